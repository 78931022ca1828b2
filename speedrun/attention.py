"""Document-masked, sliding-window, bidirectional attention over a packed token stream.

All back-ends share one mask definition, `allowed(q, k)`:

    same segment (equal doc id)  and  |q - k| < window

Segments are the runs of `doc_ids` (one id per token): documents 0, 1, 2... and the padding
(id -1) at the end of the stream, which forms a segment of its own (cut into pieces no longer than
the kernel's bound on the varlen path) — so padding never influences a real token and no row is ever
fully masked (no NaNs).

* **varlen** — FlashAttention's variable-length kernel (`torch.nn.attention.varlen.varlen_attn`)
  with cumulative segment offsets: exact work (sum of L_i^2), no block padding. Used on CUDA when the
  window cannot bind (every document is at most `data.max_length` <= window tokens long), which is the
  reference recipe's case (max length 1024, window 1024). Offsets have a fixed size (at most
  `packing.max_docs` documents per micro-batch, enforced by the loader, then the padding in pieces of
  at most the bound) so shapes stay static.
* **flex** — FlexAttention with a block mask built from the rule (128-token blocks), compiled; the
  general CUDA path, with the window as a tensor so its schedule never recompiles.
* **sdpa** — `scaled_dot_product_attention` on per-segment padded batches grouped by length (work
  near sum(L_i^2) rather than T^2). Used where the others cannot run: FlexAttention has no backward on
  CPU.

`tests/test_attention.py` checks that they give the same output on the same packed batch.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .packing import max_docs, pad_segments

_SDPA_GROUP_ELEMS = 1 << 21  # padded L^2 x segments per SDPA call (bounds mask memory on CPU)
_compiled_flex = None


def allowed(doc_q: torch.Tensor, doc_k: torch.Tensor, q_idx, k_idx, window) -> torch.Tensor:
    """The mask rule, written once for every back-end."""
    return (doc_q == doc_k) & ((q_idx - k_idx).abs() < window)


def flex_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def varlen_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


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
    offsets: Optional[torch.Tensor] = None  # varlen: cumulative segment offsets (int32)
    max_len: int = 0  # varlen: upper bound on a segment's length


def build_context(doc_ids: torch.Tensor, window: int | torch.Tensor, backend: str,
                  max_len: int = 0) -> AttnContext:
    """Build the mask structures for `doc_ids` (T,) and the sliding `window` (tokens).

    varlen needs `max_len`, an upper bound on a document's length that is at most the window; the
    trailing padding is cut into segments no longer than it (varlen_offsets)."""
    if backend == "varlen":
        if max_len <= 0:
            raise ValueError("the varlen back-end needs max_len, a bound on every segment's length")
        return AttnContext("varlen", offsets=varlen_offsets(doc_ids, max_docs(doc_ids.numel()), int(max_len)),
                           max_len=int(max_len))
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
    if ctx.backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, ctx.offsets, ctx.offsets, ctx.max_len, ctx.max_len)
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
