"""Attacks, as an attacker and as a careless user would try them (issue 18), each a class of its own:
no code runs from a file; one owner per run directory; a re-issued sweep never touches finished runs;
a finished or running run is never lost; nothing a user made is overwritten; nonsense never ends as
done; and the one-line errors of the rest. The data-side attacks are in tests/test_attacks_data.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY
from speedrun import checkpoint as ckpt
from speedrun.errors import SpeedrunError
from speedrun.train import run


def _rows(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny finished run with two checkpoints (steps 2 and 4)."""
    from conftest import typed

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPEEDRUN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        torch.set_num_threads(1)
        d = tmp_path_factory.mktemp("finished")
        assert run(typed(TINY + ["train.max_steps=4", "checkpoint.every_steps=2"]), d)["status"] == "done"
    return d


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- 1. no code execution from a file -------------------------------------------------------------
class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _poison(step_dir: Path, marker: Path, legacy: bool) -> None:
    """Replace state.pt with a pickle that runs code, and fix the checksums as an attacker would."""
    payload = {"optimizers": [], "rng": {}, "boom": _Payload(marker)}
    if legacy:  # a 0.1-style checkpoint: the config inside state.pt, a plain-text marker
        payload["config"] = json.loads((step_dir / "config.json").read_text())["run"]
        for name in ("config.json", "trainer_state.json"):
            (step_dir / name).unlink()
    torch.save(payload, step_dir / "state.pt")
    if legacy:
        (step_dir / "COMPLETE").write_text("4\n")
    else:
        marker_json = json.loads((step_dir / "COMPLETE").read_text())
        marker_json["files"]["state.pt"] = ckpt.sha256(step_dir / "state.pt")
        (step_dir / "COMPLETE").write_text(json.dumps(marker_json))


@pytest.mark.parametrize("legacy", [False, True], ids=["checkpoint", "legacy-checkpoint"])
def test_a_crafted_state_file_runs_no_code_anywhere(finished, tmp_path, legacy, tiny_cfg):
    import speedrun
    from speedrun.export import export

    d = _copy(finished, tmp_path / "run")
    marker = tmp_path / "PWNED"
    newest = ckpt.find(d / "checkpoints")
    _poison(newest, marker, legacy)
    attempts = [lambda: speedrun.load(d), lambda: export(d, tmp_path / "out"),
                lambda: (d / "summary.json").unlink() or run(tiny_cfg("train.max_steps=4", "checkpoint.every_steps=2"), d)]
    if legacy:
        attempts = attempts[:2]
    for attempt in attempts:
        try:
            attempt()
        except SpeedrunError as exc:
            assert "\n" not in str(exc) and "state.pt" in str(exc)
        assert not marker.exists(), "unpickling ran the payload"


