"""SLURM: rank/world/device selection under submitit (unit tests, no cluster), and end-to-end tests against
a real one-node SLURM cluster (`bash scripts/slurm/start_slurm.sh`; marked slow, skipped with the reason
when `sinfo` is missing or the cluster is down):

  * the issue's command, `launch.py -m hydra/launcher=submitit_slurm model.tie_embeddings=true,false`:
    a 2-job array whose results land in the sweep directory;
  * one 2-task DDP job (gloo), through our launcher preset and through submitit directly: rank and world
    come from the job environment, and the ranks hold identical weights;
  * a job preempted mid-run (a `high`-partition job preempts it: USR2 -> checkpoint -> requeue) resumes and
    ends with exactly the losses of an uninterrupted run.
Runs use tiny configs with one thread per task (`hydra.launcher.cpus_per_task=1`, OMP_NUM_THREADS=1).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY

from speedrun import dist as D

NPROC = os.cpu_count() or 2


def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "SLURM is not installed (no `sinfo`): start the one-node cluster with `bash scripts/slurm/start_slurm.sh`"
    r = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%T"], capture_output=True, text=True, timeout=30)
    state = r.stdout.strip().split("\n")[0] if r.returncode == 0 else ""
    if state not in ("idle", "mixed", "allocated", "completing"):
        return (f"the SLURM cluster is down (sinfo: {state or r.stderr.strip()[:120]!r}): "
                "`bash scripts/slurm/start_slurm.sh` starts it")
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)


def _launch(*args, timeout=300, **popen):
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    cmd = [sys.executable, str(ROOT / "launch.py"), *args]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in _rows(run_dir) if "train_loss" in r}


def _submission_scripts(sweep_dir: Path) -> list[str]:
    return [p.read_text() for p in sorted((sweep_dir / ".submitit").rglob("*_submission.sh"))]


# ============================================================ unit: modes and devices (no cluster) ====
SUBMITIT_TASK = {"SLURM_JOB_ID": "77", "SUBMITIT_EXECUTOR": "slurm", "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "1",
                 "SLURM_NODEID": "0", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "localhost"}


DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    """No SLURM/submitit/rank variables; whatever a test exports (dist.init does) is removed afterwards, or
    a later test would believe it is rank 1 of 2 and wait forever for rank 0."""
    before = dict(os.environ)
    for k in list(os.environ):
        if k.startswith(("SLURM_", "SUBMITIT_")) or k in DIST_VARS:
            monkeypatch.delenv(k)
    yield monkeypatch
    for k in DIST_VARS:
        if k not in before:
            os.environ.pop(k, None)


def test_mode_precedence(clean_env):
    assert D.detect_mode(1) == "single" and D.detect_mode(2) == "spawn"
    for k, v in SUBMITIT_TASK.items():
        clean_env.setenv(k, v)
    assert D.detect_mode(2) == "submitit"  # each task is one rank: no spawning
    with pytest.raises(RuntimeError, match="2 tasks but hardware.gpus=1"):
        D.detect_mode(1)  # the job's task count and the config disagree: say so before training
    clean_env.setenv("SLURM_NTASKS", "1")
    assert D.detect_mode(2) == "spawn"  # one task on a multi-GPU allocation: spawn the ranks locally
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    assert D.detect_mode(2) == "torchrun"  # an outer launcher's variables win
    clean_env.delenv("SUBMITIT_EXECUTOR")
    clean_env.delenv("RANK")
    clean_env.setenv("SLURM_NTASKS", "2")
    assert D.detect_mode(1) == "single"  # salloc/srun without submitit is not a submitit job


def test_submitit_rank_and_world_come_from_the_job_environment(clean_env):
    from submitit.helpers import TorchDistributedEnvironment

    for k, v in SUBMITIT_TASK.items():
        clean_env.setenv(k, v)
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)  # what D.init does
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "1")
    assert os.environ["MASTER_ADDR"] == "localhost" and int(os.environ["MASTER_PORT"]) > 0
    assert "CUDA_VISIBLE_DEVICES" not in os.environ or os.environ.get("CUDA_VISIBLE_DEVICES") != "1"


@pytest.mark.parametrize("visible,local_rank,expected", [
    (1, 0, 0), (1, 5, 0),  # SLURM bound one GPU to each task: it is always cuda:0
    (8, 0, 0), (8, 5, 5),  # the task sees the whole node: cuda:LOCAL_RANK
])
def test_gpu_choice_with_bound_or_shared_gpus(monkeypatch, visible, local_rank, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert D.pick_device("auto", local_rank) == torch.device("cuda", expected)
    assert D.pick_device("cuda", local_rank) == torch.device("cuda", expected)
    assert D.pick_device("cpu", local_rank) == torch.device("cpu")


def test_gpu_choice_names_the_fix_when_too_few_are_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    from speedrun.errors import SpeedrunError

    with pytest.raises(SpeedrunError, match="hardware.gpus"):
        D.pick_device("cuda", 5)


# ======================================================== trainer/task behaviour a requeue relies on ====
def test_only_the_first_task_writes_reproduce_yaml(clean_env, tmp_path, monkeypatch):
    """Under submitit every task runs the Hydra job, before RANK is exported (dist.init does that later).
    task.py decides 'rank 0' from RANK alone, so every task writes reproduce.yaml (same temp file name:
    one task's os.replace can fail when another already moved it). Rank should come from SLURM_PROCID too."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import speedrun.train
    from conftest import compose
    from speedrun.task import run_task

    for k, v in SUBMITIT_TASK.items():  # task 1 of 2, RANK not exported yet
        clean_env.setenv(k, v)
    cfg = compose(TINY, return_hydra=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    monkeypatch.setattr(speedrun.train, "run", lambda typed, run_dir: {})
    run_task(cfg)
    assert not (tmp_path / "reproduce.yaml").exists(), "task 1 of 2 wrote reproduce.yaml"


def test_job_killed_before_its_first_checkpoint_restarts(tiny_cfg, tmp_path):
    """A requeue after SIGKILL/node failure (or `scontrol requeue` before the trainer installed its handler)
    restarts the job from its original pickle in the SAME run dir. With no checkpoint yet (the default
    checkpoint.every_steps=0), the trainer must start this same run over, not refuse its own directory."""
    from speedrun.train import run

    cfg = tiny_cfg("train.max_steps=3", "checkpoint.final=false")
    run(cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    summary["status"] = "running"  # what a SIGKILL mid-run leaves behind
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    again = run(cfg, tmp_path)
    assert again["status"] == "done" and again["step"] == 3
    assert list(_losses(tmp_path)) == [1, 2, 3]


def test_sigterm_right_after_usr2_still_checkpoints(tiny_cfg, tmp_path):
    """SLURM may follow the preemption/time-limit USR2 with SIGTERM before the step ends (a preemption with
    GraceTime=0, the time limit when signal_delay_s is too short, `scontrol requeue` of a job already
    told to stop). The trainer is already stopping at the step boundary; SIGTERM must not turn that into
    a KeyboardInterrupt that skips the checkpoint (only a second Ctrl-C should stop at once)."""
    import threading

    from speedrun import checkpoint as ckpt
    from speedrun.train import run

    metrics = tmp_path / "metrics.jsonl"

    def signal_twice():
        deadline = time.time() + 60
        while time.time() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                os.kill(os.getpid(), __import__("signal").SIGUSR2)
                os.kill(os.getpid(), __import__("signal").SIGTERM)
                return
            time.sleep(0.005)

    threading.Thread(target=signal_twice, daemon=True).start()
    with pytest.raises((SystemExit, KeyboardInterrupt)):
        run(tiny_cfg("train.max_steps=200", "train.batch_tokens=1024"), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    latest = ckpt.latest(tmp_path / "checkpoints")
    assert latest is not None and latest.name == f"step-{summary['step']:06d}", summary.get("reason")
    assert summary["status"] in ("preempted", "interrupted")


# ================================================================= end to end on a real SLURM cluster ====
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_issue_command_two_job_sweep_on_slurm(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    t0 = time.time()
    r = _launch("-m", "hydra/launcher=submitit_slurm", "model.tie_embeddings=true,false", *TINY, "train.max_steps=3",
                "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}
    assert sorted(summaries) == ["0", "1"] and all(s["status"] == "done" for s in summaries.values())
    job_ids = {json.loads((sweep / n / "env.json").read_text())["env"].get("SLURM_JOB_ID") for n in summaries}
    assert len(job_ids) == 2 and None not in job_ids  # two SLURM array tasks ran them
    assert all(s["mode"] == "single" for s in summaries.values())  # one task per job: no process group
    (script,) = _submission_scripts(sweep)
    assert "#SBATCH --array=0-1" in script and "#SBATCH --cpus-per-task=1" in script
    # the leaderboard reads the sweep directory
    from speedrun.report import report

    rows = report(sweep)["rows"]
    assert sorted(r["model.tie_embeddings"] for r in rows) == ["False", "True"]
    print(f"2-job SLURM sweep: {time.time() - t0:.1f}s")


def test_failed_sweep_jobs_fail_in_slurm_and_on_the_submitting_side(cluster, tmp_path):
    """A job whose run fails (here: missing data) ends FAILED in SLURM with exit code 2, still hands submitit
    its result (so the submitting side never waits for a result file), and the sweep exits 1 with one line."""
    sweep = tmp_path / "sweep"
    r = _launch("-m", "hydra/launcher=submitit_slurm", "data=local", f"data.path={tmp_path}/nowhere", "seed=0,1",
                *TINY, "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 1, (r.stdout + r.stderr)[-4000:]
    assert "error: a job of the sweep failed" in r.stderr  # (_launch sets HYDRA_FULL_ERROR: traceback too)
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
    assert len(summaries) == 2 and all(s["status"] == "failed" for s in summaries)  # both jobs ran
    ids = sorted({p.name.split("_")[0] for p in (sweep / ".submitit").iterdir() if p.name[0].isdigit()})
    shown = subprocess.run(["scontrol", "show", "job", ids[0]], capture_output=True, text=True).stdout
    assert shown.count("JobState=FAILED") == 2 and shown.count("ExitCode=2:0") == 2, shown


def _ddp_rank_weights(cfg, run_dir: str, out_dir: str):
    """One SLURM task: run the trainer's public entry point, then save this rank's final weights."""
    import os

    import torch

    import speedrun.setup as S
    import speedrun.train as T

    made, build = [], S.build_model

    def recording(*a, **k):  # the trainer builds its model through speedrun.setup (setup.build)
        made.append(build(*a, **k))
        return made[-1]

    S.build_model = recording
    T.run(cfg, run_dir)
    torch.save({k: v.detach().clone() for k, v in made[0].state_dict().items()},
               os.path.join(out_dir, f"weights{os.environ['RANK']}.pt"))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_task_ddp_job_ranks_agree(cluster, tmp_path, tiny_cfg):
    import cloudpickle
    import submitit

    t0 = time.time()
    ddp = ("hardware.gpus=2", "hardware.device=cpu", "train.max_steps=4", "train.batch_tokens=2048")
    # 1) through Hydra and our slurm_debug preset: tasks_per_node follows hardware.gpus
    sweep = tmp_path / "sweep"
    launcher = _launch("-m", "hydra/launcher=slurm_debug", "hydra.launcher.gpus_per_node=null",
                       "hydra.launcher.cpus_per_task=1", *TINY, *ddp, f"hydra.sweep.dir={sweep}", popen=True)
    # 2) the same config through submitit directly, to look at every rank's weights
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ex = submitit.AutoExecutor(folder=tmp_path / "direct" / "%j")
    ex.update_parameters(timeout_min=10, nodes=1, tasks_per_node=2, cpus_per_task=1, slurm_partition="debug")
    out = tmp_path / "weights"
    out.mkdir()
    job = ex.submit(_ddp_rank_weights, tiny_cfg(*ddp), str(tmp_path / "direct_run"), str(out))
    assert sorted(job.results()) == [(0, 2, 0), (1, 2, 1)]  # rank, world, local rank from the job environment
    w0, w1 = torch.load(out / "weights0.pt"), torch.load(out / "weights1.pt")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # the ranks agree
    stdout, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, stdout[-4000:]

    run_dir = sweep / "0"
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "done" and s["mode"] == "submitit" and s["batch"]["world_size"] == 2
    assert (run_dir / "rank0.log").exists() and (run_dir / "rank1.log").exists()
    assert [r["step"] for r in _rows(run_dir) if "train_loss" in r] == [1, 2, 3, 4]  # rank 0 alone writes
    assert "tie_embeddings" in (run_dir / "reproduce.yaml").read_text()
    (script,) = _submission_scripts(sweep)
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --partition=debug" in script
    assert "export OMP_NUM_THREADS=$((SLURM_CPUS_PER_TASK > 0 ? SLURM_CPUS_PER_TASK : 1))" in script and "#SBATCH --signal=USR2@60" in script
    # the Hydra-launched job computed exactly what the directly submitted ranks did
    from safetensors.torch import load_file
    from speedrun import checkpoint as ckpt

    saved = load_file(str(ckpt.latest(run_dir / "checkpoints") / "model.safetensors"))
    assert all(torch.equal(saved[k], w0[k]) for k in saved if k in w0)
    print(f"2-task DDP on SLURM (hydra + direct): {time.time() - t0:.1f}s")


LONG = (*TINY, "hardware.num_threads=1", "train.max_steps=300", "eval.every_steps=100")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the same run, never interrupted, in this process (1 thread, CPU: deterministic)."""
    from conftest import typed
    from speedrun.train import run

    mp = pytest.MonkeyPatch()
    mp.setenv("SPEEDRUN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.set_num_threads(1)
    try:
        ref = tmp_path_factory.mktemp("uninterrupted")
        return run(typed(list(LONG)), ref), _losses(ref)
    finally:
        mp.undo()


def _start_long_job(sweep: Path, cpus: int) -> tuple[subprocess.Popen, Path]:
    launcher = _launch("-m", "hydra/launcher=slurm_debug", "hydra.launcher.gpus_per_node=null",
                       f"hydra.launcher.cpus_per_task={cpus}", *LONG, f"hydra.sweep.dir={sweep}", popen=True)
    run_dir = sweep / "0"
    deadline = time.time() + 180
    while len(_losses(run_dir)) < 20:  # interrupt it mid-run
        assert launcher.poll() is None, launcher.stdout.read()[-4000:]
        assert time.time() < deadline, "the job did not start training"
        time.sleep(0.1)
    return launcher, run_dir


def _check_resumed_exactly(run_dir: Path, reference) -> int:
    ref_summary, ref_losses = reference
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "done" and summary["step"] == 300
    log = (run_dir / "rank0.log").read_text()
    assert "resumed from" in log, "the job was not interrupted and resumed"
    resumed_at = int(log.split("resumed from")[1].split("at step")[1].split()[0])
    assert 20 <= resumed_at < 300
    assert json.loads((run_dir / "env.json").read_text()).get("restarts"), "env.json records the restart"
    assert _losses(run_dir) == ref_losses  # bit-identical, every step
    assert summary["val_loss"] == ref_summary["val_loss"]
    return resumed_at


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_preempted_job_resumes_to_the_uninterrupted_loss(cluster, tmp_path, uninterrupted):
    """A job in partition `high` preempts ours (it needs all the node's CPUs): USR2 -> the trainer checkpoints
    at the step boundary -> submitit requeues -> the job resumes from the checkpoint."""
    t0 = time.time()
    sweep = tmp_path / "sweep"
    launcher, run_dir = _start_long_job(sweep, NPROC)
    subprocess.run(["sbatch", "-p", "high", "-c", str(NPROC), "-o", "/dev/null", "--wrap", "sleep 1"], check=True)
    stdout, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, stdout[-4000:]
    submitit_logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "this job is preempted" in submitit_logs and "requeu" in submitit_logs.lower()
    at = _check_resumed_exactly(run_dir, uninterrupted)
    print(f"preempt (USR2) + requeue + resume on SLURM: {time.time() - t0:.1f}s, resumed at step {at}")


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_requeued_job_resumes_to_the_uninterrupted_loss(cluster, tmp_path, uninterrupted):
    """`scontrol requeue` (an admin, a node problem, a SIGTERM-only preemption): SLURM sends SIGTERM, which
    submitit ignores; the trainer checkpoints and exits, and the job restarts from its ORIGINAL pickle in
    the same run directory -- where the trainer finds its checkpoint and resumes."""
    t0 = time.time()
    sweep = tmp_path / "sweep"
    launcher, run_dir = _start_long_job(sweep, 1)
    job_id = json.loads((run_dir / "env.json").read_text())["env"]["SLURM_JOB_ID"]
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    stdout, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, stdout[-4000:]
    assert "Restarts=1" in subprocess.run(["scontrol", "show", "job", job_id], capture_output=True,
                                          text=True).stdout
    at = _check_resumed_exactly(run_dir, uninterrupted)
    print(f"scontrol requeue (SIGTERM) + restart + resume on SLURM: {time.time() - t0:.1f}s, resumed at step {at}")
