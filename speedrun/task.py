"""The Hydra task: composed config -> typed config -> trainer. The only module besides launch.py that
touches Hydra; the trainer itself receives dataclasses.

It also writes `reproduce.yaml`, a self-contained resolved config:

    python launch.py -cd RUN_DIR -cn reproduce                       # rerun from scratch, new directory
    python launch.py -cd RUN_DIR -cn reproduce hydra.run.dir=RUN_DIR # resume this run

Known errors (bad config, an impossible batch, missing or corrupt data, an unwritable checkpoint, a
failed spawned rank) end with one line on stderr and exit code 2 instead of a traceback. In a multirun a
failed job is marked failed in its summary.json; under submitit the job then exits non-zero (SLURM marks
it FAILED), while a local sweep goes on and launch.py exits non-zero at the end (see failure_action).
Under torchrun all ranks share rank 0's run directory.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, batch_geometry, from_container, to_dict

REPRODUCE_HEADER = """\
# Self-contained, resolved config of this run.
#   rerun from scratch (new directory):  python launch.py -cd {run_dir} -cn reproduce
#   resume this run:                     python launch.py -cd {run_dir} -cn reproduce hydra.run.dir={run_dir}
"""


def write_reproduce(run_dir: Path, cfg_dict: dict, replace: bool = False) -> None:
    """reproduce.yaml, written once; `replace` (resume=must continuing with another config) keeps the
    earlier file as reproduce.prev-N.yaml and describes the config the run now continues with."""
    path = run_dir / "reproduce.yaml"
    if path.exists() and not replace:
        return
    if path.exists():
        n = 1 + len(list(run_dir.glob("reproduce.prev-*.yaml")))
        os.replace(path, run_dir / f"reproduce.prev-{n}.yaml")
    body = {"defaults": ["schema", "_self_"], **cfg_dict,
            "hydra": {"run": {"dir": f"outputs/runs/{cfg_dict['name']}-repro/${{now:%Y-%m-%d_%H-%M-%S_%f}}"},
                      "job": {"chdir": False}}}
    text = REPRODUCE_HEADER.format(run_dir=run_dir) + OmegaConf.to_yaml(OmegaConf.create(body))
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _global_rank() -> int:
    """This process's rank: torchrun/spawn set RANK; under submitit every task runs this Hydra job before
    RANK is exported, so SLURM_PROCID tells the tasks apart."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def _under_submitit(hc) -> bool:
    """This Hydra job runs as a submitit job (SLURM, or submitit's local executor; our SLURM launcher,
    hydra_plugins/speedrun_launcher, is submitit's)."""
    target = str(OmegaConf.select(hc, "launcher._target_", default="") or "")
    return "submitit" in target or "speedrun_launcher" in target or "SUBMITIT_FOLDER" in os.environ


