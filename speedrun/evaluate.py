"""The evaluation protocol and its metrics.

Protocol (one for every comparison; RECIPE.md decision 2): the fixed validation (or test) split,
packed once; `<mask>`-only masking at `eval.mask_rate` (15 %) drawn per document from a generator
seeded by (eval.seed, document number) — the same masks at every evaluation, for any batch size and
any number of ranks; the model's current sliding window. Loss is token-weighted cross-entropy over all masked tokens
(sum of CE / number of masked tokens), perplexity = e^loss. Sums and the 33×33 confusion matrix are
all-reduced across ranks before any metric is computed.

Metrics from the confusion matrix C (rows = label, columns = prediction), N = total:
accuracy = trace/N; per-class precision/recall/F1 (0 where undefined); weighted P/R/F1 = Σ_c m_c·n_c/N
with n_c the support; multiclass MCC = (trace·N − Σ p_c·n_c) / sqrt((N² − Σ p_c²)(N² − Σ n_c²)).

`val_loss_stderr` is the standard error of the mean token loss. `unigram_loss` is the cross-entropy of the same masked tokens under their own empirical letter
frequencies (the best any context-free predictor can do on them): a model must beat it to have
learned anything from context.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .data.loader import EvalSet
from .objectives import IGNORE, maskable, masked_loss
from .vocab import MASK


def confusion_metrics(cm: torch.Tensor) -> dict:
    """Accuracy, weighted precision/recall/F1 and MCC of a confusion matrix (rows: label)."""
    cm = cm.double()
    n = cm.sum()
    if n <= 0:
        return {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "mcc": 0.0}
    tp = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-30), torch.zeros_like(tp))
    w = support / n
    trace = tp.sum()
    cov_xy = trace * n - (predicted * support).sum()
    cov_xx = n * n - (predicted * predicted).sum()
    cov_yy = n * n - (support * support).sum()
    mcc = (cov_xy / math.sqrt(cov_xx * cov_yy)).item() if cov_xx > 0 and cov_yy > 0 else 0.0
    return {
        "accuracy": (trace / n).item(),
        "precision": (precision * w).sum().item(),
        "recall": (recall * w).sum().item(),
        "f1": (f1 * w).sum().item(),
        "mcc": mcc,
    }


def unigram_entropy(counts: torch.Tensor) -> float:
    """Cross-entropy (nats) of tokens under their own empirical frequencies."""
    counts = counts.double()
    n = counts.sum()
    if n <= 0:
        return float("nan")
    p = counts[counts > 0] / n
    return float(-(p * p.log()).sum())


@torch.no_grad()
def evaluate(model, evalset: EvalSet, *, device: torch.device, window: int, dtype: torch.dtype,
             mask_rate: float, rank: int = 0, world_size: int = 1, prefix: str = "val",
             loss_only: bool = False) -> dict:
    """Run the evaluation protocol on `evalset`; returns {prefix_loss, prefix_ppl, ...} on every rank."""
    was_training = model.training
    model.eval()
    V = model.cfg.vocab_size
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # CE sum, masked-token count, CE^2 sum
    cm = torch.zeros(V * V, dtype=torch.float64, device=device)
    for _, (tokens, doc_ids, u) in evalset.for_rank(rank, world_size):
        t = torch.from_numpy(tokens).to(device).long()
        d = torch.from_numpy(doc_ids).to(device)
        selected = (torch.from_numpy(u).to(device) < mask_rate) & maskable(t)
        inputs = torch.where(selected, torch.full_like(t, MASK), t)
        labels = torch.where(selected, t, torch.full_like(t, IGNORE))
        h = model(inputs, d, window, dtype=dtype)
        ce, logits, targets = masked_loss(model, h, labels, reduction="none", dense_head=True)
        ce = ce.double()
        sums[0] += ce.sum()
        sums[1] += targets.numel()
        sums[2] += (ce * ce).sum()
        pred = logits.argmax(-1)
        cm += torch.bincount(targets * V + pred, minlength=V * V).double()
    if world_size > 1:
        dist.all_reduce(sums)
        dist.all_reduce(cm)
    if was_training:
        model.train()
    cm = cm.view(V, V).cpu()
    n_masked = int(sums[1].item())
    loss = (sums[0] / sums[1]).item() if n_masked else float("nan")
    # standard error of the mean token loss (tokens treated as independent): how far apart two runs'
    # val_loss must be before the difference means something
    var = (sums[2] / sums[1]).item() - loss * loss if n_masked > 1 else float("nan")
    stderr = math.sqrt(max(var, 0.0) / (n_masked - 1)) if n_masked > 1 else float("nan")
    out = {f"{prefix}_loss": loss, f"{prefix}_ppl": math.exp(loss) if n_masked else float("nan"),
           f"{prefix}_loss_stderr": stderr, f"{prefix}_masked_tokens": n_masked}
    if loss_only:
        return out
    out.update({f"{prefix}_{k}": v for k, v in confusion_metrics(cm).items()})
    out[f"{prefix}_unigram_loss"] = unigram_entropy(cm.sum(1))
    return out


class Evaluator:
    """The protocol bound to a model and its evaluation set: `evaluator(window, prefix, evalset)` runs
    `evaluate` and, for the diffusion objectives, the loss at each fixed masking level `levels`
    (`{prefix}_loss_t10` ...)."""

    def __init__(self, model, evalset: EvalSet, *, device: torch.device, dtype: torch.dtype, rank: int = 0,
                 world_size: int = 1, mask_rate: float = 0.15, levels=()):
        self.model, self.evalset, self.levels = model, evalset, tuple(levels)
        self.kw = dict(device=device, dtype=dtype, rank=rank, world_size=world_size)
        self.mask_rate = mask_rate

    def __call__(self, window: int, prefix: str = "val", evalset: EvalSet | None = None) -> dict:
        es = evalset if evalset is not None else self.evalset
        out = evaluate(self.model, es, window=window, mask_rate=self.mask_rate, prefix=prefix, **self.kw)
        for level in self.levels:
            lv = evaluate(self.model, es, window=window, mask_rate=level, prefix=prefix, loss_only=True, **self.kw)
            out[f"{prefix}_loss_t{round(level * 100):02d}"] = lv[f"{prefix}_loss"]
        return out
