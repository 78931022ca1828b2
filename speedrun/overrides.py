"""Command-line pre-check: one line per mistake, with a suggestion, before Hydra composes anything.

`check_overrides(argv, conf_dir)` looks at every `key=value` and `group=option` of a launch.py command
line and returns the first problem as one line (or None):

* an unknown group option (`model=unte` -> "did you mean model=unet?");
* a key renamed in 0.2 (`optimizer.warmup_steps` -> "renamed optimizer.lr_warmup_steps");
* an unknown key, with the closest one;
* a key that belongs to another option of its group (`objective=mlm objective.eps=0.1`);
* a value that cannot have the key's type.

Which option a group has is read from the command line, else from the experiment named there, else
from conf/config.yaml; where it cannot be known (a sweep over options), any option's keys pass and
Hydra's typed composition has the last word.
"""
from __future__ import annotations

import difflib
import os
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, List, Optional

from .config import GROUP_TYPES, POLYMORPHIC, RENAMED, RunConfig

GROUPS = ("model", "optimizer", "objective", "data", "hardware", "experiment", "sweep")


def _flat(cls, prefix: str) -> dict:
    hints = typing.get_type_hints(cls)
    return {f"{prefix}{f.name}": hints[f.name] for f in fields(cls) if not is_dataclass(hints[f.name])}


def schema_keys() -> tuple[dict, dict]:
    """({dotted key: type}, {dotted key of a polymorphic group: [options that have it]})."""
    keys = _flat(RunConfig, "")
    for group in POLYMORPHIC:
        keys.pop(group, None)
    for group, cls in GROUP_TYPES.items():
        keys.update(_flat(cls, f"{group}."))
    owners: dict[str, list] = {}
    for group, (_, table) in POLYMORPHIC.items():
        for option, cls in table.items():
            for key, t in _flat(cls, f"{group}.").items():
                keys.setdefault(key, t)
                owners.setdefault(key, []).append(option)
    return keys, owners


def _yaml(path: Path) -> dict:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path)) or {}
    except Exception:  # noqa: BLE001 - an unreadable file is Hydra's to report
        return {}


def _defaults(path: Path) -> dict:
    """{group: option} from a config file's defaults list (`group: x` and `override /group: x`)."""
    out = {}
    for entry in _yaml(path).get("defaults", []) or []:
        if isinstance(entry, dict):
            for k, v in entry.items():
                out[k.replace("override", "").strip().lstrip("/")] = v
    return out


def option_of(group: str, preset: str, conf_dir: Path, depth: int = 0) -> Optional[str]:
    """The option (dataclass) a preset file of a polymorphic group extends: unet_tiny -> unet."""
    if depth > 8:
        return None
    for entry in _yaml(conf_dir / group / f"{preset}.yaml").get("defaults", []) or []:
        if isinstance(entry, str) and entry.startswith("schema_"):
            return entry[len("schema_"):]
        if isinstance(entry, str) and entry != "_self_":
            return option_of(group, entry, conf_dir, depth + 1)
    return None


def _chosen(group: str, cli: dict, conf_dir: Path) -> Optional[list]:
    """The options a polymorphic group can have in this command, or None when unknown."""
    if group in cli:
        presets = cli[group]
    else:
        experiment = cli.get("experiment", [None])
        if len(experiment) != 1 or "sweep" in cli:
            return None
        preset = None
        if experiment[0] is not None:
            preset = _defaults(conf_dir / "experiment" / f"{experiment[0]}.yaml").get(group)
        preset = preset or _defaults(conf_dir / "config.yaml").get(group)
        presets = [preset] if preset else []
    options = [option_of(group, str(p), conf_dir) for p in presets]
    return None if not options or None in options else options


def _convert(value: Any, t) -> None:
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
        if type(None) in typing.get_args(t) or t is Any:
            return
        raise ValueError("null is not allowed here")
    args = [a for a in typing.get_args(t) if a is not type(None)]
    base = args[0] if typing.get_origin(t) is typing.Union and args else t
    if typing.get_origin(base) in (list, List) or base is Any:
        return
    if base is bool:
        if not isinstance(value, bool) and str(value).lower() not in ("true", "false"):
            raise ValueError("expected true or false")
    elif base is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError("expected an integer")
        try:
            int(value)
        except ValueError:
            raise ValueError("expected an integer") from None
    elif base is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            float(value)
        except ValueError:
            raise ValueError("expected a number") from None


def _group_option_problem(key: str, values: list, conf_dir: Path) -> Optional[str]:
    group_dir = conf_dir.parent / "sweeps" / "sweep" if key == "sweep" else conf_dir / key
    opts = sorted(p.stem for p in group_dir.glob("*.yaml")) if group_dir.is_dir() else []
    for v in values:
        if str(v) not in opts and not (key in ("experiment", "sweep") and v is None):
            close = difflib.get_close_matches(str(v), opts, n=1)
            hint = f"did you mean {key}={close[0]}? " if close else ""
            return f"unknown {key} option '{v}': {hint}choose one of {', '.join(opts)}"
    return None


def _key_problem(key: str, values: list, cli: dict, conf_dir: Path, keys: dict, owners: dict) -> Optional[str]:
    if key in RENAMED:
        return f"{key} was renamed {RENAMED[key]} (speedrun-plm 0.2): use {RENAMED[key]}=..."
    if key not in keys:
        close = difflib.get_close_matches(key, list(keys), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return f"unknown config key '{key}': {hint}(python launch.py --cfg job lists every key)"
    group = key.split(".")[0]
    if key in owners:
        chosen = _chosen(group, cli, conf_dir)
        for option in chosen or []:
            if option not in owners[key]:
                return (f"{key} does not apply to {group}={option} (it belongs to {group}="
                        f"{' | '.join(owners[key])}): drop it or choose that {group}")
    for v in values:
        try:
            _convert(v, keys[key])
        except (ValueError, TypeError) as exc:
            return f"bad value {key}={v!r}: {exc}"
    return None


def check_overrides(args: list[str], conf_dir: str | os.PathLike) -> Optional[str]:
    """Return a one-line error for the first bad `key=value` / `group=option` override, else None."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    except ImportError:  # pragma: no cover
        return None
    conf_dir = Path(conf_dir)
    keys, owners = schema_keys()
    cands = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(cands)
    except Exception as exc:  # noqa: BLE001 - Hydra will report syntax errors itself
        return f"cannot parse override: {str(exc).splitlines()[0]}"
    cli, plain = {}, []
    for ov in parsed:
        key = ov.key_or_group
        if key.startswith("hydra") or ov.package or ov.is_delete() or ov.is_add() or ov.is_force_add():
            continue
        value = ov.value()
        values = value.list if isinstance(value, ChoiceSweep) else (
            [] if isinstance(value, (RangeSweep, IntervalSweep)) else [value])
        if key in GROUPS or key == "local":
            problem = _group_option_problem(key, values, conf_dir)
            if problem:
                return problem
            cli[key] = values
        else:
            plain.append((key, values))
    for key, values in plain:
        problem = _key_problem(key, values, cli, conf_dir, keys, owners)
        if problem:
            return problem
    return None
