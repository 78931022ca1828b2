"""Document-masked, sliding-window, bidirectional attention over a packed token stream.

All back-ends share one mask definition, `allowed(q, k)`:

    same segment (equal doc id)  and  |q - k| < window

Segments are the runs of `doc_ids` (one id per token): documents 0, 1, 2... and the padding
(id -1) at the end of the stream, which forms a segment of its own (cut into pieces no longer than
the kernel's bound on the varlen path) — so padding never influences a real token and no row is ever
fully masked (no NaNs).

* **fa4** — FlashAttention-4 (CuTe DSL, Hopper/Blackwell; `pip install "speedrun-plm[hopper]"`) through
  speedrun/kernels/fa4.py, a torch.library custom op (no graph break), on the same offsets as varlen;
  it takes the sliding window as a 0-d CPU tensor, so a window that binds (whole proteins, a growing
  window) stays on this path without recompiles. Chosen first on CUDA when it imports and passes a
  forward+backward self-test against an fp32 reference; else the next back-end, with one warning.
* **varlen** — FlashAttention-2's variable-length kernel (`torch.nn.attention.varlen.varlen_attn`)
  with cumulative segment offsets: exact work (sum of L_i^2), no block padding; a binding window as
  its `window_size` where this torch has it. Offsets have a fixed size (at most `packing.max_docs`
  documents per micro-batch, enforced by the loader, then the padding in pieces of at most the bound)
  so shapes stay static.
* **flex** — FlexAttention with a block mask built from the rule (128-token blocks), compiled; the
  general CUDA path (fp32 too), with the window as a tensor so its schedule never recompiles.
* **sdpa** — `scaled_dot_product_attention` on per-segment padded batches grouped by length (work
  near sum(L_i^2) rather than T^2). Used where the others cannot run: FlexAttention has no backward on
  CPU.

`choose()` picks one (model.attention=auto: fa4 -> varlen -> flex on CUDA, sdpa elsewhere) from what is
installed, the device, the dtype, the segment bound and whether the window can bind, and says why;
the run's log and summary.json record it. `tests/test_attention.py` checks that they give the same
output on the same packed batch.
"""
from __future__ import annotations

import importlib
import inspect
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .packing import max_docs, pad_segments

_SDPA_GROUP_ELEMS = 1 << 21  # padded L^2 x segments per SDPA call (bounds mask memory on CPU)
_compiled_flex = None


def allowed(doc_q: torch.Tensor, doc_k: torch.Tensor, q_idx, k_idx, window) -> torch.Tensor:
    """The mask rule, written once for every back-end."""
    return (doc_q == doc_k) & ((q_idx - k_idx).abs() < window)


def _cuda_and_importable(device: torch.device, module: str, name: str) -> bool:
    if device.type != "cuda":
        return False
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def flex_available(device: torch.device) -> bool:
    return _cuda_and_importable(device, "torch.nn.attention.flex_attention", "flex_attention")


def varlen_available(device: torch.device) -> bool:
    return _cuda_and_importable(device, "torch.nn.attention.varlen", "varlen_attn")


def varlen_offsets(doc_ids: torch.Tensor, n_docs: int, bound: int) -> torch.Tensor:
    """Cumulative segment offsets, int32, computed on the device without a host sync: documents
    0..n_docs-1 (unused slots are zero-length segments, which the kernel skips), then the trailing
    padding cut into `pad_segments(T, bound)` pieces of at most `bound` tokens. No segment is longer
    than `bound`, the max_seqlen the kernel is given: rows past it would come back unwritten (garbage
    outputs and gradients, issue 15), while padding segments inside it compute finite values that
    nothing reads, so their gradients are exactly zero. Size: n_docs + pad_segments(T, bound) + 1."""
    d = doc_ids.reshape(-1).long()
    T = d.numel()
    counts = torch.zeros(n_docs, dtype=torch.int32, device=d.device)
    counts.scatter_add_(0, d.clamp(min=0), (d >= 0).to(torch.int32))
    ends = counts.cumsum(0, dtype=torch.int32)
    steps = torch.arange(1, pad_segments(T, bound) + 1, dtype=torch.int32, device=d.device) * bound
    pad_ends = (ends[-1:] + steps).clamp(max=T)
    return F.pad(torch.cat((ends, pad_ends)), (1, 0))


