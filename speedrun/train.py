"""The training loop: `train()` reads top to bottom, like modded-nanogpt's; its parts live elsewhere.

    run(cfg, run_dir)          entry point (launch.py via task.py, tests, benchmarks): holds the run
                               directory's lock, spawns local ranks if asked, returns the summary
    train(cfg, run_dir, info)  one rank: claim the directory, build the parts, dry run or warm up, loop

Parts: rundir.claim (new / resume / done / refuse), setup.build (data, model, optimizers, state,
TrainStep), preflight (checks before step 1), step.TrainStep (micro-steps, clipping, the masked
update), control.Control (stop and checkpoint decisions agreed by all ranks), evaluate (the one
protocol), checkpoint / state (what is saved), summary (summary.json), tracking (W&B, console).

Timing follows RECIPE.md decision 5: compilation happens in an explicit untimed warm-up; the clock
(`train_seconds`) runs over optimizer steps only and is paused (after a device sync) for evaluation
and checkpointing; `wall_seconds` counts everything from the start of the run (summed over resumes;
`time_to_first_step` counts from process start). tokens/s = trained tokens / train_seconds.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from . import checkpoint as ckpt
from . import dist as D
from . import preflight, rundir, summary
from .config import RunConfig, to_dict
from .control import Clock, Control, Every, Signals
from .data.loader import EvalSet, Prefetcher
from .errors import SpeedrunError
from .evaluate import Evaluator
from .fsutil import FolderLock
from .objectives import diffusion_fraction, mask_rate_at
from .optim import apply_schedules
from .setup import Run, build, compile_model, window_at
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
# called with the step number after every optimizer step when set (the benchmark's profiler: speedrun.bench)
STEP_HOOK: Optional[Callable[[int], None]] = None


class RunFailed(SpeedrunError):
    """The run stopped with status 'failed' (summary.json holds the reason); exit code is non-zero."""


class StopRun(Exception):
    """Raised to end a run early with a status (interrupted, preempted, failed) and a reason."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


# ================================================================================================
def run(cfg: RunConfig, run_dir: str | os.PathLike) -> dict:
    """Train `cfg` into `run_dir`, starting the local ranks if hardware.gpus > 1. Returns the summary."""
    mode = D.detect_mode(cfg.hardware.gpus)
    lock = None
    if D.launch_rank() == 0 and not cfg.dry_run:  # one process owns a run directory at a time
        lock = FolderLock(run_dir, "run directory (hydra.run.dir)").acquire()
    try:
        if mode == "spawn":
            D.spawn(_rank_main, cfg.hardware.gpus, (cfg, str(run_dir), "spawn"))
            return rundir.read_json(Path(run_dir) / "summary.json")
        return _rank_main(cfg, str(run_dir), mode)
    finally:
        if lock is not None:
            lock.release()


def _rank_main(cfg: RunConfig, run_dir: str, mode: str) -> dict:
    info = D.init(cfg.hardware.device, mode, dry_run=cfg.dry_run)
    try:
        return train(cfg, Path(run_dir), info)
    finally:
        D.cleanup()


