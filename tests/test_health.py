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

from speedrun import checkpoint as ckpt
from speedrun.evaluate import Evaluator
from speedrun.step import MaskedLM, TrainStep
from speedrun.train import RunFailed, run


def _inject(monkeypatch, bad_calls: set, value=float("nan")):
    """Make the training loss non-finite on the given (1-based) calls: through the step's loss module."""
    real = MaskedLM.forward
    calls = {"n": 0}

    def fake(self, *a, **k):
        loss = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] in bad_calls:
            loss = loss * value
        return loss

    monkeypatch.setattr(MaskedLM, "forward", fake)


def _raise_oom(self, *a, **k):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


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
    """A bad step changes no weight and no optimizer state, on the device, without a host sync: after 4
    steps with step 3 bad, Adam has counted 3 updates and every weight is finite."""
    _inject(monkeypatch, {3})
    run(tiny_cfg("train.max_steps=4"), tmp_path)
    saved = ckpt.read(ckpt.find(tmp_path / "checkpoints"))
    muon, adam = saved.tensors()["optimizers"]
    assert {float(s["step"]) for s in adam["state"].values()} == {3.0}
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(saved.weights).values())
    assert all(torch.isfinite(s["momentum_buffer"]).all() for s in muon["state"].values())


def test_a_masked_update_is_exactly_no_update():
    """The device-side skip: TrainStep zeroes non-finite gradients and masks Muon's and Adam's updates."""
    import copy

    from conftest import typed
    from speedrun.models import build_model
    from speedrun.optim import build_optimizers

    cfg = typed(["model=unet_tiny"])
    model = build_model(cfg.model)
    opts = build_optimizers(model, cfg.optimizer, torch.device("cpu"))
    step = TrainStep(model, opts, objective=cfg.objective, seed=0, accum=1, dtype=torch.float32, grad_clip=0.0)
    ids = torch.randint(4, 24, (256,))
    docs = torch.zeros(256, dtype=torch.int32)
    step(lambda: (ids, docs), 0, 256)  # one good step: optimizer state exists
    before = (copy.deepcopy(model.state_dict()), [copy.deepcopy(o.state_dict()) for o in opts])
    real = MaskedLM.forward
    MaskedLM.forward = lambda self, *a, **k: real(self, *a, **k) * float("nan")
    try:
        result = step(lambda: (ids, docs), 1, 256)
    finally:
        MaskedLM.forward = real
    assert not bool(result.finite)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[0][k]), k
    for o, sd in zip(opts, before[1]):
        for pid, st in o.state_dict()["state"].items():
            for name, t in st.items():
                assert torch.equal(t, sd["state"][pid][name]), (pid, name)


