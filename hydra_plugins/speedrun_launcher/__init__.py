"""Hydra launcher plugin `hydra/launcher=speedrun_slurm`: hydra-submitit-launcher's SlurmLauncher that can
submit a whole sweep and return at once (`hydra.launcher.detach=true`), and that records every submission's
SLURM job ids in the sweep directory (`jobs.json`, read by `python -m speedrun.status`).

Why: the stock launcher blocks until every job of the sweep ends (hydra #2479) -- fine in tmux, useless
from a laptop on a train. The jobs never needed the launching process: each writes its own results into
the sweep directory, and time-outs and preemptions requeue themselves. So detaching only has to skip the
wait. Sweepers that read results to choose the next jobs (Optuna) cannot be detached; that is refused in
one line.

Plain-language keys added to the stock SLURM config (`SlurmQueueConf`):

    detach   false: wait for the jobs as Hydra always does; true: submit, print the sweep dir and job ids, exit
    time     sbatch's own --time spellings ("90", "4:00:00", "1-12:00:00"); null: timeout_min decides

and a CPU run (`hardware.device=cpu`) asks SLURM for no GPUs, whatever `gpus_per_node` says.

The presets in conf/hydra/launcher/ (slurm, slurm_8gpu, slurm_debug) extend this node. Hydra discovers the
module by scanning the `hydra_plugins` namespace package; everything heavy (submitit, speedrun) is
imported inside the methods, so plugin discovery -- which every `python launch.py` pays -- stays fast.
"""

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

#: sweepers that never read a job's result (so their sweeps may be submitted and left)
RESULT_FREE_SWEEPERS = ("BasicSweeper", "ListSweeper")


@dataclass
class SpeedrunSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.speedrun_launcher.SpeedrunSlurmLauncher"
    detach: bool = False  # submit the sweep and return at once (job ids in SWEEP_DIR/jobs.json)
    time: Optional[str] = None  # sbatch --time ("MM", "HH:MM:SS", "D-HH:MM"...); null: timeout_min


ConfigStore.instance().store(group="hydra/launcher", name="speedrun_slurm", node=SpeedrunSlurmConf,
                             provider="speedrun")


def _fail(msg: str) -> None:
    """The project's one CLI error style (speedrun.errors): one line on stderr, exit code 2."""
    print(f"error: {' '.join(msg.split())}", file=sys.stderr, flush=True)
    sys.exit(2)


_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


def time_minutes(value: Any) -> int:
    """sbatch --time in minutes (rounded up): "MM", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM", "D-HH:MM:SS"."""
    text = str(value).strip()
    m = _TIME.match(text)
    if not m:
        raise ValueError(f"hydra.launcher.time={text!r} is not a SLURM time: use minutes (90), HH:MM:SS "
                         "(4:00:00) or D-HH:MM:SS (1-12:00:00)")
    d, a, b, c = (int(m[k]) if m[k] is not None else None for k in "dabc")
    if d is not None:  # D-HH[:MM[:SS]]
        seconds = d * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    else:  # MM[:SS]
        seconds = a * 60 + (b or 0)
    minutes = -(-seconds // 60)
    if minutes < 1:
        raise ValueError(f"hydra.launcher.time={text!r} is shorter than a minute")
    return minutes


class SpeedrunSlurmLauncher(SlurmLauncher):
    """SlurmLauncher + `detach`, `time`, no GPUs for CPU runs, and `jobs.json` (see the module docstring)."""

    def __init__(self, detach: bool = False, time: Optional[str] = None, **params: Any) -> None:
        super().__init__(**params)
        self.detach = bool(detach)
        if time is not None:
            try:
                self.params["timeout_min"] = time_minutes(time)
            except ValueError as exc:
                _fail(str(exc))

    def _executor(self):
        """The submitit executor, built exactly as the stock launcher builds it (SLURM keys prefixed)."""
        import submitit

        params = dict(self.params)
        device = OmegaConf.select(self.config, "hardware.device", default=None) if self.config is not None else None
        if device == "cpu":  # a CPU run: no --gpus-per-node, which a CPU-only partition would refuse
            params["gpus_per_node"] = None
        executor = submitit.AutoExecutor(folder=params.pop("submitit_folder"), cluster=self._EXECUTOR,
                                         slurm_max_num_timeout=params.pop("max_num_timeout"))
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})
        return executor

    def _submit(self, executor, job_params: List[Any]) -> list:
        """executor.map_array, with sbatch's refusal (no such partition, no GPUs there...) as one line."""
        from submitit.core.utils import FailedJobError

        try:
            return executor.map_array(self, *zip(*job_params))
        except FailedJobError as exc:
            why = next((ln for ln in str(exc).splitlines() if ln.strip()), "no reason given")
            gpus = executor.parameters.get("gpus_per_node")
            hint = (f"it asked for {gpus} GPU(s) per node (hardware.gpus): choose a partition with GPUs "
                    "(hydra.launcher.partition=...) or run hardware=cpu" if gpus else
                    "check the launcher settings: python launch.py hydra/launcher=slurm --cfg hydra -p hydra.launcher")
            _fail(f"sbatch refused the sweep ({why.strip()}); {hint}")

    def _check_detachable(self) -> None:
        sweeper = str(OmegaConf.select(self.config, "hydra.sweeper._target_", default="") or "")
        if not sweeper.endswith(RESULT_FREE_SWEEPERS):
            _fail(f"hydra.launcher.detach=true: the sweeper {sweeper.rsplit('.', 1)[-1]} reads each job's result "
                  "to choose the next jobs, so it must wait for them: drop hydra.launcher.detach=true (and run "
                  "the command in tmux)")

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides

        from speedrun.status import record_submission

        assert self.config is not None and len(job_overrides) > 0
        if self.detach:
            self._check_detachable()
        executor = self._executor()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        job_params: List[Any] = []
        for idx, overrides in enumerate(job_overrides, initial_job_idx):
            print(f"\t#{idx} : {' '.join(filter_overrides(overrides))}", flush=True)
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = self._submit(executor, job_params)
        nums = range(initial_job_idx, initial_job_idx + len(jobs))
        record_submission(sweep_dir, [(n, j.job_id, list(o)) for n, j, o in zip(nums, jobs, job_overrides)],
                          detached=self.detach)
        ids = " ".join(j.job_id for j in jobs)
        print(f"submitted {len(jobs)} SLURM job(s): {ids}\nsweep dir: {sweep_dir}\n"
              f"  watch:  python -m speedrun.status {sweep_dir} --watch\n"
              f"  report: python -m speedrun.report {sweep_dir}", flush=True)
        if self.detach:
            return [JobReturn(overrides=list(o), status=JobStatus.COMPLETED, _return_value=None)
                    for o in job_overrides]
        return [j.results()[0] for j in jobs]
