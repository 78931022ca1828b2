"""QK RMS-norm + half-split RoPE (and the value-embedding mix) as hand-written Triton kernels.

* `qk_norm_rope(q, k, rope)` -> (q, k): `apply_rotary(norm(x), rope)` for x = q and x = k, one launch;
* `qkv_norm_rope_mix(qkv, ve, lambdas, rope)` -> (q, k, v): the whole step of Attention.forward from the
  QKV GEMM's output (T, 3, H, D) to attention's inputs: q, k as above and v = l0 v + l1 ve.

Why: Inductor runs this step as fused kernels, 11.7 ms of a 65,536-token step (NOTES item 9). Per layer
and 65,536 x 768 bf16 tensor (100.7 MB, "a unit"), the minimum traffic is: forward, read q, k, v, ve and
write q, k, v (7 units); backward, read dq, dk, dv, q, k, v, ve and write d qkv, d ve (11 units): 18 units
= 1.81 GB, x 24 layers = 43.5 GB, ~10.9 ms at 4 TB/s. Inductor can reach that only if it fuses every
part (norm, rotation, value mix, lambda sums, the stack of dq, dk, dv into the QKV gradient) in one
kernel per direction; the kernels here do so by construction, in fp32 with one rounding.
`qk_norm_rope` alone (the norm + RoPE part, 10 units) costs 4 units more per layer inside a compiled
block: its dq, dk are separate tensors that Inductor then copies into the QKV gradient (read 2, write 2:
+9.7 GB per step, ~2.4 ms), so in the model `qkv_norm_rope_mix` is the one to use;
`python -m speedrun.bench.kernels` times all three variants on the GPU. The ops save no activations:
the backward re-reads the QKV output (which autograd keeps for the value-mix backward anyway).

Semantics: exactly speedrun.models.unet's `apply_rotary(F.rms_norm(x, (D,)), (cos, sin))` and
`lambdas[0] * v + lambdas[1] * ve`, with `cos, sin` the (T, 1, D/2) tables of `Rotary.forward` and
torch's default eps. That default is the epsilon of the *computation* dtype: F.rms_norm on bf16/fp16
computes in fp32 and adds finfo(float32).eps (checked on torch 2.13 CPU, and in torch/_decomp
`_fused_rms_norm`, which is what torch.compile runs), not finfo(bfloat16).eps = 2^-7. The kernels compute
in fp32 and round once, so in bf16 they are within one ulp of the fp32 result, at least as close as the
eager bf16 chain (which rounds after the norm and after each product).

Dispatch inside the ops: the Triton kernels on CUDA, and on the CPU under TRITON_INTERPRET=1 (tests);
the eager formula everywhere else (CPU runs, machines without triton), so the ops are always usable.
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
    """The eager formula of speedrun.models.unet: apply_rotary(F.rms_norm(x, (D,), eps=eps), (cos, sin))."""
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



# ----------------------------------------------------------------------------------------------------
# the whole step between the QKV GEMM and attention: unbind, value mix, QK norm + RoPE


def mix_reference(qkv: torch.Tensor, ve: torch.Tensor, lambdas: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  eps: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eager formula of Attention.forward from the (T, 3, H, D) QKV output to attention's inputs."""
    q, k, v = qkv.unbind(1)
    v = lambdas[0] * v + lambdas[1] * ve
    return reference(q, cos, sin, eps), reference(k, cos, sin, eps), v