def train(cfg: RunConfig, run_dir: Path, info: D.DistInfo) -> dict:
    # ---- SETUP: claim the directory, build the parts (checks before step 1 included) ----
    claim = rundir.claim(run_dir, cfg, is_main=info.is_main)
    log = rundir.setup_logging(run_dir if claim.writes else None, info.rank)
    if claim.kind == "done":
        log.info(f"{run_dir}: summary.json says done; nothing to do")
        return claim.summary
    D.barrier(info)
    run = build(cfg, run_dir, info, claim, log, info.device)
    announce(run, claim)
    if cfg.dry_run:
        return dry_run(run)
    with Session(run) as s:
        compile_warmup(run)
        state, ctl = run.state, s.control
        while state.step < cfg.train.max_steps:
            # ---- stop signals, time limit, checkpoint timer: one decision for every rank ----
            decision = ctl.decide(state.step, healthy=s.health.streak == 0)
            if decision.stop == "time_limit":
                log.info(f"train.max_minutes={cfg.train.max_minutes} reached at step {state.step}")
                break
            if decision.stop:
                save_checkpoint(s)
                raise StopRun(decision.stop, f"received {s.signals.name or 'a stop signal'} at step {state.step}; "
                                             "checkpoint saved")
            if decision.checkpoint:
                log.info(f"checkpoint.every_minutes={cfg.checkpoint.every_minutes:g} passed: checkpoint at step "
                         f"{state.step}")
                save_checkpoint(s)
            # ---- one optimizer step ----
            sched = schedules(cfg, run.optimizers, state.step)
            s.clock.start()
            try:
                result = run.step(s.next_batch, state.step, sched["window"])
            except torch.OutOfMemoryError:
                raise StopRun("failed", preflight.one_line_oom(run.geo["micro_batch_tokens"], run.device)) from None
            state.step += 1
            state.tokens += run.geo["batch_tokens"]
            s.health.push(state.step, result, sched)
            if STEP_HOOK is not None:
                STEP_HOOK(state.step)
            s.tracker.progress(state.step)  # advances the console bar; no device sync
            # ---- log, evaluate, probe, checkpoint at their cadence ----
            if state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps:
                log_train(s)
            if s.evals.due_steps(state.step) and state.step < cfg.train.max_steps:
                if evaluate_now(s) and cfg.train.stop_at_target:
                    break
            if s.probes.due_steps(state.step) and state.step < cfg.train.max_steps:
                probe_now(s)
            if s.checkpoints.due_steps(state.step) and state.step < cfg.train.max_steps:
                s.health.settle()
                if s.health.streak == 0:  # never in the middle of a streak of non-finite steps
                    save_checkpoint(s)
        finish(s)
    return s.summary


# ================================================================================================
def announce(run: Run, claim) -> None:
    """The run's description in the log, and env.json / code.diff / run.json in the run directory."""
    cfg, d, log = run.cfg, run.desc, run.log
    if not run.info.is_main:
        return
    geo = run.geo
    log.info(f"run dir {run.run_dir}" + ("" if run.writes else " (dry run of an existing run: nothing is written)"))
    log.info(f"{cfg.model.arch} d={cfg.model.dim} L={cfg.model.n_layers} H={cfg.model.n_heads}: {d['n_params']:,} "
             f"parameters | {cfg.optimizer.name} | {cfg.objective.name} rate {mask_rate_at(cfg.objective, 0)} | "
             f"attention {d['attention']} | {run.device} x{run.info.world_size} | {d['threads']} CPU threads")
    log.info(f"batch: {geo['batch_tokens']:,} tokens/step = {geo['micro_batch_tokens']:,} tokens x "
             f"{geo['grad_accum']} micro-steps x {geo['world_size']} rank(s)"
             + (" (planned: a dry run in this one process)" if geo["world_size"] != run.info.world_size else "")
             + f"; {cfg.train.max_steps} steps")
    if getattr(cfg.model, "tie_embeddings", False) and hasattr(cfg.optimizer, "lr_embed"):
        log.info(f"model.tie_embeddings=true: the shared embedding/decoder matrix trains with the embeddings, at "
                 f"optimizer.lr_embed={cfg.optimizer.lr_embed:g}")
    if not run.writes:
        return
    rundir.write_identity(run.run_dir, cfg, claim.changed if claim.kind == "resume" else [])
    env, diff = rundir.environment({"run": d})
    if (run.run_dir / "env.json").exists():
        old = rundir.read_json(run.run_dir / "env.json")
        old.setdefault("restarts", []).append(env)
        env = old
    rundir.write_json(run.run_dir / "env.json", env)
    if diff.strip() and not (run.run_dir / "code.diff").exists():
        rundir.write_text(run.run_dir / "code.diff", diff)


def schedules(cfg: RunConfig, optimizers: list, step: int) -> dict:
    """Every schedule at `step` (pure functions of the step): lr multiplier (applied), window, rates."""
    return {"lr_mult": apply_schedules(optimizers, cfg.optimizer, step, cfg.train.max_steps),
            "window": window_at(cfg, step), "mask_rate": mask_rate_at(cfg.objective, step),
            "diffusion_frac": diffusion_fraction(cfg.objective, step)}


