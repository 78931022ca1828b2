"""The Optuna sweeper of `sweep=lr_search` (hydra-optuna-sweeper's), with one change: a search in which no
trial finished ends like any sweep whose jobs all failed -- one line per failure from the jobs, then
launch.py's `error: N job(s) of the sweep failed ...` and exit code 1 -- instead of Optuna's
`ValueError: No trials are completed yet.` traceback out of Hydra.

Selected in sweeps/sweep/lr_search.yaml by `hydra.sweeper._target_` (Hydra instantiates plugins only from
the hydra_plugins namespace). Hydra's plugin scan imports this module at every launch, as it imports the
stock sweeper's: neither imports Optuna itself until a search starts.
"""
from __future__ import annotations

import sys
from typing import List

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as _OptunaSweeper


class OptunaSweeper(_OptunaSweeper):
    def sweep(self, arguments: List[str]) -> None:
        try:
            return super().sweep(arguments)
        except ValueError as exc:
            if "No trials are completed" not in str(exc):
                raise
            print("error: no trial of the search finished, so there is no best trial (each failed job's "
                  "summary.json says why)", file=sys.stderr, flush=True)
            return None
