"""End-to-end training on CPU: the loss falls, the run directory is complete, dry runs, exact resume,
atomic checkpoints, and interruption."""
from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from speedrun import checkpoint as ckpt
from speedrun.train import run

SECRET = "hf_THIS_MUST_NOT_LEAK_123"


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in _rows(run_dir) if "train_loss" in r}


def test_few_steps_lower_the_loss_and_fill_the_run_dir(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    cfg = tiny_cfg("train.max_steps=30", "eval.every_steps=15", "checkpoint.every_steps=10")
    summary = run(cfg, tmp_path)
    assert summary["status"] == "done"
    losses = _losses(tmp_path)
    first, last = sum(list(losses.values())[:3]) / 3, sum(list(losses.values())[-3:]) / 3
    assert last < first - 0.2
    for key in ("status", "val_loss", "unigram_loss", "n_params", "tokens_per_s", "train_seconds", "wall_seconds",
                "tokens", "val_ppl", "val_accuracy", "val_f1", "val_mcc", "val_precision", "val_recall", "batch"):
        assert key in summary, key
    assert summary["tokens"] == 30 * 1024 and summary["n_params"] > 0
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["status"] == "done" and on_disk["val_loss"] == pytest.approx(summary["val_loss"])
    rows = _rows(tmp_path)
    assert all({"step", "tokens", "train_loss", "lr_mult", "tokens_per_s"} <= r.keys() for r in rows if "train_loss" in r)
    assert [r["step"] for r in rows if "val_loss" in r] == [15, 30]
    assert len({r["step"] for r in rows}) == len(rows)  # one row per step
    assert (tmp_path / "env.json").exists() and (tmp_path / "rank0.log").exists()
    done = ckpt.complete_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in done] == ["step-000020", "step-000030"]  # keep_last=2
    assert {"model.safetensors", "state.pt", "COMPLETE"} <= {p.name for p in done[-1].iterdir()}
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".log", ".yaml", ".txt", ".diff"):
            assert SECRET not in path.read_text(errors="ignore"), path


def test_dry_run_writes_summary_without_training(tiny_cfg, tmp_path):
    summary = run(tiny_cfg("dry_run=true", "train.batch_tokens=4096"), tmp_path)
    assert summary["status"] == "dry_run" and summary["n_params"] > 0
    assert summary["batch"] == {"micro_batch_tokens": 1024, "grad_accum": 4, "world_size": 1, "batch_tokens": 4096}
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "dry_run"
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()


def test_gradient_accumulation_runs(tiny_cfg, tmp_path):
    summary = run(tiny_cfg("train.max_steps=3", "train.batch_tokens=3072", "checkpoint.final=false"), tmp_path)
    assert summary["status"] == "done" and summary["tokens"] == 3 * 3072


def test_resume_is_bit_identical(tiny_cfg, tmp_path):
    args = ("train.max_steps=8", "checkpoint.every_steps=4", "train.batch_tokens=2048")
    ref = tmp_path / "ref"
    run(tiny_cfg(*args), ref)
    cut = tmp_path / "cut"
    run(tiny_cfg(*args), cut)
    # simulate a crash after step 4: drop the final checkpoint and summary, keep the step-4 checkpoint
    import shutil
    shutil.rmtree(cut / "checkpoints" / "step-000008")
    (cut / "summary.json").unlink()
    summary = run(tiny_cfg(*args), cut)
    assert summary["status"] == "done" and summary["step"] == 8
    assert _losses(cut) == _losses(ref)  # bit-identical, not approximately equal
    assert [r["step"] for r in _rows(cut) if "train_loss" in r] == list(range(1, 9))


