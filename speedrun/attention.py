"""Document-masked, sliding-window, bidirectional attention over a packed token stream.

Two back-ends share one mask definition, `allowed(q, k)`:

    same document (doc id >= 0)  and  |q - k| < window        or  q == k

Documents are the segments of `doc_ids` (one id per token; padding has id -1). The `q == k` term
lets a padding token attend to itself only, so no row is ever fully masked (no NaNs) and padding
never influences real tokens.

* **flex** — FlexAttention with a block mask built from that rule (`create_block_mask`, 128-token
  blocks). The fast path on CUDA; compiled there.
* **sdpa** — `scaled_dot_product_attention` on per-segment padded batches. Used where FlexAttention
  cannot run (its backward has no CPU implementation). Segments are cut out of the stream, grouped by
  length so the padded work stays near sum(L_i^2) rather than T^2, and scattered back.

`tests/test_attention.py` checks that both give the same output on the same packed batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

_SDPA_GROUP_ELEMS = 1 << 21  # padded L^2 x segments per SDPA call (bounds mask memory on CPU)
_compiled_flex = None


def allowed(doc_q: torch.Tensor, doc_k: torch.Tensor, q_idx, k_idx, window) -> torch.Tensor:
    """The mask rule, written once for both back-ends."""
    return ((doc_q == doc_k) & (doc_q >= 0) & ((q_idx - k_idx).abs() < window)) | (q_idx == k_idx)


def flex_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _flex_fn(device: torch.device):
    """FlexAttention, compiled on CUDA (where it becomes one fused kernel); eager elsewhere (tests)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


@dataclass
class AttnContext:
    """Everything the attention layers of one forward need, built once per forward."""
    backend: str
    block_mask: object = None  # flex
    groups: Optional[dict] = None  # sdpa: {'groups': [(index, valid, mask)], 'inverse': permutation}


def build_context(doc_ids: torch.Tensor, window: int | torch.Tensor, backend: str) -> AttnContext:
    """Build the mask structures for `doc_ids` (T,) and the sliding `window` (tokens)."""
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        T = doc_ids.numel()
        win = window if isinstance(window, torch.Tensor) else torch.tensor(int(window), device=doc_ids.device)

        def mask_mod(b, h, q_idx, kv_idx):
            return allowed(doc_ids[q_idx], doc_ids[kv_idx], q_idx, kv_idx, win)

        bm = create_block_mask(mask_mod, None, None, T, T, device=doc_ids.device)
        return AttnContext("flex", block_mask=bm)
    return AttnContext("sdpa", groups=_sdpa_groups(doc_ids, int(window)))


def _segments(doc_ids: torch.Tensor) -> tuple[list[int], list[int], list[bool]]:
    """Contiguous runs of equal doc id: starts, lengths, and whether the run is a document (id >= 0)."""
    d = doc_ids.detach().cpu()
    T = d.numel()
    change = torch.ones(T, dtype=torch.bool)
    change[1:] = d[1:] != d[:-1]
    starts = torch.nonzero(change).flatten()
    ends = torch.cat([starts[1:], torch.tensor([T])])
    lens = ends - starts
    is_doc = d[starts] >= 0
    return starts.tolist(), lens.tolist(), is_doc.tolist()


def _bucket(n: int) -> int:
    """Padded length class of a segment: multiples of 16 up to 128, then steps of ~12 %."""
    if n <= 128:
        return -(-n // 16) * 16
    b = 128
    while b < n:
        b = -(-int(b * 1.125) // 16) * 16
    return b


def _sdpa_groups(doc_ids: torch.Tensor, window: int) -> dict:
    """Segments grouped by padded length: per group the gather index, validity and mask (or None when
    every segment is a whole document shorter than the window, so only padding needs masking)."""
    device = doc_ids.device
    starts, lens, is_doc = _segments(doc_ids)
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
            doc_flag = torch.tensor([is_doc[m] for m in chunk]).view(-1, 1, 1)
            qi, ki = ar.view(L, 1), ar.view(1, L)
            mask = ((qi - ki).abs() < window) & valid.unsqueeze(2) & valid.unsqueeze(1) & doc_flag
            mask = (mask | (qi == ki)).unsqueeze(1)
            groups.append((index.to(device), valid.to(device), mask.to(device)))
            order.append(index[valid])
    inverse = torch.argsort(torch.cat(order)).to(device)
    return {"groups": groups, "inverse": inverse}


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """Attention for q, k, v of shape (T, H, D) under `ctx`; returns (T, H, D)."""
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
