"""speedrun-plm entry point: `python launch.py [group=option ...] [key=value ...]` (see --help).

Hydra composes the config (conf/) once, here; the typed config is handed to the trainer, which never
imports Hydra. Only Hydra and the torch-free schema are imported at module level, so --help and
--cfg are fast.

Exit codes: 0 when every run succeeded; 2 for a single run that stopped on a known error (one line on
stderr); 1 for a local multirun in which any job failed -- the sweep goes on through all its jobs, then one
line lists the failed job directories. A SLURM sweep with hydra.launcher.detach=true (our launcher presets,
hydra_plugins/speedrun_launcher) exits 0 as soon as every job is submitted -- the job ids are in
SWEEP_DIR/jobs.json, `python -m speedrun.status SWEEP_DIR` follows them -- and sbatch refusing the sweep is
one line with exit code 2. An Optuna search (hydra/sweeper=optuna) minimises what each job returns:
sweep_objective, see speedrun/task.py objective_value.
"""
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from speedrun.config import register_schema
from speedrun.overrides import check_overrides

ROOT = Path(__file__).resolve().parent
register_schema()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from speedrun.task import run_task

    return run_task(cfg)


def helper_groups() -> set:
    """Config groups under sweeps/ other than `sweep` itself (e.g. diffusion_schedule): overlays that only
    the sweep files select, so --help does not offer them as groups to pick."""
    sweeps, conf = ROOT / "sweeps", ROOT / "conf"
    if not sweeps.is_dir():
        return set()
    return {p.name for p in sweeps.iterdir() if p.is_dir() and p.name != "sweep" and not (conf / p.name).is_dir()}


def _hide_helper_groups() -> None:
    """Leave helper_groups() out of --help's group list ($APP_CONFIG_GROUPS, which Hydra builds itself), and
    the schema nodes (`schema`, `schema_<option>`: the dataclasses the presets extend) out of each group's options."""
    from hydra._internal.hydra import Hydra

    hidden = helper_groups()

    def format_config_groups(self, predicate, compact=True):
        lines = []
        for group in sorted(g for g in self.list_all_config_groups() if predicate(g) and g.split("/")[0] not in hidden):
            options = sorted(o for o in self.config_loader.get_group_options(group) if not o.startswith("schema"))
            lines.append(f"{group}: {', '.join(options)}" if compact else
                         f"{group}:\n" + "\n".join(f"  {o}" for o in options))
        return "".join(line + "\n" for line in lines)

    Hydra.format_config_groups = format_config_groups


if __name__ == "__main__":
    problem = check_overrides(sys.argv[1:], os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf"))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        _hide_helper_groups()
    main()
    task = sys.modules.get("speedrun.task")  # imported only when a job ran
    failed = task.failed_runs() if task is not None else []
    if failed:
        print(f"error: {len(failed)} job(s) of the sweep failed (see their summary.json): {' '.join(failed)}",
              file=sys.stderr, flush=True)
        sys.exit(1)
