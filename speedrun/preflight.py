"""Runtime checks before step 1: everything a run will need, checked while nothing is lost yet.

Static rules live beside each config dataclass (speedrun/config.py); these need the machine or the
data: every data split the run will read (the test split with eval.test=true, which used to be looked up
after training), the probe tasks, the model size against train.max_params, the memory estimate against
the card, FP8 support, and a CUDA device at all (a dry run on a machine without one checks what it can
and says what it could not).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .config import ConfigError, RunConfig
from .errors import SpeedrunError

MEMORY_FRACTION = 0.92  # of the card's memory a micro-batch may plan for


def data_splits(cfg: RunConfig) -> dict[str, list[Path]]:
    """The shard files of every split the run reads (DataError naming what is missing and the fix)."""
    from .data import data_files

    splits = ("train", "valid", "test") if cfg.eval.test else ("train", "valid")
    return {split: data_files(cfg.data, split) for split in splits}


def device_or_none(cfg: RunConfig) -> Optional[str]:
    """Why the configured device cannot be used here (None if it can)."""
    if cfg.hardware.device == "cuda" and not torch.cuda.is_available():
        return "hardware.device=cuda but no CUDA GPU is visible"
    return None


def model_size(cfg: RunConfig, n_params: int) -> None:
    if cfg.train.max_params is not None and n_params > cfg.train.max_params:
        raise ConfigError(f"the model has {n_params:,} parameters, over train.max_params={cfg.train.max_params:,} "
                          "(the speed track's limit): choose a smaller model")


def memory(cfg: RunConfig, estimate_gib: Optional[float], device: torch.device, micro: int, estimate) -> None:
    """Stop before training when the micro-batch cannot fit the card, naming the one that would."""
    if device.type != "cuda" or estimate_gib is None:
        return
    card = torch.cuda.get_device_properties(device).total_memory / 2**30
    if estimate_gib > MEMORY_FRACTION * card:
        fit = micro
        while fit > cfg.data.max_length and estimate(fit) > MEMORY_FRACTION * card:
            fit //= 2
        raise ConfigError(f"hardware.micro_batch_tokens={micro} needs about {estimate_gib:.0f} GiB but {device} has "
                          f"{card:.0f} GiB: use hardware.micro_batch_tokens={fit} (gradient accumulation keeps "
                          "train.batch_tokens)")


def fp8(cfg: RunConfig, model, device: torch.device) -> None:
    from .fp8 import fp8_supported

    if not cfg.hardware.fp8:
        return
    why = fp8_supported(device) or (None if hasattr(model, "enable_fp8") else
                                    f"model.arch={cfg.model.arch} has no FP8 path (unet and transformer have)")
    if why:
        raise ConfigError(f"hardware.fp8=true: {why}; use hardware.fp8=false")
    model.enable_fp8()


def triton_rope(model, device: torch.device) -> None:
    """hardware.triton_rope=true: the Triton QK-norm + RoPE kernels, where they can run."""
    from .kernels.rope import triton_kernels

    if not hasattr(model, "enable_fused_rope"):
        raise ConfigError(f"hardware.triton_rope=true: model.arch={model.cfg.arch} has no such path (unet and "
                          "transformer have); use hardware.triton_rope=false")
    if device.type != "cuda" or triton_kernels() is None:
        raise ConfigError("hardware.triton_rope=true needs CUDA and triton: use hardware.triton_rope=false")
    model.enable_fused_rope()


def probes(cfg: RunConfig) -> None:
    """Probe tasks load now (cached), so a missing file stops the run before training."""
    if cfg.eval.probe_every > 0:
        from .probe import check_eval_config

        check_eval_config(cfg.eval, load=True)


def one_line_oom(micro: int, device, where: str = "", eval_tokens: Optional[int] = None) -> str:
    """The message for torch.OutOfMemoryError: where it happened and which setting to lower."""
    at = f" {where}" if where else ""
    if eval_tokens is not None:
        return (f"out of memory{at} at eval.batch_tokens={eval_tokens} (hardware.micro_batch_tokens={micro}) on "
                f"{device}: lower eval.batch_tokens (e.g. eval.batch_tokens={eval_tokens // 2}; it defaults to "
                "hardware.micro_batch_tokens) or use a smaller model")
    return (f"out of memory{at} at hardware.micro_batch_tokens={micro} on {device}: lower it "
            f"(e.g. hardware.micro_batch_tokens={micro // 2}; gradient accumulation keeps train.batch_tokens) "
            "or use a smaller model")


class DeviceMissing(SpeedrunError):
    """The configured device is not here (one line; a dry run checks what it can instead)."""
