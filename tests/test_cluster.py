"""The cluster workflow (issue 20): submit a sweep and walk away, watch it, multi-node jobs, the job's
objective for searches, the plain-language `slurm` preset, and dry runs of GPU configs on a CPU machine.

Unit tests need no cluster. The end-to-end tests (marked slow) run against the local SLURM cluster that
`bash scripts/slurm/start_slurm.sh` starts (CI's .ci/run does) and are skipped, with the reason, without it.
Each uses tiny settings (conftest.TINY) and one thread per task.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CONF, ROOT, TINY, compose

from test_slurm import _cluster_problem

TINY_RUN = [*TINY, "hardware=cpu", "train.max_steps=4", "hydra.launcher.time=10", "hydra.launcher.cpus_per_task=1"]


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)


def _launch(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def _tool(module: str, *args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def _launcher(*overrides) -> dict:
    from hydra.core.hydra_config import HydraConfig

    cfg = compose(list(overrides), return_hydra=True)
    HydraConfig.instance().set_config(cfg)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


# ====================================================================== the launcher presets (unit) ====
def test_sbatch_time_spellings():
    from hydra_plugins.speedrun_launcher import time_minutes

    assert [time_minutes(t) for t in ("90", 90, "30:30", "4:00:00", "1-12", "1-00:30", "2-00:00:01")] == \
        [90, 90, 31, 240, 2160, 1470, 2881]
    for bad in ("4h", "", "1:2:3:4", "0"):
        with pytest.raises(ValueError, match="hydra.launcher.time"):
            time_minutes(bad)


@pytest.mark.parametrize("preset", ["slurm", "slurm_8gpu", "slurm_debug"])
def test_presets_detach_and_follow_gpus_and_nodes(preset):
    launcher = _launcher(f"hydra/launcher={preset}", "hardware=h100x8", "hardware.nodes=2")
    assert launcher["_target_"] == "hydra_plugins.speedrun_launcher.SpeedrunSlurmLauncher"
    assert launcher["detach"] is False  # Hydra's blocking behaviour unless asked
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 8, 8)


def test_plain_slurm_preset_keys_and_site_settings():
    launcher = _launcher("hydra/launcher=slurm")
    for key in ("partition", "account", "qos", "time", "constraint", "additional_parameters"):
        assert key in launcher, key
    assert launcher["max_num_timeout"] > 0 and launcher["timeout_min"] >= 10
    local = CONF / "local" / "slurm.yaml"
    if local.exists():
        pytest.skip(f"{local} exists on this machine; not touching a user's site settings")
    local.write_text("partition: gpu\naccount: acme\nqos: high\ntime: '1-00:00:00'\nconstraint: h100\n"
                     "additional_parameters: {mail-type: END}\n")
    try:
        launcher = _launcher("hydra/launcher=slurm", "hydra.launcher.qos=low",
                             "+hydra.launcher.additional_parameters.exclusive=true")
        assert {k: launcher[k] for k in ("partition", "account", "qos", "time", "constraint")} == \
            {"partition": "gpu", "account": "acme", "qos": "low", "time": "1-00:00:00", "constraint": "h100"}
        assert launcher["additional_parameters"] == {"mail-type": "END", "exclusive": True}
        assert "account" not in OmegaConf.to_container(compose([], return_hydra=True).hydra.launcher)
    finally:
        local.unlink()


def test_detach_refuses_a_search_that_needs_the_results():
    """An Optuna sweeper picks the next trials from the results: detaching it would end the search at once."""
    r = _launch("sweep=lr_search", "hydra/launcher=slurm", "hydra.launcher.detach=true", *TINY,
                "hydra.sweep.dir=/nonexistent/never-made")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: hydra.launcher.detach=true: the sweeper OptunaSweeper")
    assert not Path("/nonexistent/never-made").exists()


# ======================================================================= world size and objective ====
def _typed(*overrides):
    from conftest import typed

    return typed([*TINY, *overrides])


def test_world_size_counts_nodes_times_gpus(monkeypatch):
    from speedrun.config import ConfigError
    from speedrun.task import _world_size

    for k in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_")) or k in ("RANK", "WORLD_SIZE")]:
        monkeypatch.delenv(k)
    slurm = OmegaConf.create({"launcher": {"_target_": "hydra_plugins.speedrun_launcher.SpeedrunSlurmLauncher"}})
    local = OmegaConf.create({"launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}})
    monkeypatch.setenv("SLURM_NNODES", "2")
    assert _world_size(_typed("hardware.gpus=4", "hardware.nodes=2"), slurm) == 8
    with pytest.raises(ConfigError, match="the SLURM job has 2 node"):
        _world_size(_typed("hardware.gpus=4", "hardware.nodes=3"), slurm)
    monkeypatch.delenv("SLURM_NNODES")
    with pytest.raises(ConfigError, match="hardware.nodes=2 needs 2 machines"):
        _world_size(_typed("hardware.nodes=2"), local)
    assert _world_size(_typed("hardware.gpus=8", "hardware.nodes=2", "dry_run=true"), local) == 16


def test_objective_is_val_loss_or_the_time_to_target():
    from speedrun.config import ConfigError
    from speedrun.task import NOT_REACHED_S, objective_value

    done = {"status": "done", "val_loss": 2.5, "best_val_loss": 2.4, "target": None}
    assert objective_value(_typed(), done) == 2.5  # the default, speedrun/config.py
    speed = _typed("sweep_objective=time_to_target", "target_loss=2.45")
    hit = dict(done, target={"loss": 2.45, "train_seconds": 12.5, "step": 30})
    assert objective_value(speed, hit) == 12.5
    close, far = objective_value(speed, done), objective_value(speed, dict(done, best_val_loss=3.0))
    assert 12.5 < NOT_REACHED_S < close < far  # every miss after every hit, closer misses first
    assert objective_value(speed, {"status": "failed"}) is None  # Optuna marks such a trial failed
    with pytest.raises(ConfigError, match="needs target_loss"):
        _typed("sweep_objective=time_to_target")
    with pytest.raises(ConfigError, match="sweep_objective"):
        _typed("sweep_objective=speed")


# ============================================================================= dry runs without a GPU ====
def test_dry_run_of_an_8_gpu_config_on_this_cpu_machine(tmp_path):
    """The issue's command: sizes and the 8-rank batch in summary.json, in one process, exit 0."""
    run_dir = tmp_path / "run"
    r = _launch("experiment=reference", "data=sample", "hardware=h100x8", "dry_run=true", f"hydra.run.dir={run_dir}")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "dry_run" and s["n_params"] == 133_065_357
    assert s["batch"] == {"micro_batch_tokens": 65536, "grad_accum": 1, "world_size": 8, "batch_tokens": 524288}
    assert "the measured peak memory needs the GPU" in s["device_note"] and "peak_memory_gib" not in s
    assert "8 rank(s) (8 GPU(s) x 1 node(s))" in r.stdout and "needs the GPU" in r.stdout
    assert "x 1 rank(s)" not in r.stdout + r.stderr  # the log's batch line plans the 8 ranks too


