"""The Patch-UNet protein language model (RECIPE.md §4.4, `model.arch=patch_unet`), with the
reference's document-boundary defect fixed.

Input: (B, L) rows, L = data.max_length, a power of two; `doc_ids` (B, L) int32, -1 on padding.
n_layers = 2E: E encoder levels and E decoder levels, one block each; then n_extra_layers
full-resolution blocks.

* **Hidden sizes** (`hidden_sizes`): a = lcm(64, n_heads), cap = ⌊n_heads·128/a⌋·a (head dim ≤ 128),
  level i has size min(⌈d·(1 + i/(E-1))/a⌉·a, cap): d=768, 12 heads, E=6 ->
  [768, 960, 1152, 1344, 1536, 1536]. If level 0's size differs from d, Linear d->d_0 / d_0->d
  projections wrap the UNet (as in the reference).
* **Encoder level i** (length L/2^i): block(d_i); push the output on the skip stack; PatchMerge
  (concatenate adjacent pairs, Linear 2·d_i -> d_{i+1}). At depths i >= log2(L) the length is 1 and a
  `BottleneckMLP` (λ-mixing with x0, then x + MLP(norm(x))) replaces the block; no merge past it.
* **Decoder level j** (deepest first, depth e = E-1-j): PatchExpand (Linear d_{e+1} -> 2·d_e, split
  into a pair) for j > 0; x += skip_weights[j]·pop(); block(d_e).
* **Blocks**: x <- λ0·x + λ1·P(x0_i) (λ init [1, 0]; x0_i = the normed input embedding average-pooled
  in pairs to the level's length, P a Linear d -> d_i when d_i != d); x += Attn(norm(x), ve_i);
  x += MLP(norm(x)) (ReLU², hidden ⌈r·d_i/256⌉·256, zero-init down). Attention as in model.py:
  separate q/k/v/o, v <- λv0·v + λv1·ve (init [0.5, 0.5]), QK-norm, half-split RoPE over the level's
  positions, zero-init o. ve_i = the level's value-embedding table (encoder_embed[i]: 33×d_i,
  decoder_embed[j]: 33×d_e) average-pooled to the level's length (computed as pooled one-hot counts
  times the table, so no full-resolution B×L×d_i tensor is ever built). Extra layers are plain blocks
  (no λ, no value embeddings) on the level-0 mask.
* **Head**: norm -> `LMHead` of model.py (dense -> GELU -> decoder + bias, soft-cap).

The reference config (d=768, 12 heads, n_layers=12, n_extra_layers=4, r=2.0, L=2048) has
212,279,127 parameters, exactly the figure RECIPE.md computes (tests/test_patch_unet.py).

**Documents and padding (the fix of RECIPE.md §12.2 defect 10).** The reference max-pools doc ids in
pairs, so a merged position straddling two documents (or a document and padding) is given one of
the two ids and attends to, and is attended by, that document, while its merged features carry the
other document's token: documents see each other. Here:

1. *Rule*: a merged position belongs to a document only if both halves belong to it:
   doc_{l+1}[j] = doc_l[2j] if doc_l[2j] == doc_l[2j+1] >= 0, else -1 ("dead"). So a live position at
   level l covers 2^l tokens of one document, and its merged features, pooled x0 and pooled value
   embeddings come from that document only.
2. *Attention* at every level uses one mask rule, `level_rule`: attention.py's `allowed` (same doc
   id, |q-k| < window) between live positions, or q == k; the same window number at every level,
   counted in that level's positions, as in the reference. Dead positions (and padding) attend only
   to themselves.
3. *PatchExpand is gated*: a position whose parent is dead receives nothing from the expansion (its
   decoder state restarts from its skip). Without this, the mixed content of a straddling position
   would flow back into both documents on the way up.

Hence a document's outputs depend on its own tokens only (and on where it sits in the row: its
tokens in a straddling pair get no deeper context than that level). Padding outputs depend on
padding only. tests/test_patch_unet.py changes one document and checks the other is bit-identical.

Masks are built in `make_context` (outside any compiled region): FlexAttention block masks (B rows)
on CUDA, dense boolean (B, 1, L_l, L_l) masks for SDPA elsewhere, both from `level_rule`.

Deliberate differences from the reference, none of which changes the parameter count of any
config without bottleneck levels (the reference config has none: E=6 < log2(2048)=11):
the boundary fix above; RoPE is computed here on (B, L, H, D) rows (`RowRotary`, the same half-split
rotation as model.py's); value-embedding tables are created only for levels that use them (the
reference also builds tables for BottleneckMLP levels, which ignore them); x0 and value embeddings
are pooled in the activation dtype.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import _flex_fn, allowed, flex_available
from ..config import ConfigError, ModelConfig, mlp_hidden
from .unet import MLP, CastedLinear, LMHead, norm
from ..vocab import MASK


def hidden_sizes(dim: int, n_levels: int, n_heads: int, max_head_dim: int = 128) -> list[int]:
    """Per-level widths: ⌈d·(1 + i/(E-1))/a⌉·a capped at ⌊n_heads·128/a⌋·a, a = lcm(64, n_heads)."""
    a = 64 * n_heads // math.gcd(64, n_heads)
    cap = (n_heads * max_head_dim // a) * a
    out = []
    for i in range(n_levels):
        raw = dim * (1.0 + i / max(n_levels - 1, 1))
        out.append(min(int(math.ceil(raw / a - 1e-9)) * a, cap))
    return out


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _pool(x: torch.Tensor) -> torch.Tensor:
    """Average adjacent pairs along dim 1: (B, L, ...) -> (B, L/2, ...)."""
    return 0.5 * (x[:, 0::2] + x[:, 1::2])


def level_rule(doc_q: torch.Tensor, doc_k: torch.Tensor, q_idx, k_idx, window) -> torch.Tensor:
    """The one mask rule of every level, for both back-ends: attention.py's `allowed` (same doc id,
    |q-k| < window) between live positions (doc id >= 0), and every position sees itself. Dead
    positions (padding, pairs straddling a boundary) therefore attend only to themselves."""
    return (allowed(doc_q, doc_k, q_idx, k_idx, window) & (doc_q >= 0)) | (q_idx == k_idx)


class PatchContext(NamedTuple):
    """Masks of one forward, per resolution level, built once outside any compiled region (a
    NamedTuple, so torch.compile sees a tuple of inputs)."""
    backend: str
    docs: list  # level l: (B, L/2^l) int32 doc ids, -1 = dead (padding or straddling)
    masks: list  # level l: flex BlockMask or SDPA bool (B, 1, L_l, L_l); None at bottleneck levels
    gates: list  # level l < n_merges: (B, L_l, 1) bool, True where the parent at level l+1 is live


class RowRotary(nn.Module):
    """Half-split RoPE (as model.py's) over dim 1 of (B, L, H, D): positions 0..L-1 of the level."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.register_buffer("inv_freq", base ** (-torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.arange(x.size(1), device=x.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        cos, sin = freqs.cos()[None, :, None, :].to(x.dtype), freqs.sin()[None, :, None, :].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class RowAttention(nn.Module):
    """Bidirectional attention over (B, L, d) rows under a per-level mask."""

    def __init__(self, dim: int, n_heads: int, value_mix: bool, rope_base: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.q, self.k, self.v = CastedLinear(dim, dim), CastedLinear(dim, dim), CastedLinear(dim, dim)
        self.o = CastedLinear(dim, dim, zero_init=True)
        self.lambdas = nn.Parameter(torch.tensor([0.5, 0.5])) if value_mix else None
        self.rotary = RowRotary(self.head_dim, rope_base)

    def forward(self, x: torch.Tensor, ve: Optional[torch.Tensor], mask, backend: str) -> torch.Tensor:
        B, L, _ = x.shape
        shape = (B, L, self.n_heads, self.head_dim)
        q, k, v = self.q(x).view(shape), self.k(x).view(shape), self.v(x).view(shape)
        if self.lambdas is not None and ve is not None:
            v = self.lambdas[0] * v + self.lambdas[1] * ve.view(shape)
        q, k = self.rotary(norm(q)), self.rotary(norm(k))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D)
        if backend == "flex":
            y = _flex_fn(x.device)(q, k, v, block_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(B, L, -1))


class RowBlock(nn.Module):
    """Transformer block on (B, L, d_i). `unet`: λ-mixing with the (projected) x0 and value mixing."""

    def __init__(self, dim: int, base_dim: int, n_heads: int, hidden: int, unet: bool, value_mix: bool,
                 rope_base: float):
        super().__init__()
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0])) if unet else None
        self.x0_proj = CastedLinear(base_dim, dim) if unet and dim != base_dim else None
        self.attn = RowAttention(dim, n_heads, value_mix=unet and value_mix, rope_base=rope_base)
        self.mlp = MLP(dim, hidden)

    def forward(self, x, x0, ve, mask, backend):
        if self.lambdas is not None:
            if self.x0_proj is not None:
                x0 = self.x0_proj(x0)
            x = self.lambdas[0] * x + self.lambdas[1] * x0
        x = x + self.attn(norm(x), ve, mask, backend)
        return x + self.mlp(norm(x))