def _flex_fn(device: torch.device):
    """FlexAttention, compiled on CUDA (where it becomes one fused kernel); eager elsewhere (tests)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


class AttnContext(NamedTuple):
    """Everything the attention layers of one forward need, built once per forward (a NamedTuple, so
    torch.compile treats it as a tuple of inputs rather than an opaque object)."""
    backend: str
    block_mask: object = None  # flex
    groups: Optional[dict] = None  # sdpa: {'groups': [(index, valid, mask)], 'inverse': permutation}
    offsets: Optional[torch.Tensor] = None  # fa4, varlen: cumulative segment offsets (int32)
    max_len: int = 0  # fa4, varlen: upper bound on a segment's length
    window: object = None  # fa4: a 0-d CPU tensor, varlen: an int; None when the window cannot bind


def varlen_window_supported() -> bool:
    """torch's varlen_attn takes `window_size` (torch 2.13 does; earlier releases may not)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    return "window_size" in inspect.signature(varlen_attn).parameters


def _usable(name: str, device: torch.device, *, n_heads: int, head_dim: int, dtype: torch.dtype, bound: int,
            window_binds: bool, tokens: int) -> tuple[bool, str]:
    """Whether back-end `name` can run this configuration here, and why (not)."""
    half = dtype in (torch.bfloat16, torch.float16)
    if name == "sdpa":
        return True, "SDPA on per-document batches (no fused kernel here)"
    if device.type != "cuda":
        return False, f"needs CUDA (the device is {device})"
    if name == "flex":
        return (flex_available(device), "FlexAttention with 128-token block masks")
    if bound <= 0:
        return False, "needs a bound on the documents' length (data.crop, or a window that cannot bind)"
    if not half:
        return False, f"runs bf16/fp16 attention, not {dtype} (hardware.precision)"
    if name == "varlen":
        if not varlen_available(device):
            return False, "torch has no torch.nn.attention.varlen"
        if window_binds and not varlen_window_supported():
            return False, "this torch's varlen_attn takes no window_size and the window binds"
        return True, "FlashAttention-2 varlen (torch)" + (" with a sliding window" if window_binds else "")
    from .kernels import fa4

    ok, why = fa4.probe(device, n_heads, head_dim, dtype, window=min(128, bound - 1) if window_binds else -1,
                        max_seqlen=bound, tokens_per_batch=tokens)
    return ok, ("FlashAttention-4 varlen: " + why) if ok else why


def choose(want: str, device: torch.device, *, n_heads: int, head_dim: int, dtype: torch.dtype, bound: int = 0,
           window_binds: bool = False, tokens: int = 65536) -> tuple[str, str]:
    """(back-end, why) for model.attention=`want` (see the module docstring). A back-end asked for by
    name that cannot run is one ConfigError line; `auto` takes the first that can."""
    from .errors import ConfigError

    order = ["fa4", "varlen", "flex"] if device.type == "cuda" else ["sdpa"]
    if want == "auto":
        skipped = []
        for name in order:
            ok, why = _usable(name, device, n_heads=n_heads, head_dim=head_dim, dtype=dtype, bound=bound,
                              window_binds=window_binds, tokens=tokens)
            if ok:
                return name, why + (f" (not {'; not '.join(skipped)})" if skipped else "")
            skipped.append(f"{name}: {why}")
        return "sdpa", "SDPA on per-document batches (" + "; ".join(skipped) + ")"
    ok, why = _usable(want, device, n_heads=n_heads, head_dim=head_dim, dtype=dtype, bound=bound,
                      window_binds=window_binds, tokens=tokens)
    if not ok:
        raise ConfigError(f"model.attention={want} {why}: use model.attention=auto")
    return want, why


def build_context(doc_ids: torch.Tensor, window: int | torch.Tensor, backend: str,
                  max_len: int = 0) -> AttnContext:
    """Build the mask structures for `doc_ids` (T,) and the sliding `window` (tokens).

    varlen needs `max_len`, an upper bound on a document's length that is at most the window; the
    trailing padding is cut into segments no longer than it (varlen_offsets)."""
    if backend in ("fa4", "varlen"):
        if max_len <= 0:
            raise ValueError(f"the {backend} back-end needs max_len, a bound on every segment's length")
        offsets = varlen_offsets(doc_ids, max_docs(doc_ids.numel()), int(max_len))
        return AttnContext(backend, offsets=offsets, max_len=int(max_len), window=_kernel_window(backend, window,
                                                                                              max_len))
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        T = doc_ids.numel()
        win = window if isinstance(window, torch.Tensor) else torch.tensor(int(window), device=doc_ids.device)

        def mask_mod(b, h, q_idx, kv_idx):
            return allowed(doc_ids[q_idx], doc_ids[kv_idx], q_idx, kv_idx, win)

        bm = create_block_mask(mask_mod, None, None, T, T, device=doc_ids.device)
        _flex_fn(doc_ids.device)  # create the compiled kernel here, outside any compiled region: created
        # while a block is traced, the global changes under the trace and every block compiles twice
        return AttnContext("flex", block_mask=bm)
    return AttnContext("sdpa", groups=_sdpa_groups(doc_ids, int(window)))


