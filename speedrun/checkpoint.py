"""Atomic, verifiable checkpoints in the run directory; nothing read back runs code.

    checkpoints/step-000500/model.safetensors    weights (safetensors: tensors only; tied weights handled)
    checkpoints/step-000500/config.json          the run's config (JSON) and the model's, for loaders
    checkpoints/step-000500/trainer_state.json   progress counters and every rank's data cursor (JSON)
    checkpoints/step-000500/state.pt             optimizer states and RNG states: tensors in plain containers
    checkpoints/step-000500/COMPLETE             written last: {"step", "files": {name: sha256}}

A checkpoint is assembled in a hidden temporary folder next to its final place, fsynced, marked
COMPLETE and only then renamed into place: a crash or a full disk mid-write leaves the previous
checkpoints untouched and nothing that looks complete. Old checkpoints beyond `keep_last` are removed
only after a new one is complete.

Reading: `state.pt` is loaded with `torch.load(weights_only=True)`, which refuses any pickled object
but tensors and plain containers (a crafted file stops with one line instead of running code); the
rest is JSON and safetensors. `find()` returns the newest checkpoint whose files match the checksums
in its marker; a corrupt newest one (truncated, edited, a file missing) is passed over with one
warning for the previous complete one. Checkpoints of speedrun-plm 0.1 (a pickled `state.pt` holding
the config and numpy RNG states, a plain-text marker) still load, with only numpy's array
reconstruction allowed besides what weights_only allows.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import CheckpointError  # noqa: F401  (re-exported)
from .fsutil import write_failure

MARKER = "COMPLETE"
WEIGHTS, CONFIG, TRAINER, TENSORS = "model.safetensors", "config.json", "trainer_state.json", "state.pt"
FORMAT = "speedrun-plm-checkpoint"
_STEP_DIR = re.compile(r"^step-(\d+)$")
log = logging.getLogger("speedrun")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_all(tmp: Path, model, config: dict, trainer_state: dict, tensors: dict) -> None:
    import torch
    from safetensors.torch import save_model

    save_model(model, str(tmp / WEIGHTS))
    (tmp / CONFIG).write_text(json.dumps({"format": FORMAT, "version": 2, **config}, indent=1) + "\n")
    (tmp / TRAINER).write_text(json.dumps(trainer_state, indent=1) + "\n")
    torch.save(tensors, tmp / TENSORS)
    digests = {}
    for name in (WEIGHTS, CONFIG, TRAINER, TENSORS):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
        digests[name] = sha256(tmp / name)
    with open(tmp / MARKER, "w") as f:
        f.write(json.dumps({"step": trainer_state.get("step"), "files": digests}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)


def save(root: Path, step: int, model, *, config: dict, trainer_state: dict, tensors: dict,
         keep_last: int = 2) -> Path:
    """Write checkpoint `step` under `root` atomically; returns its folder."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{int(time.time() * 1e6)}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        _write_all(tmp, model, config, trainer_state, tensors)
        if final.exists():  # a re-save of the same step (e.g. after resume): replace it whole
            old = root / f".old-{final.name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, OSError) and "writ" not in str(exc).lower():
            raise
        why, fix = write_failure(exc) if isinstance(exc, OSError) else _failed_write(root)
        raise CheckpointError(f"could not write checkpoint {final}: {why}; the previous checkpoint is intact "
                              f"- {fix}, or choose another run directory (hydra.run.dir=...), then resume the "
                              "run") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, keep_last)
    return final


def _failed_write(root: Path) -> tuple[str, str]:
    """(what, fix) for a write that failed without an OSError (torch.save's stream writer)."""
    try:
        if shutil.disk_usage(root).free < 64 * 2**20:
            return "the disk is full", "free space on that disk"
    except OSError:
        pass
    return "the write failed", "check the disk"


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders that carry the COMPLETE marker, oldest first (checksums not yet verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [(int(m.group(1)), p) for p in root.iterdir()
            if p.is_dir() and (m := _STEP_DIR.match(p.name)) and (p / MARKER).is_file()]
    return [p for _, p in sorted(dirs)]


def prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for p in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    for p in Path(root).glob(".tmp-step-*"):  # leftovers of writers that died
        if p.is_dir() and str(os.getpid()) not in p.name:
            shutil.rmtree(p, ignore_errors=True)


def _marker(path: Path) -> dict:
    text = (path / MARKER).read_text().strip()
    if text.isdigit():  # speedrun-plm 0.1: the step alone, no checksums
        return {"step": int(text), "files": {}}
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ValueError("the marker is not a checkpoint marker")
    return data


def verify(path: Path) -> dict:
    """The marker of `path` after checking every file against its checksum; CheckpointError if not."""
    path = Path(path)
    try:
        marker = _marker(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable {MARKER} marker ({exc})") from None
    needed = marker["files"] or {WEIGHTS: None, TENSORS: None}
    for name, digest in needed.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if digest is not None and sha256(f) != digest:
            raise CheckpointError(f"{path}: {name} does not match its checksum (truncated or changed)")
    return marker


def find(root: Path, check: Callable[[Path], None] = verify) -> Optional[Path]:
    """The newest checkpoint under `root` that verifies; a corrupt newer one is skipped with a warning."""
    for path in reversed(complete_checkpoints(root)):
        try:
            check(path)
            return path
        except CheckpointError as exc:
            log.warning(f"skipping a corrupt checkpoint: {exc}; falling back to the previous one")
    return None


def latest(root: Path) -> Optional[Path]:
    """The newest checkpoint with a COMPLETE marker (no checksum check; see find())."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


# ---- reading --------------------------------------------------------------------------------------
def _torch_load(path: Path) -> dict:
    """state.pt with weights_only=True. A 0.1 checkpoint also needs numpy's array reconstruction (its RNG
    states were numpy arrays): allowed by name, nothing else; any other pickled object is refused."""
    import numpy as np
    import torch

    legacy = [np.ndarray, np.dtype, type(np.dtype("uint32"))]
    core = getattr(np, "_core", None) or np.core
    legacy.append(core.multiarray._reconstruct)
    try:
        with torch.serialization.safe_globals(legacy):
            out = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle refusals, truncation: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: refused to load ({first[:200]}); it holds more than tensors and plain "
                              "containers, or it is damaged: use a checkpoint written by speedrun-plm") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{path}: not a speedrun-plm state file")
    return out


@dataclass
class Checkpoint:
    """What a checkpoint folder holds, read safely (weights are read by the model loader)."""
    path: Path
    config: dict  # the RunConfig as a dict (plain)
    trainer_state: dict
    legacy: bool

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS

    def tensors(self) -> dict:
        """Optimizer and RNG states (weights_only load)."""
        out = _torch_load(self.path / TENSORS)
        if self.legacy:
            return {"optimizers": out.get("optimizers", []), "rng": out.get("rng", {})}
        return out


def read(path: Path) -> Checkpoint:
    """Open a complete checkpoint folder (either format). CheckpointError names what is wrong."""
    path = Path(path)
    if not (path / MARKER).exists():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker): pick another one")
    if (path / CONFIG).is_file() and (path / TRAINER).is_file():
        try:
            config = json.loads((path / CONFIG).read_text())
            trainer = json.loads((path / TRAINER).read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable checkpoint JSON ({exc})") from None
        return Checkpoint(path, config.get("run", {}), trainer, legacy=False)
    state = _torch_load(path / TENSORS)  # 0.1: everything in one pickle
    trainer = {k: v for k, v in state.items() if k not in ("optimizers", "rng", "config")}
    return Checkpoint(path, state.get("config") or {}, trainer, legacy=True)
