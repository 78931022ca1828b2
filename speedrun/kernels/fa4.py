"""FlashAttention-4 variable-length attention as a custom op: `fa4_varlen(q, k, v, cu_seqlens, max_seqlen)`.

Why: on the H200 the FA2 varlen kernel behind `torch.nn.attention.varlen.varlen_attn` takes ~53 ms of a
~186 ms step (its backward runs at ~160 TFLOP/s). FA4 (`flash-attn-4`, CuTe DSL, JIT-compiled on first
use) does forward+backward on 65,536 packed tokens in 1.35 ms against 1.95 ms. Called behind
`torch.compiler.disable` it costs a graph break per layer; as a `torch.library.custom_op` with a fake
implementation and an autograd formula it sits inside the compiled block like FA2's op does.

Semantics are those of `speedrun.attention`: q, k, v (T, H, D) hold the documents of a packed stream,
`cu_seqlens` (int32, (S+1,)) their cumulative offsets (zero-length segments allowed; the trailing
padding cut into segments of at most `max_seqlen` tokens, `speedrun.attention.varlen_offsets`), and a
token attends to the tokens of its own segment with |q - k| < window (`window=-1`: no window). FA's
`window_size=(left, right)` keeps key k for query q when q - left <= k <= q + right (flash_attn/cute
mask.py, 4.0.0b36: a score is masked when col >= row + 1 + right or col < row - left, with seqlen_q ==
seqlen_k within a segment), so |q - k| < window is `window_size=(window - 1, window - 1)`. A window that
cannot bind (window >= max_seqlen) is passed as no window: FA4 compiles one kernel per (window or not),
the window's value is a run-time argument. The op takes the window as a 0-d CPU tensor, so a window
that grows during training changes no guard of a compiled block (no recompiles, no device sync);
`fa4_varlen` also takes a Python int (a compiled block then specialises on its value).

Off CUDA the op computes the fp32 per-segment reference (`reference_varlen`), so the op's fake,
autograd and compile registrations are testable on the CPU. On CUDA it runs FA4 only; when FA4 cannot
run it raises `FA4Unavailable`. The caller decides before compiling anything: `probe()` imports FA4,
checks the device (compute capability 9.x or 10.x) and runs one small forward+backward against the
reference; on any failure it returns (False, reason) and warns once, and the caller keeps FA2.
"""
from __future__ import annotations

import math
import warnings
from types import ModuleType
from typing import Optional

import torch

from ..errors import SpeedrunError, one_line

TESTED_VERSION = "4.0.0b36"
_interface: Optional[ModuleType] = None
_import_error: Optional[str] = None
_probed: dict[tuple, tuple[bool, str, bool]] = {}
_warned: set[str] = set()


class FA4Unavailable(SpeedrunError, RuntimeError):
    """FlashAttention-4 cannot run here: not importable, not a Hopper/Blackwell GPU, or its kernel failed."""


# ----------------------------------------------------------------------------------------------------
# availability


def load_interface() -> tuple[Optional[ModuleType], str]:
    """`flash_attn.cute.interface` (cached), or None and why it could not be imported."""
    global _interface, _import_error
    if _interface is None and _import_error is None:
        try:
            import flash_attn.cute.interface as iface

            missing = [n for n in ("flash_attn_varlen_func", "_flash_attn_bwd") if not hasattr(iface, n)]
            if missing:
                raise ImportError(f"flash_attn.cute.interface lacks {', '.join(missing)} "
                                  f"(this wrapper was written against flash-attn-4=={TESTED_VERSION})")
            _interface = iface
        except Exception as exc:  # ImportError, or anything its import-time code raises
            _import_error = f"cannot import flash_attn.cute ({one_line(exc)}): install flash-attn-4=={TESTED_VERSION}"
    return _interface, _import_error or ""


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("flash-attn-4")
    except Exception:
        return "unknown version"


