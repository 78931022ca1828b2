"""The typed config a run would use, composed outside `launch.py` (for `python -m speedrun.data ...`).

Its own module so that the CLI (`__main__`) and `hub` can both use it without importing each other.
"""
from __future__ import annotations

from pathlib import Path

from .shards import DataError


def conf_dir() -> Path:
    return Path(__file__).resolve().parent.parent.parent / "conf"


def compose_config(overrides: list[str]):
    """The typed RunConfig that `python launch.py OVERRIDES` would run with (nothing is run)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from ..config import ConfigError, check_overrides, from_container, register_schema

    conf = conf_dir()
    if not (conf / "config.yaml").exists():
        raise DataError(f"{conf}: the Hydra configs are missing: run from a source checkout of speedrun-plm")
    problem = check_overrides(overrides, str(conf))
    if problem:
        raise DataError(problem)
    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            return from_container(cfg)
    except ConfigError as exc:
        raise DataError(str(exc)) from None
    except Exception as exc:  # Hydra's own composition errors
        if type(exc).__module__.split(".")[0] not in ("hydra", "omegaconf"):
            raise
        raise DataError(f"cannot compose the config: {str(exc).splitlines()[0]}") from None
    finally:
        GlobalHydra.instance().clear()


def compose_data(overrides: list[str]):
    """The typed DataConfig of `overrides` (e.g. ['data=omgprot50', 'data.num_chunks=10'])."""
    return compose_config(overrides).data
