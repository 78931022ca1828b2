"""Atomic checkpoints in the run directory.

    checkpoints/step-000500/model.safetensors   weights (safetensors; tied weights handled)
    checkpoints/step-000500/state.pt             optimizer states + trainer state (step, tokens, data
                                                 cursor, RNG states, timers, ...)
    checkpoints/step-000500/COMPLETE             written last

A checkpoint is assembled in a hidden temporary folder next to its final place, fsynced, marked
COMPLETE and only then renamed into place; a crash or a full disk mid-write leaves the previous
checkpoints untouched and nothing that looks complete. Loading picks the newest folder that has the
COMPLETE marker. Old checkpoints beyond `keep_last` are removed only after a new one is complete.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from .rundir import CheckpointError, write_failure  # noqa: F401  (CheckpointError: re-exported)

MARKER = "COMPLETE"


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


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def save(root: Path, step: int, model: torch.nn.Module, state: dict, keep_last: int = 2) -> Path:
    """Write checkpoint `step` under `root` atomically; returns its folder."""
    from safetensors.torch import save_model

    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{int(time.time() * 1e6)}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
        for name in ("model.safetensors", "state.pt"):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        with open(tmp / MARKER, "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (e.g. after resume): replace it whole
            old = root / f".old-{final.name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        why, fix = write_failure(exc)
        raise CheckpointError(f"could not write checkpoint {final}: {why}; the previous checkpoint is intact "
                              f"- {fix}, or choose another run directory (hydra.run.dir=...), then resume the "
                              "run") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, keep_last)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.glob("step-*") if p.is_dir() and (p / MARKER).exists()]
    return sorted(dirs, key=lambda p: int(p.name.split("-")[1]))


def latest(root: Path) -> Optional[Path]:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for p in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    for p in Path(root).glob(".tmp-step-*"):  # leftovers of writers that died
        if p.is_dir() and str(os.getpid()) not in p.name:
            shutil.rmtree(p, ignore_errors=True)


def load(path: Path, model: torch.nn.Module, device: torch.device) -> dict:
    """Load weights into `model` and return the saved state dict (on CPU)."""
    from safetensors.torch import load_model

    path = Path(path)
    if not (path / MARKER).exists():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker): pick another one")
    try:
        load_model(model, str(path / "model.safetensors"), device=str(device))
        return torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load checkpoint {path}: {exc}".splitlines()[0]) from exc
