"""Training health: non-finite steps are skipped (and too many stop the run), out-of-memory and full
disks stop with one line that names the fix, SIGTERM saves; every failure exits non-zero."""
from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time

import pytest
import torch

import speedrun.train as T
from speedrun import checkpoint as ckpt
from speedrun.train import RunFailed, run


def _inject(monkeypatch, bad_calls: set, value=float("nan")):
    """Make the training loss non-finite on the given (1-based) calls."""
    real = T.dense_loss
    calls = {"n": 0}

    def fake(*a, **k):
        loss = real(*a, **k)
        calls["n"] += 1
        if calls["n"] in bad_calls:
            loss = loss * value
        return loss

    monkeypatch.setattr(T, "dense_loss", fake)


def _rows(d):
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_step_is_skipped(tiny_cfg, tmp_path, monkeypatch, value):
    _inject(monkeypatch, {3}, value)
    summary = run(tiny_cfg("train.max_steps=6", "checkpoint.final=false"), tmp_path)
    assert summary["status"] == "done" and summary["skipped_steps"] == 1 and summary["step"] == 6
    rows = [r for r in _rows(tmp_path) if "train_loss" in r]
    assert all(r["train_loss"] is not None for r in rows)  # the bad step is not averaged into the log
    assert all(r["grad_norm"] is not None for r in rows if r["step"] != 3)
    assert rows[-1]["skipped_steps"] == 1


def test_skipped_step_leaves_parameters_and_optimizer_untouched(tiny_cfg, tmp_path, monkeypatch):
    """The optimizers do not step on a bad step, and the weights stay finite."""
    real_step = torch.optim.Adam.step

    _inject(monkeypatch, {3})
    model_holder = {}
    real_init = T.ProteinLM.__init__

    def keep(self, *a, **k):
        real_init(self, *a, **k)
        model_holder["m"] = self

    monkeypatch.setattr(T.ProteinLM, "__init__", keep)
    steps_seen = []

    def spy(self, *a, **k):
        steps_seen.append(1)
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    run(tiny_cfg("train.max_steps=4", "checkpoint.final=false"), tmp_path)
    assert len(steps_seen) == 3  # Adam stepped on steps 1, 2 and 4 only
    assert all(torch.isfinite(p).all() for p in model_holder["m"].parameters())


def test_too_many_bad_steps_fail_the_run_and_keep_the_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    _inject(monkeypatch, set(range(5, 100)))
    with pytest.raises(RunFailed, match="3 consecutive steps with a non-finite"):
        run(tiny_cfg("train.max_steps=20", "checkpoint.every_steps=2", "train.max_bad_steps=3"), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite" in summary["reason"]
    good = ckpt.latest(tmp_path / "checkpoints")
    assert good is not None and good.name == "step-000004"
    state = ckpt.load(good, T.ProteinLM(tiny_cfg().model), torch.device("cpu"))
    assert state["step"] == 4


def test_out_of_memory_names_the_micro_batch(tiny_cfg, tmp_path, monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(T, "dense_loss", oom)
    with pytest.raises(RunFailed) as err:
        run(tiny_cfg("train.max_steps=3"), tmp_path)
    msg = str(err.value)
    assert "hardware.micro_batch_tokens=1024" in msg and "hardware.micro_batch_tokens=512" in msg
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


def test_full_disk_during_training_stops_cleanly(tiny_cfg, tmp_path, monkeypatch):
    real = torch.save
    calls = {"n": 0}

    def save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(ckpt.CheckpointError, match="disk is full"):
        run(tiny_cfg("train.max_steps=8", "checkpoint.every_steps=2"), tmp_path)
    monkeypatch.setattr(torch, "save", real)
    assert ckpt.latest(tmp_path / "checkpoints").name == "step-000002"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "CheckpointError" in summary["reason"]


def test_sigterm_saves_and_exits_non_zero(tiny_cfg, tmp_path):
    metrics = tmp_path / "metrics.jsonl"

    def term():
        deadline = time.time() + 60
        while time.time() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    threading.Thread(target=term, daemon=True).start()
    with pytest.raises(SystemExit) as exc:
        run(tiny_cfg("train.max_steps=50"), tmp_path)
    assert exc.value.code == 128 + signal.SIGTERM
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["reason"]
    assert ckpt.latest(tmp_path / "checkpoints") is not None
