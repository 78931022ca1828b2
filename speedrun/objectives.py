"""Training objectives: masking a packed batch on the model's device, and the loss on masked tokens.

Masking runs where the model runs, on the batch the trainer is about to use, with a generator seeded
from (seed, step, micro-step, rank). So a schedule change takes effect at the very next step, and the
masks of any step can be re-created exactly (resume is bit-identical).

Every objective is "draw a masking level t per document, mask each maskable token with probability t":

* **mlm** — t = the mask rate (20 %; optionally scheduled start -> end over N steps) for every
  document. Selected tokens become `<mask>` (mask-only, the current reference) or, with
  `replace=true`, 80 % `<mask>` / 10 % a random amino acid / 10 % unchanged (December 2024).
  Loss: mean cross-entropy over masked tokens.
* **diffusion** — masked diffusion as DSM defines it (RECIPE.md §10): t_b = (1-ε)·u + ε, u ~ U(0,1),
  drawn **per sequence**; every masked token's CE is weighted by 1/t_b; the sum is normalised by the
  number of real (non-padding) tokens. (The reference draws one t per batch and divides a mean by it,
  RECIPE.md §12.4.)
* **mlm_to_diffusion** — MLM for `mlm_steps`, then a ramp to full diffusion: the fraction α of
  documents that draw a diffusion t (the rest keep the MLM rate) goes 0 -> 1 at once (`ramp=step`)
  or linearly over `ramp_steps` (`ramp=linear`). The loss is the diffusion form, which for a
  document at the fixed MLM rate r equals its masked-token CE / r — the same scale as MLM.

Special tokens (`<cls>`, `<eos>`, `<pad>`, `<unk>`, `<mask>`, `<null_1>`) are never masked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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
    inputs: torch.Tensor  # ids given to the model
    labels: torch.Tensor  # original id at masked positions, IGNORE elsewhere
    rate: float  # the MLM rate used (or the mean level for diffusion, for logging only)
    weights: Optional[torch.Tensor] = None  # per-token loss weights (1/t) for the diffusion form
    denom: Optional[torch.Tensor] = None  # normaliser of the weighted sum (number of real tokens)


def mask_tokens(tokens: torch.Tensor, rate: float, generator: torch.Generator, replace: bool = False) -> Masked:
    """MLM: select maskable tokens with probability `rate`; <mask>-only or 80/10/10."""
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


def mask_per_document(tokens: torch.Tensor, doc_ids: torch.Tensor, mlm_rate: float, alpha: float, eps: float,
                      generator: torch.Generator) -> Masked:
    """Diffusion-form masking: each document draws t (diffusion with probability alpha, else the MLM
    rate), every maskable token is masked with probability t, loss weights are 1/t."""
    tokens = tokens.long()
    flat_docs = doc_ids.reshape(-1).long()
    n = flat_docs.numel()  # an upper bound on the number of documents; avoids a host sync
    u_doc = torch.rand(n, device=tokens.device, generator=generator)
    pick = torch.rand(n, device=tokens.device, generator=generator) < alpha
    t_doc = torch.where(pick, (1 - eps) * u_doc + eps, torch.full_like(u_doc, mlm_rate))
    t = t_doc[flat_docs.clamp(min=0)].view(tokens.shape)
    u = torch.rand(tokens.shape, device=tokens.device, generator=generator)
    selected = (u < t) & maskable(tokens)
    labels = torch.where(selected, tokens, torch.full_like(tokens, IGNORE))
    inputs = torch.where(selected, torch.full_like(tokens, MASK), tokens)
    weights = torch.where(selected, 1.0 / t, torch.zeros_like(t))
    denom = (doc_ids >= 0).sum().clamp(min=1).float()
    return Masked(inputs, labels, mlm_rate, weights=weights, denom=denom)


def mask_rate_at(cfg: ObjectiveConfig, step: int) -> Optional[float]:
    """The MLM mask rate at `step`: linear from mask_rate_start to mask_rate over mask_rate_steps (None
    for pure diffusion, which draws a level per sequence)."""
    if not hasattr(cfg, "mask_rate"):
        return None
    if cfg.mask_rate_start is None or cfg.mask_rate_steps <= 0:
        return cfg.mask_rate
    f = min(step / cfg.mask_rate_steps, 1.0)
    return (1.0 - f) * cfg.mask_rate_start + f * cfg.mask_rate


def diffusion_fraction(cfg: ObjectiveConfig, step: int) -> float:
    """α at `step`: the fraction of documents that draw a diffusion level (0 = pure MLM)."""
    if cfg.name == "mlm":
        return 0.0
    if cfg.name == "diffusion":
        return 1.0
    if step < cfg.mlm_steps:
        return 0.0
    if cfg.ramp == "step" or cfg.ramp_steps <= 0:
        return 1.0
    return min(1.0, (step - cfg.mlm_steps + 1) / cfg.ramp_steps)


def apply_objective(cfg: ObjectiveConfig, tokens: torch.Tensor, doc_ids: torch.Tensor, step: int,
                    generator: torch.Generator) -> Masked:
    """Mask one micro-batch for training step `step` under objective `cfg`."""
    rate = mask_rate_at(cfg, step)
    if cfg.name == "mlm":
        return mask_tokens(tokens, rate, generator, cfg.replace)
    mlm_rate = rate if rate is not None else 1.0  # pure diffusion: every document draws its own level
    return mask_per_document(tokens, doc_ids, mlm_rate, diffusion_fraction(cfg, step), cfg.eps, generator)


def masked_loss(model, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean",
                weights: Optional[torch.Tensor] = None, denom: Optional[torch.Tensor] = None,
                dense_head: bool = False):
    """Cross-entropy on masked positions only: the LM head runs on those rows alone — or, with
    `dense_head`, on every row of the batch before the masked rows are picked (a static shape, so a
    compiled head is not recompiled for every count of masked tokens; evaluation uses it).

    Plain form: mean (or sum) CE over masked tokens. Weighted form (weights, denom given): the sum of
    weight x CE over masked tokens divided by denom. Returns (loss, logits, targets) where
    logits/targets are the masked rows (for metrics).
    """
    flat = labels.reshape(-1)
    idx = torch.nonzero(flat != IGNORE).flatten()
    targets = flat[idx]
    rows = hidden.reshape(-1, hidden.size(-1))
    logits = model.logits(rows)[idx] if dense_head else model.logits(rows[idx])
    if idx.numel() == 0:
        return hidden.sum() * 0.0, logits, targets
    if weights is not None:
        ce = F.cross_entropy(logits, targets, reduction="none")
        return (ce * weights.reshape(-1)[idx]).sum() / denom, logits, targets
    return F.cross_entropy(logits, targets, reduction=reduction), logits, targets


def dense_loss(logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None,
               denom: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The training loss from logits at *every* position (static shapes, no host sync: the form the
    compiled training step uses; the head is < 0.5 % of the model's FLOPs, so computing it everywhere
    is cheaper than a data-dependent gather). Same value as masked_loss."""
    flat = labels.reshape(-1)
    selected = flat != IGNORE
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), flat.clamp(min=0), reduction="none")
    ce = torch.where(selected, ce, torch.zeros_like(ce))  # where, not multiply: padding may hold garbage
    if weights is not None:
        return (ce * weights.reshape(-1)).sum() / denom
    return ce.sum() / selected.sum().clamp(min=1)