@torch.library.custom_op("speedrun::qkv_norm_rope_mix", mutates_args=())
def _mix_fwd(qkv: torch.Tensor, ve: torch.Tensor, lambdas: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_triton(qkv):
        c, s = _tables(cos, sin, qkv.size(0), qkv.size(-1) // 2)
        return triton_kernels().mix_forward(_rows_ok(qkv), ve.contiguous(), lambdas.contiguous(), c, s, eps)
    return tuple(t.contiguous() for t in mix_reference(qkv, ve, lambdas, cos, sin, eps))


@_mix_fwd.register_fake
def _mix_fwd_fake(qkv, ve, lambdas, cos, sin, eps):
    T, _, H, D = qkv.shape
    return tuple(qkv.new_empty(T, H, D) for _ in range(3))


@torch.library.custom_op("speedrun::qkv_norm_rope_mix_bwd", mutates_args=())
def _mix_bwd(qkv: torch.Tensor, ve: torch.Tensor, lambdas: torch.Tensor, gq: torch.Tensor, gk: torch.Tensor,
             gv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d qkv (T, 3, H, D) contiguous, d ve, d lambdas)."""
    if _use_triton(qkv):
        c, s = _tables(cos, sin, qkv.size(0), qkv.size(-1) // 2)
        return triton_kernels().mix_backward(_rows_ok(qkv), ve.contiguous(), lambdas.contiguous(), gq.contiguous(),
                                             gk.contiguous(), gv.contiguous(), c, s, eps)
    q, k, v = qkv.unbind(1)
    dqkv = torch.stack((_reference_grad(q, gq, cos, sin, eps), _reference_grad(k, gk, cos, sin, eps),
                        lambdas[0] * gv), dim=1)
    g = gv.float()
    dlam = torch.stack(((g * v.float()).sum(), (g * ve.float()).sum())).to(lambdas.dtype)
    return dqkv, (lambdas[1] * gv).to(ve.dtype), dlam


@_mix_bwd.register_fake
def _mix_bwd_fake(qkv, ve, lambdas, gq, gk, gv, cos, sin, eps):
    return qkv.new_empty(qkv.shape), ve.new_empty(ve.shape), lambdas.new_empty(lambdas.shape)


def _mix_setup_context(ctx, inputs, output) -> None:
    qkv, ve, lambdas, cos, sin, eps = inputs
    ctx.save_for_backward(qkv, ve, lambdas, cos, sin)
    ctx.eps = eps


def _mix_backward(ctx, gq, gk, gv):
    qkv, ve, lambdas, cos, sin = ctx.saved_tensors
    gq, gk, gv = (torch.zeros_like(ve) if g is None else g for g in (gq, gk, gv))
    dqkv, dve, dlam = torch.ops.speedrun.qkv_norm_rope_mix_bwd(qkv, ve, lambdas, gq, gk, gv, cos, sin, ctx.eps)
    return dqkv, dve, dlam, None, None, None


_mix_fwd.register_autograd(_mix_backward, setup_context=_mix_setup_context)


def qkv_norm_rope_mix(qkv: torch.Tensor, ve: torch.Tensor, lambdas: torch.Tensor,
                      rope: tuple[torch.Tensor, torch.Tensor], eps: Optional[float] = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) for attention from the QKV GEMM's output viewed as (T, 3, H, D): q and k as
    `qk_norm_rope`, v = lambdas[0] v + lambdas[1] ve (the value-embedding mix, `ve` (T, H, D),
    `lambdas` (2,)). Its backward writes dq, dk, dv straight into the gradient of `qkv` (no stack copy
    of separate dq, dk) and sums the lambdas' gradient in the same pass. Differentiable in qkv, ve and
    lambdas. Returns contiguous tensors."""
    cos, sin = rope
    T, three, H, D = qkv.shape if qkv.dim() == 4 else (0, 0, 0, 0)
    if three != 3 or D % 2 or ve.shape != (T, H, D) or ve.dtype != qkv.dtype or lambdas.numel() != 2:
        raise ValueError(f"qkv must be (T, 3, H, D) with an even D, ve (T, H, D) of its dtype and lambdas (2,); got "
                         f"{tuple(qkv.shape)} {qkv.dtype}, {tuple(ve.shape)} {ve.dtype}, {tuple(lambdas.shape)}")
    if cos.dtype != qkv.dtype or sin.dtype != qkv.dtype:
        cos, sin = cos.to(qkv.dtype), sin.to(qkv.dtype)
    return torch.ops.speedrun.qkv_norm_rope_mix(qkv, ve, lambdas, cos, sin,
                                                default_eps(qkv.dtype) if eps is None else float(eps))

def within_one_ulp(got: torch.Tensor, truth: torch.Tensor) -> tuple[bool, float]:
    """Whether `got` is within one unit in the last place of its dtype of the fp32 `truth` (plus 1e-5 of
    the tensor's scale, for fp32 reordering near zero), and the fraction equal to truth rounded to
    nearest (~1 for an fp32 kernel that rounds once; the Triton interpreter truncates instead)."""
    rtol = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}.get(got.dtype, 1e-5)
    bound = rtol * truth.abs() + 1e-5 * truth.abs().max()
    ok = bool(((got.float() - truth).abs() <= bound).all())
    return ok, float((got == truth.to(got.dtype)).float().mean())


__all__ = ["default_eps", "mix_reference", "qk_norm_rope", "qkv_norm_rope_mix", "reference", "triton_kernels",
           "within_one_ulp"]
