"""`python launch.py` end to end: the run directory, reproduce.yaml, rerun and resume commands."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT, TINY


def _launch(*args, env=None, timeout=300):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=e)


def test_launch_trains_and_writes_a_reproducible_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    r = _launch(*TINY, "train.max_steps=6", "eval.every_steps=3", f"hydra.run.dir={run_dir}")
    assert r.returncode == 0, r.stderr
    assert f"run directory: {run_dir}" in r.stdout and "val_loss=" in r.stdout and "unigram_loss=" in r.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "done" and summary["step"] == 6
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "reproduce.yaml").exists()
    text = (run_dir / "reproduce.yaml").read_text()
    assert "-cn reproduce" in text and "max_steps: 6" in text

    # rerun from scratch in a new directory with the saved config
    again = tmp_path / "again"
    r2 = _launch("-cd", str(run_dir), "-cn", "reproduce", f"hydra.run.dir={again}")
    assert r2.returncode == 0, r2.stderr
    s2 = json.loads((again / "summary.json").read_text())
    assert s2["val_loss"] == summary["val_loss"]  # same config, same seed, same data: same result

    # "resume" a finished run: it notices and exits at once
    before = (run_dir / "metrics.jsonl").read_text()
    r3 = _launch("-cd", str(run_dir), "-cn", "reproduce", f"hydra.run.dir={run_dir}")
    assert r3.returncode == 0, r3.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_dry_run_from_the_cli(tmp_path):
    r = _launch("model=unet", "optimizer=muon", "dry_run=true", "train.batch_tokens=524288",
                "hardware.micro_batch_tokens=65536", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "dry_run" and s["n_params"] == 133_065_357 and s["batch"]["grad_accum"] == 8


def test_missing_data_is_one_line(tmp_path):
    r = _launch("data=local", f"data.path={tmp_path}/nowhere", f"hydra.run.dir={tmp_path}/r")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and "data.path" in lines[0]


def test_help_hides_helper_groups_and_lists_the_launchers():
    r = _launch("--help", timeout=60)
    assert r.returncode == 0, r.stderr
    groups = r.stdout.split("Config groups", 1)[1].split("Canonical commands", 1)[0]
    assert "diffusion_schedule:" not in groups  # an overlay only sweep files select (sweeps/diffusion_schedule/)
    (sweep_line,) = [ln for ln in groups.splitlines() if ln.startswith("sweep:")]
    sweeps = sorted(p.stem for p in (ROOT / "sweeps" / "sweep").glob("*.yaml"))
    assert sweep_line == "sweep: " + ", ".join(sweeps)
    assert "model:" in groups and "hardware:" in groups
    presets = sorted(p.stem for p in (ROOT / "conf" / "hydra" / "launcher").glob("*.yaml"))
    assert {"slurm_debug", "slurm_8gpu"} <= set(presets)
    lines = r.stdout.splitlines()
    for name in [*presets, "submitit_slurm", "submitit_local"]:  # each with one line on when to use it
        (line,) = [ln for ln in lines if ln.split()[:1] == [name]]
        assert len(line.split()) > 4, line
    assert "hydra/launcher=" in r.stdout


def test_ctrl_c_then_the_documented_resume_command_finishes_the_run(tmp_path):
    """Interrupt a real CLI run with SIGINT, then resume it in place with `-cd RUN_DIR -cn reproduce
    hydra.run.dir=RUN_DIR`: it continues from the saved step (no restart from 0) and ends done."""
    import signal
    import time

    run_dir = tmp_path / "run"
    e = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "launch.py", *TINY, "train.max_steps=400", f"hydra.run.dir={run_dir}"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=e)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()[0]
    p.send_signal(signal.SIGINT)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 130, out
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "interrupted" and 3 <= s["step"] < 400
    stopped_at = s["step"]

    r = _launch("-cd", str(run_dir), "-cn", "reproduce", f"hydra.run.dir={run_dir}", timeout=300)
    assert r.returncode == 0, r.stderr
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "done" and s["step"] == 400
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 400  # one row per step, no step logged twice
    assert "resumed from" in (run_dir / "rank0.log").read_text() and stopped_at in steps
