"""Tracking: W&B in offline mode driven through a fake loop (and, once train.py uses the tracker, a real
run), run-id reuse on resume, finish() on exceptions, the key never written, console progress."""
from __future__ import annotations

import io
import json
import logging
import struct
import time
from pathlib import Path

import pytest

import speedrun.train
from speedrun.config import RunConfig
from speedrun.tracking import ID_FILE, Tracker, print_config_tree, sweep_group, wandb_wanted

SECRET = "wandbkey_THIS_MUST_NOT_LEAK_0123456789abcdef"


def read_wandb_records(path: Path) -> list:
    """Records of a .wandb transaction log (W&B's LevelDB-style log of wandb_internal_pb2.Record)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too small for a header is padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if (n == 0 and kind == 0) or pos + n > len(data):  # zero padding, or a record still being written
            break
        buf += data[pos:pos + n]
        pos += n
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
            buf = b""
    return records


def _complete_records(path: Path, timeout: float = 15.0) -> list:
    """wandb-core writes the log asynchronously: finish() can return before the file is flushed, so wait
    for its exit record."""
    deadline = time.time() + timeout
    while True:
        records = read_wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
            return records
        time.sleep(0.1)


def offline_run(wandb_dir: Path, run_id: str) -> dict:
    """History rows, config, summary and exit code of the offline run(s) with this id."""
    dirs = sorted((wandb_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert dirs, f"no offline run {run_id} under {wandb_dir}"
    out = {"dirs": dirs, "history": [], "config": {}, "summary": {}, "exit_code": None}
    for d in dirs:
        for rec in _complete_records(d / f"run-{run_id}.wandb"):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in rec.history.item})
            elif kind == "run":
                out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "config":
                out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
            elif kind == "summary":
                for i in rec.summary.update:
                    out["summary"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
            elif kind == "exit":
                out["exit_code"] = rec.exit.exit_code
    return out


def assert_no_secret(root: Path) -> None:
    for p in Path(root).rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert SECRET.encode() not in p.read_bytes(), p


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    return tmp_path / "wb"


def _cfg(**kw) -> RunConfig:
    cfg = RunConfig()
    cfg.log.progress = "plain"
    cfg.log.print_config = False
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def fake_loop(tracker: Tracker, steps: range, total: int) -> None:
    tracker.start(total_steps=total, start_step=steps.start, info={"n_params": 1234})
    for step in steps:
        row = {"step": step + 1, "tokens": 1024 * (step + 1), "train_loss": 3.0 - 0.1 * step, "lr_mult": 1.0,
               "tokens_per_s": 5000.0 + step, "window": 256}
        tracker.log(row)
        tracker.progress(step + 1, row["train_loss"], row["tokens_per_s"], extra="lr x1.000")
    tracker.log({"step": steps.stop, "tokens": 1024 * steps.stop, "val_loss": 2.5, "val_ppl": 12.2})


def test_when_wandb_is_on():
    assert not wandb_wanted(_cfg(logger="auto"), {})
    assert wandb_wanted(_cfg(logger="auto"), {"WANDB_API_KEY": "x"})
    assert wandb_wanted(_cfg(logger="wandb"), {})
    assert not wandb_wanted(_cfg(logger="none"), {"WANDB_API_KEY": "x"})
    assert not wandb_wanted(_cfg(logger="wandb"), {"WANDB_API_KEY": "x", "WANDB_MODE": "disabled"})
    assert sweep_group(Path("/x/outputs/sweeps/quickstart/2026-01-01_10-00-00_000001/3")) == \
        "quickstart/2026-01-01_10-00-00_000001"
    assert sweep_group(Path("/x/outputs/runs/quickstart/2026-01-01_10-00-00_000001")) is None


def test_offline_run_holds_metrics_config_summary_and_is_resumed(offline, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stream = io.StringIO()
    tracker = Tracker(_cfg(), run_dir, is_main=True, stream=stream)
    fake_loop(tracker, range(0, 4), total=8)
    tracker.summary({"status": "running", "val_loss": 2.5, "n_params": 1234, "target": None})
    tracker.finish("preempted")
    run_id = (run_dir / ID_FILE).read_text().strip()
    assert tracker.run_id == run_id and len(run_id) == 8
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("step 4/8 (50%) | loss 2.7000 | 5.0k tok/s | lr x1.000")
    assert "ETA" in lines[-1]

    time.sleep(1.05 - time.time() % 1)  # W&B names offline dirs by the second: keep the two attempts apart
    resumed = Tracker(_cfg(), run_dir, is_main=True, stream=io.StringIO())  # resume: same id, same W&B run
    fake_loop(resumed, range(4, 8), total=8)
    resumed.summary({"status": "done", "val_loss": 2.4})
    resumed.finish()
    assert resumed.run_id == run_id

    got = offline_run(offline, run_id)
    assert len(got["dirs"]) == 2  # one offline dir per attempt; `wandb sync` merges them into one run
    train = [(r["step"], r["train_loss"]) for r in got["history"] if "train_loss" in r]
    assert train == [(s + 1, pytest.approx(3.0 - 0.1 * s)) for s in range(8)]
    assert [r["val_loss"] for r in got["history"] if "val_loss" in r] == [2.5, 2.5]
    assert got["config"]["model"]["dim"] == 768 and got["config"]["run"] == {"n_params": 1234}
    assert got["config"]["run_dir"] == str(run_dir)
    assert got["summary"]["status"] == "done" and got["summary"]["val_loss"] == 2.4
    assert got["exit_code"] == 0
    assert_no_secret(tmp_path)


def test_finish_is_called_on_exceptions(offline, tmp_path):
    import wandb

    with pytest.raises(RuntimeError, match="boom"):
        with Tracker(_cfg(logger="wandb"), tmp_path, is_main=True, stream=io.StringIO()) as tracker:
            fake_loop(tracker, range(0, 2), total=10)
            raise RuntimeError("boom")
    assert wandb.run is None and tracker.run is None
    got = offline_run(offline, tracker.run_id)
    assert got["exit_code"] == 1 and got["summary"]["status"] == "failed"
    assert [r["train_loss"] for r in got["history"] if "train_loss" in r] == [3.0, pytest.approx(2.9)]


def test_off_without_key_and_on_other_ranks(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    stream = io.StringIO()
    tracker = Tracker(_cfg(), tmp_path, is_main=True, stream=stream)  # logger=auto, no key
    fake_loop(tracker, range(0, 3), total=3)
    tracker.finish()
    assert tracker.run_id is None and not (tmp_path / ID_FILE).exists() and not (tmp_path / "wandb").exists()
    assert len(stream.getvalue().splitlines()) == 3
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    quiet = io.StringIO()
    other = Tracker(_cfg(logger="wandb"), tmp_path, is_main=False, stream=quiet)
    fake_loop(other, range(0, 3), total=3)
    other.finish()
    assert quiet.getvalue() == "" and not (tmp_path / ID_FILE).exists()


def test_bar_keeps_log_lines_above_it_and_progress_in_the_file(tmp_path):
    log = logging.getLogger("speedrun")
    saved = list(log.handlers), log.propagate, log.level
    log.setLevel(logging.INFO)
    console = io.StringIO()
    ch = logging.StreamHandler(console)
    fh = logging.FileHandler(tmp_path / "rank0.log")
    for h in list(log.handlers):
        log.removeHandler(h)
    log.addHandler(ch)
    log.addHandler(fh)
    log.propagate = False
    try:
        bar = io.StringIO()
        cfg = _cfg(logger="none")
        cfg.log.progress = "bar"
        tracker = Tracker(cfg, tmp_path, is_main=True, stream=bar)
        fake_loop(tracker, range(0, 3), total=3)
        log.info("step 3 | val_loss 2.5000")
        tracker.finish()
        assert log.handlers == [ch, fh]
    finally:
        for h in list(log.handlers):
            log.removeHandler(h)
        for h in saved[0]:
            log.addHandler(h)
        log.propagate, log.level = saved[1], saved[2]
        fh.close()
    assert "3/3" in bar.getvalue() and "loss=2.8000" in bar.getvalue() and "tok/s=5.0k" in bar.getvalue()
    assert "val_loss 2.5000" in console.getvalue() and "step 3/3 (100%)" not in console.getvalue()
    text = (tmp_path / "rank0.log").read_text()
    assert "step 3/3 (100%) | loss 2.8000" in text and "val_loss 2.5000" in text


def test_config_tree(capsys):
    cfg = RunConfig()
    from speedrun.config import to_dict

    print_config_tree(to_dict(cfg))
    out = capsys.readouterr().out
    for text in ("optimizer", "betas: [0.8, 0.95]", "dim: 768", "logger: 'auto'", "wandb_project: 'speedrun-plm'"):
        assert text in out, text
    tracker = Tracker(_cfg(logger="none"), Path("."), is_main=True, stream=io.StringIO())
    tracker.cfg.log.print_config = True
    tracker.start(total_steps=1)
    tracker.finish()
    assert "model" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(speedrun.train, "Tracker"),
                    reason="train.py does not use speedrun.tracking.Tracker yet (issue 7 integration)")
def test_training_logs_to_wandb_offline(tiny_cfg, tmp_path, offline):
    run_dir = tmp_path / "run"
    summary = speedrun.train.run(tiny_cfg("logger=wandb", "train.max_steps=3"), run_dir)
    assert summary["status"] == "done"
    run_id = (run_dir / ID_FILE).read_text().strip()
    got = offline_run(offline, run_id)
    assert [r["step"] for r in got["history"] if "train_loss" in r] == [1, 2, 3]
    assert any("val_loss" in r for r in got["history"])
    assert got["summary"]["status"] == "done" and got["summary"]["val_loss"] == pytest.approx(summary["val_loss"])
    assert got["exit_code"] == 0
    assert_no_secret(tmp_path)
