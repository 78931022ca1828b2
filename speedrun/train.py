"""The training loop. One readable function, `train()`, in the modded-nanogpt style.

    run(cfg, run_dir)         entry point used by launch.py (and tests): picks the distributed mode,
                              spawns local ranks if asked, returns the summary dict
    train(cfg, run_dir, info) the loop, on one rank

Sections of `train()`: SETUP (devices, data, model, optimizers, resume) -> DRY RUN exit -> COMPILE
WARM-UP (untimed; model and optimizer state restored afterwards) -> LOOP (schedules, micro-steps with
gradient accumulation and DDP no_sync, optimizer step, logging, evaluation, checkpoints, signals) ->
FINAL evaluation, checkpoint and summary.

Timing follows RECIPE.md decision 5: compilation happens in an explicit untimed warm-up; the clock
(`train_seconds`) runs over optimizer steps only and is paused (after a device sync) for evaluation
and checkpointing; `wall_seconds` counts everything from the start of the run (summed over resumes;
`time_to_first_step` counts from process start). tokens/s = trained tokens /
train_seconds.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import dist as D
from .errors import SpeedrunError
from .config import ConfigError, RunConfig, batch_geometry, diff_keys, semantic_dict, signature, to_dict
from .data import data_files
from .data.loader import EvalSet, Prefetcher, RowStream, TrainStream
from .evaluate import evaluate
from .fp8 import fp8_supported
from .model import ProteinLM, estimate_memory_gib, flops_per_token
from .objectives import (apply_objective, dense_loss, diffusion_fraction, generator_for, mask_rate_at,
                         mask_tokens, masked_loss)
from .optim import apply_schedules, build_optimizers
from .rundir import MetricsLog, RunDirWriteError, environment, read_json, setup_logging, write_json, write_text
from .tracking import Tracker

def _process_start() -> float:
    """Wall-clock time this process started (Linux /proc; else the import time of this module)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


PROCESS_START = _process_start()
TERMINAL = ("done", "failed", "dry_run")
# stop requests as numbers, so that ranks agree on one with an all-reduce max (time_limit: train.max_minutes)
STOP_CODE = {None: 0.0, "interrupted": 1.0, "preempted": 2.0}
STOP_KIND = {1.0: "interrupted", 2.0: "preempted", 3.0: "time_limit"}
# called with the step number after every optimizer step when set (the benchmark's profiler: speedrun.bench.profile)
STEP_HOOK: Optional[Callable[[int], None]] = None


class RunFailed(SpeedrunError):
    """The run stopped with status 'failed' (summary.json holds the reason); exit code is non-zero."""


