"""QK RMS-norm + half-split RoPE for q and k in one Triton kernel: `qk_norm_rope(q, k, rope)`.

Why: in the compiled block Inductor emits this as fused kernels, 11.7 ms of a 65,536-token step
(NOTES item 9), while the memory-bound minimum is ~6 ms on an H200 (q and k are each 65,536 x 768 bf16
= 100.7 MB per layer: the forward reads them and writes the results, 403 MB; the backward reads q, k
and their output gradients and writes dq, dk, 604 MB; x 24 layers = 24.2 GB at ~4 TB/s). A
hand-written kernel reads each row once, computes in fp32, and writes once, for both q and k in one
launch, forward and backward; the op saves no activations (the backward re-reads q and k, which are
views of the QKV GEMM's output that autograd keeps anyway).

Semantics: exactly `apply_rotary(F.rms_norm(x, (D,)), (cos, sin))` of speedrun.model for x = q and
x = k, with `cos, sin` the (T, 1, D/2) tables of `Rotary.forward` and torch's default eps. That default
is the epsilon of the *computation* dtype: F.rms_norm on bf16/fp16 computes in fp32 and adds
finfo(float32).eps (checked on torch 2.13 CPU, and in torch/_decomp `_fused_rms_norm`, which is what
torch.compile runs), not finfo(bfloat16).eps = 2^-7. The kernel computes in fp32 and rounds once, so in
bf16 it is at least as close to the fp32 result as the eager bf16 chain (which rounds after the norm
and after each product).

Dispatch inside the op: the Triton kernel on CUDA, and on the CPU under TRITON_INTERPRET=1 (tests);
the eager formula everywhere else (CPU runs, machines without triton), so the op is always usable.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

_triton_module = None
_triton_error: Optional[str] = None


def triton_kernels():
    """The `_rope_triton` module, or None where triton cannot be imported (cached)."""
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        try:
            from . import _rope_triton

            _triton_module = _rope_triton
        except Exception as exc:  # ImportError, or a triton that fails at import
            _triton_error = f"{type(exc).__name__}: {exc}"
    return _triton_module


def _use_triton(x: torch.Tensor) -> bool:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or x.size(-1) > 256:
        return False
    interpreted = not x.is_cuda and os.environ.get("TRITON_INTERPRET") == "1"
    return (x.is_cuda or interpreted) and triton_kernels() is not None


def default_eps(dtype: torch.dtype) -> float:
    """F.rms_norm's eps when none is given: the epsilon of its computation dtype (fp32 for half types)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: Optional[float] = None) -> torch.Tensor:
    """The eager formula of speedrun.model: apply_rotary(F.rms_norm(x, (D,), eps=eps), (cos, sin))."""
    n = F.rms_norm(x, (x.size(-1),), eps=eps)
    n1, n2 = n.chunk(2, dim=-1)
    return torch.cat((n1 * cos + n2 * sin, n2 * cos - n1 * sin), dim=-1)


def _tables(cos: torch.Tensor, sin: torch.Tensor, T: int, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, D/2) views of the (T, 1, D/2) tables with a unit last stride."""
    if cos.shape[0] != T or cos.shape[-1] != half or cos.numel() != T * half or cos.shape != sin.shape:
        raise ValueError(f"cos/sin must be (T, 1, D/2) = ({T}, 1, {half}), got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")
    return cos.reshape(T, half).contiguous(), sin.reshape(T, half).contiguous()


def _rows_ok(x: torch.Tensor) -> torch.Tensor:
    """x with a unit last stride (the kernel's only layout requirement)."""
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("speedrun::qk_norm_rope", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
         ) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(q):
        c, s = _tables(cos, sin, q.size(0), q.size(-1) // 2)
        return triton_kernels().forward(_rows_ok(q), _rows_ok(k), c, s, eps)
    return reference(q, cos, sin, eps).contiguous(), reference(k, cos, sin, eps).contiguous()


@_fwd.register_fake
def _fwd_fake(q, k, cos, sin, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _reference_grad(x: torch.Tensor, g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
                    ) -> torch.Tensor:
    """dx of `reference` in closed form (it runs inside a custom op, below the autograd dispatch)."""
    xf, gf = x.float(), g.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    n1, n2 = (xf * r).chunk(2, dim=-1)
    g1, g2 = gf.chunk(2, dim=-1)
    c, s = cos.float(), sin.float()
    dn1, dn2 = g1 * c - g2 * s, g1 * s + g2 * c
    dot = ((dn1 * n1).sum(-1, keepdim=True) + (dn2 * n2).sum(-1, keepdim=True)) / x.size(-1)
    return torch.cat((r * (dn1 - n1 * dot), r * (dn2 - n2 * dot)), dim=-1).to(x.dtype)


@torch.library.custom_op("speedrun::qk_norm_rope_bwd", mutates_args=())
def _bwd(q: torch.Tensor, k: torch.Tensor, gq: torch.Tensor, gk: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(q):
        c, s = _tables(cos, sin, q.size(0), q.size(-1) // 2)
        return triton_kernels().backward(_rows_ok(q), _rows_ok(k), _rows_ok(gq), _rows_ok(gk), c, s, eps)
    return _reference_grad(q, gq, cos, sin, eps), _reference_grad(k, gk, cos, sin, eps)


@_bwd.register_fake
def _bwd_fake(q, k, gq, gk, cos, sin, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, cos, sin, eps = inputs
    ctx.save_for_backward(q, k, cos, sin)
    ctx.eps = eps


def _backward(ctx, gq, gk):
    q, k, cos, sin = ctx.saved_tensors
    gq = torch.zeros_like(q) if gq is None else gq
    gk = torch.zeros_like(k) if gk is None else gk
    dq, dk = torch.ops.speedrun.qk_norm_rope_bwd(q, k, gq, gk, cos, sin, ctx.eps)
    return dq, dk, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                 eps: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(apply_rotary(norm(q), rope), apply_rotary(norm(k), rope)) in one kernel. q, k: (T, H, D) with
    even D <= 256, same shape and dtype (strided views are fine); rope: the (cos, sin) tables of
    `Rotary.forward`, (T, 1, D/2). Differentiable in q and k (not in the tables). Returns contiguous
    tensors."""
    cos, sin = rope
    if q.dim() != 3 or q.shape != k.shape or q.dtype != k.dtype or q.size(-1) % 2:
        raise ValueError(f"q and k must be (T, H, D) of one shape and dtype with an even D, got "
                         f"{tuple(q.shape)} {q.dtype} and {tuple(k.shape)} {k.dtype}")
    if cos.dtype != q.dtype or sin.dtype != q.dtype:
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    return torch.ops.speedrun.qk_norm_rope(q, k, cos, sin, default_eps(q.dtype) if eps is None else float(eps))


def within_one_ulp(got: torch.Tensor, truth: torch.Tensor) -> tuple[bool, float]:
    """Whether `got` is within one unit in the last place of its dtype of the fp32 `truth` (plus 1e-5 of
    the tensor's scale, for fp32 reordering near zero), and the fraction equal to truth rounded to
    nearest (~1 for an fp32 kernel that rounds once; the Triton interpreter truncates instead)."""
    rtol = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}.get(got.dtype, 1e-5)
    bound = rtol * truth.abs() + 1e-5 * truth.abs().max()
    ok = bool(((got.float() - truth).abs() <= bound).all())
    return ok, float((got == truth.to(got.dtype)).float().mean())


__all__ = ["default_eps", "qk_norm_rope", "reference", "triton_kernels", "within_one_ulp"]