def test_done_run_exits_at_once(tiny_cfg, tmp_path):
    run(tiny_cfg("train.max_steps=2"), tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    again = run(tiny_cfg("train.max_steps=2"), tmp_path)
    assert again["status"] == "done" and (tmp_path / "metrics.jsonl").read_text() == before


def test_refuses_to_overwrite_another_run(tiny_cfg, tmp_path):
    from speedrun.errors import FolderError

    run(tiny_cfg("train.max_steps=2", "checkpoint.final=false"), tmp_path)
    with pytest.raises(FolderError, match=r"finished run with a different config \(seed\)"):
        run(tiny_cfg("train.max_steps=2", "seed=1"), tmp_path)
    (tmp_path / "summary.json").unlink()
    with pytest.raises(FolderError, match=r"already holds a run with a different config \(seed\)"):
        run(tiny_cfg("train.max_steps=2", "seed=1"), tmp_path)
    (tmp_path / "run.json").unlink()  # results with no identity at all: never overwritten
    with pytest.raises(FolderError, match="already holds another run's results"):
        run(tiny_cfg("train.max_steps=2", "checkpoint.final=false"), tmp_path)


def test_own_run_killed_before_its_first_checkpoint_starts_over(tiny_cfg, tmp_path):
    ref = run(tiny_cfg("train.max_steps=3", "checkpoint.final=false"), tmp_path / "ref")
    run(tiny_cfg("train.max_steps=3", "checkpoint.final=false"), tmp_path / "r")
    (tmp_path / "r" / "summary.json").unlink()  # as if killed (SIGKILL, node failure) before finishing
    again = run(tiny_cfg("train.max_steps=3", "checkpoint.final=false", "log.progress=plain"), tmp_path / "r")
    assert again["status"] == "done" and again["val_loss"] == ref["val_loss"]
    assert [r["step"] for r in _rows(tmp_path / "r") if "train_loss" in r] == [1, 2, 3]


def test_full_disk_keeps_previous_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    run(tiny_cfg("train.max_steps=2"), tmp_path)
    good = ckpt.latest(tmp_path / "checkpoints")
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    from speedrun.models.unet import ProteinLM
    model = ProteinLM(tiny_cfg().model)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.save(tmp_path / "checkpoints", 5, model, config={}, trainer_state={"step": 5}, tensors={})
    msg = str(err.value)
    assert "disk is full" in msg and "step-000005" in msg and "\n" not in msg
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.latest(tmp_path / "checkpoints") == good
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert ckpt.read(ckpt.find(tmp_path / "checkpoints")).trainer_state["step"] == 2


def test_incomplete_checkpoint_is_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-000009").mkdir(parents=True)  # no COMPLETE marker: a crash mid-write
    assert ckpt.latest(root) is None


def test_ctrl_c_saves_and_resume_continues(tiny_cfg, tmp_path):
    args = ("train.max_steps=40", "train.batch_tokens=1024")
    run_dir = tmp_path / "r"
    metrics = run_dir / "metrics.jsonl"

    def interrupt():
        deadline = time.time() + 60
        while time.time() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.01)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(SystemExit) as exc:
        run(tiny_cfg(*args), run_dir)
    assert exc.value.code == 130
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 3 <= summary["step"] < 40
    assert ckpt.latest(run_dir / "checkpoints").name == f"step-{summary['step']:06d}"
    resumed = run(tiny_cfg(*args), run_dir)
    assert resumed["status"] == "done" and resumed["step"] == 40
    ref = tmp_path / "ref"
    run(tiny_cfg(*args), ref)
    assert _losses(run_dir) == _losses(ref)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("objective", ["diffusion", "mlm_to_diffusion"])
def test_diffusion_objectives_lower_their_loss(tiny_cfg, tmp_path, objective, tied):
    extra = ["objective.mlm_steps=10", "objective.ramp_steps=10"] if objective == "mlm_to_diffusion" else []
    summary = run(tiny_cfg(f"objective={objective}", "train.max_steps=40", "eval.every_steps=4",
                           "checkpoint.final=false", f"model.tie_embeddings={str(tied).lower()}", *extra), tmp_path)
    if tied:  # the head's decoder is the embedding matrix: one tensor, trained through both uses
        from speedrun.models.unet import ProteinLM
        m = ProteinLM(tiny_cfg("model.tie_embeddings=true").model)
        assert summary["n_params"] == m.num_params() < ProteinLM(tiny_cfg().model).num_params()
    # the 1/t-weighted training loss is noisy on tiny batches: judge progress on the fixed validation set
    vals = [r for r in _rows(tmp_path) if "val_loss" in r]
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] - 0.1
    for level in ("10", "30", "50", "70", "90"):
        assert vals[-1][f"val_loss_t{level}"] < vals[0][f"val_loss_t{level}"]
        assert summary[f"val_loss_t{level}"] == vals[-1][f"val_loss_t{level}"]
    rows = [r for r in _rows(tmp_path) if "diffusion_frac" in r]
    if objective == "mlm_to_diffusion":
        assert rows[0]["diffusion_frac"] == 0.0 and rows[-1]["diffusion_frac"] == 1.0