def fail_early(run: Run, reason: str):
    """Before the loop (dry-run probe, compile warm-up): status failed in summary.json, RunFailed."""
    if run.writes:
        rundir.write_json(run.run_dir / "summary.json", {"status": "failed", "reason": reason,
                                                         "step": run.state.step, **run.desc})
    raise RunFailed(reason) from None


def dry_run(run: Run) -> dict:
    """Everything but training: sizes, batch geometry and (on a GPU) one real step's peak memory."""
    out = {"status": "dry_run", **run.desc,
           "optimizers": [[g.get("name", g.get("kind")) for g in o.param_groups] for o in run.optimizers]}
    why = preflight.device_or_none(run.cfg)
    if why:
        out["device_note"] = f"{why}: checked on the CPU instead; the measured peak memory needs the GPU"
    try:
        stream = run.new_stream(7)
        batches = ((torch.from_numpy(t).to(run.device), torch.from_numpy(d).to(run.device))
                   for t, d in iter(stream.next_batch, None))
        peak = run.step.measure_peak(batches, window_at(run.cfg, 0))
    except torch.OutOfMemoryError:
        fail_early(run, preflight.one_line_oom(run.geo["micro_batch_tokens"], run.device,
                                               "measuring one training step (dry run)"))
    if peak is not None:
        out["peak_memory_gib"] = peak
    if run.writes:
        rundir.write_json(run.run_dir / "summary.json", out)
    mem = f"; one training step peaks at {peak:.1f} GiB" if peak is not None else \
        f"; estimated memory {run.desc['estimated_memory_gib'] or float('nan'):.1f} GiB (no GPU measured)"
    run.log.info(f"dry run: {run.desc['n_params']:,} parameters; batch {run.geo}{mem}; nothing trained")
    return out


def compile_warmup(run: Run) -> None:
    """Compile (torch.compile) and run hardware.compile_warmup_steps untimed steps, state restored (inside
    the Session: an out-of-memory here ends the run as failed, with the usual summary)."""
    cfg, t0 = run.cfg, time.time()
    if cfg.hardware.compile and run.desc["attention"] == "sdpa":
        run.log.warning("hardware.compile=true ignored: the SDPA attention path (CPU) has data-dependent shapes; "
                        "torch.compile is used with the fa4/varlen/flex back-ends on CUDA")
    elif cfg.hardware.compile:
        compile_model(run.model, cfg.hardware.compile_scope, cfg.hardware.memory_budget)
    if cfg.hardware.compile_warmup_steps > 0:
        stream = run.new_stream(9973)

        def batch():
            t, d = stream.next_batch()
            return torch.from_numpy(t).to(run.device), torch.from_numpy(d).to(run.device)

        try:
            with run.step.restored():
                for _ in range(cfg.hardware.compile_warmup_steps):
                    sched = schedules(cfg, run.optimizers, run.state.step)
                    run.step(batch, run.state.step, sched["window"])
        except torch.OutOfMemoryError:
            raise StopRun("failed", preflight.one_line_oom(run.geo["micro_batch_tokens"], run.device,
                                                           "in the compile warm-up (hardware.compile_warmup_steps)"))
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
    run.timing.compile_seconds = time.time() - t0


