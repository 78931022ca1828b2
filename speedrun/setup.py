"""Build a run's parts from its config: data, model, optimizers, state, the step — and describe the run.

`build(cfg, run_dir, info, claim)` returns a `Run` holding every part the loop in speedrun/train.py
uses, each from its own module: streams and the eval set (data/loader.py), the model (models/),
optimizers (optim.py), the `TrainState` restored from the claimed checkpoint (state.py, checkpoint.py),
the `TrainStep` (step.py), and `desc`, the description of the run that goes to env.json, the log,
W&B and summary.json. Runtime checks (preflight.py) run here, before anything trains.
"""
from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import preflight
from .config import RunConfig, batch_geometry
from .data.loader import ContiguousStream, EvalSet, RowStream, TrainStream
from .models import build_model, spec
from .optim import build_optimizers
from .state import TrainState
from .step import TrainStep
from .summary import Timing


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def threads(cfg: RunConfig, device: torch.device) -> int:
    """Torch intra-op threads: hardware.num_threads, else OMP_NUM_THREADS, else the CPUs this process may
    use (os.sched_getaffinity: a job pinned to 2 of 64 cores gets 2, not 64)."""
    n = cfg.hardware.num_threads
    if n <= 0 and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        n = int(os.environ["OMP_NUM_THREADS"])
    if n <= 0:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def compile_model(model: nn.Module, scope: str, memory_budget: float = 1.0) -> None:
    """torch.compile in place. scope=blocks compiles each transformer block (identical code, so one
    compiled graph serves all layers: short compile times) plus the head; scope=model compiles the
    whole forward as one graph. memory_budget < 1 lets the partitioner recompute cheap activations in
    the backward instead of saving them (torch._functorch.config.activation_memory_budget)."""
    import torch._functorch.config as functorch_config

    functorch_config.activation_memory_budget = memory_budget
    if scope == "model":
        model.compile(dynamic=False)
        return
    for block in model.blocks:
        block.compile(dynamic=False)
    model.lm_head.compile(dynamic=False)


def max_segment_len(cfg: RunConfig, tokens: Optional[int] = None) -> int:
    """The bound on a training document's length that the FlashAttention back-ends rely on
    (packing.segment_bound: data.max_length when cropped, a multiple of it for whole proteins, the
    micro-batch for data.packing=stream)."""
    from .packing import segment_bound

    T = tokens or cfg.hardware.micro_batch_tokens
    return T if cfg.data.packing == "stream" else segment_bound(T, cfg.data.max_length, cfg.data.crop)


def train_stream(cfg: RunConfig, files: list, tokens: int, seed: int, rank: int, world: int, rows: bool):
    """The training stream of one rank: rows (Patch-UNet), Dec-2024's contiguous stream, or documents."""
    args = (files, tokens, cfg.data.max_length, seed, rank, world)
    if rows:
        return RowStream(*args)
    if cfg.data.packing == "stream":
        return ContiguousStream(*args)
    return TrainStream(*args, crop=cfg.data.crop)


def window_binds(cfg: RunConfig) -> bool:
    """Whether the sliding window can ever be shorter than a training document."""
    smallest = min(cfg.train.window_start, cfg.train.window_end or cfg.data.max_length)
    return smallest < max_segment_len(cfg)