def _kernel_window(backend: str, window, bound: int):
    """The window as the fa4/varlen kernels take it: None when it cannot bind (>= the segment bound);
    fa4: a 0-d CPU tensor (no recompile as it grows), varlen: an int."""
    if isinstance(window, torch.Tensor):
        if backend == "fa4" and window.device.type == "cpu":
            return window  # the caller keeps it current (TrainStep); its value may not bind, the kernel checks
        window = int(window)
    if window is None or int(window) >= bound:
        return None
    return torch.tensor(int(window)) if backend == "fa4" else int(window)


def _segments(doc_ids: torch.Tensor) -> tuple[list[int], list[int]]:
    """Contiguous runs of equal doc id: starts and lengths."""
    d = doc_ids.detach().cpu()
    T = d.numel()
    change = torch.ones(T, dtype=torch.bool)
    change[1:] = d[1:] != d[:-1]
    starts = torch.nonzero(change).flatten()
    ends = torch.cat([starts[1:], torch.tensor([T])])
    lens = ends - starts
    return starts.tolist(), lens.tolist()


def _bucket(n: int) -> int:
    """Padded length class of a segment: multiples of 16 up to 128, then steps of ~12 %."""
    if n <= 128:
        return -(-n // 16) * 16
    b = 128
    while b < n:
        b = -(-int(b * 1.125) // 16) * 16
    return b


def _sdpa_groups(doc_ids: torch.Tensor, window: int) -> dict:
    """Segments grouped by padded length: per group the gather index, validity and mask."""
    device = doc_ids.device
    starts, lens = _segments(doc_ids)
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(lens):
        by_len.setdefault(_bucket(n), []).append(i)
    groups, order = [], []
    for L, members in sorted(by_len.items()):
        for c in range(0, len(members), max(1, _SDPA_GROUP_ELEMS // (L * L))):
            chunk = members[c:c + max(1, _SDPA_GROUP_ELEMS // (L * L))]
            ar = torch.arange(L)
            seg_len = torch.tensor([lens[m] for m in chunk]).view(-1, 1)
            valid = ar.view(1, L) < seg_len
            index = torch.where(valid, torch.tensor([starts[m] for m in chunk]).view(-1, 1) + ar, 0)
            qi, ki = ar.view(L, 1), ar.view(1, L)
            mask = ((qi - ki).abs() < window) & valid.unsqueeze(2) & valid.unsqueeze(1)
            mask = (mask | (qi == ki)).unsqueeze(1)  # padded slots of a group attend to themselves
            groups.append((index.to(device), valid.to(device), mask.to(device)))
            order.append(index[valid])
    inverse = torch.argsort(torch.cat(order)).to(device)
    return {"groups": groups, "inverse": inverse}


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """Attention for q, k, v of shape (T, H, D) under `ctx`; returns (T, H, D)."""
    if ctx.backend == "fa4":
        from .kernels.fa4 import fa4_varlen

        return fa4_varlen(q, k, v, ctx.offsets, ctx.max_len, -1 if ctx.window is None else ctx.window)
    if ctx.backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        kw = {} if ctx.window is None else {"window_size": (ctx.window - 1, ctx.window - 1)}
        return varlen_attn(q, k, v, ctx.offsets, ctx.offsets, ctx.max_len, ctx.max_len, **kw)
    if ctx.backend == "flex":
        out = _flex_fn(q.device)(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                         v.transpose(0, 1).unsqueeze(0), block_mask=ctx.block_mask)
        return out.squeeze(0).transpose(0, 1)
    outs = []
    for index, valid, mask in ctx.groups["groups"]:
        # (S, L, H, D) -> (S, H, L, D); the valid rows come back in segment order
        qs, ks, vs = (t[index].transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask).transpose(1, 2)
        outs.append(o[valid])
    return torch.cat(outs)[ctx.groups["inverse"]]
