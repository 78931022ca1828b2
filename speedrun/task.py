"""The Hydra task: composed config -> typed config -> trainer. The only module besides launch.py that
touches Hydra; the trainer itself receives dataclasses.

It also writes `reproduce.yaml`, a self-contained resolved config:

    python launch.py -cd RUN_DIR -cn reproduce                       # rerun from scratch, new directory
    python launch.py -cd RUN_DIR -cn reproduce hydra.run.dir=RUN_DIR # resume this run

Known errors (bad config, missing or corrupt data, an unwritable checkpoint) end with one line on
stderr and exit code 2 instead of a traceback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, from_container, to_dict

REPRODUCE_HEADER = """\
# Self-contained, resolved config of this run.
#   rerun from scratch (new directory):  python launch.py -cd {run_dir} -cn reproduce
#   resume this run:                     python launch.py -cd {run_dir} -cn reproduce hydra.run.dir={run_dir}
"""


def write_reproduce(run_dir: Path, cfg_dict: dict) -> None:
    path = run_dir / "reproduce.yaml"
    if path.exists():
        return
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


def _fail(msg: str, multirun: bool, run_dir: Path | None = None) -> None:
    """One line on stderr. A single run exits with code 2; in a multirun the job is marked failed in its
    summary.json (so the sweep report shows why) and the sweep goes on with the other jobs."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    if not multirun:
        sys.exit(2)
    if run_dir is not None and _global_rank() == 0:
        from .rundir import read_json, write_json

        path = run_dir / "summary.json"
        summary = read_json(path)
        if summary.get("status") != "failed":
            summary.update(status="failed", reason=msg)
            write_json(path, summary)
    return None


def run_task(cfg: DictConfig):
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        typed = from_container(cfg)
    except ConfigError as exc:
        return _fail(str(exc), multirun, run_dir)

    from .checkpoint import CheckpointError
    from .data.shards import DataError
    from .probe import ProbeError
    from .probe_tasks import ProbeDataError
    from .train import RunFailed, run

    if _global_rank() == 0:
        write_reproduce(run_dir, to_dict(typed))
    try:
        summary = run(typed, run_dir)
    except (ConfigError, DataError, CheckpointError, RunFailed, ProbeError, ProbeDataError) as exc:
        return _fail(str(exc), multirun, run_dir)
    if summary and _global_rank() == 0:
        print(f"run directory: {run_dir}")
        keys = ("status", "val_loss", "val_loss_stderr", "unigram_loss", "val_ppl", "val_accuracy", "tokens_per_s",
                "train_seconds")
        print("summary: " + ", ".join(f"{k}={_fmt(summary.get(k))}" for k in keys if k in summary), flush=True)
    return summary.get("val_loss") if summary else None


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else v