def test_gpu_configs_without_a_gpu(tmp_path):
    """Two nodes of 8 GPUs plan a 16-rank batch in a dry run; without dry_run, one line and exit 2 (no ranks
    spawned only to fail one by one)."""
    run_dir = tmp_path / "run"
    r = _launch(*TINY, "hardware=h100x8", "hardware.micro_batch_tokens=1024", "hardware.nodes=2", "dry_run=true",
                "train.batch_tokens=32768", f"hydra.run.dir={run_dir}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["batch"]["world_size"] == 16
    for extra in ([], ["hardware.fp8=true"]):
        t0 = time.time()
        r = _launch(*TINY, "hardware=h100x8", "hardware.micro_batch_tokens=1024", *extra, f"hydra.run.dir={tmp_path}/x")
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [
            "error: hardware.device=cuda but no CUDA GPU is visible: use hardware=cpu, or dry_run=true to check the "
            "config on this machine"], r.stderr[-2000:]
        assert time.time() - t0 < 30


# ========================================================================== speedrun.status (unit) ====
def _fake_run(d: Path, status: str, step: int, max_steps: int = 100, tps: float = 1000.0) -> None:
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"config": {"train": {"max_steps": max_steps}}}))
    (d / "summary.json").write_text(json.dumps({"status": status, "step": 0 if status == "running" else step,
                                                "batch": {"batch_tokens": 100}, "val_loss": None}))
    rows = [{"step": s, "train_loss": 3.0, "tokens_per_s": tps, "train_seconds": s * 0.1} for s in range(1, step + 1)]
    rows.append({"step": step, "val_loss": 2.9})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_status_without_slurm_reads_the_runs(tmp_path, monkeypatch):
    import speedrun.status as S

    monkeypatch.setattr(S.shutil, "which", lambda name: None)  # a laptop with a copy of the sweep
    sweep = tmp_path / "sweep"
    _fake_run(sweep / "0", "done", 100)
    _fake_run(sweep / "1", "running", 40)
    S.record_submission(sweep, [(0, "41_0", ["seed=0"]), (1, "41_1", ["seed=1"]), (2, "41_2", ["seed=2"])], True)
    rows = {r["job"]: r for r in S.collect(sweep)}
    assert [rows[n]["status"] for n in (0, 1, 2)] == ["done", "running", "not started"]
    assert all(r["slurm"] == "unknown" for r in rows.values())  # no squeue/sacct/scontrol here
    assert (rows[1]["step"], rows[1]["max_steps"], rows[1]["val_loss"]) == (40, 100, 2.9)
    assert rows[1]["eta_s"] == pytest.approx(60 * 100 / 1000.0)  # 60 steps x 100 tokens at 1000 tokens/s
    assert [rows[n]["ended"] for n in (0, 1, 2)] == [True, False, False]
    text = S.table(list(rows.values()), sweep)
    assert "40 / 100" in text and "6s" in text and "not started" in text
    assert S.main([str(sweep)]) == 0
    assert S.cli_main(S.main, [str(tmp_path / "nowhere")]) == 2