def test_speed_track_refuses_a_model_over_the_limit(tiny_cfg, tmp_path):
    from speedrun.config import ConfigError
    with pytest.raises(ConfigError, match="over train.max_params=1,000"):
        run(tiny_cfg("train.max_params=1000"), tmp_path)


def test_target_loss_records_time_and_tokens(tiny_cfg, tmp_path):
    summary = run(tiny_cfg("train.max_steps=20", "eval.every_steps=5", "target_loss=3.3",
                           "train.stop_at_target=true", "checkpoint.final=false"), tmp_path)
    target = summary["target"]
    assert target["loss"] == 3.3 and target["val_loss"] <= 3.3
    assert target["step"] % 5 == 0 and target["tokens"] == target["step"] * 1024 and target["train_seconds"] > 0
    assert summary["step"] == target["step"]  # stopped at the target


@pytest.mark.parametrize("objective", ["mlm", "diffusion"])
def test_patch_unet_trains_on_rows(tiny_cfg, tmp_path, objective):
    """model=patch_unet takes (B, L) rows from RowStream, evaluates on row-packed batches, and learns."""
    summary = run(tiny_cfg("model=patch_unet_tiny", f"objective={objective}", "train.max_steps=30",
                           "eval.every_steps=3", "checkpoint.final=false"), tmp_path)
    assert summary["status"] == "done" and summary["flops_per_token"] is None
    vals = [r["val_loss"] for r in _rows(tmp_path) if "val_loss" in r]
    assert vals[-1] < vals[0] - 0.1
    assert summary["val_masked_tokens"] > 0


def test_probes_run_during_training(tiny_cfg, tmp_path):
    """eval.probe_every runs layer-wise probes (tiny fixtures here) at its interval and at the end; the
    scores go to metrics.jsonl and the last ones to summary.json."""
    fix = Path(__file__).resolve().parent / "fixtures" / "probes"
    tasks = f'eval.probe_tasks=["ss3@{fix / "flip_ss3"}","meltome@{fix / "meltome.csv"}"]'
    summary = run(tiny_cfg("train.max_steps=4", "eval.probe_every=2", tasks, "checkpoint.final=false"), tmp_path)
    probe_rows = [r for r in _rows(tmp_path) if "probe/score" in r]
    assert [r["step"] for r in probe_rows] == [2, 4]  # at the interval, and once at the end
    assert 0 < summary["probe/score"] <= 1 and "probe/ss3/test_acc" in summary and "probe/meltome/test_spearman" in summary


def test_metrics_have_one_row_per_step_with_train_val_and_test(tiny_cfg, tmp_path):
    """An evaluation at a log step lands in that step's row; an evaluation between log steps gets its own
    row; the final row also holds the test metrics (eval.test=true)."""
    summary = run(tiny_cfg("train.max_steps=6", "train.log_every=2", "eval.every_steps=3", "eval.test=true",
                           "checkpoint.final=false"), tmp_path)
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [2, 3, 4, 6]
    by_step = {r["step"]: r for r in rows}
    assert "val_loss" in by_step[3] and "train_loss" not in by_step[3]
    assert "train_loss" in by_step[4] and "val_loss" not in by_step[4]
    last = by_step[6]
    assert {"train_loss", "tokens_per_s", "val_loss", "val_accuracy", "test_loss", "test_accuracy"} <= last.keys()
    assert last["val_loss"] == pytest.approx(summary["val_loss"]) and last["test_loss"] == pytest.approx(summary["test_loss"])


def test_metrics_log_merges_a_step_across_restarts_and_drops_a_torn_line(tmp_path):
    from speedrun.rundir import MetricsLog, read_metrics
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, enabled=True)
    log.write({"step": 1, "train_loss": 3.0})
    log.write({"step": 2, "train_loss": 2.5})
    log.write({"step": 2, "val_loss": 2.7})
    assert read_metrics(path) == [{"step": 1, "train_loss": 3.0}, {"step": 2, "train_loss": 2.5, "val_loss": 2.7}]
    with open(path, "a") as f:
        f.write('{"step": 3, "train_lo')  # a crash mid-write
    again = MetricsLog(path, enabled=True)  # e.g. a resumed run
    again.write({"step": 2, "test_loss": 2.8})
    assert read_metrics(path) == [{"step": 1, "train_loss": 3.0},
                                  {"step": 2, "train_loss": 2.5, "val_loss": 2.7, "test_loss": 2.8}]
    again.truncate_after(1)
    again.write({"step": 1, "val_loss": 3.1})
    assert read_metrics(path) == [{"step": 1, "train_loss": 3.0, "val_loss": 3.1}]
    MetricsLog(tmp_path / "other.jsonl", enabled=False).write({"step": 1})
    assert not (tmp_path / "other.jsonl").exists()


