"""The one way to compose conf/ outside launch.py (tools, benchmarks, tests): the typed RunConfig that
`python launch.py OVERRIDES` would train, without running anything.

Bad overrides fail as in launch.py (speedrun.overrides: one line naming the fix); Hydra's own
composition errors become one-line ConfigErrors too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .config import ConfigError, RunConfig, from_container, register_schema
from .overrides import check_overrides

CONF = Path(__file__).resolve().parent.parent / "conf"


def compose_dict(overrides: Sequence[str] = (), *, check: bool = True):
    """Hydra's composed DictConfig (with the hydra node, and HydraConfig set, so that `${hydra:...}`
    interpolations resolve)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    if not (CONF / "config.yaml").exists():
        raise ConfigError(f"{CONF}: the Hydra configs are missing: run from a source checkout of speedrun-plm")
    overrides = list(overrides)
    problem = check_overrides(overrides, CONF) if check else None
    if problem:
        raise ConfigError(problem)
    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except Exception as exc:  # Hydra's own composition errors
        if type(exc).__module__.split(".")[0] not in ("hydra", "omegaconf"):
            raise
        raise ConfigError(f"cannot compose the config: {str(exc).splitlines()[0]}") from None
    finally:
        GlobalHydra.instance().clear()
    HydraConfig.instance().set_config(cfg)
    return cfg


def compose(overrides: Sequence[str] = (), *, check: bool = True) -> RunConfig:
    """The validated RunConfig of `overrides` (e.g. ['model=unet', 'hardware=gpu'])."""
    return from_container(compose_dict(overrides, check=check))
