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


def _fail(msg: str, multirun: bool) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    if not multirun:
        sys.exit(2)
    raise SystemExit(2)


def run_task(cfg: DictConfig):
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        typed = from_container(cfg)
    except ConfigError as exc:
        return _fail(str(exc), multirun)
    run_dir = Path(hc.runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    from .checkpoint import CheckpointError
    from .data.shards import DataError
    from .train import RunFailed, run

    if int(os.environ.get("RANK", "0")) == 0:
        write_reproduce(run_dir, to_dict(typed))
    try:
        summary = run(typed, run_dir)
    except (ConfigError, DataError, CheckpointError, RunFailed) as exc:
        return _fail(str(exc), multirun)
    if summary and int(os.environ.get("RANK", "0")) == 0:
        print(f"run directory: {run_dir}")
        keys = ("status", "val_loss", "unigram_loss", "val_ppl", "val_accuracy", "tokens_per_s", "train_seconds")
        print("summary: " + ", ".join(f"{k}={_fmt(summary.get(k))}" for k in keys if k in summary), flush=True)
    return summary.get("val_loss") if summary else None


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else v
