"""FP8 matrix multiplies for the hidden linear layers (`hardware.fp8=true`).

y = x Wᵀ runs as `torch._scaled_mm` on float8 operands with dynamic per-tensor scales (the scale maps
the tensor's absolute maximum onto the format's largest value, computed on every call — no amax
history to carry or checkpoint):

    forward   y  = (x₈ · W₈ᵀ) / (s_x s_W)            x, W in e4m3 (3 mantissa bits)
    backward  ∂x = (g₈ · W₈) / (s_g s_W)               g = ∂y in e5m2 (more range for gradients)
              ∂W = (g₈ᵀ · x₈) / (s_g s_x)              accumulated in fp32 for the fp32 master weight

Only the inputs' fp8 copies are saved for backward, so a linear layer's saved activation costs one
byte per element instead of two. Master weights stay fp32; the optimizer and checkpoints are
unchanged: an fp8-trained checkpoint evaluates, embeds and exports like any other (hardware.fp8 is
part of a run's identity, like precision, so resume keeps it). Hopper/Ada GPUs run these as FP8 tensor-core
GEMMs; the CPU runs the same arithmetic (slowly), which is what the tests check.
"""
from __future__ import annotations

import torch

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x scaled into `dtype`'s range and cast, the inverse scale as a 0-d fp32 tensor)."""
    fmax = torch.finfo(dtype).max
    amax = x.detach().abs().amax().float().clamp(min=1e-12)
    scale = fmax / amax
    x8 = (x.float() * scale).clamp(-fmax, fmax).to(dtype)
    return x8, scale.reciprocal()


def _col_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix, stored column-major (what `_scaled_mm` wants for its second operand)."""
    return t.t().contiguous().t()


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x8, sx = quantize(x, E4M3)
        w8, sw = quantize(weight, E4M3)
        y = torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=x.dtype)
        ctx.save_for_backward(x8, sx, w8, sw)
        ctx.out_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x8, sx, w8, sw = ctx.saved_tensors
        g8, sg = quantize(grad.contiguous(), E5M2)
        gx = torch._scaled_mm(g8, _col_major(w8), scale_a=sg, scale_b=sw, out_dtype=ctx.out_dtype)
        gw = torch._scaled_mm(g8.t().contiguous(), _col_major(x8), scale_a=sg, scale_b=sx,
                              out_dtype=torch.float32)
        return gx, gw


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) · weight (N, K)ᵀ in FP8; K and N must be multiples of 16 (ProteinLM.enable_fp8 checks)."""
    lead = x.shape[:-1]
    y = _FP8Linear.apply(x.reshape(-1, x.size(-1)), weight)
    return y.view(*lead, weight.size(0))


def fp8_supported(device: torch.device) -> str | None:
    """None when FP8 matmuls run on `device`, else the reason they do not."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return f"FP8 matmuls need an Ada or Hopper GPU (compute capability ≥ 8.9); {device} is {major}.{minor}"
    elif device.type != "cpu":
        return f"FP8 matmuls are not available on {device.type}"
    return None