class StopRun(Exception):
    """Raised to end a run early with a status (interrupted, preempted, failed) and a reason."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


class MaskedLM(nn.Module):
    """The module DDP wraps: model forward + head + loss, so every parameter's gradient comes out of
    one forward call. The head runs on every position (static shapes for the compiler)."""

    def __init__(self, model: ProteinLM):
        super().__init__()
        self.model = model

    def forward(self, inputs, doc_ids, window, labels, ctx, dtype, weights=None, denom=None):
        h = self.model(inputs, doc_ids, window, dtype=dtype, ctx=ctx)
        return dense_loss(self.model.logits(h), labels, weights, denom)


def compile_model(model: ProteinLM, scope: str, memory_budget: float = 1.0) -> None:
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


def build_model(cfg: RunConfig) -> nn.Module:
    """ProteinLM (unet, transformer) or PatchUNet (patch_unet, over rows of data.max_length tokens)."""
    if cfg.model.arch == "patch_unet":
        from .patch_unet import PatchUNet

        return PatchUNet(cfg.model, cfg.data.max_length)
    return ProteinLM(cfg.model)


def max_segment_len(cfg: RunConfig) -> int:
    """The bound `set_attention_backend` may rely on: data.max_length when the sliding window can never
    bind (every document fits in it, for the whole run), else 0."""
    never_binds = min(cfg.train.window_start, cfg.train.window_end or cfg.data.max_length) >= cfg.data.max_length
    return cfg.data.max_length if never_binds else 0


def window_at(cfg: RunConfig, step: int) -> int:
    """Sliding window at `step`: window_start -> window_end (default data.max_length), in multiples of 128."""
    start = cfg.train.window_start
    end = cfg.train.window_end if cfg.train.window_end is not None else cfg.data.max_length
    f = min(step / max(1, cfg.train.max_steps), 1.0)
    w = (1 - f) * start + f * end
    block = min(128, start, end)
    return max(block, int(w // block) * block)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Clock:
    """Accumulates train time over timed regions; `pause()` syncs the device first."""

    def __init__(self, device: torch.device, already: float = 0.0):
        self.device, self.total, self._t0 = device, already, None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self):
        if self._t0 is None:
            self._sync()
            self._t0 = time.perf_counter()

    def pause(self):
        if self._t0 is not None:
            self._sync()
            self.total += time.perf_counter() - self._t0
            self._t0 = None

    @property
    def seconds(self) -> float:
        return self.total + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)


class Signals:
    """SIGINT/SIGTERM -> 'interrupted', SIGUSR2 (submitit/SLURM) -> 'preempted': a flag read at step
    boundaries; the previous handlers are kept so they can be chained after the checkpoint."""

    def __init__(self):
        self.flag: Optional[str] = None
        self.signum: int = 0
        self.previous: dict = {}

    def install(self) -> None:
        import threading
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, status in ((signal.SIGINT, "interrupted"), (signal.SIGTERM, "interrupted"),
                            (signal.SIGUSR2, "preempted")):
            try:
                self.previous[sig] = signal.getsignal(sig)
                signal.signal(sig, lambda s, f, st=status: self._set(st, s))
            except (ValueError, OSError):
                continue

    def _set(self, status: str, signum: int) -> None:
        if self.flag is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        if self.flag is None:  # the first signal decides (e.g. SLURM's SIGTERM after USR2 keeps "preempted")
            self.flag, self.signum = status, signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.flag else ""

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------------
def run(cfg: RunConfig, run_dir: str | os.PathLike) -> dict:
    """Train `cfg` into `run_dir`, starting the local ranks if hardware.gpus > 1. Returns the summary."""
    mode = D.detect_mode(cfg.hardware.gpus)
    if mode == "spawn":
        D.spawn(_rank_main, cfg.hardware.gpus, (cfg, str(run_dir), "spawn"))
        return read_json(Path(run_dir) / "summary.json")
    return _rank_main(cfg, str(run_dir), mode)


def _rank_main(cfg: RunConfig, run_dir: str, mode: str) -> dict:
    info = D.init(cfg.hardware.device, mode)
    try:
        return train(cfg, Path(run_dir), info)
    finally:
        D.cleanup()


def train(cfg: RunConfig, run_dir: Path, info: D.DistInfo) -> dict:
    # ============================================ SETUP ============================================
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirWriteError(f"cannot create the run directory {run_dir}: {exc.strerror or exc} - choose another "
                               "run directory (hydra.run.dir=...)") from exc
    log = setup_logging(run_dir, info.rank)
    log.info(f"rank {info.rank}/{info.world_size} on {info.device} ({info.mode}), host {os.uname().nodename}, "
             f"pid {os.getpid()}")
    main = info.is_main
    device = info.device
    summary_path = run_dir / "summary.json"
    previous = read_json(summary_path)
    ckpt_root = run_dir / "checkpoints"
    # ---- is this directory new, our own run (finished, or to resume / restart), or someone else's? ----
    sig, ident_path = signature(cfg), run_dir / "run.json"
    ident = read_json(ident_path)
    same = ident.get("signature") == sig
    changed = ", ".join(diff_keys(ident.get("config", {}), semantic_dict(cfg))[:6]) if ident and not same else ""
    if previous.get("status") == "done" and not cfg.dry_run:
        if ident and not same:
            raise RuntimeError(f"{run_dir} holds a finished run with a different config ({changed}): "
                               "start in a new directory (drop hydra.run.dir / hydra.sweep.dir)")
        log.info(f"{run_dir}: summary.json says done; nothing to do")
        return previous
    resume_from = ckpt.latest(ckpt_root) if cfg.resume != "never" else None
    if cfg.resume == "must" and resume_from is None:
        raise ckpt.CheckpointError(f"resume=must but {ckpt_root} holds no complete checkpoint")
    has_results = ckpt.latest(ckpt_root) is not None or (run_dir / "metrics.jsonl").exists()
    if not cfg.dry_run and has_results:
        if cfg.resume == "never" or (cfg.resume != "must" and not same):
            why = f"a run with a different config ({changed})" if changed else "another run's results"
            raise RuntimeError(f"{run_dir} already holds {why}; start in a new directory (drop hydra.run.dir), "
                               "or resume=must to continue it anyway")
        if resume_from is None:  # our own run, stopped before its first checkpoint: start it over
            log.info(f"{run_dir}: no checkpoint yet from an earlier attempt of this run; starting over")
            if info.is_main:
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            D.barrier(info)
    if info.is_main and not cfg.dry_run and not ident_path.exists():
        write_json(ident_path, {"signature": sig, "config": semantic_dict(cfg)})

    if cfg.hardware.num_threads > 0:
        torch.set_num_threads(cfg.hardware.num_threads)
    seed_everything(cfg.seed + info.rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16 if cfg.hardware.precision == "bf16" else torch.float32
    geo = batch_geometry(cfg, info.world_size)
    T, accum = geo["micro_batch_tokens"], geo["grad_accum"]

    train_files = data_files(cfg.data, "train")
    valid_files = data_files(cfg.data, "valid")
    data_dir = train_files[0].parent
    rows = cfg.model.arch == "patch_unet"  # the Patch-UNet takes (B, L) rows of L = data.max_length
    Stream = RowStream if rows else TrainStream
    stream = Stream(train_files, T, cfg.data.max_length, cfg.data.seed, info.rank, info.world_size)
    eval_T = cfg.eval.batch_tokens or T
    evalset = EvalSet.build(valid_files, eval_T, cfg.data.max_length, cfg.eval.max_tokens, cfg.eval.seed, rows=rows)

    model = build_model(cfg).to(device)
    backend = model.set_attention_backend(device, max_segment_len(cfg))
    if cfg.hardware.fp8:
        why = fp8_supported(device) or (None if hasattr(model, "enable_fp8") else
                                        f"model.arch={cfg.model.arch} has no FP8 path (unet and transformer have)")
        if why:
            raise ConfigError(f"hardware.fp8=true: {why}; use hardware.fp8=false")
        model.enable_fp8()
    n_params = model.num_params()
    est_gib = estimate_memory_gib(cfg.model, T, cfg.hardware.precision)
    if device.type == "cuda" and est_gib is not None:
        card = torch.cuda.get_device_properties(device).total_memory / 2**30
        if est_gib > 0.92 * card:
            fit = T
            while fit > cfg.data.max_length and estimate_memory_gib(cfg.model, fit, cfg.hardware.precision) > 0.92 * card:
                fit //= 2
            raise ConfigError(f"hardware.micro_batch_tokens={T} needs about {est_gib:.0f} GiB but {device} has "
                              f"{card:.0f} GiB: use hardware.micro_batch_tokens={fit} (gradient accumulation keeps "
                              "train.batch_tokens)")
    if cfg.train.max_params is not None and n_params > cfg.train.max_params:
        raise ConfigError(f"the model has {n_params:,} parameters, over train.max_params={cfg.train.max_params:,} "
                          "(the speed track's limit): choose a smaller model")
    optimizers = build_optimizers(model, cfg.optimizer, device)

    run_start = time.time()
    step, tokens_seen, train_seconds_before, wall_before = 0, 0, 0.0, 0.0
    best_val, target_hit = math.inf, previous.get("target") if resume_from else None
    if resume_from is not None:
        state = ckpt.load(resume_from, model, device)
        for opt, sd in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(sd)
        stream.load_state_dict(state["data"][info.rank] if isinstance(state["data"], list) else state["data"])
        set_rng_state(state["rng"])
        step, tokens_seen = state["step"], state["tokens"]
        train_seconds_before, best_val = state["train_seconds"], state.get("best_val", math.inf)
        wall_before = state.get("wall_seconds", 0.0)
        target_hit = state.get("target")
        log.info(f"resumed from {resume_from} at step {step}")

    mean_ctx = _mean_context(evalset, cfg.data.max_length)
    fpt = None if rows else flops_per_token(cfg.model, mean_ctx)  # the Patch-UNet's levels differ: no formula
    desc = {"n_params": n_params, "estimated_memory_gib": est_gib, "batch": geo, "attention": backend, "device": str(device),
            "precision": cfg.hardware.precision + ("+fp8" if cfg.hardware.fp8 else ""), "compile": cfg.hardware.compile,
            "flops_per_token": fpt, "mean_context": mean_ctx, "data_dir": str(data_dir), "train_shards": len(train_files),
            "valid_tokens": evalset.n_tokens, "mode": info.mode}
    if main:
        log.info(f"run dir {run_dir}")
        log.info(f"{cfg.model.arch} d={cfg.model.dim} L={cfg.model.n_layers} H={cfg.model.n_heads}: "
                 f"{n_params:,} parameters | {cfg.optimizer.name} | {cfg.objective.name} "
                 f"rate {mask_rate_at(cfg.objective, 0)} | attention {backend} | {device} x{info.world_size}")
        log.info(f"batch: {geo['batch_tokens']:,} tokens/step = {T:,} tokens x {accum} micro-steps x "
                 f"{info.world_size} rank(s); {cfg.train.max_steps} steps")
        env, diff = environment({"run": desc})
        if (run_dir / "env.json").exists():
            old = read_json(run_dir / "env.json")
            old.setdefault("restarts", []).append(env)
            env = old
        write_json(run_dir / "env.json", env)
        if diff.strip() and not (run_dir / "code.diff").exists():
            write_text(run_dir / "code.diff", diff)

    probes_on = cfg.eval.probe_every > 0
    if probes_on and main:  # representation probes during training: fail now, not at the first probe
        from .probe import check_eval_config

        check_eval_config(cfg.eval, load=True)

    def fail_early(reason: str):
        """Before the loop (dry-run probe, compile warm-up): status failed in summary.json, RunFailed."""
        if main:
            write_json(summary_path, {"status": "failed", "reason": reason, "step": step, **desc})
        raise RunFailed(reason) from None

    # ============================================ DRY RUN ==========================================
    if cfg.dry_run:
        summary = {"status": "dry_run", "n_params": n_params, **desc,
                   "optimizers": [[g.get("name", g.get("kind")) for g in o.param_groups] for o in optimizers]}
        try:  # on CUDA: one training step's peak memory, so that a config can be checked
            peak = _probe_step_memory(cfg, model, optimizers, stream, device, dtype)
        except torch.OutOfMemoryError:
            fail_early(_oom_reason(T, device, "measuring one training step (dry run)"))
        if peak is not None:
            summary["peak_memory_gib"] = peak
        if main:
            write_json(summary_path, summary)
            mem = (f"; one training step peaks at {peak:.1f} GiB (eager; compiled runs use a little less)"
                   if peak is not None else "")
            log.info(f"dry run: {n_params:,} parameters; batch {geo}{mem}; nothing trained")
        return summary

    # ======================================= COMPILE WARM-UP =======================================
    if cfg.hardware.compile and backend == "sdpa":
        log.warning("hardware.compile=true ignored: the SDPA attention path (CPU) has data-dependent shapes; "
                    "torch.compile is used with the varlen/flex back-ends on CUDA")
    elif cfg.hardware.compile:
        compile_model(model, cfg.hardware.compile_scope, cfg.hardware.memory_budget)
    task = MaskedLM(model)
    net = task
    if info.distributed:
        net = nn.parallel.DistributedDataParallel(task, device_ids=[device.index] if device.type == "cuda" else None,
                                                  broadcast_buffers=False, gradient_as_bucket_view=True)
    window_t = torch.tensor(window_at(cfg, step), dtype=torch.int32, device=device)

    def micro_step(tokens, doc_ids, at_step, gen, sync: bool):
        m = apply_objective(cfg.objective, tokens, doc_ids, at_step, gen)
        # flex reads the window from a device tensor (no recompiles); the others take the host int
        # (no .item(): a host sync here would stall the launch of every step's forward)
        ctx = model.make_context(doc_ids, window_t if backend == "flex" else window_at(cfg, at_step))
        cm = net.no_sync() if (info.distributed and not sync) else contextlib.nullcontext()
        with cm:
            loss = net(m.inputs, doc_ids, window_t, m.labels, ctx, dtype, m.weights, m.denom)
            (loss / accum).backward()
        return loss.detach()

    t_warm = time.time()
    if cfg.hardware.compile_warmup_steps > 0:
        saved = ({k: v.detach().clone() for k, v in model.state_dict().items()},
                 [copy.deepcopy(o.state_dict()) for o in optimizers])
        warm = Stream(train_files, T, cfg.data.max_length, cfg.data.seed + 9973, info.rank, info.world_size)
        try:
            for i in range(cfg.hardware.compile_warmup_steps):
                tok, did = warm.next_batch()
                t = torch.from_numpy(tok).to(device)
                d = torch.from_numpy(did).to(device)
                micro_step(t, d, step, generator_for(device, 1, i), sync=True)
                apply_schedules(optimizers, cfg.optimizer, step, cfg.train.max_steps)
                for o in optimizers:
                    o.step()
                model.zero_grad(set_to_none=True)
        except torch.OutOfMemoryError:
            saved = None
            fail_early(_oom_reason(T, device, "in the compile warm-up (hardware.compile_warmup_steps)"))
        model.load_state_dict(saved[0])
        for o, sd in zip(optimizers, saved[1]):
            o.load_state_dict(sd)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    compile_seconds = time.time() - t_warm

    # ============================================= LOOP ============================================
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=main)  # one row per step (rundir.MetricsLog)
    if resume_from is not None:
        metrics.truncate_after(step)
    if main:  # before the loader thread and the signal handlers: a full disk here leaves nothing behind
        write_json(summary_path, {"status": "running", "n_params": n_params, "step": step, **desc})
    loader = Prefetcher(stream, device, depth=cfg.data.prefetch)
    signals = Signals()
    signals.install()
    clock = Clock(device, train_seconds_before)
    tracker = Tracker(cfg, run_dir, is_main=main)  # W&B (when on) + console progress
    tracker.start(total_steps=cfg.train.max_steps, start_step=step, info=desc)
    status, reason = "done", None
    last_val: dict = {}
    last_probe: dict = {}
    time_to_first_step = None
    last_log_time, last_log_tokens, last_log_train = time.time(), tokens_seen, clock.seconds
    losses: list[torch.Tensor] = []
    skipped_steps, bad_streak = (state.get("skipped_steps", 0) if resume_from is not None else 0), 0
    step_times: list[float] = []  # seconds between consecutive end-of-step syncs (no pause in between)
    last_sync: Optional[float] = None
    loader_wait = 0.0
    cursor = stream.state_dict()
    # checkpoint.every_minutes: wall time since the last checkpoint (or the start of this loop)
    ckpt_every_s = 60.0 * cfg.checkpoint.every_minutes
    last_ckpt_wall, last_ckpt_step = time.time(), step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def evaluate_now(prefix: str = "val", files=None) -> dict:
        nonlocal last_sync
        clock.pause()
        last_sync = None
        es = evalset if files is None else EvalSet.build(files, eval_T, cfg.data.max_length, cfg.eval.max_tokens,
                                                         cfg.eval.seed, rows=rows)
        try:
            out = evaluate(model, es, device=device, window=window_at(cfg, step), dtype=dtype,
                           mask_rate=cfg.eval.mask_rate, rank=info.rank,
                           world_size=info.world_size, prefix=prefix)
            if cfg.objective.name != "mlm":  # masked diffusion: also the loss at fixed masking levels
                for level in cfg.objective.eval_levels:
                    lv = evaluate(model, es, device=device, window=window_at(cfg, step), dtype=dtype,
                                  mask_rate=level, rank=info.rank, world_size=info.world_size, prefix=prefix,
                                  loss_only=True)
                    out[f"{prefix}_loss_t{round(level * 100):02d}"] = lv[f"{prefix}_loss"]
        except torch.OutOfMemoryError:
            raise StopRun("failed", _oom_reason(T, device, f"in evaluation ({prefix}) at step {step}",
                                                eval_T=eval_T)) from None
        return out

    def probe_now() -> dict:
        """Layer-wise probes (speedrun/probe/) on rank 0, outside the train clock; others wait."""
        nonlocal last_sync
        clock.pause()
        last_sync = None
        res = {}
        if main:
            from .probe import run_probes_from_config

            res = run_probes_from_config(model, cfg.eval, device, max_length=min(cfg.data.max_length, 1024),
                                         dtype=dtype)
            row = {"step": step, "tokens": tokens_seen, "train_seconds": clock.seconds, **res}
            metrics.write(row)
            tracker.log(row)
            log.info(f"step {step} | probe score {res.get('probe/score', float('nan')):.4f} | " + " | ".join(
                f"{k[6:]} {v:.3f}" for k, v in res.items() if k.startswith("probe/") and k.count("/") == 2
                and "best_layer" not in k))
        D.barrier(info)
        return res

    def save_checkpoint() -> None:
        nonlocal last_sync, last_ckpt_wall, last_ckpt_step
        clock.pause()
        last_sync = None
        data_states = _gather_objects(cursor, info)
        if main:
            state = {"step": step, "tokens": tokens_seen, "optimizers": [o.state_dict() for o in optimizers],
                     "data": data_states, "rng": rng_state(), "train_seconds": clock.seconds,
                     "wall_seconds": wall_before + time.time() - run_start,
                     "best_val": best_val, "target": target_hit, "config": to_dict(cfg),
                     "skipped_steps": skipped_steps}
            path = ckpt.save(ckpt_root, step, model, state, keep_last=cfg.checkpoint.keep_last)
            log.info(f"checkpoint {path}")
        D.barrier(info)
        last_ckpt_wall, last_ckpt_step = time.time(), step

    try:
        while step < cfg.train.max_steps:
            # ---- signals, limits and the checkpoint timer, agreed by all ranks at the step boundary ----
            stop = STOP_CODE[signals.flag]
            if cfg.train.max_minutes > 0 and clock.seconds > 60 * cfg.train.max_minutes:
                stop = max(stop, 3.0)
            # checkpoint.every_minutes rides on the same all-reduce: code = 2 * stop + timer. The max gives
            # every rank the same code; with no stop anywhere its low bit is "the timer fired on some rank"
            timer = float(ckpt_every_s > 0 and step > last_ckpt_step and bad_streak == 0
                          and time.time() - last_ckpt_wall >= ckpt_every_s)
            code = 2.0 * stop + timer
            code = D.all_reduce_max(code, info) if info.distributed else code
            stop, timer = float(code // 2), code % 2
            if stop:
                kind = STOP_KIND[stop]
                if kind == "time_limit":
                    log.info(f"train.max_minutes={cfg.train.max_minutes} reached at step {step}")
                    break
                save_checkpoint()
                raise StopRun(kind, f"received {signals.name or 'a stop signal'} at step {step}; checkpoint saved")
            if timer:
                log.info(f"checkpoint.every_minutes={cfg.checkpoint.every_minutes:g} passed: checkpoint at step {step}")
                save_checkpoint()

            # ---- schedules for this step ----
            window = window_at(cfg, step)
            window_t.fill_(window)
            rate = mask_rate_at(cfg.objective, step)
            alpha = diffusion_fraction(cfg.objective, step)
            lr_mult = apply_schedules(optimizers, cfg.optimizer, step, cfg.train.max_steps)

            # ---- forward/backward over the micro-batches ----
            clock.start()
            step_loss = torch.zeros((), device=device)
            try:
                for micro in range(accum):
                    t_wait = time.perf_counter()
                    tokens, doc_ids, cursor = loader.next()
                    loader_wait += time.perf_counter() - t_wait
                    gen = generator_for(device, cfg.seed, step, micro, info.rank)
                    step_loss += micro_step(tokens.long(), doc_ids, step, gen, sync=(micro == accum - 1)) / accum
                grad_norm = _clip_grad_norm(model, cfg.optimizer.grad_clip)
                # one host sync per step: a non-finite loss or gradient skips the update on every rank
                ok = torch.isfinite(grad_norm) & torch.isfinite(step_loss)
                if info.distributed:
                    ok = ok.float()
                    torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
                finite = bool(ok)
                t_now = time.perf_counter()
                if last_sync is not None:
                    step_times.append(t_now - last_sync)
                last_sync = t_now
                if finite:
                    for opt in optimizers:
                        opt.step()
            except torch.OutOfMemoryError:
                raise StopRun("failed", _oom_reason(T, device)) from None
            model.zero_grad(set_to_none=True)
            step += 1
            if STEP_HOOK is not None:
                STEP_HOOK(step)
            tokens_seen += geo["batch_tokens"]
            tracker.progress(step)  # advances the console bar; no device sync
            if finite:
                bad_streak = 0
                losses.append(step_loss)
            else:
                skipped_steps += 1
                bad_streak += 1
                log.warning(f"step {step}: non-finite loss or gradient norm "
                            f"(loss {float(step_loss):.4g}, grad norm {float(grad_norm):.4g}); update skipped "
                            f"({bad_streak} in a row, {skipped_steps} in total)")
                if bad_streak >= cfg.train.max_bad_steps:
                    raise StopRun("failed", f"{bad_streak} consecutive steps with a non-finite loss or gradient "
                                            f"(last at step {step}); the last checkpoint is intact: lower the "
                                            "learning rates or enable optimizer.grad_clip, then resume")
            if time_to_first_step is None:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                time_to_first_step = time.time() - PROCESS_START

            # ---- logging ----
            if (step % cfg.train.log_every == 0 or step == cfg.train.max_steps) and losses:
                mean_loss = torch.stack(losses).mean()
                if info.distributed:
                    torch.distributed.all_reduce(mean_loss, op=torch.distributed.ReduceOp.AVG)
                losses = []
                now_train = clock.seconds
                dt_train = max(now_train - last_log_train, 1e-9)
                tps = (tokens_seen - last_log_tokens) / dt_train
                row = {"step": step, "tokens": tokens_seen, "train_loss": mean_loss.item(),
                       "lr_mult": lr_mult, "lr_hidden": optimizers[0].param_groups[0]["lr"],
                       "mask_rate": rate, "diffusion_frac": alpha, "window": window, "tokens_per_s": tps,
                       "train_seconds": now_train, "wall_seconds": wall_before + time.time() - run_start}
                row["grad_norm"] = float(grad_norm)
                row["skipped_steps"] = skipped_steps
                metrics.write(row)
                tracker.log(row)
                tracker.progress(step, row["train_loss"], tps, extra=f"lr x{lr_mult:.3f} | train {now_train:.1f}s")
                last_log_tokens, last_log_train = tokens_seen, now_train

            # ---- evaluation ----
            due = cfg.eval.every_steps > 0 and step % cfg.eval.every_steps == 0
            if due and step < cfg.train.max_steps:
                last_val = evaluate_now()
                best_val = min(best_val, last_val["val_loss"])
                target_hit = _check_target(cfg, last_val, target_hit, step, tokens_seen, clock.seconds)
                val_row = {"step": step, "tokens": tokens_seen, "train_seconds": clock.seconds, **last_val}
                metrics.write(val_row)
                tracker.log(val_row)
                if main:
                    log.info(_val_line(step, last_val))
                if target_hit and cfg.train.stop_at_target:
                    break

            # ---- representation probes (eval.probe_every) ----
            if probes_on and step % cfg.eval.probe_every == 0 and step < cfg.train.max_steps:
                last_probe = probe_now()

            # ---- periodic checkpoint (never in the middle of a streak of non-finite steps) ----
            if (cfg.checkpoint.every_steps > 0 and step % cfg.checkpoint.every_steps == 0
                    and step < cfg.train.max_steps and bad_streak == 0):
                save_checkpoint()

        # =========================================== FINAL =========================================
        clock.pause()
        last_val = evaluate_now()
        best_val = min(best_val, last_val["val_loss"])
        target_hit = _check_target(cfg, last_val, target_hit, step, tokens_seen, clock.seconds)
        val_row = {"step": step, "tokens": tokens_seen, "train_seconds": clock.seconds, **last_val}
        metrics.write(val_row)
        tracker.log(val_row)
        if main:
            log.info(_val_line(step, last_val))
        if probes_on:
            last_probe = probe_now()
        if cfg.eval.test:
            test_files = data_files(cfg.data, "test")
            test_metrics = evaluate_now("test", test_files)
            last_val.update(test_metrics)
            test_row = {"step": step, **test_metrics}
            metrics.write(test_row)  # merged into this step's row
            tracker.log(test_row)
        if cfg.checkpoint.final:
            save_checkpoint()
        # A stop signal that arrived during the final evaluation or checkpoint is read only here (the flag is
        # otherwise read at step boundaries, and there are none left). Training is finished either way, so:
        #   - the final checkpoint was written completely (save_checkpoint() returned; the handler only sets
        #     a flag, so a signal cannot cut the write short): the run is complete and resumable -> "done",
        #     exit 0, with the signal named in the summary's reason (SIGUSR2 does not requeue a finished run);
        #   - no final checkpoint (checkpoint.final=false): nothing proves the end state -> "interrupted" /
        #     "preempted" with the usual non-zero exit, as for a signal during training.
        late = STOP_CODE[signals.flag]
        late = D.all_reduce_max(late, info) if info.distributed else late
        if late:
            who = signals.name or "a stop signal"
            if cfg.checkpoint.final:
                reason = (f"received {who} after training finished (step {step}); the final evaluation and "
                          "checkpoint completed")
                log.warning(reason)
            else:
                raise StopRun(STOP_KIND[late],
                              f"received {who} during the final evaluation (step {step}, training finished); "
                              "no final checkpoint was written (checkpoint.final=false)")
    except StopRun as stop_exc:
        status, reason = stop_exc.status, stop_exc.reason
    except BaseException as exc:
        status, reason = ("interrupted", "KeyboardInterrupt") if isinstance(exc, KeyboardInterrupt) else \
            ("failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        if main:
            with contextlib.suppress(OSError, RunDirWriteError):  # a full disk must not hide the original error
                tracker.summary(_write_summary(summary_path, status, reason, cfg, desc, step, tokens_seen, clock,
                                               {**last_val, **last_probe}, best_val, target_hit, time_to_first_step,
                                               compile_seconds, device, skipped_steps, step_times, loader_wait,
                                               wall_before + time.time() - run_start))
        tracker.finish(status)
        raise
    finally:
        loader.close()
        signals.restore()

    try:
        summary = _write_summary(summary_path, status, reason, cfg, desc, step, tokens_seen, clock,
                                 {**last_val, **last_probe}, best_val, target_hit, time_to_first_step, compile_seconds, device,
                                 skipped_steps, step_times, loader_wait,
                                 wall_before + time.time() - run_start) if main else {}
        tracker.summary(summary)
    except BaseException:  # e.g. summary.json on a full disk (RunDirWriteError: one line)
        status = "failed"
        raise
    finally:
        tracker.finish(status)
    if main:
        log.info(f"{status}: {run_dir}")
        if last_val:
            log.info(f"final val_loss {last_val.get('val_loss', float('nan')):.4f} "
                     f"± {last_val.get('val_loss_stderr', float('nan')):.4f} "
                     f"(unigram {last_val.get('val_unigram_loss', float('nan')):.4f}) | "
                     f"ppl {last_val.get('val_ppl', float('nan')):.3f} | acc {last_val.get('val_accuracy', 0):.4f}")
    if status == "failed":
        raise RunFailed(reason)
    if status == "preempted":
        _chain_previous_handler(signals, signal.SIGUSR2)
    if status in ("interrupted", "preempted"):
        raise SystemExit(128 + (signals.signum or signal.SIGINT))
    return summary


# ----------------------------------------------------------------------------------------------------
def _mean_context(evalset: EvalSet, max_length: int) -> float:
    """Mean attended context per token (≈ sum L_i^2 / sum L_i over documents) for the FLOP formula."""
    sq, n = 0.0, 0
    for _, doc_ids, _ in evalset.batches[:64]:
        counts = np.bincount(doc_ids[doc_ids >= 0])
        sq += float((counts.astype(np.float64) ** 2).sum())
        n += int(counts.sum())
    return sq / max(n, 1)


def _gather_objects(obj, info: D.DistInfo):
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def _check_target(cfg, val: dict, hit, step, tokens, seconds):
    if hit or cfg.target_loss is None or val.get("val_loss", math.inf) > cfg.target_loss:
        return hit
    return {"loss": cfg.target_loss, "step": step, "tokens": tokens, "train_seconds": seconds,
            "val_loss": val["val_loss"]}


def _val_line(step: int, v: dict) -> str:
    return (f"step {step} | val_loss {v['val_loss']:.4f} | ppl {v['val_ppl']:.3f} | acc {v['val_accuracy']:.4f} | "
            f"f1 {v['val_f1']:.4f} | mcc {v['val_mcc']:.4f} | unigram {v['val_unigram_loss']:.4f}")


def _oom_reason(T: int, device, where: str = "", eval_T: Optional[int] = None) -> str:
    """One line for torch.OutOfMemoryError: where it happened and which setting to lower."""
    at = f" {where}" if where else ""
    if eval_T is not None:
        return (f"out of memory{at} at eval.batch_tokens={eval_T} (hardware.micro_batch_tokens={T}) on {device}: "
                f"lower eval.batch_tokens (e.g. eval.batch_tokens={eval_T // 2}; it defaults to "
                "hardware.micro_batch_tokens) or use a smaller model")
    return (f"out of memory{at} at hardware.micro_batch_tokens={T} on {device}: lower it "
            f"(e.g. hardware.micro_batch_tokens={T // 2}; gradient accumulation keeps train.batch_tokens) "
            "or use a smaller model")


def _clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global L2 norm of all gradients (logged every step); clip to max_norm when it is > 0."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if max_norm > 0:
        torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


def _write_summary(path, status, reason, cfg, desc, step, tokens, clock, val, best_val, target, ttfs,
                   compile_seconds, device, skipped_steps=0, step_times=(), loader_wait=0.0,
                   wall_seconds=None) -> dict:
    train_s = clock.seconds
    timing = {}
    if step_times:
        st = np.sort(np.asarray(step_times)) * 1e3
        timing = {"step_ms_median": float(np.median(st)), "step_ms_p10": float(np.percentile(st, 10)),
                  "step_ms_p90": float(np.percentile(st, 90)), "timed_step_count": int(st.size),
                  "tokens_per_s_median_step": desc["batch"]["batch_tokens"] / (float(np.median(st)) / 1e3)}
        if len(step_times) <= 1000:  # the raw series for benchmarks (speedrun.bench)
            timing["step_times_ms"] = [round(t * 1e3, 3) for t in step_times]
    summary = {
        "status": status,
        "reason": reason,
        "step": step,
        "skipped_steps": skipped_steps,
        "max_steps": cfg.train.max_steps,
        "tokens": tokens,
        "train_seconds": train_s,
        "wall_seconds": wall_seconds,
        "tokens_per_s": tokens / train_s if train_s > 0 else None,
        "time_to_first_step": ttfs,
        "compile_seconds": compile_seconds,
        "loader_wait_frac": loader_wait / train_s if train_s > 0 else None,
        **timing,
        "val_loss": val.get("val_loss"),
        "unigram_loss": val.get("val_unigram_loss"),
        "best_val_loss": best_val if math.isfinite(best_val) else None,
        "target_loss": cfg.target_loss,
        "target": target,
        **{k: v for k, v in val.items() if k not in ("val_loss",)},
        **desc,
    }
    if device.type == "cuda":
        summary["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if summary["tokens_per_s"] and desc.get("flops_per_token"):
        summary["model_tflops_per_s"] = summary["tokens_per_s"] * desc["flops_per_token"] / 1e12
    write_json(path, summary)
    return summary


def _probe_step_memory(cfg, model, optimizers, stream, device, dtype) -> Optional[float]:
    """Peak GPU memory (GiB) of one forward/backward/optimizer step, with state restored afterwards;
    None off CUDA (no peak-memory counter)."""
    if device.type != "cuda":
        return None
    saved = ({k: v.detach().clone() for k, v in model.state_dict().items()},
             [copy.deepcopy(o.state_dict()) for o in optimizers])
    probe = type(stream)(stream.shards.files, stream.T, stream.max_length, stream.seed + 7, stream.rank, stream.world)
    tok, did = probe.next_batch()
    torch.cuda.reset_peak_memory_stats(device)
    t, d = torch.from_numpy(tok).to(device).long(), torch.from_numpy(did).to(device)
    m = mask_tokens(t, cfg.objective.mask_rate, generator_for(device, 0))
    h = model(m.inputs, d, window_at(cfg, 0), dtype=dtype)
    loss, _, _ = masked_loss(model, h, m.labels)
    loss.backward()
    for o in optimizers:
        o.step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    model.zero_grad(set_to_none=True)
    model.load_state_dict(saved[0])
    for o, sd in zip(optimizers, saved[1]):
        o.load_state_dict(sd)
    return peak


def _chain_previous_handler(signals: Signals, sig) -> None:
    """After saving on SIGUSR2, hand over to submitit's handler (which requeues the job)."""
    prev = signals.previous.get(sig)
    if callable(prev):
        prev(sig, None)
