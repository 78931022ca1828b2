"""`TrainStep`: one optimizer step — micro-steps, clipping, the finite check, the masked update.

    result = train_step(next_batch, step, window)     # StepResult(loss, grad_norm, finite): device tensors

* Micro-steps: `accum` forward/backward passes, each on the next batch, with gradient accumulation;
  under DDP the gradient all-reduce happens on the last one only (`no_sync` before). Masking runs on
  the device from a generator seeded by (seed, step, micro-step, rank), so any step can be recreated.
* The loss head runs on every position (`MaskedLM`: static shapes for the compiler, no host sync).
* Clipping to `optimizer.grad_clip` (0 = off); the global gradient norm is returned for the log.
* The finite check never waits for the device: the flag (loss and gradient norm finite, agreed by all
  ranks with an all-reduce MIN on the device) masks every optimizer update on the device
  (speedrun/optim.py `skip_if`: Muon's masked step, fused Adam's `found_inf`), so a non-finite step
  leaves weights and optimizer state exactly as they were on every rank. The host reads the flag later
  (the loop, one step behind) to count skipped steps.
* `restored()`: a context that snapshots weights and optimizer state and puts them back — for the
  compile warm-up and the dry run's memory probe, which run this very step.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn

from .objectives import apply_objective, dense_loss, generator_for
from .optim import Muon, skip_if


class MaskedLM(nn.Module):
    """The module DDP wraps: model forward + head + loss, so every parameter's gradient comes out of
    one forward call."""

    def __init__(self, model: nn.Module, loss: Callable = dense_loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, inputs, doc_ids, window, labels, ctx, dtype, weights=None, denom=None):
        h = self.model(inputs, doc_ids, window, dtype=dtype, ctx=ctx)
        return self.loss(self.model.logits(h), labels, weights, denom)


@dataclass
class StepResult:
    loss: torch.Tensor  # mean training loss over the micro-batches (device scalar)
    grad_norm: torch.Tensor  # global gradient norm before clipping
    finite: torch.Tensor  # bool: the update was applied (agreed by every rank)


def grad_norm(grads: list, max_norm: float) -> torch.Tensor:
    """Global L2 norm of `grads`; clips them in place to max_norm when it is > 0."""
    if not grads:
        return torch.zeros(())
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if max_norm > 0:
        torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


class TrainStep:
    """One optimizer step of `model` with `optimizers` (see the module docstring)."""

    def __init__(self, model: nn.Module, optimizers: list, *, objective, seed: int, accum: int, dtype,
                 grad_clip: float, rank: int = 0, distributed: bool = False, device=None,
                 window_tensor: Optional[str] = None):
        self.model, self.optimizers, self.objective = model, optimizers, objective
        self.seed, self.accum, self.dtype, self.grad_clip = seed, accum, dtype, grad_clip
        self.rank, self.distributed = rank, distributed
        self.device = device or next(model.parameters()).device
        self.task = MaskedLM(model)
        self.net = self.task
        if distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.task, device_ids=ids, broadcast_buffers=False,
                                                           gradient_as_bucket_view=True)
        # the window as a tensor the compiled blocks do not specialise on (its schedule never recompiles):
        # on the device for flex, a 0-d CPU tensor for fa4 (read on the host by the kernel launch); the
        # others take the host int (a .item() before each forward would stall the launch queue)
        self.window_t = None
        if window_tensor == "device":
            self.window_t = torch.zeros((), dtype=torch.int32, device=self.device)
        elif window_tensor == "cpu":
            self.window_t = torch.zeros((), dtype=torch.int64)

    def micro(self, tokens: torch.Tensor, doc_ids: torch.Tensor, step: int, index: int, window: int,
              sync: bool) -> torch.Tensor:
        gen = generator_for(self.device, self.seed, step, index, self.rank)
        m = apply_objective(self.objective, tokens.long(), doc_ids, step, gen)
        ctx = self.model.make_context(doc_ids, self.window_t if self.window_t is not None else window)
        cm = self.net.no_sync() if (self.distributed and not sync) else contextlib.nullcontext()
        with cm:
            win = self.window_t if self.window_t is not None else window
            loss = self.net(m.inputs, doc_ids, win, m.labels, ctx, self.dtype, m.weights, m.denom)
            (loss / self.accum).backward()
        return loss.detach()

    def clip(self) -> torch.Tensor:
        return grad_norm([p.grad for p in self.model.parameters() if p.grad is not None], self.grad_clip)

    def __call__(self, next_batch: Callable[[], tuple], step: int, window: int) -> StepResult:
        if self.window_t is not None:
            self.window_t.fill_(window)
        loss = torch.zeros((), device=self.device)
        for index in range(self.accum):
            tokens, doc_ids = next_batch()
            loss += self.micro(tokens, doc_ids, step, index, window, sync=index == self.accum - 1) / self.accum
        norm = self.clip()
        finite = (torch.isfinite(norm) & torch.isfinite(loss)).to(torch.int32)
        if self.distributed:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        finite = finite.bool()
        for opt in self.optimizers:
            skip_if(opt, finite)
            if isinstance(opt, Muon):  # its momentum lerp must not read NaN: zero the gradients of a bad step
                for group in opt.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.masked_fill_(~finite, 0.0)
            opt.step()
        self.model.zero_grad(set_to_none=True)
        return StepResult(loss, norm.detach(), finite)

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Run steps inside; weights and optimizer state come back as they were on exit."""
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        states = [copy.deepcopy(o.state_dict()) for o in self.optimizers]
        try:
            yield
        finally:
            self.model.zero_grad(set_to_none=True)
            self.model.load_state_dict(weights)
            for opt, sd in zip(self.optimizers, states):
                opt.load_state_dict(sd)

    def measure_peak(self, batches: Iterator, window: int) -> Optional[float]:
        """Peak GPU memory (GiB) of this very step on `batches`, state restored; None off CUDA."""
        if self.device.type != "cuda":
            return None
        with self.restored():
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self(lambda: next(batches), 0, window)
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**30