@pytest.mark.parametrize("minutes", [1e-6, 0.0])
def test_checkpoint_every_minutes(tiny_cfg, tmp_path, minutes):
    summary = run(tiny_cfg("train.max_steps=4", f"checkpoint.every_minutes={minutes}", "checkpoint.keep_last=0"),
                  tmp_path)
    assert summary["status"] == "done"
    steps = [p.name for p in ckpt.complete_checkpoints(tmp_path / "checkpoints")]
    if minutes:  # due at every step boundary (never at step 0, nothing trained yet), then the final one
        assert steps == ["step-000001", "step-000002", "step-000003", "step-000004"]
    else:
        assert steps == ["step-000004"]


def test_checkpoint_every_minutes_must_not_be_negative(tiny_cfg):
    from speedrun.config import ConfigError
    with pytest.raises(ConfigError, match="checkpoint.every_minutes=-1.0 must be >= 0"):
        tiny_cfg("checkpoint.every_minutes=-1")


def test_grad_clip_clips_the_global_gradient_norm(tiny_cfg, tmp_path, monkeypatch):
    """optimizer.grad_clip>0: after clipping the global gradient norm is at most grad_clip; the logged
    grad_norm is the norm before clipping. grad_clip=0 leaves gradients alone."""
    from speedrun.step import TrainStep
    real = TrainStep.clip
    seen = []

    def spy(self):
        norm = real(self)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        after = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        seen.append((self.grad_clip, float(norm), after))
        return norm

    monkeypatch.setattr(TrainStep, "clip", spy)
    run(tiny_cfg("train.max_steps=3", "optimizer.grad_clip=0.05", "checkpoint.final=false"), tmp_path / "clip")
    assert len(seen) == 3 and all(c == 0.05 for c, _, _ in seen)
    assert all(before > 0.05 and after <= 0.05 * 1.001 for _, before, after in seen)
    logged = [r["grad_norm"] for r in _rows(tmp_path / "clip") if "grad_norm" in r]
    assert logged == pytest.approx([before for _, before, _ in seen])
    seen.clear()
    run(tiny_cfg("train.max_steps=2", "checkpoint.final=false"), tmp_path / "noclip")
    assert all(c == 0 and after == pytest.approx(before, rel=1e-5) for c, before, after in seen)


def test_the_dec2024_experiment_trains_as_dec2024_did(tiny_cfg, tmp_path):
    """experiment=dec2024 at tiny size: contiguous batches, fused QKV for Muon, warmed-up Muon, no token
    dropout, the 1023 -> 2048 window formula; it trains, and resumes onto the same stream."""
    from conftest import typed
    from speedrun.setup import window_at

    cfg = typed(["experiment=dec2024", "model=unet_tiny", "hardware=cpu", "data=sample", "data.max_length=256",
                 "hardware.micro_batch_tokens=1024", "train.batch_tokens=1024", "train.max_steps=4",
                 "checkpoint.every_steps=2", "eval.every_steps=0", "eval.max_tokens=3000", "model.head=linear"])
    assert cfg.data.packing == "stream" and cfg.optimizer.fused_qkv and cfg.optimizer.muon_warmup
    assert not cfg.model.token_dropout
    full = typed(["experiment=dec2024", "data=local", "data.path=/x"])
    assert [window_at(full, s) for s in (0, 50000, 100000)] == [896, 1408, 2048]  # floor_128(1535.5) = 1408
    summary = run(cfg, tmp_path / "a")
    assert summary["status"] == "done" and summary["step"] == 4
    (tmp_path / "a" / "summary.json").unlink()
    import shutil
    shutil.rmtree(tmp_path / "a" / "checkpoints" / "step-000004")
    again = run(cfg, tmp_path / "a")
    assert again["status"] == "done" and again["val_loss"] == summary["val_loss"]