def test_the_generate_cli_refuses_a_crafted_checkpoint_in_one_line(finished, tmp_path):
    d = _copy(finished, tmp_path / "run")
    marker = tmp_path / "PWNED"
    _poison(ckpt.find(d / "checkpoints"), marker, legacy=True)
    r = subprocess.run([sys.executable, "-m", "speedrun.generate", str(d), "num=1", "length=8"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert not marker.exists()


# ---- 2. one owner per run directory ----------------------------------------------------------------
def test_a_second_process_on_a_busy_run_dir_stops_naming_the_holder(tiny_cfg, tmp_path):
    from speedrun.errors import FolderError
    from speedrun.fsutil import FolderLock

    with FolderLock(tmp_path, "run directory"):  # as another process holding it would
        with pytest.raises(FolderError, match=rf"in use by pid {os.getpid()} on host"):
            run(tiny_cfg("train.max_steps=2"), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()
    assert run(tiny_cfg("train.max_steps=2"), tmp_path)["status"] == "done"  # released: it is free again


# ---- 3. a re-issued sweep never touches finished runs ----------------------------------------------
def _launch(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.mark.slow
def test_a_reissued_sweep_in_another_order_finds_each_run_by_identity(tmp_path):
    sweep = tmp_path / "sweep"
    base = [*TINY, "train.max_steps=2", f"hydra.sweep.dir={sweep}", "log.progress=plain"]
    assert _launch("-m", "objective.mask_rate=0.2,0.3", *base).returncode == 0
    before = {p.parent.name: p.read_bytes() for p in sweep.glob("*/summary.json")}
    r = _launch("-m", "objective.mask_rate=0.3,0.2", *base)  # the values swapped: job 0 is now 0.3
    assert r.returncode == 0, r.stderr[-2000:]
    after = {p.parent.name: p.read_bytes() for p in sweep.glob("*/summary.json")}
    assert after == before  # both finished runs untouched, no new run
    rates = {n: json.loads((sweep / n / "run.json").read_text())["config"]["objective"]["mask_rate"] for n in after}
    assert rates == {"0": 0.2, "1": 0.3}
    from speedrun.report import build_rows, load_runs

    rows, _ = build_rows(load_runs(sweep))
    assert {r["run"]: float(r["objective.mask_rate"]) for r in rows} == {"0": 0.2, "1": 0.3}


# ---- 4. never lose a finished or running run -------------------------------------------------------
def test_a_missing_test_split_stops_before_step_one(tiny_cfg, tmp_path):
    from speedrun.data import sample_dir
    from speedrun.errors import DataError

    shards = tmp_path / "shards"
    shards.mkdir()
    for f in sample_dir().glob("*_valid_*.bin"):
        shutil.copy(f, shards)
    for f in sorted(sample_dir().glob("*_train_*.bin"))[:1]:
        shutil.copy(f, shards)
    with pytest.raises(DataError, match="test"):
        run(tiny_cfg("data=local", f"data.path={shards}", "eval.test=true", "train.max_steps=2"), tmp_path / "r")
    assert not (tmp_path / "r" / "metrics.jsonl").exists()  # nothing trained, nothing lost


def test_a_dry_run_never_writes_into_an_existing_run(finished, tmp_path, tiny_cfg):
    d = _copy(finished, tmp_path / "run")
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    out = run(tiny_cfg("train.max_steps=4", "checkpoint.every_steps=2", "dry_run=true"), d)
    assert out["status"] == "dry_run"
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("damage", ["truncated-weights", "truncated-state", "stray-bak", "edited-json"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(finished, tmp_path, damage, caplog):
    d = _copy(finished, tmp_path / "run")
    newest = ckpt.find(d / "checkpoints")
    if damage == "truncated-weights":
        with open(newest / "model.safetensors", "r+b") as f:
            f.truncate(100)
    elif damage == "truncated-state":
        with open(newest / "state.pt", "r+b") as f:
            f.truncate(10)
    elif damage == "edited-json":
        (newest / "trainer_state.json").write_text('{"step": 999}')
    else:  # a folder left by a hand-made backup: not a checkpoint, never picked
        shutil.copytree(newest, d / "checkpoints" / f"{newest.name}.bak")
    import logging

    logging.getLogger("speedrun").addHandler(caplog.handler)  # the speedrun logger does not propagate
    try:
        found = ckpt.find(d / "checkpoints")
    finally:
        logging.getLogger("speedrun").removeHandler(caplog.handler)
    if damage == "stray-bak":
        assert found == newest
    else:
        assert found is not None and found.name == "step-000002"
        assert any("skipping a corrupt checkpoint" in r.message for r in caplog.records)


# ---- 5. never overwrite a user's file --------------------------------------------------------------
def test_export_refuses_a_folder_with_files_it_did_not_write(finished, tmp_path):
    from speedrun.errors import FolderError
    from speedrun.export import export

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FolderError, match="did not write"):
        export(finished, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    fresh = export(finished, tmp_path / "fresh")
    with pytest.raises(FolderError, match="--overwrite"):
        export(finished, fresh)
    assert export(finished, fresh, overwrite=True) == fresh


def test_generate_never_replaces_an_input_or_an_existing_file(finished, tmp_path):
    given = tmp_path / "given.fasta"
    given.write_text(">a\nMKT__AYIAK\n")
    for args, words in ((["infill=" + str(given), "out=" + str(given), "overwrite=true"], "also an input"),
                        (["num=1", "length=8", "out=" + str(given)], "exists")):
        r = subprocess.run([sys.executable, "-m", "speedrun.generate", str(finished), *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and words in r.stderr, r.stderr
        assert given.read_text() == ">a\nMKT__AYIAK\n"


# ---- 6. nonsense never finishes as done; one line for the rest --------------------------------------
def test_generate_refuses_a_length_the_model_cannot_take(finished):
    r = subprocess.run([sys.executable, "-m", "speedrun.generate", str(finished), "num=1", "length=100000"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "length<=" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_resume_never_on_an_existing_run_and_a_changed_config_are_one_line(finished, tmp_path, tiny_cfg):
    from speedrun.errors import FolderError

    d = _copy(finished, tmp_path / "run")
    (d / "summary.json").unlink()
    with pytest.raises(FolderError, match="resume=must"):
        run(tiny_cfg("train.max_steps=4", "resume=never"), d)
    with pytest.raises(FolderError, match=r"different config \(seed\)"):
        run(tiny_cfg("train.max_steps=4", "seed=3"), d)


def test_resume_must_with_another_config_records_it(tmp_path):
    run_dir = tmp_path / "r"
    args = [*TINY, "train.max_steps=4", "checkpoint.every_steps=2", f"hydra.run.dir={run_dir}"]
    assert _launch(*args).returncode == 0
    (run_dir / "summary.json").unlink()
    r = _launch(*args[:-2], "train.max_steps=6", "resume=must", "checkpoint.every_steps=2", f"hydra.run.dir={run_dir}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "max_steps: 6" in (run_dir / "reproduce.yaml").read_text()
    assert "max_steps: 4" in (run_dir / "reproduce.prev-1.yaml").read_text()
    ident = json.loads((run_dir / "run.json").read_text())
    assert ident["config"]["train"]["max_steps"] == 6 and ident["history"][0]["config"]["train"]["max_steps"] == 4


def test_a_read_only_run_dir_is_one_line(tiny_cfg, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions; the read-only case is covered by the EROFS write tests")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(SpeedrunError) as err:
            run(tiny_cfg("train.max_steps=2"), d)
        assert "\n" not in str(err.value)
    finally:
        d.chmod(0o700)


def test_the_log_says_how_many_threads_and_follows_omp_num_threads(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    summary = run(tiny_cfg("train.max_steps=1", "checkpoint.final=false"), tmp_path)
    assert summary["threads"] == 1
    assert "1 CPU threads" in (tmp_path / "rank0.log").read_text()
    from speedrun.setup import threads

    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads(tiny_cfg(), torch.device("cpu")) == len(os.sched_getaffinity(0))
