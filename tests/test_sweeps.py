"""Named sweeps (sweeps/sweep/*.yaml), the search-path plugin that makes them selectable, the hardware and
SLURM launcher presets, and a real local multirun that is idempotent when re-issued."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CONF, ROOT, TINY, compose

SWEEPS = ROOT / "sweeps"
SWEEP_FILES = sorted((SWEEPS / "sweep").glob("*.yaml"))
NEEDS_DIFFUSION = {"diffusion_schedules"}


def _launch(*args, cwd=ROOT, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def _has_sweep_slot() -> bool:
    """True once conf/config.yaml's defaults list has a `sweep: null` slot (then `sweep=NAME` works)."""
    defaults = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml")).get("defaults", [])
    return any(isinstance(d, dict) and any(k.split()[-1] == "sweep" for k in d) for d in defaults)


def select(name: str) -> str:
    """The override that selects a named sweep: `sweep=NAME` with the defaults slot, else `+sweep=NAME`."""
    return f"sweep={name}" if _has_sweep_slot() else f"+sweep={name}"


def _diffusion_missing() -> str | None:
    from dataclasses import fields

    from speedrun.config import MLMToDiffusionConfig

    missing = [f"conf/objective/{o}.yaml" for o in ("diffusion", "mlm_to_diffusion")
               if not (CONF / "objective" / f"{o}.yaml").exists()]
    if "mlm_steps" not in {f.name for f in fields(MLMToDiffusionConfig)}:
        missing.append("MLMToDiffusionConfig.mlm_steps")
    return ", ".join(missing) or None


def sweep_jobs(name: str) -> list[list[str]]:
    """Every job's overrides, expanded from the sweep file as its sweeper does it (the grid of the
    BasicSweeper, the pairs x grid of the ListSweeper); for an Optuna search, the two corners of its space."""
    from omegaconf import open_dict

    from speedrun.report import _sweeper_jobs

    cfg = compose([select(name)], return_hydra=True)
    target = cfg.hydra.sweeper._target_
    if target.endswith("OptunaSweeper"):
        return _search_corners(cfg.hydra.sweeper.params)
    with open_dict(cfg):
        cfg.hydra.overrides.task = []  # the file's own jobs, without `sweep=NAME`
    return list(_sweeper_jobs(cfg, target).values())


