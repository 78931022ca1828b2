"""speedrun-plm entry point: `python launch.py [group=option ...] [key=value ...]` (see --help).

Hydra composes the config (conf/) once, here; the typed config is handed to the trainer, which never
imports Hydra. Only Hydra and the torch-free schema are imported at module level, so --help and
--cfg are fast.
"""
import os
import sys

import hydra
from omegaconf import DictConfig

from speedrun.config import check_overrides, register_schema

register_schema()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from speedrun.task import run_task

    return run_task(cfg)


if __name__ == "__main__":
    problem = check_overrides(sys.argv[1:], os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf"))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
