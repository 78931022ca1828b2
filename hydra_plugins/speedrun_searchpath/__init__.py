"""Hydra SearchPathPlugin: make the repository's named sweeps selectable (`python launch.py sweep=tied_heads`).

Hydra discovers this module by scanning the `hydra_plugins` namespace package (present both through the
editable install, which lists `hydra_plugins*` in pyproject.toml, and through the repository root on
`sys.path` when `launch.py` runs). It appends `<repo>/sweeps` to the config search path, so the config
groups there -- `sweep/` (the named sweeps) and `diffusion_schedule/` (an overlay the schedule sweep
uses) -- compose like the groups in `conf/`.

The folder is computed from this file's own location, never from the working directory: a search path
entry relative to the cwd would silently vanish when `launch.py` is started from elsewhere or when a
SLURM job starts in another directory.
"""
from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

#: <repo>/sweeps (this file is <repo>/hydra_plugins/speedrun_searchpath/__init__.py)
SWEEPS_DIR = Path(__file__).resolve().parent.parent.parent / "sweeps"
PROVIDER = "speedrun-sweeps"


class SpeedrunSweepsSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if SWEEPS_DIR.is_dir():
            search_path.append(provider=PROVIDER, path=f"file://{SWEEPS_DIR}")
