"""`TrainState`: everything a checkpoint holds besides the weights, in one place.

Saved and restored through one pair of methods, so what is written and what is read back cannot drift
apart. The state splits into JSON (progress counters, every rank's data cursor: `trainer_state.json`)
and tensors in plain containers (optimizer states, RNG states: `state.pt`, read back with
weights_only=True): speedrun/checkpoint.py writes both.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

#: the progress counters, with their starting values
PROGRESS = {"step": 0, "tokens": 0, "train_seconds": 0.0, "wall_seconds": 0.0, "best_val": math.inf,
            "target": None, "skipped_steps": 0}


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states as tensors."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {"python": torch.tensor(mt, dtype=torch.int64), "python_version": version,
             "python_gauss": gauss, "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2]), "numpy_gauss": [int(np_state[3]), float(np_state[4])],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    if "python_version" in state:
        random.setstate((state["python_version"], tuple(int(x) for x in state["python"].tolist()),
                         state["python_gauss"]))
        has_gauss, cached = state["numpy_gauss"]
        np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                             has_gauss, cached))
    else:  # speedrun-plm 0.1: the plain objects
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    """Progress of a run plus live references to what else a checkpoint must capture."""
    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0  # train time of earlier attempts (the clock adds this attempt's)
    wall_seconds: float = 0.0  # wall time of earlier attempts
    best_val: float = math.inf
    target: Optional[dict] = None  # when validation first reached target_loss
    skipped_steps: int = 0  # non-finite steps whose update was skipped
    optimizers: list = field(default_factory=list, repr=False)
    stream: object = field(default=None, repr=False)  # the rank's training stream (state_dict: its cursor)

    def progress(self) -> dict:
        return {k: getattr(self, k) for k in PROGRESS}

    def state_dict(self, cursors: list, train_seconds: float, wall_seconds: float) -> tuple[dict, dict]:
        """(JSON part, tensor part). `cursors`: every rank's data cursor, gathered by the caller;
        the timers: this attempt's totals so far."""
        trainer = {**self.progress(), "train_seconds": train_seconds, "wall_seconds": wall_seconds,
                   "best_val": self.best_val if math.isfinite(self.best_val) else None, "data": cursors}
        tensors = {"optimizers": [o.state_dict() for o in self.optimizers], "rng": rng_state()}
        return trainer, tensors

    def load_state_dict(self, trainer: dict, tensors: dict, rank: int) -> None:
        for key, default in PROGRESS.items():
            value = trainer.get(key, default)
            setattr(self, key, default if value is None and key == "best_val" else value)
        for opt, sd in zip(self.optimizers, tensors["optimizers"]):
            opt.load_state_dict(sd)
        data = trainer["data"]
        if self.stream is not None:
            self.stream.load_state_dict(data[rank] if isinstance(data, list) else data)
        set_rng_state(tensors["rng"])
