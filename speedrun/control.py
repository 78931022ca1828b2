"""When to stop, when to checkpoint, and how long training took: one decision per step, agreed by all ranks.

* `Clock` — train time over timed regions; `pause()` syncs the device first, so evaluation and
  checkpoints stay out of it (RECIPE.md decision 5).
* `Signals` — SIGINT/SIGTERM -> "interrupted", SIGUSR2 (SLURM preemption via submitit) -> "preempted":
  a flag read at step boundaries; the previous handlers are kept to be chained after the checkpoint.
* `Every(steps, minutes)` — a cadence: due every N steps and/or when M minutes of wall time passed.
* `Control.decide(step, healthy)` — the stop request (signal, train.max_minutes) and the checkpoint
  timer of every rank in ONE all-reduce (MAX) over a CPU process group, so ranks never disagree and
  the GPU stream is not synchronised for it.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

STOP_CODES = {None: 0, "interrupted": 1, "preempted": 2, "time_limit": 3}
STOP_NAMES = {v: k for k, v in STOP_CODES.items()}


class Clock:
    """Accumulates train time over timed regions; `pause()` syncs the device first."""

    def __init__(self, device: torch.device, already: float = 0.0):
        self.device, self.total, self._t0 = device, already, None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        if self._t0 is None:
            self._sync()
            self._t0 = time.perf_counter()

    def pause(self) -> None:
        if self._t0 is not None:
            self._sync()
            self.total += time.perf_counter() - self._t0
            self._t0 = None

    @property
    def running(self) -> bool:
        return self._t0 is not None

    @property
    def seconds(self) -> float:
        return self.total + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)


class Signals:
    """SIGINT/SIGTERM -> 'interrupted', SIGUSR2 -> 'preempted': a flag, read at step boundaries."""

    def __init__(self):
        self.flag: Optional[str] = None
        self.signum: int = 0
        self.previous: dict = {}

    def install(self) -> "Signals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig, status in ((signal.SIGINT, "interrupted"), (signal.SIGTERM, "interrupted"),
                            (signal.SIGUSR2, "preempted")):
            try:
                self.previous[sig] = signal.getsignal(sig)
                signal.signal(sig, lambda s, f, st=status: self._set(st, s))
            except (ValueError, OSError):
                continue
        return self

    def _set(self, status: str, signum: int) -> None:
        if self.flag is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        if self.flag is None:  # the first signal decides (SLURM's SIGTERM after USR2 keeps "preempted")
            self.flag, self.signum = status, signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.flag else ""

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, handler)

    def chain(self, sig=signal.SIGUSR2) -> None:
        """After saving on SIGUSR2, hand over to the previous handler (submitit's, which requeues)."""
        prev = self.previous.get(sig)
        if callable(prev):
            prev(sig, None)


@dataclass
class Every:
    """A cadence: due every `steps` steps (0 = never) or when `minutes` of wall time passed since the
    last `mark()` (0 = never), at a step past the last mark."""
    steps: int = 0
    minutes: float = 0.0
    last_step: int = 0
    last_time: float = field(default_factory=time.time)

    def due_steps(self, step: int) -> bool:
        return self.steps > 0 and step % self.steps == 0

    def due_time(self, step: int, now: Optional[float] = None) -> bool:
        now = time.time() if now is None else now
        return self.minutes > 0 and step > self.last_step and now - self.last_time >= 60.0 * self.minutes

    def mark(self, step: int, now: Optional[float] = None) -> None:
        self.last_step, self.last_time = step, time.time() if now is None else now


@dataclass
class Decision:
    stop: Optional[str] = None  # interrupted | preempted | time_limit
    checkpoint: bool = False  # the checkpoint timer fired on some rank


class Control:
    """One stop/checkpoint decision per step from one all-reduce (see the module docstring)."""

    def __init__(self, signals: Signals, clock: Clock, checkpoints: Every, max_minutes: float = 0.0,
                 group=None, distributed: bool = False):
        self.signals, self.clock, self.checkpoints = signals, clock, checkpoints
        self.max_minutes, self.group, self.distributed = max_minutes, group, distributed

    def local(self, step: int, healthy: bool) -> tuple[int, int]:
        stop = STOP_CODES[self.signals.flag]
        if self.max_minutes > 0 and self.clock.seconds > 60.0 * self.max_minutes:
            stop = max(stop, STOP_CODES["time_limit"])
        return stop, int(healthy and self.checkpoints.due_time(step))

    def decide(self, step: int, healthy: bool = True) -> Decision:
        stop, timer = self.local(step, healthy)
        if self.distributed:
            import torch.distributed as dist

            flags = torch.tensor([stop, timer], dtype=torch.int64)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
            stop, timer = (int(x) for x in flags.tolist())
        return Decision(STOP_NAMES[stop], bool(timer))