def _search_corners(params) -> list[list[str]]:
    """[lowest, highest] point of an Optuna search space (first and last choice of a categorical)."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    dists, _ = create_params_from_overrides([f"{k}={v}" for k, v in params.items()])
    ends = [(d.choices[0], d.choices[-1]) if hasattr(d, "choices") else (d.low, d.high) for d in dists.values()]
    return [[f"{k}={e[i]}" for k, e in zip(dists, ends)] for i in (0, 1)]


# ---------------------------------------------------------------------------------------- sweeps ----
def test_there_are_the_named_sweeps():
    assert {"tied_heads", "mlm_rates", "diffusion_schedules", "scaled_batches", "lr_search"} <= {p.stem for p in SWEEP_FILES}


@pytest.mark.parametrize("path", SWEEP_FILES, ids=[p.stem for p in SWEEP_FILES])
def test_sweep_file_is_a_global_multirun_with_a_name_and_a_question(path):
    text = path.read_text()
    assert text.startswith("# @package _global_\n"), "a sweep file is a `# @package _global_` overlay"
    assert "Question:" in text, "each sweep says which question it answers"
    raw = OmegaConf.load(path)
    assert raw.name == path.stem, "outputs land under outputs/sweeps/<name>/: name the sweep after its file"
    assert raw.hydra.mode == "MULTIRUN" and len(raw.hydra.sweeper.get("params") or raw.hydra.sweeper.list_params) >= 1


@pytest.mark.parametrize("path", SWEEP_FILES, ids=[p.stem for p in SWEEP_FILES])
def test_every_job_of_every_sweep_composes_and_validates(path):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from speedrun.config import from_container

    if path.stem in NEEDS_DIFFUSION and _diffusion_missing():
        pytest.skip(f"sweep={path.stem} needs {_diffusion_missing()} (the lead is adding objective=diffusion and "
                    "objective=mlm_to_diffusion with objective.mlm_steps); it is tested once they exist")
    base = compose([select(path.stem)], return_hydra=True)
    assert base.hydra.mode == RunMode.MULTIRUN and base.name == path.stem
    assert str(base.hydra.sweep.dir).startswith(f"outputs/sweeps/{path.stem}/")
    jobs = sweep_jobs(path.stem)
    assert len(jobs) >= 2
    seen = set()
    for job in jobs:
        cfg = compose([select(path.stem), *job], return_hydra=True)
        HydraConfig.instance().set_config(cfg)
        typed = from_container(cfg)  # the schema and the cross-field rules accept every job
        assert typed.name == path.stem
        seen.add(json.dumps(OmegaConf.to_container(cfg, resolve=False)
                            | {"hydra": None}, sort_keys=True, default=str))
    assert len(seen) == len(jobs), "two jobs of the sweep compose to the same config"


def test_sweep_contents():
    assert sorted([o.lower() for o in job] for job in sweep_jobs("tied_heads")) == sorted(
        [[f"model.tie_embeddings={t}", f"seed={s}"] for t in ("true", "false") for s in (0, 1)])
    rates = [job[0].split("=")[1] for job in sweep_jobs("mlm_rates")]
    assert [float(r) for r in rates] == [0.10, 0.15, 0.20, 0.30, 0.40]
    arms = [job[0] for job in sweep_jobs("diffusion_schedules")]
    assert arms[:2] == ["+diffusion_schedule=mlm", "+diffusion_schedule=diffusion"]
    assert len(arms) >= 5 and all(a.startswith("+diffusion_schedule=mlm_to_diffusion_") for a in arms[2:])


def test_paired_and_search_sweep_contents():
    pairs = [dict(o.split("=") for o in job) for job in sweep_jobs("scaled_batches")]
    assert [(p["seed"], p["train.batch_tokens"]) for p in pairs] == [(s, b) for s in "01" for b in ("8192", "16384", "32768")]
    for p in pairs:  # a fixed token budget; every learning rate x sqrt(batch / 8192)
        batch = int(p["train.batch_tokens"])
        assert batch * int(p["train.max_steps"]) == 8192 * 600
        for key, base in (("lr_hidden", 0.05), ("lr_embed", 0.06), ("lr_head", 0.008), ("lr_scalar", 0.04)):
            assert float(p[f"optimizer.{key}"]) == pytest.approx(base * (batch / 8192) ** 0.5, rel=2e-3)
    cfg = compose([select("lr_search")], return_hydra=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "minimize"
    assert cfg.sweep_objective == "time_to_target" and cfg.target_loss is not None and cfg.train.stop_at_target
    assert set(cfg.hydra.sweeper.params) == {"optimizer.lr_hidden", "optimizer.lr_embed", "optimizer.lr_warmup_steps",
                                             "optimizer.momentum_warmup_steps"}


def test_the_sweeper_plugins_register_through_hydra_discovery():
    r = _launch("--info", "plugins")
    assert r.returncode == 0, r.stderr
    for name in ("OptunaSweeper", "ListSweeper", "SpeedrunSlurmLauncher", "SlurmLauncher"):
        assert name in r.stdout, name


def test_diffusion_sweep_uses_the_lead_s_objective_names():
    """Pinned here so a rename on either side is caught even while the objectives do not exist yet."""
    arms = {p.stem: OmegaConf.load(p) for p in (SWEEPS / "diffusion_schedule").glob("*.yaml")}
    assert arms["mlm"].defaults == [{"override /objective": "mlm"}]
    assert arms["diffusion"].defaults == [{"override /objective": "diffusion"}]
    warm = {k: v for k, v in arms.items() if k.startswith("mlm_to_diffusion_")}
    assert len(warm) >= 3
    for stem, cfg in warm.items():
        assert cfg.defaults == [{"override /objective": "mlm_to_diffusion"}]
        assert cfg.objective.mlm_steps == int(stem.rsplit("_", 1)[1]) and cfg.objective.ramp == "step"


def test_search_path_is_computed_from_the_plugin_not_the_cwd(tmp_path):
    r = _launch("--info", "searchpath", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"file://{SWEEPS}" in r.stdout
    r = _launch("sweep=mlm_rates", "--cfg", "hydra", "-p", "hydra.sweeper.params", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "objective.mask_rate: 0.10,0.15,0.20,0.30,0.40" in r.stdout


def test_plugin_path_does_not_depend_on_cwd(tmp_path, monkeypatch):
    from hydra_plugins.speedrun_searchpath import SWEEPS_DIR

    monkeypatch.chdir(tmp_path)
    assert SWEEPS_DIR == SWEEPS and SWEEPS_DIR.is_absolute()


def test_sweep_is_selected_without_a_plus():
    """`python launch.py sweep=tied_heads` (the issue's command) needs a `sweep: null` slot in conf/config.yaml's
    defaults list and `sweep` in speedrun.config.GROUPS (options read from sweeps/sweep/) -- see the report."""
    r = _launch("sweep=tied_heads", "--cfg", "hydra", "-p", "hydra.sweeper.params")
    assert r.returncode == 0, r.stderr
    assert "model.tie_embeddings: true,false" in r.stdout


# ------------------------------------------------------------------------------ hardware presets ----
RIGS = {"h100x8": (8, 65536, 1), "a100x4": (4, 65536, 2), "h200": (1, 65536, 8), "rtx4090x4": (4, 16384, 8)}


@pytest.mark.parametrize("rig", sorted(RIGS))
def test_hardware_presets_keep_the_global_batch(rig):
    from hydra.core.hydra_config import HydraConfig

    from speedrun.config import batch_geometry, from_container

    gpus, micro, accum = RIGS[rig]
    cfg = compose(["experiment=reference", f"hardware={rig}"], return_hydra=True)
    HydraConfig.instance().set_config(cfg)
    typed = from_container(cfg)
    h = typed.hardware
    assert (h.device, h.gpus, h.micro_batch_tokens, h.precision, h.compile) == ("cuda", gpus, micro, "bf16", True)
    geo = batch_geometry(typed, h.gpus)
    assert geo["batch_tokens"] == 524288 == typed.train.batch_tokens  # the global batch is the recipe's
    assert geo["grad_accum"] == accum


# ------------------------------------------------------------------------------ launcher presets ----
@pytest.mark.parametrize("preset,rig,partition", [("slurm_8gpu", "h100x8", None), ("slurm_debug", "gpu", "debug")])
def test_slurm_launcher_presets(preset, rig, partition):
    cfg = compose([f"hydra/launcher={preset}", f"hardware={rig}"], return_hydra=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)  # resolved as the launcher does
    gpus = cfg.hardware.gpus
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["gpus_per_node"] == launcher["tasks_per_node"] == gpus  # one task (rank) per GPU
    assert launcher["nodes"] == 1 and launcher["partition"] == partition
    assert launcher["max_num_timeout"] > 0  # timed-out jobs requeue
    assert launcher["timeout_min"] >= 10  # submitit treats any USR2 as a time-out in jobs < 10 min
    assert 30 <= launcher["signal_delay_s"] < 60 * launcher["timeout_min"]
    assert launcher["cpus_per_task"] >= 1
    assert "export OMP_NUM_THREADS=$((SLURM_CPUS_PER_TASK > 0 ? SLURM_CPUS_PER_TASK : 1))" in launcher["setup"]


def test_site_settings_come_from_the_git_ignored_local_config(tmp_path):
    """conf/local/<preset>.yaml (git-ignored) fills account/partition; it never breaks non-SLURM runs."""
    local = CONF / "local" / "slurm_8gpu.yaml"
    if local.exists():
        pytest.skip(f"{local} exists on this machine; not touching a user's site settings")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(local)], cwd=ROOT).returncode == 0
    assert ignored, "conf/local/*.yaml must stay git-ignored"
    local.write_text("account: acme\npartition: gpu-h100\n")
    try:
        cfg = compose(["hydra/launcher=slurm_8gpu", "hardware=h100x8"], return_hydra=True)
        assert (cfg.hydra.launcher.account, cfg.hydra.launcher.partition) == ("acme", "gpu-h100")
        cfg = compose(["hydra/launcher=slurm_8gpu", "hydra.launcher.partition=other"], return_hydra=True)
        assert cfg.hydra.launcher.partition == "other"  # the command line still wins
        cfg = compose([], return_hydra=True)  # the basic launcher is untouched by the SLURM site file
        assert "account" not in cfg.hydra.launcher
    finally:
        local.unlink()


# ----------------------------------------------------------------------------- a real local sweep ----
@pytest.mark.slow
def test_local_sweep_runs_and_reissuing_it_reuses_done_jobs(tmp_path):
    """A named sweep (one seed of tied_heads: 2 jobs) through submitit's local executor, tiny settings."""
    sweep_dir = tmp_path / "sweep"
    args = [select("tied_heads"), "seed=0", "hydra/launcher=submitit_local", "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.timeout_min=10", *TINY, "train.max_steps=3", f"hydra.sweep.dir={sweep_dir}"]
    r = _launch(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    before = {}
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        assert summary["status"] == "done" and summary["step"] == 3
        assert (job / ".hydra" / "overrides.yaml").exists() and (job / "reproduce.yaml").exists()
        before[job.name] = ((job / "metrics.jsonl").read_text(), (job / "summary.json").read_text())
    ties = {job.name: OmegaConf.load(job / ".hydra" / "config.yaml").model.tie_embeddings for job in jobs}
    assert ties == {"0": True, "1": False}

    # re-issue into the same sweep dir, after losing job 1's results: job 0 is reused as is, job 1 is redone
    for p in jobs[1].iterdir():
        if p.name != ".hydra":
            subprocess.run(["rm", "-rf", str(p)], check=True)
    r = _launch(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ((jobs[0] / "metrics.jsonl").read_text(), (jobs[0] / "summary.json").read_text()) == before["0"]
    assert "summary.json says done" in (jobs[0] / "rank0.log").read_text()
    redone = json.loads((jobs[1] / "summary.json").read_text())
    assert redone["status"] == "done" and _losses(jobs[1] / "metrics.jsonl") == _losses_text(before["1"][0])


def _losses_text(text: str) -> dict:
    return {r["step"]: r["train_loss"] for r in map(json.loads, text.splitlines()) if "train_loss" in r}


def _losses(path: Path) -> dict:
    return _losses_text(path.read_text())


def test_reissued_sweep_with_other_settings_does_not_reuse_results(tiny_cfg, tmp_path):
    """Re-issuing a sweep into its old hydra.sweep.dir reuses a job whose summary says done. If the command
    changed meanwhile (another value, another override), job N of the new sweep is a different config, and
    silently returning the old summary puts the wrong numbers on the leaderboard: it must be refused (as
    for any directory that holds another run's results), not reused."""
    from speedrun.errors import FolderError
    from speedrun.train import run

    run(tiny_cfg("train.max_steps=2"), tmp_path)
    with pytest.raises(FolderError, match=r"finished run with a different config \(model.tie_embeddings\)"):
        run(tiny_cfg("train.max_steps=2", "model.tie_embeddings=true"), tmp_path)


# ------------------------------------------------------------------------ sweeps that are not grids ----
@pytest.mark.slow
def test_lr_search_names_the_fastest_trial(tmp_path):
    """sweep=lr_search with 3 Optuna trials of the tiny model, locally: every trial returns its train seconds
    to the target (sweep_objective=time_to_target), and the search ends naming the best trial's run."""
    from speedrun.report import best_trial, report

    sweep = tmp_path / "search"
    r = _launch(select("lr_search"), "hydra.sweeper.n_trials=3", *TINY, "train.max_steps=6", "eval.every_steps=2",
                "target_loss=3.45", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-3000:]
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}
    assert sorted(summaries) == ["0", "1", "2"] and all(s["status"] == "done" for s in summaries.values())

    def objective(s):  # what each job returned to Optuna (speedrun.task.objective_value)
        from speedrun.task import NOT_REACHED_S

        hit = s.get("target") or {}
        return hit["train_seconds"] if hit.get("train_seconds") is not None else NOT_REACHED_S + s["best_val_loss"]

    fastest = min(summaries, key=lambda n: objective(summaries[n]))
    best = best_trial(sweep)
    assert best["run_dir"] == sweep / fastest and best["value"] == pytest.approx(objective(summaries[fastest]))
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("best trial:"))
    assert line.startswith(f"best trial: {sweep / fastest} time_to_target=") and "optimizer.lr_hidden=" in line
    overrides = (sweep / fastest / ".hydra" / "overrides.yaml").read_text()
    assert all(f"{k}={v}" in overrides for k, v in best["params"].items())
    md = report(sweep)["text"]
    assert f"best trial (Optuna): `{fastest}`" in md and "optimizer.lr_hidden" in md  # a searched knob is a column


def test_a_search_in_which_no_trial_finishes_ends_in_lines_not_a_traceback(tmp_path):
    """Every trial fails (its data folder is missing): each says why in one line, the search says there is
    no best trial, launch.py lists the failed jobs, exit 1 -- no Optuna ValueError out of Hydra."""
    sweep = tmp_path / "search"
    r = _launch(select("lr_search"), "hydra.sweeper.n_trials=2", *TINY, "data=local",
                f"data.path={tmp_path}/nowhere", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 4 and sum("does not exist" in ln for ln in errors) == 2, errors
    assert "no trial of the search finished" in errors[2] and "2 job(s) of the sweep failed" in errors[3]


@pytest.mark.slow
def test_paired_sweep_runs_the_pairs(tmp_path):
    """sweep=scaled_batches (hydra-list-sweeper) with two tiny pairs: each run gets the i-th value of every
    list -- pairs, not their product -- and the report compares the pairs as arms."""
    from speedrun.report import report

    sweep = tmp_path / "pairs"
    pairs = ("{train.batch_tokens:[1024,2048],train.max_steps:[4,2],optimizer.lr_hidden:[0.05,0.0707],"
             "optimizer.lr_embed:[0.06,0.0849],optimizer.lr_head:[0.008,0.0113],optimizer.lr_scalar:[0.04,0.0566]}")
    r = _launch(select("scaled_batches"), f"hydra.sweeper.list_params={pairs}", "hydra.sweeper.grid_params={seed:0}",
                *TINY, f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-3000:]
    ran = {}
    for p in sorted(sweep.glob("*/run.json")):
        c = json.loads(p.read_text())["config"]
        ran[p.parent.name] = (c["train"]["batch_tokens"], c["train"]["max_steps"], c["optimizer"]["lr_hidden"])
    assert ran == {"0": (1024, 4, 0.05), "1": (2048, 2, 0.0707)}
    res = report(sweep, baseline=["train.batch_tokens=1024"])
    assert [r["status"] for r in res["rows"]] == ["done", "done"]  # and no job of the sweep is missing
    (other,) = [a for a in res["arms"] if not a["baseline"]]
    assert other["train.batch_tokens"] == "2048" and other["diff_se"] > 0