def test_too_many_bad_steps_fail_the_run_and_keep_the_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    _inject(monkeypatch, set(range(5, 100)))
    with pytest.raises(RunFailed, match="3 consecutive steps with a non-finite"):
        run(tiny_cfg("train.max_steps=20", "checkpoint.every_steps=2", "train.max_bad_steps=3"), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite" in summary["reason"]
    good = ckpt.find(tmp_path / "checkpoints")
    assert good is not None and good.name == "step-000004"
    assert ckpt.read(good).trainer_state["step"] == 4


def test_out_of_memory_names_the_micro_batch(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(MaskedLM, "forward", _raise_oom)
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


def _failed_summary(d):
    summary = json.loads((d / "summary.json").read_text())
    assert summary["status"] == "failed"
    return summary


def _fails_with_one_line(cfg, run_dir) -> tuple[str, dict]:
    """run() raises RunFailed with a one-line message, which summary.json (status failed) records."""
    with pytest.raises(RunFailed) as err:
        run(cfg, run_dir)
    msg = str(err.value)
    assert "\n" not in msg
    summary = _failed_summary(run_dir)
    assert summary["reason"] == msg
    return msg, summary


def test_out_of_memory_in_the_compile_warmup_fails_cleanly(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(MaskedLM, "forward", _raise_oom)
    msg, _ = _fails_with_one_line(tiny_cfg("train.max_steps=3", "hardware.compile_warmup_steps=1"), tmp_path)
    assert "warm-up" in msg and "hardware.micro_batch_tokens=1024" in msg and "hardware.micro_batch_tokens=512" in msg


def test_out_of_memory_in_the_dry_run_probe_fails_cleanly(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(TrainStep, "measure_peak", _raise_oom)  # the probe (CUDA only) runs out of memory
    msg, _ = _fails_with_one_line(tiny_cfg("dry_run=true"), tmp_path)
    assert "dry run" in msg and "hardware.micro_batch_tokens=512" in msg


def test_out_of_memory_in_evaluation_names_eval_batch_tokens(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(Evaluator, "__call__", _raise_oom)
    msg, summary = _fails_with_one_line(tiny_cfg("train.max_steps=2", "eval.batch_tokens=2048"), tmp_path)
    assert "evaluation" in msg and "eval.batch_tokens=2048" in msg and "eval.batch_tokens=1024" in msg
    assert "hardware.micro_batch_tokens=1024" in msg and summary["step"] == 2


@pytest.mark.parametrize("err_no,words", [(errno.ENOSPC, "disk is full"), (errno.EACCES, "permission denied")])
def test_metrics_write_on_a_full_or_unwritable_disk_stops_with_one_line(tiny_cfg, tmp_path, monkeypatch, err_no,
                                                                         words):
    import builtins

    from speedrun import rundir

    calls = {"n": 0}

    def fake_open(file, mode="r", *a, **k):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            calls["n"] += 1
            if calls["n"] >= 3:
                exc = PermissionError if err_no == errno.EACCES else OSError
                raise exc(err_no, os.strerror(err_no))
        return builtins.open(file, mode, *a, **k)

    monkeypatch.setattr(rundir, "open", fake_open, raising=False)
    with pytest.raises(rundir.RunDirWriteError) as err:
        run(tiny_cfg("train.max_steps=6"), tmp_path)
    msg = str(err.value)
    assert isinstance(err.value, ckpt.CheckpointError)  # what launch.py prints as one line (speedrun/task.py)
    assert str(tmp_path / "metrics.jsonl") in msg and words in msg and "hydra.run.dir" in msg and "\n" not in msg
    summary = _failed_summary(tmp_path)
    assert "metrics.jsonl" in summary["reason"] and summary["step"] == 3


@pytest.mark.parametrize("err_no,words", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only")])
def test_summary_write_on_a_full_or_read_only_disk_stops_with_one_line(tiny_cfg, tmp_path, monkeypatch, err_no,
                                                                        words):
    import tempfile

    from speedrun import rundir

    real = tempfile.mkstemp
    calls = {"n": 0}

    def mkstemp(*a, prefix=None, **k):
        if prefix and prefix.startswith(".summary.json."):
            calls["n"] += 1
            if calls["n"] >= 2:  # the first is the "running" summary; the final one fails
                raise OSError(err_no, os.strerror(err_no))
        return real(*a, prefix=prefix, **k)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    with pytest.raises(rundir.RunDirWriteError) as err:
        run(tiny_cfg("train.max_steps=2", "checkpoint.final=false"), tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "summary.json") in msg and words in msg and "hydra.run.dir" in msg and "\n" not in msg
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "running"  # the old file is intact
    assert not list(tmp_path.glob(".summary.json.*"))


def _signal_during_final_eval(monkeypatch):
    real = Evaluator.__call__

    def evaluate(self, *a, **k):
        out = real(self, *a, **k)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets the flag: evaluation and the rest go on
        return out

    monkeypatch.setattr(Evaluator, "__call__", evaluate)


def test_stop_signal_during_final_evaluation_without_final_checkpoint_is_interrupted(tiny_cfg, tmp_path, monkeypatch):
    _signal_during_final_eval(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        run(tiny_cfg("train.max_steps=2", "checkpoint.final=false"), tmp_path)
    assert exc.value.code == 128 + signal.SIGTERM
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["reason"]
    assert summary["step"] == 2 and summary["val_loss"] is not None


def test_stop_signal_during_final_evaluation_with_final_checkpoint_is_done(tiny_cfg, tmp_path, monkeypatch):
    _signal_during_final_eval(monkeypatch)
    summary = run(tiny_cfg("train.max_steps=2"), tmp_path)  # no SystemExit: the run is complete
    assert summary["status"] == "done" and "SIGTERM" in summary["reason"]
    assert json.loads((tmp_path / "summary.json").read_text())["reason"] == summary["reason"]
    assert ckpt.latest(tmp_path / "checkpoints").name == "step-000002"


def test_host_memory_error_in_the_loader_names_what_to_lower(tiny_cfg, tmp_path, monkeypatch):
    from speedrun.data import loader
    from speedrun.data.shards import DataError

    real = loader.TrainStream.next_batch
    calls = {"n": 0}

    def next_batch(self):
        if threading.current_thread().name == "speedrun-loader":
            calls["n"] += 1
            if calls["n"] >= 3:
                raise MemoryError("cannot allocate buffer")
        return real(self)

    monkeypatch.setattr(loader.TrainStream, "next_batch", next_batch)
    with pytest.raises(DataError) as err:
        run(tiny_cfg("train.max_steps=20", "data.prefetch=1"), tmp_path)
    msg = str(err.value)
    assert "MemoryError" in msg and ".bin" in msg and "\n" not in msg
    assert "hardware.micro_batch_tokens (now 1024)" in msg and "data.prefetch (now 1)" in msg
    assert _failed_summary(tmp_path)["reason"].startswith("DataError")


def test_code_diff_records_changes_and_new_untracked_files(tmp_path):
    import subprocess

    from speedrun.rundir import environment

    def git(*a):
        subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    env, diff = environment(repo=tmp_path)
    assert env["git_commit"] and not env["git_dirty"] and diff == ""
    (tmp_path / "a.py").write_text("x = 2\n")
    (tmp_path / "new_module.py").write_text("y = 3\n")
    env, diff = environment(repo=tmp_path)
    assert env["git_dirty"]
    assert "+x = 2" in diff and "new_module.py" in diff and "+y = 3" in diff