# ================================================================================================
class Health:
    """Reads each step's finite flag one step late (no host sync on the step itself): counts skipped
    steps, stops after train.max_bad_steps in a row, times completed steps, keeps losses for the log."""

    def __init__(self, s: "Session"):
        self.s, self.pending, self.streak, self.last = s, None, 0, None
        self.losses: list = []  # (loss, finite) device tensors since the last log row
        self.last_sched: dict = {}
        self.last_norm = torch.tensor(math.nan)

    def push(self, step: int, result, sched: dict) -> None:
        self.settle()
        self.pending = (step, result)
        self.losses.append((result.loss, result.finite))
        self.last_sched, self.last_norm = sched, result.grad_norm

    def settle(self) -> None:
        """Read the pending step's flag (waits for that step, not for any later one)."""
        if self.pending is None:
            return
        step, result = self.pending
        self.pending = None
        finite = bool(result.finite)
        now = time.perf_counter()
        timing = self.s.run.timing
        if self.last is not None and self.s.clock.running:
            timing.step_times.append(now - self.last)
        self.last = now if self.s.clock.running else None
        if timing.time_to_first_step is None:
            timing.time_to_first_step = time.time() - PROCESS_START
        if finite:
            self.streak = 0
            return
        state, cfg = self.s.run.state, self.s.run.cfg
        state.skipped_steps += 1
        self.streak += 1
        self.s.run.log.warning(f"step {step}: non-finite loss or gradient norm (loss {float(result.loss):.4g}, grad "
                               f"norm {float(result.grad_norm):.4g}); update skipped ({self.streak} in a row, "
                               f"{state.skipped_steps} in total)")
        if self.streak >= cfg.train.max_bad_steps:
            raise StopRun("failed", f"{self.streak} consecutive steps with a non-finite loss or gradient (last at "
                                    f"step {step}); the last checkpoint is intact: lower the learning rates or "
                                    "enable optimizer.grad_clip, then resume")

    def paused(self) -> None:
        self.settle()
        self.last = None

    def mean_loss(self) -> Optional[torch.Tensor]:
        """Mean of the finite losses since the last call (None if there were none)."""
        if not self.losses:
            return None
        losses = torch.stack([x for x, _ in self.losses])
        keep = torch.stack([f for _, f in self.losses])
        self.losses = []
        n = keep.sum()
        return torch.where(keep, losses, torch.zeros_like(losses)).sum() / n.clamp(min=1) if bool(n > 0) else None