def _torchrun() -> bool:
    """Started by torchrun (or another launcher that sets RANK/WORLD_SIZE): every rank composed Hydra itself
    (speedrun.dist.detect_mode's first case)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "SPEEDRUN_SPAWNED" not in os.environ


def failure_action(status: str | None, *, multirun: bool, submitit: bool) -> str:
    """How this Hydra job ends, given the final status of its run.

    ok        done, dry_run, or no status: return normally
    requeue   preempted / interrupted: left alone -- the trainer's own SystemExit and submitit's USR2
              handler decide (checkpoint, requeue, resume), exactly as without this function
    exit      failed, single run: one line on stderr, exit code 2 at once
    fail_job  failed in a multirun under submitit: after the failed summary, JobFailed is the job's result
              (the submitting side's sweep raises it once all jobs are in) and the process exits with code 2
              so SLURM (or submitit's local executor) marks the job FAILED, not COMPLETED
    record    failed in a local (basic launcher) multirun: the sweep goes on with the other jobs, and
              launch.py exits non-zero at the end, listing the failed job directories
    """
    if status in ("preempted", "interrupted"):
        return "requeue"
    if status != "failed":
        return "ok"
    if not multirun:
        return "exit"
    return "fail_job" if submitit else "record"


_FAILED_RUNS: list[str] = []
_EXIT_CODE: list[int] = []  # set by a failed submitit job: the process's exit code (_exit_code_at_exit)
_EXIT_HOOK: list[bool] = []


class JobFailed(CompactHydraException):
    """A sweep job under submitit failed; the message names its run directory and its summary's reason.
    Hydra prints a CompactHydraException as its message alone: one line on the submitting side."""


def _exit_code_at_exit() -> None:
    """Registered when a submitit job starts, so it runs after every exit handler registered later (W&B,
    logging) and after submitit has written the job's result: a failed job's process exits non-zero."""
    if _EXIT_CODE:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(_EXIT_CODE[0])


def failed_runs() -> list[str]:
    """Run directories of the jobs of this process's local multirun that failed (for launch.py)."""
    return list(_FAILED_RUNS)


def _fail(msg: str, multirun: bool, run_dir: Path | None = None, submitit: bool = False,
          owned: bool = True) -> None:
    """One line on stderr. A single run exits with code 2. In a multirun the job is marked failed in its
    summary.json (so the sweep report shows why) — only in a folder that is this job's (`owned`), never in
    another run's; then, per failure_action, a submitit job exits non-zero (the scheduler sees the
    failure) and a local sweep goes on with the other jobs."""
    print(f"error: {' '.join(str(msg).split())}", file=sys.stderr, flush=True)
    action = failure_action("failed", multirun=multirun, submitit=submitit)
    if action == "exit":
        _cleanup_dist()
        sys.exit(2)
    if run_dir is not None and owned and _global_rank() == 0:
        from .rundir import CheckpointError, read_json, write_json

        path = run_dir / "summary.json"
        try:
            summary = read_json(path)
            if summary.get("status") != "failed":
                summary.update(status="failed", reason=msg)
                write_json(path, summary)
        except (OSError, CheckpointError) as exc:  # a full or unwritable disk (RunDirWriteError)
            print(f"error: could not mark {path} failed: {exc}", file=sys.stderr, flush=True)
    if action == "fail_job":
        # The job must end FAILED in SLURM *and* hand submitit its result: without a result file the
        # submitting side stops at the first failure (or, where SLURM accounting is off, waits forever).
        # So raise a plain exception -- Hydra's run_job stores it in the JobReturn, submitit pickles that as
        # the job's result, and the sweep on the submitting side re-raises it once every job is collected --
        # and exit with code 2 after submitit has written the result (_exit_code_at_exit).
        _cleanup_dist()
        _EXIT_CODE[:] = [2]
        raise JobFailed(f"error: a job of the sweep failed ({run_dir}): {msg} - the other jobs ran to the end; "
                        "each job's summary.json says how it ended")
    if run_dir is not None and str(run_dir) not in _FAILED_RUNS:
        _FAILED_RUNS.append(str(run_dir))
    return None


def _cleanup_dist() -> None:
    if "torch.distributed" in sys.modules:
        from .dist import cleanup

        cleanup()


def _world_size(typed, hc) -> int:
    """Total ranks of this run: torchrun's WORLD_SIZE, else hardware.gpus x hardware.nodes. A SLURM job must
    hold hardware.nodes nodes (our launcher presets ask for them); without SLURM, more than one node cannot
    run here -- but a dry run plans its batch all the same (a login node checking a multi-node config)."""
    if _torchrun():
        return int(os.environ["WORLD_SIZE"])
    nodes = typed.hardware.nodes
    allocated = os.environ.get("SLURM_NNODES") if _under_submitit(hc) else None
    if allocated is not None and int(allocated) != nodes:
        raise ConfigError(f"the SLURM job has {allocated} node(s) but hardware.nodes={nodes}: set "
                          "hydra.launcher.nodes=${hardware.nodes} (our presets do) or hardware.nodes=" + allocated)
    if allocated is None and nodes > 1 and not typed.dry_run:
        raise ConfigError(f"hardware.nodes={nodes} needs {nodes} machines: submit it to SLURM (-m hydra/launcher="
                          f"slurm ...), or use hardware.nodes=1 here (dry_run=true plans the {nodes}-node batch)")
    return typed.hardware.gpus * nodes


def _share_run_dir(typed, run_dir: Path, hc) -> Path:
    """Under torchrun every rank composed Hydra itself, each with its own timestamped run directory. Bring
    up the process group, take rank 0's directory on every rank, and remove the one Hydra made for this
    rank if it holds nothing but what Hydra wrote there (.hydra/*.yaml and the job log)."""
    from . import dist as D

    info = D.init(typed.hardware.device, "torchrun")
    shared = Path(D.broadcast_object(str(run_dir.resolve()), info))
    mine = run_dir.resolve()
    if info.rank == 0 or shared == mine:
        return run_dir
    sub = hc.output_subdir
    hydra_files = {f"{hc.job.name}.log"}
    if sub:
        hydra_files |= {str(sub), *(f"{sub}/{n}" for n in ("config.yaml", "hydra.yaml", "overrides.yaml"))}
    ours = {p.relative_to(mine).as_posix() for p in mine.rglob("*")} <= hydra_files
    if ours:
        import shutil

        loggers = [logging.getLogger(), *(lg for lg in list(logging.root.manager.loggerDict.values())
                                          if isinstance(lg, logging.Logger))]
        for logger in loggers:  # Hydra's job log file handler, open on the directory about to go
            for h in list(logger.handlers):
                if isinstance(h, logging.FileHandler) and Path(h.baseFilename).resolve().is_relative_to(mine):
                    logger.removeHandler(h)
                    h.close()
        if Path.cwd().resolve().is_relative_to(mine):  # hydra.job.chdir=true
            os.chdir(shared)
        shutil.rmtree(mine, ignore_errors=True)
    return shared


def sweep_job_dir(index_dir: Path, typed) -> Path:
    """A sweep job's folder, matched by the run's identity (run.json), not by the job's number: the
    folder that holds this job's run, else its numbered folder when that holds no run, else a new folder
    beside it (`<num>-<signature>`). A re-issued sweep with its values in another order so finds each
    finished run where it is and never writes into another job's."""
    from .config import signature
    from .rundir import holds_a_run, read_json

    sig = signature(typed)
    for d in sorted(p for p in index_dir.parent.iterdir() if p.is_dir()):
        stored = read_json(d / "run.json").get("config")
        if isinstance(stored, dict) and signature(stored) == sig:
            return d
    return index_dir if not holds_a_run(index_dir) else index_dir.parent / f"{index_dir.name}-{sig[:8]}"


def write_hydra_files(run_dir: Path, cfg: DictConfig, hc) -> None:
    """Hydra's .hydra/{config,hydra,overrides}.yaml, written once into the run's own folder (Hydra itself
    writes none: hydra.output_subdir is null, see conf/config.yaml)."""
    sub = run_dir / ".hydra"
    if sub.exists():
        return
    sub.mkdir(parents=True)
    task = OmegaConf.create({k: cfg[k] for k in cfg if k != "hydra"}) if "hydra" in cfg else cfg
    OmegaConf.save(task, sub / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(hc, resolve=False)}), sub / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(hc.overrides.task)), sub / "overrides.yaml")


