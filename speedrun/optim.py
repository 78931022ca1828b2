"""Muon for hidden matrices, Adam for the rest, learning-rate and momentum schedules.

Muon (Keller Jordan; RECIPE.md §5.1). For each hidden matrix W with gradient G:

    buf <- μ·buf + (1-μ)·G                      (an EMA, written as a lerp)
    U   <- (1-μ)·G + μ·buf  (Nesterov)  or buf
    O   <- NewtonSchulz5(U)                     (bf16, quintic (3.4445, -4.7750, 2.0315), 5 steps,
                                                 on the wide orientation, after dividing by ||U||_F + 1e-7)
    W   <- W - lr·sqrt(max(1, rows/cols))·O

This is exactly `torch.optim.Muon` with weight_decay=0 and adjust_lr_fn="original" (tested).

Matrices of the same shape are orthogonalised together (one batched Newton–Schulz per shape: a few
large matmuls instead of thousands of small launches).

Distributed: gradients are already averaged by DDP, so every rank could orthogonalise every matrix.
Instead the work is shared: within each shape group rank r orthogonalises matrices r, r+world, ...,
and one `all_gather_into_tensor` per shape hands every rank every result (the last chunk is padded
with zeros). Momentum is advanced on every rank, so any rank holds the full optimizer state. Works on
any number of ranks (the reference asserts on numel groups and fails with the Patch-UNet on 4 or 8
GPUs).

Parameter groups with `optimizer=muon` (RECIPE.md §5.2): matrices (ndim >= 2, not an embedding, not
the head) -> Muon at lr_hidden; embeddings (token + value) -> Adam lr_embed; LM head -> Adam lr_head;
scalars (λ, skip weights) -> Adam lr_scalar; the head's bias is part of the head (name rule "lm_head"):
Adam lr_head. A tied head's decoder is the token embedding, so it trains at lr_embed. Adam betas
(0.8, 0.95), eps 1e-8, no decay.
Every parameter lands in exactly one group (asserted). `optimizer=adamw`: one AdamW over everything.

Schedules are pure functions of the step (no scheduler state), so resume needs only the step.

`optimizer.fused_qkv=true` (Dec-2024) orthogonalises each layer's q, k, v as one 3d x d matrix.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import OptimizerConfig

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise G, or a batch of same-shaped matrices (..., m, n): singular values end
    up near 1, roughly in [0.5, 1.5]. Runs in bf16 on the wide orientation."""
    a, b, c = NS_COEFFS
    X = G.bfloat16()
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    mm = torch.addmm if X.ndim == 2 else torch.baddbmm
    for _ in range(steps):
        A = X @ X.mT
        B = mm(A, A, A, beta=b, alpha=c)
        X = mm(X, B, X, beta=a)
    if transposed:
        X = X.mT
    return X


def _weight(value: float, keep: Optional[torch.Tensor]):
    """`value`, or value x keep (a 0-dim 0/1 tensor on the device) when updates are masked."""
    return value if keep is None else keep * value