def available(device: torch.device | str) -> tuple[bool, str]:
    """Whether FA4 can be used on `device`, and why (not): a CUDA device of compute capability 9.x
    (Hopper) or 10.x (Blackwell) and an importable `flash_attn.cute`. Cheap; runs no kernel."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"FlashAttention-4 needs a CUDA device, not {device.type}"
    if not torch.cuda.is_available():
        return False, "FlashAttention-4 needs CUDA, and torch sees no CUDA device"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return False, f"FlashAttention-4 is used on compute capability 9.x/10.x only, this GPU is {major}.{minor}"
    iface, why = load_interface()
    if iface is None:
        return False, why
    return True, f"flash-attn-4 {_version()} on sm{major}{minor}"


def warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"FlashAttention-4 not used: {reason}; falling back to FA2 varlen", RuntimeWarning,
                      stacklevel=3)


# ----------------------------------------------------------------------------------------------------
# the fp32 reference (CPU implementation of the op, and the check in probe/tests/bench)


def window_bounds(window: int, max_seqlen: int) -> tuple[Optional[int], Optional[int]]:
    """FA's (window_size_left, window_size_right) for |q - k| < window; (None, None) when it cannot bind."""
    if window == 0 or window < -1:
        raise ValueError(f"window must be -1 (none) or a positive number of tokens, got {window}")
    if window < 0 or window >= max_seqlen:
        return None, None
    return window - 1, window - 1