def _place(cfg: DictConfig, hc, multirun: bool, submitit: bool):
    """(typed config, run directory) or None after a one-line failure."""
    index_dir = Path(hc.runtime.output_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    try:
        typed = from_container(cfg)
    except ConfigError as exc:
        from .rundir import holds_a_run

        return _fail(str(exc), multirun, index_dir, submitit, owned=not holds_a_run(index_dir))
    run_dir = index_dir
    if multirun and _global_rank() == 0 and not typed.dry_run:
        run_dir = sweep_job_dir(index_dir, typed)
        if run_dir != index_dir:
            print(f"{index_dir} holds another run: this job's run is {run_dir}", flush=True)
            with contextlib.suppress(OSError):
                index_dir.rmdir()  # nothing of this job is there
    if _torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        run_dir = _share_run_dir(typed, run_dir, hc)
    try:  # an impossible batch stops here, before any rank is spawned or any data is read
        batch_geometry(typed, _world_size(typed, hc))
    except ConfigError as exc:
        return _fail(str(exc), multirun, run_dir, submitit)
    return typed, run_dir


def run_task(cfg: DictConfig):
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    submitit = multirun and _under_submitit(hc)
    if submitit and not _EXIT_HOOK:
        import atexit

        atexit.register(_exit_code_at_exit)
        _EXIT_HOOK.append(True)
    placed = _place(cfg, hc, multirun, submitit)
    if placed is None:
        return None
    typed, run_dir = placed

    from .dist import RankFailed, one_line
    from .errors import SpeedrunError

    if _global_rank() == 0 and not typed.dry_run:
        write_hydra_files(run_dir, cfg, hc)
        write_reproduce(run_dir, to_dict(typed), replace=typed.resume == "must" and _config_changed(run_dir, typed))
    if submitit and _global_rank() == 0:
        from .status import mark_run_dir

        mark_run_dir(run_dir)  # for `python -m speedrun.status`: this job's run directory
    try:
        summary = _train(typed, run_dir)
    except RankFailed as exc:  # a spawned rank: one line here, its traceback in the run directory's log
        log = run_dir / f"{hc.job.name}.log"
        with open(log, "a") as f:
            f.write(f"{exc}\n{exc.details}\n")
        return _fail(f"{exc} (traceback in {log})", multirun, run_dir, submitit)
    except SpeedrunError as exc:
        from .errors import FolderError

        return _fail(str(exc), multirun, run_dir, submitit, owned=not isinstance(exc, FolderError))
    except Exception as exc:  # unexpected: a single run reports it as Hydra does; a sweep job must fail visibly
        if not multirun:
            raise
        traceback.print_exc()
        return _fail(one_line(exc), multirun, run_dir, submitit)
    if summary and _global_rank() == 0:
        print(f"run directory: {run_dir}")
        keys = ("status", "val_loss", "val_loss_stderr", "unigram_loss", "val_ppl", "val_accuracy", "tokens_per_s",
                "train_seconds")
        if summary.get("status") == "dry_run":
            keys = ("status", "n_params", "estimated_memory_gib", "peak_memory_gib")
        print("summary: " + ", ".join(f"{k}={_fmt(summary.get(k))}" for k in keys if k in summary), flush=True)
        if summary.get("status") == "dry_run":
            b = summary.get("batch") or {}
            print(f"batch: {b.get('batch_tokens'):,} tokens/step = {b.get('micro_batch_tokens'):,} tokens x "
                  f"{b.get('grad_accum')} micro-steps x {b.get('world_size')} rank(s) ({typed.hardware.gpus} GPU(s) x "
                  f"{typed.hardware.nodes} node(s))" + (f"\nnote: {summary['device_note']}" if summary.get("device_note")
                                                        else ""), flush=True)
    return objective_value(typed, summary)


def _train(typed, run_dir: Path) -> dict:
    """speedrun.train.run, except where it would spawn local ranks (hardware.gpus > 1): a dry run plans
    every rank in this one process instead (setup.build counts hardware.gpus x nodes), so a login node
    checks an 8-GPU config without 8 processes or 8 GPUs; and a GPU run on a machine without a GPU stops
    here in one line, before N ranks are started only to say so N times."""
    from . import dist as D
    from .train import run, train

    if typed.hardware.gpus > 1 and D.detect_mode(typed.hardware.gpus) == "spawn":
        if typed.dry_run:
            info = D.init(typed.hardware.device, "single", dry_run=True)
            try:
                return train(typed, run_dir, info)
            finally:
                D.cleanup()
        D.pick_device(typed.hardware.device, 0)  # DeviceError when hardware.device=cuda finds no GPU
    return run(typed, run_dir)


#: time_to_target of a run that never reached target_loss: larger than any real time, plus its best
#: validation loss, so a miss ranks after every hit and closer misses first (Optuna minimises it)
NOT_REACHED_S = 1e9


def objective_value(typed, summary: Optional[dict]) -> Optional[float]:
    """What this job returns to its sweeper, by sweep_objective (speedrun/config.py): the final val_loss, or
    the train seconds to target_loss. None for a run without a result (failed, dry run): an Optuna sweeper
    marks that trial failed."""
    if not summary or summary.get("status") != "done":
        return None
    if typed.sweep_objective == "time_to_target":
        hit = summary.get("target") or {}
        if hit.get("train_seconds") is not None:
            return float(hit["train_seconds"])
        best = summary.get("best_val_loss", summary.get("val_loss"))
        return NOT_REACHED_S + (float(best) if best is not None else NOT_REACHED_S)
    return summary.get("val_loss")


class BestTrial(Callback):
    """Hydra callback (hydra.callbacks in sweeps/sweep/lr_search.yaml): after a search, one line naming the
    best trial's run directory, its objective and its parameters (from Optuna's optimization_results.yaml)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from .report import best_trial

        best = best_trial(Path(str(config.hydra.sweep.dir)))
        if best:
            print(f"best trial: {best['run_dir'] or 'job ?'} {config.get('sweep_objective', 'objective')}="
                  f"{best['value']:.6g} with " + " ".join(f"{k}={v}" for k, v in best["params"].items()), flush=True)


def _config_changed(run_dir: Path, typed) -> bool:
    from .config import signature
    from .rundir import read_json

    stored = read_json(run_dir / "run.json").get("config")
    return isinstance(stored, dict) and signature(stored) != signature(typed)


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else v
