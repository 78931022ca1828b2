"""Distributed setup: who am I, which device, and how the ranks were started.

Precedence (STYLE.md §3.4):
1. `RANK`/`WORLD_SIZE` already in the environment (torchrun or another launcher): trust them.
2. Inside a submitit/SLURM job with several tasks: each task is one rank; rank and world come from the
   job environment (`submitit.helpers.TorchDistributedEnvironment`).
3. `hardware.gpus > 1` locally: `launch.py` composed the config once; `spawn()` starts the N ranks
   itself and hands each the typed config (one run directory, not N).
4. Otherwise: one process, no process group — the same code path with world size 1.

Device: `cuda:0` when the job sees one GPU (SLURM bound one GPU per task), else `cuda:LOCAL_RANK` —
the fix for "invalid device ordinal" (STYLE.md §2.2 #12). Backend: NCCL on GPU, gloo on CPU.

A spawned rank that raises surfaces in the parent as one-line `RankFailed` (its traceback in `.details`).
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from .errors import SpeedrunError


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    mode: str = "single"  # single | spawn | torchrun | submitit

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(want: str, local_rank: int, dry_run: bool = False) -> torch.device:
    """The rank's device. Without a GPU, hardware.device=cuda is one line — except in a dry run, which
    then checks the config on the CPU (a login node)."""
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if dry_run:
            return torch.device("cpu")
        raise DeviceError("hardware.device=cuda but no CUDA GPU is visible: use hardware=cpu, or dry_run=true to "
                          "check the config on this machine")
    n = torch.cuda.device_count()
    idx = 0 if n == 1 else local_rank
    if idx >= n:
        raise DeviceError(f"rank with local rank {local_rank} needs GPU {idx} but only {n} are visible: "
                          "lower hardware.gpus or fix CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", idx)


def _submitit_env():
    if "SLURM_JOB_ID" not in os.environ or "SUBMITIT_EXECUTOR" not in os.environ and "SUBMITIT_FOLDER" not in os.environ:
        return None
    try:
        import submitit

        env = submitit.JobEnvironment()
        return env if env.num_tasks > 1 else None
    except Exception:
        return None


def detect_mode(gpus: int) -> str:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torchrun"
    env = _submitit_env()
    if env is not None:
        if env.num_tasks != gpus * int(os.environ.get("SLURM_NNODES", "1")):
            raise RuntimeError(f"the SLURM job has {env.num_tasks} tasks but hardware.gpus={gpus}: one task per GPU "
                               "(hydra.launcher.tasks_per_node must equal hardware.gpus)")
        return "submitit"
    return "spawn" if gpus > 1 else "single"


def init(device_pref: str, mode: str, dry_run: bool = False) -> DistInfo:
    """Initialise this process as a rank (or as the only process). Call once per process."""
    if mode == "submitit":
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    if mode == "single":
        return DistInfo(device=pick_device(device_pref, 0, dry_run))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = pick_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=timedelta(minutes=30), **kwargs)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device, mode=mode)


class DeviceError(SpeedrunError):
    """The configured device is not there (one line naming the fix)."""


class RankFailed(SpeedrunError):
    """A spawned rank failed. str() is one line (`rank R: Type: message`); `details` holds the rank's full
    traceback, for a log file rather than the console."""

    def __init__(self, msg: str, details: str = ""):
        super().__init__(msg)
        self.details = details


_RANK_FAILED = f"{__name__}.RankFailed: "
#: exit codes of a rank that stopped on a signal it handled (interrupted / preempted, checkpoint saved)
_SIGNAL_EXITS = {128 + 2, 128 + 15, 128 + 12}  # SIGINT, SIGTERM, SIGUSR2


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _spawned(local_rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SPEEDRUN_SPAWNED="1")
    try:
        fn(*args)
    except Exception as exc:  # torch sends the parent this traceback, whose last line is the one-line summary
        raise RankFailed(f"rank {local_rank}: {one_line(exc)}") from exc


def spawn(fn: Callable, nprocs: int, args: tuple) -> None:
    """Run fn(*args) in `nprocs` fresh processes (start method spawn) with rank variables set.

    A rank that raises ends the others and raises RankFailed here: one line, the traceback in `.details`.
    A rank that exited on a handled stop signal (interrupted / preempted) re-raises its SystemExit code."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException

    port = free_port()
    quiet = logging.getLogger("torch.multiprocessing.spawn")  # its "Terminating process ..." warnings
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        mp.start_processes(_spawned, args=(nprocs, port, fn, args), nprocs=nprocs, start_method="spawn", join=True)
    except ProcessRaisedException as exc:
        text = str(exc.msg)
        lines = [ln for ln in text.splitlines() if ln.strip()]
        summary = next((ln[len(_RANK_FAILED):] for ln in reversed(lines) if ln.startswith(_RANK_FAILED)), None)
        if summary is None:
            summary = f"rank {exc.error_index}: {lines[-1].strip() if lines else 'failed'}"
        raise RankFailed(summary, text.strip()) from None
    except ProcessExitedException as exc:
        if exc.signal_name is None and exc.exit_code in _SIGNAL_EXITS:
            raise SystemExit(exc.exit_code) from None
        how = f"was killed by {exc.signal_name}" if exc.signal_name else f"exited with code {exc.exit_code}"
        raise RankFailed(f"rank {exc.error_index} {how}") from None
    finally:
        quiet.setLevel(level)


def broadcast_object(obj, info: DistInfo, src: int = 0):
    """`obj` as rank `src` has it, on every rank (pickled; for small things such as a path)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=info.device if info.device.type == "cuda" else None)
    return box[0]


def cleanup() -> None:
    _CONTROL_GROUP.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_max(x: float, info: DistInfo) -> float:
    if not info.distributed:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def launch_rank() -> int:
    """This process's global rank before any process group exists: torchrun/spawn set RANK, SLURM tasks
    SLURM_PROCID (0 for a single process)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


_CONTROL_GROUP: dict = {}


def control_group(info: DistInfo):
    """A gloo (CPU) group for the per-step control all-reduce, so it never synchronises the GPU stream;
    None (the default group) when the default group is gloo already or there is one rank."""
    if not info.distributed or dist.get_backend() == "gloo":
        return None
    if "group" not in _CONTROL_GROUP:
        _CONTROL_GROUP["group"] = dist.new_group(backend="gloo")
    return _CONTROL_GROUP["group"]


def gather_objects(obj, info: DistInfo) -> list:
    """`obj` of every rank, in rank order, on every rank (pickled: small things such as data cursors)."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