def _segments(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """Non-empty (start, end) segments of the offsets (one host sync)."""
    b = [int(x) for x in cu_seqlens.tolist()]
    return [(s, e) for s, e in zip(b[:-1], b[1:]) if e > s]


def _probs(q: torch.Tensor, k: torch.Tensor, s: int, e: int, window: int, scale: float
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities (H, L, L) and lse (H, L) of segment [s, e), in fp32."""
    scores = q[s:e].float().transpose(0, 1) @ k[s:e].float().permute(1, 2, 0) * scale
    if window > 0:
        i = torch.arange(e - s, device=q.device)
        scores = scores.masked_fill((i[:, None] - i[None, :]).abs() >= window, -math.inf)
    lse = scores.logsumexp(-1)
    return (scores - lse[..., None]).exp(), lse


def reference_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     window: int = -1, softmax_scale: Optional[float] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment attention in fp32 (differentiable): out (T, H, Dv) and lse (H, T), fp32 (natural
    log). Rows outside every segment get out 0 and lse -inf."""
    T, H, D = q.shape
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    out = q.new_zeros(T, H, v.size(-1), dtype=torch.float32)
    lse = q.new_full((H, T), -math.inf, dtype=torch.float32)
    for s, e in _segments(cu_seqlens):
        p, lse_s = _probs(q, k, s, e, window, scale)
        out[s:e] = (p @ v[s:e].float().transpose(0, 1)).transpose(0, 1)
        lse[:, s:e] = lse_s
    return out, lse


def reference_varlen_grads(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens: torch.Tensor, window: int = -1, softmax_scale: Optional[float] = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (fp32) of `reference_varlen` by the closed form (no autograd: it runs inside a custom
    op, below the autograd dispatch): dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = s dS K,
    dK = s dS^T Q."""
    D = q.size(-1)
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v))
    for s, e in _segments(cu_seqlens):
        p, _ = _probs(q, k, s, e, window, scale)
        qs, ks, vs, gs = (t[s:e].float().transpose(0, 1) for t in (q, k, v, dout))  # (H, L, D)
        dp = gs @ vs.transpose(1, 2)
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))  # rowsum(dO * O) = rowsum(P * dP)
        dq[s:e] = (ds @ ks * scale).transpose(0, 1)
        dk[s:e] = (ds.transpose(1, 2) @ qs * scale).transpose(0, 1)
        dv[s:e] = (p.transpose(1, 2) @ gs).transpose(0, 1)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# the custom ops


def _fa4() -> ModuleType:
    iface, why = load_interface()
    if iface is None:
        raise FA4Unavailable(why)
    return iface


def _kernel_error(phase: str, exc: Exception) -> FA4Unavailable:
    return FA4Unavailable(f"FlashAttention-4 {phase} failed: {one_line(exc)}")


def _on_fa4(t: torch.Tensor) -> bool:
    """FA4 runs on CUDA tensors; everything else takes the reference (tests patch this)."""
    return t.is_cuda


@torch.library.custom_op("speedrun::fa4_varlen_fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
         window: torch.Tensor, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (T, H, Dv) in q's dtype, lse (H, T) fp32); `window`: a 0-d CPU integer tensor."""
    w = int(window)
    left, right = window_bounds(w, max_seqlen)
    if not _on_fa4(q):
        out, lse = reference_varlen(q, k, v, cu_seqlens, w, softmax_scale)
        return out.to(q.dtype), lse
    iface = _fa4()
    try:
        with torch.no_grad():  # the op's own autograd formula is the one that counts
            out, lse = iface.flash_attn_varlen_func(
                q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                max_seqlen_k=max_seqlen, softmax_scale=softmax_scale, causal=False, window_size=(left, right),
                return_lse=True)
    except Exception as exc:
        raise _kernel_error("forward", exc) from exc
    return out.contiguous(), lse.contiguous()


@_fwd.register_fake
def _fwd_fake(q, k, v, cu_seqlens, max_seqlen, window, softmax_scale):
    T, H, _ = q.shape
    return q.new_empty(T, H, v.size(-1)), q.new_empty(H, T, dtype=torch.float32)


@torch.library.custom_op("speedrun::fa4_varlen_bwd", mutates_args=())
def _bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
         lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, window: torch.Tensor,
         softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, in the inputs' dtype."""
    w = int(window)
    left, right = window_bounds(w, max_seqlen)
    if not _on_fa4(q):
        grads = reference_varlen_grads(dout, q, k, v, cu_seqlens, w, softmax_scale)
        return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))
    iface = _fa4()
    try:
        dq, dk, dv = iface._flash_attn_bwd(
            q, k, v, out, dout, lse, softmax_scale=softmax_scale, causal=False, softcap=0.0,
            window_size_left=left, window_size_right=right, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
            max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, deterministic=False)[:3]
    except Exception as exc:
        raise _kernel_error("backward", exc) from exc
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_bwd.register_fake
def _bwd_fake(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, window, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, max_seqlen, window, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, window)
    ctx.max_seqlen, ctx.softmax_scale = max_seqlen, softmax_scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens, window = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.speedrun.fa4_varlen_bwd(dout.contiguous(), q, k, v, out, lse, cu_seqlens,
                                                   ctx.max_seqlen, window, ctx.softmax_scale)
    return dq, dk, dv, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def fa4_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
               window: int | torch.Tensor = -1, softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Attention over the packed segments of q, k, v (T, H, D) -> (T, H, Dv), non-causal, each token
    attending to its own segment within |q - k| < window (-1: no window; an int, or a 0-d CPU tensor
    that a compiled caller does not specialise on). `cu_seqlens`: int32 cumulative offsets;
    `max_seqlen`: a bound on every segment's length (rows of a longer segment are not computed).
    Differentiable in q, k, v. Raises FA4Unavailable on CUDA when FA4 cannot run."""
    if q.dim() != 3 or k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"q, k, v must be (T, H, D) with equal T and H, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if not isinstance(window, torch.Tensor):
        window = torch.tensor(int(window))
    elif window.device.type != "cpu" or window.numel() != 1:
        raise ValueError(f"a window tensor must hold one value on the CPU (it is read on the host), got "
                         f"{tuple(window.shape)} on {window.device}")
    scale = q.size(-1) ** -0.5 if softmax_scale is None else float(softmax_scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return torch.ops.speedrun.fa4_varlen_fwd(q, k, v, cu_seqlens.contiguous(), int(max_seqlen),
                                             window.reshape(()).long(), scale)[0]


# ----------------------------------------------------------------------------------------------------
# the caller's check before compiling


def _probe_batch(device: torch.device, n_heads: int, head_dim: int, dtype: torch.dtype, tokens: int,
                 max_seqlen: int, slots: int) -> tuple[torch.Tensor, ...]:
    """A packed batch of `tokens` tokens with long, short, one-token and zero-length segments and
    trailing padding; `slots` document slots, as `speedrun.attention.varlen_offsets` lays them out."""
    from ..attention import varlen_offsets

    if tokens < 2 * max_seqlen:
        raise ValueError(f"a probe batch needs at least 2 x max_seqlen tokens, got {tokens} for {max_seqlen}")
    g = torch.Generator().manual_seed(0)
    lengths = [max_seqlen, 1, max(1, max_seqlen // 3), 17]
    while sum(lengths) < tokens * 3 // 4:
        lengths.append(int(torch.randint(1, max_seqlen + 1, (1,), generator=g)))
    lengths = lengths[:-1]
    doc = torch.full((tokens,), -1, dtype=torch.long)
    doc[:sum(lengths)] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    cu = varlen_offsets(doc.to(device), max(len(lengths), slots), max_seqlen)
    q, k, v, dout = (torch.randn(tokens, n_heads, head_dim, generator=g).to(device, dtype) for _ in range(4))
    return q, k, v, dout, cu


def max_rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (a scale-free error for bf16 comparisons)."""
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def self_test(device: torch.device, n_heads: int, head_dim: int, dtype: torch.dtype = torch.bfloat16,
              window: int = -1, max_seqlen: int = 1024, tokens_per_batch: int = 65536, tokens: int = 4096,
              tol: float = 0.05) -> str:
    """One forward+backward of `fa4_varlen` on `tokens` packed tokens against the fp32 reference; raises
    on failure or mismatch (relative error above `tol` in out, dq, dk or dv). The offsets have as many
    segments as a `tokens_per_batch` batch (`max_docs` slots, most of them empty), so the kernels
    compiled here are the ones the run uses (FA4 picks its scheduler by the segment count)."""
    from ..packing import max_docs

    slots = max_docs(tokens_per_batch)
    q, k, v, dout, cu = _probe_batch(device, n_heads, head_dim, dtype, max(tokens, 2 * max_seqlen), max_seqlen,
                                     slots)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fa4_varlen(*leaves, cu, max_seqlen, window)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ref, _ = reference_varlen(*ref_leaves, cu, window)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.float())
    errors = {"out": max_rel_error(out, ref)}
    errors.update({n: max_rel_error(g, r) for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    bad = {n: e for n, e in errors.items() if not e <= tol}  # `not <=`: NaN counts as bad
    summary = ", ".join(f"{n} {e:.1e}" for n, e in errors.items())
    if bad:
        raise FA4Unavailable(f"FlashAttention-4 disagrees with the fp32 reference (relative errors {summary}; "
                             f"tolerance {tol})")
    return f"matches the fp32 reference (relative errors {summary})"


def probe(device: torch.device | str, n_heads: int, head_dim: int, dtype: torch.dtype = torch.bfloat16,
          window: int = -1, max_seqlen: int = 1024, tokens_per_batch: int = 65536) -> tuple[bool, str]:
    """Can `fa4_varlen` replace FA2 on `device` for this head shape, dtype, window and segment bound
    (`max_seqlen`, the varlen `max_len`) in batches of `tokens_per_batch` tokens? Runs `available`, then
    (on CUDA) one small forward+backward against the reference, outside any compiled region, which also
    JIT-compiles the kernels (~10 s each direction). Never raises; returns (False, reason) on failure,
    with one warning per reason where FA4 was a candidate (a CUDA device, or `available` said yes).
    Cached per argument set."""
    device = torch.device(device)
    key = (str(device), n_heads, head_dim, dtype, 0 < window < max_seqlen, max_seqlen, tokens_per_batch)
    if key not in _probed:
        ok, why = available(device)
        candidate = ok  # FA4 could have run here: its failure is worth a warning
        if ok and dtype not in (torch.bfloat16, torch.float16):
            ok, why = False, f"FlashAttention-4 runs bf16/fp16 attention, not {dtype}"
        if ok:
            try:
                why = self_test(device, n_heads, head_dim, dtype, window, max_seqlen, tokens_per_batch)
            except Exception as exc:  # anything: the run must go on with FA2
                ok, why = False, str(exc) if isinstance(exc, FA4Unavailable) else one_line(exc)
        _probed[key] = (ok, why, candidate or device.type == "cuda")
    ok, why, warn = _probed[key]
    if not ok and warn:
        warn_once(why)
    return ok, why


__all__ = ["FA4Unavailable", "available", "fa4_varlen", "load_interface", "probe", "reference_varlen",
           "reference_varlen_grads", "self_test", "window_bounds"]
