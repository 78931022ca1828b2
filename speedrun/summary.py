"""`summary.json`: how a run ended and what it measured, built from its state and description.

    status   running | done | failed | preempted | interrupted | dry_run, with `reason`
    metrics  the last validation (and test, probe) metrics, best val_loss, time and tokens to target_loss
    timing   train_seconds (optimizer steps only), wall_seconds, tokens/s, step-time percentiles,
             time to the first step, compile seconds, loader wait, peak GPU memory
    run      n_params, batch geometry, attention back-end, precision, FLOPs per token, data, ...
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch


@dataclass
class Timing:
    """What the loop measures about itself besides the train clock."""
    step_times: list = field(default_factory=list)  # seconds between consecutive completed steps
    loader_wait: float = 0.0  # seconds the loop waited for batches
    time_to_first_step: Optional[float] = None  # from process start
    compile_seconds: float = 0.0

    def stats(self, batch_tokens: int) -> dict:
        if not self.step_times:
            return {}
        st = np.sort(np.asarray(self.step_times)) * 1e3
        out = {"step_ms_median": float(np.median(st)), "step_ms_p10": float(np.percentile(st, 10)),
               "step_ms_p90": float(np.percentile(st, 90)), "timed_step_count": int(st.size),
               "tokens_per_s_median_step": batch_tokens / (float(np.median(st)) / 1e3)}
        if len(self.step_times) <= 1000:  # the raw series for benchmarks (speedrun.bench)
            out["step_times_ms"] = [round(t * 1e3, 3) for t in self.step_times]
        return out


def build(status: str, reason: Optional[str], *, cfg, state, desc: dict, train_seconds: float,
          wall_seconds: float, metrics: dict, timing: Timing, device: torch.device) -> dict:
    """The summary of a run that ended with `status` (see the module docstring)."""
    summary = {
        "status": status,
        "reason": reason,
        "step": state.step,
        "skipped_steps": state.skipped_steps,
        "max_steps": cfg.train.max_steps,
        "tokens": state.tokens,
        "train_seconds": train_seconds,
        "wall_seconds": wall_seconds,
        "tokens_per_s": state.tokens / train_seconds if train_seconds > 0 else None,
        "time_to_first_step": timing.time_to_first_step,
        "compile_seconds": timing.compile_seconds,
        "loader_wait_frac": timing.loader_wait / train_seconds if train_seconds > 0 else None,
        **timing.stats(desc["batch"]["batch_tokens"]),
        "val_loss": metrics.get("val_loss"),
        "unigram_loss": metrics.get("val_unigram_loss"),
        "best_val_loss": state.best_val if math.isfinite(state.best_val) else None,
        "target_loss": cfg.target_loss,
        "target": state.target,
        **{k: v for k, v in metrics.items() if k != "val_loss"},
        **desc,
    }
    if device.type == "cuda":
        summary["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if summary["tokens_per_s"] and desc.get("flops_per_token"):
        summary["model_tflops_per_s"] = summary["tokens_per_s"] * desc["flops_per_token"] / 1e12
    return summary
