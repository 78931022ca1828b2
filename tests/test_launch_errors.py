"""How launch.py fails: failed sweep jobs are visible in the exit code (and to SLURM), impossible batches
stop before any rank starts, a failing spawned rank is one line, torchrun ranks share one run directory,
and a config that would crash at the first probe is refused up front."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, typed

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SPEEDRUN_SPAWNED", "SUBMITIT_FOLDER",
             "SUBMITIT_EXECUTOR", "SLURM_JOB_ID", "SLURM_NNODES", "SLURM_PROCID")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    return env


def _launch(*args, cwd=ROOT, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=_env())


# ------------------------------------------------------------------------- failed jobs in a sweep ----
def test_local_sweep_goes_on_and_exits_nonzero_listing_failed_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    r = _launch("-m", "data=local", f"data.path={tmp_path}/nowhere", "seed=0,1", f"hydra.sweep.dir={sweep}")
    assert r.returncode != 0, r.stderr
    for job in ("0", "1"):  # both jobs ran (the first failure did not stop the sweep) and say why they failed
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["status"] == "failed" and "does not exist" in summary["reason"]
    last = r.stderr.strip().splitlines()[-1]
    assert "2 job(s)" in last and str(sweep / "0") in last and str(sweep / "1") in last
    assert "Traceback" not in r.stderr


def test_failure_action_decides_how_a_job_ends():
    from speedrun.task import failure_action

    # submitit (SLURM): a failed run must fail the job, so the scheduler does not report it COMPLETED
    assert failure_action("failed", multirun=True, submitit=True) == "fail_job"
    # preemption and requeue paths are left to the trainer's SystemExit and submitit's handler
    for status in ("preempted", "interrupted"):
        assert failure_action(status, multirun=True, submitit=True) == "requeue"
        assert failure_action(status, multirun=False, submitit=False) == "requeue"
    for status in ("done", "dry_run", None):
        assert failure_action(status, multirun=True, submitit=True) == "ok"
    assert failure_action("failed", multirun=True, submitit=False) == "record"  # local sweep goes on
    assert failure_action("failed", multirun=False, submitit=False) == "exit"


def test_a_failed_submitit_job_raises_its_result_and_exits_nonzero(tmp_path, monkeypatch):
    import speedrun.task as task

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    monkeypatch.setattr(task, "_EXIT_CODE", [])
    with pytest.raises(task.JobFailed, match="does not exist"):  # Hydra stores it; submitit pickles it
        task._fail("data folder /x does not exist", True, tmp_path, submitit=True)
    assert task._EXIT_CODE == [2]  # the process exits 2 once submitit has written the result
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {"status": "failed", "reason": "data folder /x does not exist"}
    assert str(tmp_path) not in task.failed_runs()  # the job itself failed: nothing left for launch.py to list
    import pickle

    assert str(pickle.loads(pickle.dumps(task.JobFailed("x")))) == "x"  # travels in submitit's result file


# ------------------------------------------------------------------------------ batch and ranks ----
def test_impossible_batch_stops_before_spawning_ranks(tmp_path):
    run_dir = tmp_path / "run"
    r = _launch("hardware.device=cpu", "hardware.gpus=2", "train.batch_tokens=3000", f"hydra.run.dir={run_dir}")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.batch_tokens=3000" in lines[0] and "2 rank(s)" in lines[0], r.stderr
    assert not list(run_dir.glob("rank*.log"))  # no rank was started


def test_a_failing_spawned_rank_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    r = _launch("hardware.device=cpu", "hardware.gpus=2", "data=local", f"data.path={tmp_path}/nowhere",
                f"hydra.run.dir={run_dir}")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "DataError" in lines[0] and "does not exist" in lines[0], r.stderr
    assert "Traceback" in (run_dir / "launch.log").read_text()  # the full traceback is kept in the run dir


def test_torchrun_ranks_share_rank0s_run_dir(tmp_path):
    """Under torchrun each rank composes Hydra and gets its own timestamped run dir; they must end in one."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "launch.py"),
           "model=unet_tiny", "hardware.micro_batch_tokens=1024", "data.max_length=256", "train.window_start=256",
           "train.max_steps=2", "eval.max_tokens=2000", "checkpoint.final=false"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [p for p in (tmp_path / "outputs" / "runs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    (run_dir,) = runs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "done" and summary["mode"] == "torchrun" and summary["batch"]["world_size"] == 2
    assert (run_dir / "rank0.log").exists() and (run_dir / "rank1.log").exists()


# ----------------------------------------------------------------------------------- config ----
def test_probes_with_the_patch_unet_are_refused_at_validation():
    from speedrun.config import ConfigError

    with pytest.raises(ConfigError) as info:
        typed(TINY + ["model=patch_unet_tiny", "eval.probe_every=2"])
    msg = str(info.value)
    assert "\n" not in msg and "eval.probe_every" in msg and "model.arch=patch_unet" in msg
    assert typed(TINY + ["model=patch_unet_tiny"]).eval.probe_every == 0  # probes off: fine
    assert typed(TINY + ["eval.probe_every=2"]).model.arch == "unet"  # a UNet with probes: fine