class Session:
    """The loop's live surroundings: loader thread, signals, clock, control, tracker, metrics, cadences.
    On exit it writes summary.json and maps how the loop ended onto a status and an exit."""

    def __init__(self, run: Run):
        cfg, info, self.run = run.cfg, run.info, run
        self.metrics = rundir.MetricsLog(run.run_dir / "metrics.jsonl", enabled=run.writes)
        self.evaluator = Evaluator(run.model, run.evalset, device=run.device, dtype=run.dtype, rank=info.rank,
                                   world_size=info.world_size, mask_rate=cfg.eval.mask_rate,
                                   levels=getattr(cfg.objective, "eval_levels", ()) if cfg.objective.name != "mlm" else ())
        self.clock = Clock(run.device, run.state.train_seconds)
        self.signals = Signals()
        self.evals, self.probes = Every(cfg.eval.every_steps), Every(cfg.eval.probe_every)
        self.checkpoints = Every(cfg.checkpoint.every_steps, cfg.checkpoint.every_minutes, run.state.step)
        self.control = Control(self.signals, self.clock, self.checkpoints, cfg.train.max_minutes,
                               group=D.control_group(info), distributed=info.distributed)
        self.tracker = Tracker(cfg, run.run_dir, is_main=run.writes)
        self.health = Health(self)
        self.last, self.probe, self.summary, self.loader = {}, {}, {}, None
        self.cursor = run.stream.state_dict()
        self.last_log = (run.state.tokens, self.clock.seconds)  # tokens and train seconds at the last log row
        self.status, self.reason = "done", None

    def __enter__(self) -> "Session":
        run = self.run
        if run.resumed_from is not None:
            self.metrics.truncate_after(run.state.step)
        if run.writes:  # before the loader thread and the signal handlers: a full disk here leaves nothing behind
            rundir.write_json(run.run_dir / "summary.json", {"status": "running", "step": run.state.step, **run.desc})
        self.loader = Prefetcher(run.stream, run.device, depth=run.cfg.data.prefetch)
        self.signals.install()
        self.tracker.start(total_steps=run.cfg.train.max_steps, start_step=run.state.step, info=run.desc)
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        return self

    def next_batch(self) -> tuple:
        t0 = time.perf_counter()
        tokens, doc_ids, self.cursor = self.loader.next()
        self.run.timing.loader_wait += time.perf_counter() - t0
        return tokens, doc_ids

    def pause(self) -> None:
        self.clock.pause()
        self.health.paused()

    def __exit__(self, exc_type, exc, tb) -> bool:
        run = self.run
        if isinstance(exc, StopRun):
            self.status, self.reason = exc.status, exc.reason
        elif exc is not None:
            self.status, self.reason = ("interrupted", "KeyboardInterrupt") if isinstance(exc, KeyboardInterrupt) \
                else ("failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        self.loader.close()
        self.signals.restore()
        try:
            self.summary = self._write_summary(quiet=exc is not None and not isinstance(exc, StopRun))
        finally:
            self.tracker.finish(self.status)
        if exc is not None and not isinstance(exc, StopRun):
            return False  # the original error propagates
        if run.info.is_main:
            run.log.info(f"{self.status}: {run.run_dir}")
            if self.last:
                v = self.last
                run.log.info(f"final val_loss {v.get('val_loss', math.nan):.4f} ± {v.get('val_loss_stderr', math.nan):.4f} "
                             f"(unigram {v.get('val_unigram_loss', math.nan):.4f}) | ppl {v.get('val_ppl', math.nan):.3f} "
                             f"| acc {v.get('val_accuracy', 0):.4f}")
        if self.status == "failed":
            raise RunFailed(self.reason)
        if self.status == "preempted":
            self.signals.chain(signal.SIGUSR2)
        if self.status in ("interrupted", "preempted"):
            raise SystemExit(128 + (self.signals.signum or signal.SIGINT))
        return True

    def _write_summary(self, quiet: bool) -> dict:
        run = self.run
        if not run.writes:
            return {}
        built = summary.build(self.status, self.reason, cfg=run.cfg, state=run.state, desc=run.desc,
                              train_seconds=self.clock.seconds, wall_seconds=self.wall_seconds(),
                              metrics={**self.last, **self.probe}, timing=run.timing, device=run.device)
        try:
            rundir.write_json(run.run_dir / "summary.json", built)
        except (OSError, rundir.RunDirWriteError):
            if not quiet:  # a full disk must not hide the original error
                self.status = "failed"
                raise
        self.tracker.summary(built)
        return built

    def wall_seconds(self) -> float:
        return self.run.state.wall_seconds + time.time() - self.run.run_start


# ================================================================================================
def log_train(s: Session) -> None:
    """One metrics row with the mean training loss since the last row (only finite steps count)."""
    run, state = s.run, s.run.state
    s.health.settle()
    mean = s.health.mean_loss()
    if mean is None:
        return
    if run.info.distributed:
        torch.distributed.all_reduce(mean, op=torch.distributed.ReduceOp.AVG)
    now, (tokens_before, seconds_before) = s.clock.seconds, s.last_log
    tps = (state.tokens - tokens_before) / max(now - seconds_before, 1e-9)
    s.last_log = (state.tokens, now)
    sched = s.health.last_sched
    row = {"step": state.step, "tokens": state.tokens, "train_loss": mean.item(), "lr_mult": sched["lr_mult"],
           "lr_hidden": run.optimizers[0].param_groups[0]["lr"], "mask_rate": sched["mask_rate"],
           "diffusion_frac": sched["diffusion_frac"], "window": sched["window"], "tokens_per_s": tps,
           "train_seconds": now, "wall_seconds": s.wall_seconds(), "grad_norm": float(s.health.last_norm),
           "skipped_steps": state.skipped_steps}
    s.metrics.write(row)
    s.tracker.log(row)
    s.tracker.progress(state.step, row["train_loss"], tps, extra=f"lr x{sched['lr_mult']:.3f} | train {now:.1f}s")


def evaluate_now(s: Session, prefix: str = "val", files=None) -> bool:
    """Evaluate (clock paused), write the row; returns True when this evaluation reached target_loss."""
    run, state, cfg = s.run, s.run.state, s.run.cfg
    s.pause()
    es = None if files is None else EvalSet.build(files, run.eval_tokens, cfg.data.max_length, cfg.eval.max_tokens,
                                                  cfg.eval.seed, rows=run.rows)
    try:
        out = s.evaluator(window_at(cfg, state.step), prefix, es)
    except torch.OutOfMemoryError:
        raise StopRun("failed", preflight.one_line_oom(run.geo["micro_batch_tokens"], run.device,
                                                       f"in evaluation ({prefix}) at step {state.step}",
                                                       eval_tokens=run.eval_tokens)) from None
    if prefix != "val":
        s.last.update(out)
        s.metrics.write({"step": state.step, **out})  # merged into this step's row
        s.tracker.log({"step": state.step, **out})
        return False
    s.last = out
    state.best_val = min(state.best_val, out["val_loss"])
    hit = state.target is None and cfg.target_loss is not None and out["val_loss"] <= cfg.target_loss
    if hit:
        state.target = {"loss": cfg.target_loss, "step": state.step, "tokens": state.tokens,
                        "train_seconds": s.clock.seconds, "val_loss": out["val_loss"]}
    row = {"step": state.step, "tokens": state.tokens, "train_seconds": s.clock.seconds, **out}
    s.metrics.write(row)
    s.tracker.log(row)
    if run.info.is_main:
        run.log.info(f"step {state.step} | val_loss {out['val_loss']:.4f} | ppl {out['val_ppl']:.3f} | acc "
                     f"{out['val_accuracy']:.4f} | f1 {out['val_f1']:.4f} | mcc {out['val_mcc']:.4f} | unigram "
                     f"{out['val_unigram_loss']:.4f}")
    return hit


def probe_now(s: Session) -> None:
    """Layer-wise probes (speedrun/probe) on rank 0, outside the train clock; other ranks wait."""
    run, state = s.run, s.run.state
    s.pause()
    if run.info.is_main:
        from .probe import run_probes_from_config

        res = run_probes_from_config(run.model, run.cfg.eval, run.device,
                                     max_length=min(run.cfg.data.max_length, 1024), dtype=run.dtype)
        s.probe = res
        row = {"step": state.step, "tokens": state.tokens, "train_seconds": s.clock.seconds, **res}
        s.metrics.write(row)
        s.tracker.log(row)
        run.log.info(f"step {state.step} | probe score {res.get('probe/score', math.nan):.4f} | " + " | ".join(
            f"{k[6:]} {v:.3f}" for k, v in res.items() if k.startswith("probe/") and k.count("/") == 2
            and "best_layer" not in k))
    D.barrier(run.info)


def save_checkpoint(s: Session) -> None:
    run, state = s.run, s.run.state
    s.pause()
    cursors = D.gather_objects(s.cursor, run.info)
    if run.writes:
        trainer, tensors = state.state_dict(cursors, s.clock.seconds, s.wall_seconds())
        config = {"run": to_dict(run.cfg), "model": to_dict(run.cfg.model)}
        path = ckpt.save(run.run_dir / "checkpoints", state.step, run.model, config=config, trainer_state=trainer,
                         tensors=tensors, keep_last=run.cfg.checkpoint.keep_last)
        run.log.info(f"checkpoint {path}")
    D.barrier(run.info)
    s.checkpoints.mark(state.step)


def finish(s: Session) -> None:
    """The final evaluation (and test, probes), the final checkpoint, and a stop signal that came late."""
    run, cfg, state = s.run, s.run.cfg, s.run.state
    s.health.settle()
    if s.health.losses:
        log_train(s)
    s.pause()
    evaluate_now(s)
    if cfg.eval.probe_every > 0:
        probe_now(s)
    if cfg.eval.test:
        evaluate_now(s, "test", run.files["test"])
    if cfg.checkpoint.final:
        save_checkpoint(s)
    # A stop signal that arrived during the final evaluation or checkpoint is read only here. Training is
    # finished either way: with a final checkpoint the run is complete ("done", the signal named in the
    # reason; SIGUSR2 does not requeue a finished run); without one nothing proves the end state.
    late = s.control.decide(state.step, healthy=False).stop
    if late and late != "time_limit":
        who = s.signals.name or "a stop signal"
        if not cfg.checkpoint.final:
            raise StopRun(late, f"received {who} during the final evaluation (step {state.step}, training finished); "
                                "no final checkpoint was written (checkpoint.final=false)")
        s.reason = f"received {who} after training finished (step {state.step}); the final evaluation and checkpoint " \
                   "completed"
        run.log.warning(s.reason)
