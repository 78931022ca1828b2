"""Training objectives: masking a packed batch on the model's device, and the loss on masked tokens.

Masking runs where the model runs, on the batch the trainer is about to use, with a generator seeded
from (seed, step, micro-step, rank). So a schedule change takes effect at the very next step, and the
masks of any step can be re-created exactly (resume is bit-identical, evaluation masks are fixed).

MLM (`objective=mlm`): each maskable token (never `<cls>`, `<eos>`, `<pad>`, `<unk>` or other
specials) is selected with probability `rate`; selected tokens become `<mask>` (mask-only, the current
reference) or, with `replace=true`, 80 % `<mask>` / 10 % a random amino acid / 10 % unchanged (the
December-2024 recipe). Labels hold the original id at selected positions and -100 elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ObjectiveConfig
from .vocab import AA_FIRST, AA_LAST, MASK

IGNORE = -100


def maskable(tokens: torch.Tensor) -> torch.Tensor:
    """Residue and gap tokens (ids 4..30) may be masked; special tokens never are."""
    return (tokens >= AA_FIRST) & (tokens <= 30)


def generator_for(device: torch.device, *seeds: int) -> torch.Generator:
    """A generator on `device` seeded deterministically from a tuple of ints."""
    h = 0x9E3779B97F4A7C15
    for s in seeds:
        h = (h ^ (int(s) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    g = torch.Generator(device=device)
    g.manual_seed(h & 0x7FFFFFFFFFFFFFFF)
    return g


@dataclass
class Masked:
    inputs: torch.Tensor  # (T,) ids given to the model
    labels: torch.Tensor  # (T,) original id at masked positions, IGNORE elsewhere
    rate: float  # the masking rate used


def mask_tokens(tokens: torch.Tensor, rate: float, generator: torch.Generator, replace: bool = False) -> Masked:
    """Select maskable tokens with probability `rate`; <mask>-only or 80/10/10."""
    tokens = tokens.long()
    u = torch.rand(tokens.shape, device=tokens.device, generator=generator)
    selected = (u < rate) & maskable(tokens)
    labels = torch.where(selected, tokens, torch.full_like(tokens, IGNORE))
    if not replace:
        inputs = torch.where(selected, torch.full_like(tokens, MASK), tokens)
    else:
        r = torch.rand(tokens.shape, device=tokens.device, generator=generator)
        rand_ids = torch.randint(AA_FIRST, AA_LAST + 1, tokens.shape, device=tokens.device, generator=generator)
        inputs = torch.where(selected & (r < 0.8), torch.full_like(tokens, MASK), tokens)
        inputs = torch.where(selected & (r >= 0.8) & (r < 0.9), rand_ids, inputs)
    return Masked(inputs, labels, rate)


def mask_rate_at(cfg: ObjectiveConfig, step: int) -> float:
    """The training mask rate at `step`: linear from mask_rate_start to mask_rate over mask_rate_steps."""
    if cfg.mask_rate_start is None or cfg.mask_rate_steps <= 0:
        return cfg.mask_rate
    f = min(step / cfg.mask_rate_steps, 1.0)
    return (1.0 - f) * cfg.mask_rate_start + f * cfg.mask_rate


def masked_loss(model, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"):
    """Cross-entropy on masked positions only: the LM head runs on those rows alone.

    Returns (loss, logits, targets) where logits/targets are the masked rows (for metrics).
    """
    idx = torch.nonzero(labels != IGNORE).flatten()
    targets = labels[idx]
    logits = model.logits(hidden[idx])
    if idx.numel() == 0:
        zero = hidden.sum() * 0.0
        return zero, logits, targets
    loss = F.cross_entropy(logits, targets, reduction=reduction)
    return loss, logits, targets