class Muon(torch.optim.Optimizer):
    """Muon with the work of orthogonalisation shared across data-parallel ranks.

    `step(keep=...)` takes an optional 0-dim tensor (1.0: apply, 0.0: skip) that masks the whole update
    on the device — momentum and weights stay exactly as they were when it is 0 (the gradients must be
    finite; TrainStep zeroes non-finite ones) — so skipping a non-finite step needs no host sync.

    A parameter group may carry `fused_with`: tuples of indices into its params, orthogonalised as one
    matrix stacked along rows (q, k, v as one 3d x d matrix, as the Dec-2024 recipe did; its lr scale
    sqrt(3) follows from the stacked shape). Indices, not tensors, so that state_dict stays small and a
    restored optimizer still points at the model's own parameters."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5):
        params = list(params)
        for p in params if not isinstance(params[0], dict) else [q for g in params for q in g["params"]]:
            if p.ndim != 2:
                raise ValueError(f"Muon takes 2-D matrices only, got shape {tuple(p.shape)}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    def _directions(self, plist: list[torch.Tensor], group: dict, keep) -> list[torch.Tensor]:
        """Advance the momentum buffers of `plist` (on every rank, so every rank holds the full state)
        and return the directions to orthogonalise. Foreach kernels: one launch per list, not per matrix."""
        bufs = []
        for p in plist:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        grads = [p.grad for p in plist]
        w = _weight(1 - group["momentum"], keep)
        torch._foreach_lerp_(bufs, grads, w if keep is None else [w] * len(bufs))
        return torch._foreach_lerp(grads, bufs, group["momentum"]) if group["nesterov"] else bufs

    @staticmethod
    def _apply(plist: list[torch.Tensor], updates: list[torch.Tensor], lr: float, shape, keep) -> None:
        """W <- W - lr·sqrt(max(1, rows/cols))·O for matrices of one (stacked) shape, updates already in
        the parameters' dtype, in one foreach launch."""
        scale = math.sqrt(max(1.0, shape[0] / shape[1]))
        if keep is None:
            torch._foreach_add_(plist, updates, alpha=-lr * scale)
        else:
            torch._foreach_mul_(updates, keep * (-lr * scale))
            torch._foreach_add_(plist, updates)

    def _units(self, group: dict) -> list[tuple]:
        """Tuples of parameters orthogonalised together: the fused sets, then every other matrix alone."""
        fused = [tuple(group["params"][i] for i in t) for t in group.get("fused_with", ())]
        inside = {id(p) for t in fused for p in t}
        return fused + [(p,) for p in group["params"] if id(p) not in inside]

    @torch.no_grad()
    def step(self, closure=None, keep: Optional[torch.Tensor] = None):
        keep = keep if keep is not None else getattr(self, "keep", None)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        for group in self.param_groups:
            by_shape = defaultdict(list)
            for unit in self._units(group):
                if all(p.grad is not None for p in unit):
                    by_shape[(len(unit), sum(p.size(0) for p in unit), unit[0].size(1))].append(unit)
            for (_, *shape), units in by_shape.items():
                flat = [p for unit in units for p in unit]
                parts = self._directions(flat, group, keep)
                width = len(units[0])
                directions = [torch.cat(parts[i * width:(i + 1) * width]) if width > 1 else parts[i]
                              for i in range(len(units))]
                out = self._orthogonalise(directions, shape, group["ns_steps"], world, rank)
                updates = [o.to(flat[0].dtype) for o in out]
                if width > 1:  # split each stacked update back onto its parameters
                    updates = [piece for o, unit in zip(updates, units)
                               for piece in o.split([p.size(0) for p in unit])]
                self._apply(flat, updates, group["lr"], shape, keep)
        return None

    @staticmethod
    def _orthogonalise(directions: list[torch.Tensor], shape, ns_steps: int, world: int, rank: int) -> list:
        if world == 1:  # one batched Newton-Schulz per shape: a few large kernels, not many small ones
            return list(zeropower_via_newtonschulz5(torch.stack(directions), ns_steps).unbind(0))
        # rank r orthogonalises matrices r, r+world, ... of this shape (batched), then all ranks exchange
        # results; the last chunk is padded with zeros so every rank sends the same shape
        n_chunks = -(-len(directions) // world)
        mine = [directions[i] for i in range(rank, len(directions), world)]
        local = torch.zeros((n_chunks, *shape), dtype=torch.bfloat16, device=directions[0].device)
        if mine:
            local[:len(mine)] = zeropower_via_newtonschulz5(torch.stack(mine), ns_steps)
        gathered = torch.empty((world * n_chunks, *shape), dtype=torch.bfloat16, device=local.device)
        dist.all_gather_into_tensor(gathered, local)  # rank r's chunk lands at rows r*n_chunks...
        return [gathered[(i % world) * n_chunks + i // world] for i in range(len(directions))]


def skip_if(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """Make `optimizer`'s next step a no-op on the device when `finite` (0-dim bool) is False: Muon masks
    its update (step(keep=...)); torch's fused Adam/AdamW take GradScaler's `found_inf`, with which the
    kernel leaves weights, moments and step counts exactly as they were."""
    if isinstance(optimizer, Muon):
        optimizer.keep = finite.float()
    else:
        optimizer.found_inf = (~finite).float()
        optimizer.grad_scale = None


def param_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Split parameters by the reference's name rules into hidden / embed / head / scalar."""
    groups: dict[str, list] = {"hidden": [], "embed": [], "head": [], "scalar": []}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if "embed" in name:
            groups["embed"].append((name, p))
        elif "lm_head" in name:
            groups["head"].append((name, p))
        elif p.ndim >= 2:
            groups["hidden"].append((name, p))
        else:
            groups["scalar"].append((name, p))
    n_assigned = sum(len(v) for v in groups.values())
    n_unique = len({id(p) for p in model.parameters() if p.requires_grad})
    assert n_assigned == n_unique, "every trainable parameter must be in exactly one optimizer group"
    return groups


def build_optimizers(model: nn.Module, cfg: OptimizerConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """The optimizers of a run. Each param group remembers its base lr in 'base_lr' and its kind."""
    if cfg.name == "adamw":
        params = [p for p in {id(p): p for p in model.parameters() if p.requires_grad}.values()]
        return [torch.optim.AdamW([dict(params=params, lr=cfg.lr, base_lr=cfg.lr, kind="adam", name="all")],
                                  lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                                  fused=True)]
    g = param_groups(model)
    adam_groups = [
        dict(params=[p for _, p in g[k]], lr=lr, base_lr=lr, kind="adam", name=k)
        for k, lr in (("embed", cfg.lr_embed), ("head", cfg.lr_head), ("scalar", cfg.lr_scalar)) if g[k]
    ]
    adam = torch.optim.Adam(adam_groups, lr=cfg.lr_embed, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=0.0,
                            fused=True)
    hidden = dict(params=[p for _, p in g["hidden"]], base_lr=cfg.lr_hidden, kind="muon", name="hidden")
    if getattr(cfg, "fused_qkv", False):
        index = {id(p): i for i, p in enumerate(hidden["params"])}
        hidden["fused_with"] = [tuple(index[id(p)] for p in t) for t in qkv_sets(model)]
    muon = Muon([hidden], lr=cfg.lr_hidden, momentum=cfg.momentum, nesterov=cfg.nesterov, ns_steps=cfg.ns_steps)
    return [muon, adam]


def qkv_sets(model: nn.Module) -> list[tuple]:
    """(q, k, v) weight triples of every attention layer that has separate q/k/v matrices."""
    return [(m.q.weight, m.k.weight, m.v.weight) for m in model.modules()
            if all(isinstance(getattr(m, a, None), nn.Module) for a in ("q", "k", "v"))]


def lr_multiplier(cfg: OptimizerConfig, step: int, total: int, warmup: bool = True) -> float:
    """Multiplier on the base learning rate at `step` (0-based) of `total` steps."""
    w = cfg.lr_warmup_steps if warmup else 0
    if w > 0 and step < w:
        return (step + 1) / w
    if cfg.schedule == "constant" or total <= w:
        return 1.0
    floor = cfg.min_lr_frac
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - w) / max(1, total - w))
        return floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # wsd: constant, then linear decay over the last cooldown_frac of the steps
    cooldown = int(round(cfg.cooldown_frac * total))
    start = total - cooldown
    if step < start or cooldown == 0:
        return 1.0
    return floor + (1 - floor) * max(0.0, (total - step) / cooldown)


def muon_momentum(cfg: OptimizerConfig, step: int) -> float:
    """Momentum warm-up 0.85 -> 0.95 over momentum_warmup_steps (RECIPE.md §5.1)."""
    if cfg.momentum_warmup_steps <= 0:
        return cfg.momentum
    f = min(step / cfg.momentum_warmup_steps, 1.0)
    return (1 - f) * cfg.momentum_warmup_start + f * cfg.momentum


def apply_schedules(optimizers, cfg: OptimizerConfig, step: int, total: int) -> float:
    """Set every group's lr (and Muon's momentum) for `step`; returns the Adam/hidden lr multiplier."""
    mult = lr_multiplier(cfg, step, total)
    for opt in optimizers:
        for group in opt.param_groups:
            if group.get("kind") == "muon":
                group["lr"] = group["base_lr"] * lr_multiplier(cfg, step, total, warmup=cfg.muon_warmup)
                group["momentum"] = muon_momentum(cfg, step)
            else:
                group["lr"] = group["base_lr"] * mult
    return mult