def window_at(cfg: RunConfig, step: int) -> int:
    """Sliding window at `step`: window_start -> window_end (default data.max_length), in multiples of 128."""
    start = cfg.train.window_start
    end = cfg.train.window_end if cfg.train.window_end is not None else cfg.data.max_length
    f = min(step / max(1, cfg.train.max_steps), 1.0)
    w = (1 - f) * start + f * end
    block = min(128, start, end)
    return max(block, int(w // block) * block)


def mean_context(evalset: EvalSet) -> float:
    """Mean attended context per token (≈ sum L_i^2 / sum L_i over documents) for the FLOP formula."""
    sq, n = 0.0, 0
    for _, doc_ids, _ in evalset.batches[:64]:
        counts = np.bincount(doc_ids[doc_ids >= 0])
        sq += float((counts.astype(np.float64) ** 2).sum())
        n += int(counts.sum())
    return sq / max(n, 1)


@dataclass
class Run:
    """Every part of one run on one rank (see the module docstring)."""
    cfg: RunConfig
    info: object  # speedrun.dist.DistInfo
    run_dir: Path
    log: logging.Logger
    writes: bool  # this rank writes run-directory files (rank 0, and not a dry run into an existing run)
    device: torch.device
    dtype: torch.dtype
    geo: dict
    files: dict
    stream: object
    evalset: EvalSet
    model: nn.Module
    optimizers: list
    state: TrainState
    step: TrainStep
    desc: dict
    resumed_from: Optional[Path] = None
    run_start: float = field(default_factory=time.time)
    timing: Timing = field(default_factory=Timing)

    @property
    def rows(self) -> bool:
        return spec(self.cfg.model.arch).layout == "rows"

    @property
    def eval_tokens(self) -> int:
        return self.cfg.eval.batch_tokens or self.geo["micro_batch_tokens"]

    def new_stream(self, seed_offset: int):
        """Another stream over the training shards (the warm-up and the dry-run probe use their own)."""
        return train_stream(self.cfg, self.files["train"], self.geo["micro_batch_tokens"],
                            self.cfg.data.seed + seed_offset, self.info.rank, self.info.world_size, self.rows)


def _model(cfg: RunConfig, device: torch.device, log) -> tuple[nn.Module, str]:
    model = build_model(cfg.model, cfg.data.max_length)
    if cfg.init_from:
        from .models.load import init_from

        log.info(f"init_from {cfg.init_from}: {init_from(model, cfg.init_from)}")
    model = model.to(device)
    dtype = torch.bfloat16 if cfg.hardware.precision == "bf16" else torch.float32
    backend = model.set_attention_backend(device, max_segment_len(cfg), window_binds(cfg),
                                          cfg.hardware.micro_batch_tokens, dtype)
    log.info(f"attention: {backend} ({getattr(model, 'attn_reason', '')})")
    if not (cfg.dry_run and preflight.device_or_none(cfg)):  # FP8 needs the GPU a dry run here does not have
        preflight.fp8(cfg, model, device)
    if cfg.hardware.triton_rope:
        preflight.triton_rope(model, device)
    return model, backend


def describe(cfg: RunConfig, run_files: dict, evalset: EvalSet, model, backend: str, geo: dict, device,
             mode: str, est_gib) -> dict:
    s = spec(cfg.model.arch)
    ctx = mean_context(evalset)
    return {"n_params": model.num_params(), "estimated_memory_gib": est_gib, "batch": geo, "attention": backend,
            "attention_reason": getattr(model, "attn_reason", None), "crop": cfg.data.crop,
            "device": str(device), "precision": cfg.hardware.precision + ("+fp8" if cfg.hardware.fp8 else ""),
            "compile": cfg.hardware.compile, "threads": torch.get_num_threads(),
            "flops_per_token": s.flops_per_token(cfg.model, ctx) if s.flops_per_token else None,
            "mean_context": ctx, "data_dir": str(run_files["train"][0].parent),
            "train_shards": len(run_files["train"]), "valid_tokens": evalset.n_tokens, "mode": mode}


def build(cfg: RunConfig, run_dir: Path, info, claim, log: logging.Logger, device: torch.device) -> Run:
    """All parts of a run on this rank, restored from the claimed checkpoint if there is one."""
    threads(cfg, device)
    seed_everything(cfg.seed + info.rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16 if cfg.hardware.precision == "bf16" else torch.float32
    planned = cfg.hardware.gpus * cfg.hardware.nodes if cfg.dry_run else info.world_size  # a dry run plans all ranks
    geo = batch_geometry(cfg, max(info.world_size, planned))
    T, rows = geo["micro_batch_tokens"], spec(cfg.model.arch).layout == "rows"
    files = preflight.data_splits(cfg)
    preflight.probes(cfg)
    evalset = EvalSet.build(files["valid"], cfg.eval.batch_tokens or T, cfg.data.max_length, cfg.eval.max_tokens,
                            cfg.eval.seed, rows=rows)
    model, backend = _model(cfg, device, log)
    preflight.model_size(cfg, model.num_params())
    memory = spec(cfg.model.arch).memory_gib
    est = memory(cfg.model, T, cfg.hardware.precision) if memory else None
    preflight.memory(cfg, est, device, T, lambda t: memory(cfg.model, t, cfg.hardware.precision))
    optimizers = build_optimizers(model, cfg.optimizer, device)
    stream = train_stream(cfg, files["train"], T, cfg.data.seed, info.rank, info.world_size, rows)
    state = TrainState(optimizers=optimizers, stream=stream)
    if claim.checkpoint is not None:
        restore(state, model, claim.checkpoint, info.rank, device)
        log.info(f"resumed from {claim.checkpoint} at step {state.step}")
    step = TrainStep(model, optimizers, objective=cfg.objective, seed=cfg.seed, accum=geo["grad_accum"], dtype=dtype,
                     grad_clip=cfg.optimizer.grad_clip, rank=info.rank, distributed=info.distributed, device=device,
                     window_tensor={"flex": "device", "fa4": "cpu"}.get(backend))
    desc = describe(cfg, files, evalset, model, backend, geo, device, info.mode, est)
    return Run(cfg, info, Path(run_dir), log, claim.writes and info.is_main, device, dtype, geo, files, stream,
               evalset, model, optimizers, state, step, desc, resumed_from=claim.checkpoint)


def restore(state: TrainState, model: nn.Module, path: Path, rank: int, device: torch.device) -> None:
    """Weights, optimizer and trainer state from checkpoint `path` (read safely: speedrun/checkpoint.py)."""
    from .models.load import load_weights

    saved = ckpt.read(path)
    load_weights(model, saved.weights)
    model.to(device)
    state.load_state_dict(saved.trainer_state, saved.tensors(), rank)