class BottleneckMLP(nn.Module):
    """The block at depths where the sequence is one position long: λ-mixing, then x + MLP(norm(x))."""

    def __init__(self, dim: int, base_dim: int, hidden: int):
        super().__init__()
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))
        self.x0_proj = CastedLinear(base_dim, dim) if dim != base_dim else None
        self.mlp = MLP(dim, hidden)

    def forward(self, x, x0, ve, mask, backend):
        if self.x0_proj is not None:
            x0 = self.x0_proj(x0)
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        return x + self.mlp(norm(x))


class PatchMerge(nn.Module):
    """(B, L, d_in) -> (B, L/2, d_out): concatenate adjacent pairs, then a Linear 2·d_in -> d_out."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = CastedLinear(2 * d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        return self.proj(x.reshape(B, L // 2, 2 * D))


class PatchExpand(nn.Module):
    """(B, L, d_in) -> (B, 2L, d_out): a Linear d_in -> 2·d_out, split into a pair."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = CastedLinear(d_in, 2 * d_out)
        self.d_out = d_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return self.proj(x).reshape(B, 2 * L, self.d_out)


class PatchUNet(nn.Module):
    """`forward(input_ids (B, L), doc_ids (B, L), window)` -> normed hidden states (B, L, d);
    `logits(h)` -> fp32 (N, V). Same interface as `ProteinLM`, on rows instead of a packed stream."""

    def __init__(self, cfg: ModelConfig, max_length: int):
        super().__init__()
        if cfg.n_layers < 2 or cfg.n_layers % 2:
            raise ConfigError(f"model.arch=patch_unet needs an even model.n_layers >= 2 (UNet levels; got "
                              f"{cfg.n_layers}): set model.n_layers")
        if cfg.n_extra_layers < 0:
            raise ConfigError(f"model.n_extra_layers={cfg.n_extra_layers} must be >= 0")
        if not _is_pow2(max_length) or max_length < 2:
            up, down = 1 << max(1, (max_length - 1).bit_length()), 1 << max(1, max_length.bit_length() - 1)
            raise ConfigError(f"model.arch=patch_unet needs rows whose length is a power of two (PatchMerge halves "
                              f"it per level); data.max_length={max_length}: set data.max_length to {up} or {down}")
        self.cfg, self.max_length = cfg, max_length
        d, H = cfg.dim, cfg.n_heads
        E = cfg.n_layers // 2
        self.n_levels = E
        self.vector_depth = int(math.log2(max_length))  # depth at which the length reaches 1
        self.n_merges = min(E - 1, self.vector_depth)
        self.hidden_sizes = hidden_sizes(d, E, H)
        size = [self.hidden_sizes[min(i, self.vector_depth)] for i in range(E)]  # width at depth i
        self.level_of = [min(i, self.vector_depth) for i in range(E)]  # resolution level at depth i
        for s in set(size):
            if s % H or (s // H) % 2:
                raise ConfigError(f"patch_unet level width {s} gives head dim {s / H:g}, not an even integer: "
                                  f"change model.n_heads or model.dim")

        def width_cfg(w: int) -> int:
            return mlp_hidden(replace(cfg, dim=w))

        self.embed = nn.Embedding(cfg.vocab_size, d)
        nn.init.normal_(self.embed.weight)
        ve = cfg.value_embeddings
        attn_depths = [i for i in range(E) if i < self.vector_depth]
        # value-embedding tables only where a block uses them (not at bottleneck depths)
        self.encoder_embed = nn.ModuleList([nn.Embedding(cfg.vocab_size, size[i]) for i in attn_depths] if ve else [])
        self.decoder_embed = nn.ModuleList(
            [nn.Embedding(cfg.vocab_size, size[E - 1 - j]) for j in range(E) if E - 1 - j < self.vector_depth]
            if ve else [])
        for t in list(self.encoder_embed) + list(self.decoder_embed):
            nn.init.normal_(t.weight)

        def block(i: int) -> nn.Module:
            if i >= self.vector_depth:
                return BottleneckMLP(size[i], d, width_cfg(size[i]))
            return RowBlock(size[i], d, H, width_cfg(size[i]), unet=True, value_mix=ve, rope_base=cfg.rope_base)

        self.in_proj = CastedLinear(d, size[0]) if size[0] != d else None
        self.out_proj = CastedLinear(size[0], d) if size[0] != d else None
        self.encoder = nn.ModuleList([block(i) for i in range(E)])
        self.merges = nn.ModuleList([PatchMerge(size[i], size[i + 1]) for i in range(self.n_merges)])
        # expands[k] runs before decoder j = k+1 (from depth E-1-k to E-2-k) when the source depth merged
        self.expands = nn.ModuleList([PatchExpand(size[E - j], size[E - 1 - j]) for j in range(1, E)
                                      if E - j <= self.n_merges])
        self.decoder = nn.ModuleList([block(E - 1 - j) for j in range(E)])
        self.skip_weights = nn.Parameter(torch.ones(E))
        self.extra = nn.ModuleList([
            RowBlock(d, d, H, mlp_hidden(cfg), unet=False, value_mix=False, rope_base=cfg.rope_base)
            for _ in range(cfg.n_extra_layers)])
        self.lm_head = LMHead(cfg)
        if cfg.tie_embeddings:
            self.lm_head.decoder.weight = self.embed.weight
        self.attn_backend = "sdpa"

    # ------------------------------------------------------------------ interface shared with ProteinLM
    @property
    def blocks(self) -> list[nn.Module]:
        """Every block (encoder, decoder, extra), e.g. for per-block torch.compile."""
        return list(self.encoder) + list(self.decoder) + list(self.extra)

    def set_attention_backend(self, device: torch.device, max_segment_len: int = 0, window_binds: bool = False,
                              tokens: int = 65536, dtype: torch.dtype = torch.bfloat16) -> str:
        """FlexAttention on CUDA (unless model.attention=sdpa), SDPA elsewhere: the FlashAttention varlen
        kernels do not apply to per-level row masks (the other arguments are ProteinLM's signature)."""
        want = self.cfg.attention
        if want in ("varlen", "fa4"):
            raise ConfigError(f"model.attention={want} does not apply to model.arch=patch_unet (per-level row "
                              "masks): use model.attention=auto, flex or sdpa")
        if want == "flex" and not flex_available(device):
            raise ConfigError(f"model.attention=flex needs CUDA (device is {device}): use model.attention=auto")
        self.attn_backend = "flex" if want == "flex" or (want == "auto" and flex_available(device)) else "sdpa"
        self.attn_reason = "FlexAttention on per-level row masks" if self.attn_backend == "flex" else "SDPA"
        return self.attn_backend

    def num_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)

    def check_length(self, L: int) -> None:
        if not _is_pow2(L) or L < (1 << self.n_merges):
            raise ConfigError(f"patch_unet rows must have a power-of-two length >= {1 << self.n_merges} "
                              f"(got L={L}): pad rows to data.max_length={self.max_length}")

    def make_context(self, doc_ids: torch.Tensor, window: int | torch.Tensor) -> PatchContext:
        """Per-level doc ids, attention masks and expansion gates for `doc_ids` (B, L). Call it outside
        any compiled region and pass the result as `ctx` (as the trainer does for ProteinLM)."""
        if doc_ids.dim() != 2:
            raise ValueError(f"patch_unet takes (B, L) rows; got doc_ids of shape {tuple(doc_ids.shape)}")
        self.check_length(doc_ids.size(1))
        docs = [doc_ids.to(torch.int32)]
        for _ in range(self.n_merges):
            a, b = docs[-1][:, 0::2], docs[-1][:, 1::2]
            docs.append(torch.where((a == b) & (a >= 0), a, torch.full_like(a, -1)))
        masks = [self._mask(dl, window) if lvl < self.vector_depth else None for lvl, dl in enumerate(docs)]
        gates = [(docs[lvl + 1] >= 0).repeat_interleave(2, dim=1).unsqueeze(-1) for lvl in range(self.n_merges)]
        return PatchContext(self.attn_backend, docs, masks, gates)

    def _mask(self, doc: torch.Tensor, window: int | torch.Tensor):
        B, L = doc.shape
        if self.attn_backend == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            win = window if isinstance(window, torch.Tensor) else torch.tensor(int(window), device=doc.device)

            def mask_mod(b, h, q_idx, kv_idx):
                return level_rule(doc[b, q_idx], doc[b, kv_idx], q_idx, kv_idx, win)

            return create_block_mask(mask_mod, B, None, L, L, device=doc.device)
        win = int(window)
        i = torch.arange(L, device=doc.device)
        m = level_rule(doc[:, :, None], doc[:, None, :], i.view(1, L, 1), i.view(1, 1, L), win)
        return m.unsqueeze(1)  # (B, 1, L, L)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor, window: int | torch.Tensor,
                dtype: torch.dtype = torch.float32, ctx: Optional[PatchContext] = None,
                return_layers: bool = False):
        """Hidden states (B, L, d) for rows `input_ids`, `doc_ids` (B, L).

        With return_layers, also returns every block's output in order (encoder depths 0..E-1 at
        their own lengths and widths, decoder depths E-1..0, then the extra layers, all (B, ·, ·)).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"patch_unet takes (B, L) rows; got input_ids of shape {tuple(input_ids.shape)}")
        if ctx is None:
            ctx = self.make_context(doc_ids, window)
        E, backend = self.n_levels, ctx.backend
        x = self.embed(input_ids)
        if self.cfg.token_dropout:
            x = x.masked_fill((input_ids == MASK).unsqueeze(-1), 0.0)
        x = norm(x.to(dtype))
        x0s = [x]  # the normed embedding pooled to every level's length
        for _ in range(self.n_merges):
            x0s.append(_pool(x0s[-1]))
        ve_enc, ve_dec = self._value_embeddings(input_ids, dtype)
        h = self.in_proj(x) if self.in_proj is not None else x
        skips, layers = [], []
        for i, blk in enumerate(self.encoder):
            lvl = self.level_of[i]
            h = blk(h, x0s[lvl], ve_enc[i], ctx.masks[lvl], backend)
            skips.append(h)
            if return_layers:
                layers.append(h)
            if i < self.n_merges:
                h = self.merges[i](h)
        k = 0
        for j, blk in enumerate(self.decoder):
            depth = E - 1 - j
            lvl = self.level_of[depth]
            if j > 0 and depth + 1 <= self.n_merges:
                # a position whose parent straddles documents (or padding) gets nothing from it
                h = self.expands[k](h) * ctx.gates[depth].to(h.dtype)
                k += 1
            h = h + self.skip_weights[j].to(h.dtype) * skips.pop()
            h = blk(h, x0s[lvl], ve_dec[j], ctx.masks[lvl], backend)
            if return_layers:
                layers.append(h)
        if self.out_proj is not None:
            h = self.out_proj(h)
        for blk in self.extra:
            h = blk(h, None, None, ctx.masks[0], backend)
            if return_layers:
                layers.append(h)
        h = norm(h)
        return (h, layers) if return_layers else h

    def _value_embeddings(self, input_ids: torch.Tensor, dtype: torch.dtype):
        """encoder/decoder value embeddings per depth, average-pooled to the depth's length (None where
        unused). Pooled tables are pooled one-hot counts @ table: no B×L×d_i intermediate."""
        E = self.n_levels
        enc, dec = [None] * E, [None] * E
        if not len(self.encoder_embed):
            return enc, dec
        counts: list[torch.Tensor] = []  # one-hot token counts averaged to level 0, 1, 2, ...

        def pooled_counts(lvl: int) -> torch.Tensor:
            if not counts:
                counts.append(F.one_hot(input_ids, self.cfg.vocab_size).to(dtype))
            while len(counts) <= lvl:
                counts.append(_pool(counts[-1]))
            return counts[lvl]

        def lookup(table: nn.Embedding, lvl: int) -> torch.Tensor:
            if lvl == 0:
                return table(input_ids).to(dtype)
            return pooled_counts(lvl) @ table.weight.to(dtype)

        for i, table in enumerate(self.encoder_embed):  # depths 0.. (the attention depths, in order)
            enc[i] = lookup(table, self.level_of[i])
        js = [j for j in range(E) if E - 1 - j < self.vector_depth]
        for j, table in zip(js, self.decoder_embed):
            dec[j] = lookup(table, self.level_of[E - 1 - j])
        return enc, dec


__all__ = ["PatchUNet", "PatchContext", "hidden_sizes"]
