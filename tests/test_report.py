"""`python -m speedrun.report`: leaderboard (Markdown + CSV) and loss curves from run directories."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from speedrun.report import report

PNG = b"\x89PNG\r\n\x1a\n"


def _run_dir(d: Path, rate: str, *, status="done", val=(3.2, 3.0, 2.9), target=None, world=1, wall=360.0,
             extra=None, summary=True):
    """A run directory as the trainer and Hydra leave it: summary.json, metrics.jsonl, .hydra/overrides.yaml."""
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(f"- objective.mask_rate={rate}\n- model=unet_tiny\n")
    rows = []
    for step in range(1, 31):
        rows.append({"step": step, "tokens": step * 1000, "train_loss": 3.5 - step * 0.02, "tokens_per_s": 100.0,
                     "train_seconds": step * 10.0, "wall_seconds": step * 11.0})
        if step % 10 == 0:
            rows.append({"step": step, "tokens": step * 1000, "train_seconds": step * 10.0,
                         "val_loss": val[step // 10 - 1]})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        s = {"status": status, "val_loss": val[-1], "best_val_loss": min(val), "unigram_loss": 2.87,
             "n_params": 133_065_357, "tokens": 30_000, "tokens_per_s": 100.0, "train_seconds": 300.0,
             "wall_seconds": wall, "target_loss": target, "target": None, "step": 30,
             "batch": {"world_size": world, "micro_batch_tokens": 1000, "grad_accum": 1, "batch_tokens": 1000},
             "device": "cuda:0", **(extra or {})}
        if target is not None:
            hit = next((r for r in rows if r.get("val_loss") is not None and r["val_loss"] <= target), None)
            if hit:
                s["target"] = {"loss": target, "step": hit["step"], "tokens": hit["tokens"],
                               "train_seconds": hit["train_seconds"], "val_loss": hit["val_loss"]}
        (d / "summary.json").write_text(json.dumps(s))


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "mlm_rates" / "2026-01-01_00-00-00_000000"
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper\n"
        "    max_batch_size: null\n    params:\n      objective.mask_rate: 0.1,0.2,0.3,0.4\n"
        "  overrides:\n    task:\n    - model=unet_tiny\n")
    _run_dir(root / "0", "0.1", val=(3.3, 3.1, 3.05), target=3.0, extra={"probe/ss3_acc": 0.61})
    _run_dir(root / "1", "0.2", val=(3.2, 2.95, 2.90), target=3.0, world=8, wall=3600.0)  # hits 3.0 at step 20
    _run_dir(root / "2", "0.3", val=(2.99, 2.92, 2.91), target=3.0, status="failed")      # hits 3.0 at step 10
    (root / "2" / ".submitit").mkdir()
    # job 3 never started: no directory at all
    return root


def test_sweep_leaderboard(sweep, tmp_path):
    res = report(sweep, price=2.0)
    md, rows = res["text"], res["rows"]
    assert res["markdown"] == sweep / "leaderboard.md" and res["markdown"].read_text() == md
    # best first: reached the target soonest (job 2 at 100 s, then job 1 at 200 s), then by loss, missing last
    assert [r["run"] for r in rows] == ["2", "1", "0", "3"]
    assert [r["objective.mask_rate"] for r in rows] == ["0.3", "0.2", "0.1", "0.4"]  # the varied knob
    assert [r["status"] for r in rows] == ["failed", "done", "done", "missing"]
    one = rows[1]
    assert (one["time_to_target_s"], one["tokens_to_target"], one["steps_to_target"]) == (200.0, 20_000, 20)
    assert one["gpu_hours"] == pytest.approx(8.0) and one["cost_usd"] == pytest.approx(16.0)  # 8 ranks x 1 h x $2
    assert rows[2]["time_to_target_s"] is None and rows[2]["best_val_loss"] == 3.05
    assert rows[2]["probe/ss3_acc"] == 0.61 and rows[0]["probe/ss3_acc"] is None  # future keys as columns
    # Markdown: the shared override is stated once, not a column; the varied one is a column
    assert "common overrides: `model=unet_tiny`" in md
    header = next(line for line in md.splitlines() if line.startswith("| rank"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    for c in ("objective.mask_rate", "status", "val_loss", "best_val_loss", "time_to_target_s", "tokens_to_target",
              "tokens_per_s", "n_params", "gpu_hours", "cost_usd", "probe/ss3_acc"):
        assert c in cols, c
    assert "model" not in cols and "$16.00" in md and "133.07M" in md and "1 missing" in md
    # CSV: the same rows, raw numbers
    with open(sweep / "leaderboard.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["2", "1", "0", "3"]
    assert float(table[1]["val_loss"]) == 2.90 and float(table[1]["cost_usd"]) == pytest.approx(16.0)
    # plots: train and validation loss against tokens and against time
    names = sorted(p.name for p in res["plots"])
    assert names == ["loss_vs_time.png", "loss_vs_tokens.png"]
    for p in res["plots"]:
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 10_000


def test_a_folder_of_several_sweeps(sweep):
    """outputs/sweeps/<name>/ holds one folder per launch: all their runs, missing jobs included."""
    rows = report(sweep.parent)["rows"]
    assert sorted(r["run"] for r in rows) == sorted(f"{sweep.name}/{n}" for n in "0123")
    assert [r["status"] for r in rows if r["run"].endswith("/3")] == ["missing"]


def test_target_can_be_chosen_after_the_fact(sweep):
    rows = {r["run"]: r for r in report(sweep, target=2.93)["rows"]}
    assert rows["1"]["time_to_target_s"] == 300.0 and rows["2"]["time_to_target_s"] == 200.0
    assert rows["0"]["time_to_target_s"] is None and rows["1"]["target_loss"] == 2.93


def test_single_run_dir(tmp_path):
    run = tmp_path / "run"
    _run_dir(run, "0.2", val=(3.2, 3.0, 2.9))
    res = report(run, out=tmp_path / "out")
    assert len(res["rows"]) == 1 and res["rows"][0]["run"] == "." and res["rows"][0]["status"] == "done"
    assert (tmp_path / "out" / "leaderboard.md").exists() and (tmp_path / "out" / "loss_vs_time.png").exists()
    assert len([line for line in res["text"].splitlines() if line.startswith("| 1 ")]) == 1


def test_report_of_a_real_run(tiny_cfg, tmp_path):
    from speedrun.train import run

    run(tiny_cfg("train.max_steps=4", "eval.every_steps=2", "target_loss=9.0", "checkpoint.final=false"), tmp_path)
    (row,) = report(tmp_path)["rows"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert row["status"] == "done" and row["val_loss"] == summary["val_loss"] and row["n_params"] == summary["n_params"]
    assert row["steps_to_target"] == 2 and row["world_size"] == 1 and row["tokens_per_s"] > 0


def test_cli(sweep, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "speedrun.report", str(sweep), "--price-per-gpu-hour", "1.5",
                        "--out", str(tmp_path / "rep")], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| rank | run |" in r.stdout and "$12.00" in r.stdout  # 8 GPU-hours x $1.5
    assert {p.name for p in (tmp_path / "rep").iterdir()} == {"leaderboard.md", "leaderboard.csv", "arms.csv",
                                                              "loss_vs_tokens.png", "loss_vs_time.png"}
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run([sys.executable, "-m", "speedrun.report", str(empty)], cwd=ROOT, capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_report_does_not_import_torch():
    code = "import sys, speedrun.report; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_wall_seconds_of_a_run_exclude_earlier_runs_in_the_same_process(tiny_cfg, tmp_path):
    """The leaderboard's GPU-hours and cost are ranks x wall_seconds. Hydra's basic launcher (and
    submitit_local's, and any notebook) runs the jobs of a sweep one after another in ONE process; the
    trainer measures wall_seconds (and time_to_first_step) from the process start, so job k is charged
    for jobs 0..k-1 too (seen: 6.1, 8.5, 10.8, 13.1, 15.5 s for five identical 1.3 s jobs)."""
    from speedrun.train import run

    run(tiny_cfg("train.max_steps=2", "checkpoint.final=false"), tmp_path / "first")
    time.sleep(3.0)
    t0 = time.time()
    second = run(tiny_cfg("train.max_steps=2", "checkpoint.final=false"), tmp_path / "second")
    elapsed = time.time() - t0
    assert second["wall_seconds"] <= elapsed + 0.5, (second["wall_seconds"], elapsed)


# ---- knobs from each run's own config, arms and seeds, results folders (issue 16) --------------------
def _config_run(d: Path, *, rate: float, seed: int, val: float, stderr: float = 0.01, status: str = "done",
                via: str = "run.json", overrides: str | None = None, extra: dict | None = None) -> None:
    """A run folder as the results page keeps it: run.json (or reproduce.yaml), summary.json, metrics.jsonl."""
    d.mkdir(parents=True)
    cfg = {"model": {"arch": "unet", "dim": 64}, "objective": {"name": "mlm", "mask_rate": rate}, "seed": seed,
           "train": {"max_steps": 30}, **(extra or {})}
    if via == "run.json":
        (d / "run.json").write_text(json.dumps({"signature": "x", "config": cfg}))
    else:
        import yaml

        full = {"defaults": ["schema", "_self_"], **cfg, "name": d.name, "log": {"progress": d.name},
                "hardware": {"compile": d.name == "0"}, "hydra": {"run": {"dir": "x"}}}
        (d / "reproduce.yaml").write_text(yaml.safe_dump(full))
    if overrides is not None:
        (d / ".hydra").mkdir()
        (d / ".hydra" / "overrides.yaml").write_text(overrides)
    rows = [{"step": s, "tokens": s * 100, "train_seconds": s * 1.0, "train_loss": 3.5 - s * 0.01} for s in (10, 20, 30)]
    rows[-1]["val_loss"] = val
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(json.dumps({"status": status, "val_loss": val if status == "done" else None,
                                                "val_loss_stderr": stderr, "step": 30, "tokens": 3000,
                                                "batch": {"world_size": 1, "batch_tokens": 100}}))


def test_knobs_come_from_each_runs_own_config(tmp_path):
    """Not from .hydra/overrides.yaml (a re-issued sweep may have matched runs by identity in another order),
    and settings that do not change what is trained (name, log, hardware.compile) are no knobs."""
    root = tmp_path / "sweep"
    _config_run(root / "0", rate=0.2, seed=0, val=2.9, overrides="- objective.mask_rate=0.3\n")
    _config_run(root / "1", rate=0.3, seed=0, val=2.8, overrides="- objective.mask_rate=0.2\n", via="reproduce.yaml")
    _config_run(root / "2", rate=0.3, seed=1, val=2.85, via="reproduce.yaml")
    from speedrun.report import build_rows, load_runs

    rows, columns = build_rows(load_runs(root))
    assert [c for c in columns if "." in c or c == "seed"] == ["objective.mask_rate", "seed"]
    assert {r["run"]: (r["objective.mask_rate"], r["seed"]) for r in rows} == \
        {"0": ("0.2", "0"), "1": ("0.3", "0"), "2": ("0.3", "1")}


@pytest.fixture
def arms_sweep(tmp_path):
    root = tmp_path / "sweep"
    for i, (rate, seed, val, se) in enumerate([(0.2, 0, 2.90, 0.01), (0.2, 1, 2.92, 0.01), (0.3, 0, 2.80, 0.01),
                                               (0.3, 1, 2.84, 0.01), (0.4, 0, 2.95, 0.02)]):
        _config_run(root / str(i), rate=rate, seed=seed, val=val, stderr=se)
    _config_run(root / "5", rate=0.4, seed=1, val=9.9, status="failed")  # not a result: no arm counts it
    return root


def test_arms_seeds_and_differences_from_the_baseline(arms_sweep, tmp_path):
    res = report(arms_sweep, out=tmp_path / "out")
    arms = {a["objective.mask_rate"]: a for a in res["arms"]}
    a2, a3, a4 = arms["0.2"], arms["0.3"], arms["0.4"]
    assert (a2["n_seeds"], a2["seeds"], a4["n_seeds"]) == (2, "0,1", 1)
    assert a2["val_loss_mean"] == pytest.approx(2.91) and a2["seed_std"] == pytest.approx(0.0141421, rel=1e-4)
    assert a2["seed_sem"] == pytest.approx(0.01) and a2["se"] == pytest.approx(0.01) and a2["se_from"] == "seeds (n=2)"
    assert a2["val_loss_stderr"] == pytest.approx(0.01 * 2 ** 0.5 / 2)  # mask-sampling se of the arm's mean
    assert a4["seed_std"] is None and a4["se"] == pytest.approx(0.02) and a4["se_from"] == "val_loss_stderr"
    assert a2["baseline"] and "diff" not in a2  # the first arm by default
    assert a3["diff"] == pytest.approx(-0.09) and a3["diff_se"] == pytest.approx((0.02 ** 2 + 0.01 ** 2) ** 0.5)
    assert a4["diff"] == pytest.approx(0.04) and a4["diff_se"] == pytest.approx((0.02 ** 2 + 0.01 ** 2) ** 0.5)
    assert a4["diff_se_from"] == "arm: val_loss_stderr; baseline: seeds (n=2)"
    md = res["markdown"].read_text()
    assert "## Arms" in md and "### Difference from the baseline: objective.mask_rate=0.2 (the first arm)" in md
    assert "| objective.mask_rate=0.3 | -0.0900 | 0.0224 | -4.02 |" in md
    with open(tmp_path / "out" / "arms.csv") as f:
        table = {r["arm"]: r for r in csv.DictReader(f)}
    assert float(table["objective.mask_rate=0.3"]["diff"]) == pytest.approx(-0.09)
    assert table["objective.mask_rate=0.2"]["baseline"] == "True"

    res = report(arms_sweep, out=tmp_path / "out", baseline=["objective.mask_rate=0.30"])  # spelt otherwise
    arms = {a["objective.mask_rate"]: a for a in res["arms"]}
    assert arms["0.3"]["baseline"] and arms["0.2"]["diff"] == pytest.approx(0.09)
    assert "--baseline objective.mask_rate=0.30" in res["markdown"].read_text()


def test_bad_baselines_are_one_line(arms_sweep):
    from speedrun.errors import SpeedrunError

    with pytest.raises(SpeedrunError, match="the arms do not differ in model.dim; they differ in objective.mask_rate"):
        report(arms_sweep, baseline=["model.dim=64"])
    with pytest.raises(SpeedrunError, match=r"no finished arm has it \(values there: 0.2, 0.3, 0.4\)"):
        report(arms_sweep, baseline=["objective.mask_rate=0.5"])
    r = subprocess.run([sys.executable, "-m", "speedrun.report", str(arms_sweep), "--baseline", "nokey"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --baseline nokey") and len(r.stderr.splitlines()) == 1


def test_a_results_folder_of_four_files_per_run(tiny_cfg, tmp_path):
    """The results page keeps summary.json, metrics.jsonl, run.json and reproduce.yaml per run, nothing else
    (no checkpoints, no .hydra/): the report reads the same, and leaderboard.md names the command that
    writes it again."""
    import shutil

    from speedrun.config import to_dict
    from speedrun.task import write_reproduce
    from speedrun.train import run

    results = tmp_path / "results" / "tied"
    for seed, tie in ((0, "true"), (1, "true"), (0, "false")):
        cfg = tiny_cfg("train.max_steps=2", f"seed={seed}", f"model.tie_embeddings={tie}")
        d = tmp_path / "runs" / f"{tie}{seed}"
        run(cfg, d)
        write_reproduce(d, to_dict(cfg))
        (results / d.name).mkdir(parents=True)
        for name in ("summary.json", "metrics.jsonl", "run.json", "reproduce.yaml"):
            shutil.copy(d / name, results / d.name / name)
    out = tmp_path / "page"
    res = report(results, out=out, baseline=["model.tie_embeddings=false"])
    assert {r["status"] for r in res["rows"]} == {"done"} and len(res["rows"]) == 3
    assert {a["arm"]: a["n_seeds"] for a in res["arms"]} == {"model.tie_embeddings=True": 2,
                                                             "model.tie_embeddings=False": 1}
    md = res["markdown"].read_text()
    cmd = next(line for line in md.splitlines() if line.startswith("- regenerate:")).split("`")[1]
    assert cmd == f"python -m speedrun.report {results} --baseline model.tie_embeddings=false --out {out}"
    import shlex

    args = shlex.split(cmd)
    assert subprocess.run([sys.executable, *args[1:]], cwd=ROOT, capture_output=True, timeout=120).returncode == 0
    strip = lambda text: [line for line in text.splitlines() if not line.startswith("- regenerate:")]  # noqa: E731
    assert strip((out / "leaderboard.md").read_text()) == strip(md)


def test_a_running_and_partly_failed_sweep(tmp_path):
    """While a sweep runs (or after some jobs failed) the report works and says which runs are missing."""
    from speedrun.status import record_submission

    root = tmp_path / "sweep"
    _config_run(root / "0", rate=0.2, seed=0, val=2.9)
    _config_run(root / "1", rate=0.3, seed=0, val=2.8, status="running")
    _config_run(root / "2", rate=0.4, seed=0, val=2.7, status="failed")
    record_submission(root, [(n, f"9_{n}", [f"objective.mask_rate={r}"]) for n, r in enumerate((0.2, 0.3, 0.4, 0.5))],
                      detached=True)
    res = report(root)
    assert {r["run"]: r["status"] for r in res["rows"]} == {"0": "done", "1": "running", "2": "failed", "3": "missing"}
    assert {r["run"]: r["objective.mask_rate"] for r in res["rows"]}["3"] == "0.5"  # from the job's overrides
    md = res["text"]
    assert f"missing (never started): 3 - re-issue the sweep with hydra.sweep.dir={root}" in md
    assert "still running: 1" in md and "failed: 2" in md
    assert [a["arm"] for a in res["arms"]] == ["objective.mask_rate=0.2"]  # only finished runs make arms