# ===================================================================== end to end on a SLURM cluster ====
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_detached_sweep_returns_at_once_and_status_follows_it(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    t0 = time.time()
    r = _launch("-m", "hydra/launcher=slurm", "hydra.launcher.detach=true", "model.tie_embeddings=true,false",
                *TINY_RUN, f"hydra.sweep.dir={sweep}")
    submit_s = time.time() - t0
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert submit_s < 10, f"the detached submit took {submit_s:.1f}s"
    jobs = json.loads((sweep / "jobs.json").read_text())["submissions"][-1]["jobs"]
    ids = [j["job_id"] for j in jobs]
    assert [j["num"] for j in jobs] == [0, 1] and f"submitted 2 SLURM job(s): {' '.join(ids)}" in r.stdout
    assert f"sweep dir: {sweep}" in r.stdout
    # while the jobs are queued or running, the report says what is not in yet
    early = _tool("speedrun.report", sweep)
    assert early.returncode == 0, early.stderr
    t0 = time.time()
    watched = _tool("speedrun.status", sweep, "--watch", "1", timeout=240)
    status_s = time.time() - t0
    assert watched.returncode == 0, (watched.stdout + watched.stderr)[-3000:]
    final = watched.stdout.strip().split("\n\n")[-1]
    assert "2 ended" in final.splitlines()[0]
    for jid in ids:
        line = next(ln for ln in final.splitlines() if f" {jid} " in ln)
        assert "COMPLETED" in line and " done " in line and "4 / 4" in line, final
    t0 = time.time()
    rep = _tool("speedrun.report", sweep)
    report_s = time.time() - t0
    assert rep.returncode == 0, rep.stderr
    assert "runs: 2 done" in rep.stdout and "model.tie_embeddings" in rep.stdout
    print(f"detached submit {submit_s:.1f}s, status --watch until done {status_s:.1f}s, report {report_s:.1f}s")


def test_a_gpu_sweep_on_a_cluster_without_gpus_is_one_line(cluster, tmp_path):
    r = _launch("-m", "hydra/launcher=slurm", "hardware=gpu", "hydra.launcher.detach=true", *TINY,
                f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: sbatch refused the sweep (") and "choose a partition with GPUs" in last, last
    assert "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_node_job(cluster, tmp_path, tiny_cfg):
    """hardware.nodes=2 on two real slurmd nodes (start_slurm.sh's partition `multi`: vnode1 and vnode2, two
    slurmd daemons on this one host, one CPU each): sbatch --nodes=2 with one task per node, rank and world
    from the job's environment, MASTER_ADDR the first node. It trains exactly what 2 local ranks train."""
    if "multi" not in subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout:
        pytest.skip("the local cluster has no partition `multi` (SLURM_VIRTUAL_NODES=0): restart start_slurm.sh")
    sweep = tmp_path / "sweep"
    two = ("train.batch_tokens=2048",)
    r = _launch("-m", "hydra/launcher=slurm", "hydra.launcher.partition=multi", "hardware.nodes=2", *TINY_RUN, *two,
                f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    run_dir = sweep / "0"
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "done" and s["mode"] == "submitit" and s["batch"]["world_size"] == 2
    (script,) = [p.read_text() for p in (sweep / ".submitit").rglob("*_submission.sh")]
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script
    assert "--gpus-per-node" not in script  # a CPU run asks for no GPUs
    job_id = json.loads((run_dir / "env.json").read_text())["env"]["SLURM_JOB_ID"]
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    assert "NumNodes=2" in shown and " NodeList=vnode[1-2]" in shown, shown
    assert (run_dir / "rank1.log").exists()

    from speedrun.train import run

    local = run(tiny_cfg("hardware=cpu", "hardware.gpus=2", "train.max_steps=4", *two), tmp_path / "local")
    losses = lambda d: [x["train_loss"] for x in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                        if "train_loss" in x]
    assert losses(run_dir) == losses(tmp_path / "local") and s["val_loss"] == local["val_loss"]
