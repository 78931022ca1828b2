"""The protein language models: the reference UNet transformer and a plain ESM-style stack.

UNet (RECIPE.md §4, `model.arch=unet`), d=768 / 24 layers / 6 heads / MLP 8/3 -> 133,065,357 parameters:

* input: token embedding (N(0,1)), token dropout (the `<mask>` row is zeroed), RMS norm -> x and x0;
* L/2 value-embedding tables; encoder layer i uses table i, decoder layer i uses table L/2-1-i;
* block: x <- λ0·x + λ1·x0 (λ learnable, init [1, 0]); x += Attn(norm(x), ve); x += MLP(norm(x));
* attention: separate q/k/v/o (d×d, bias-free), v <- λv0·v + λv1·ve (init [0.5, 0.5]), QK-norm,
  half-split RoPE (base 10000), bidirectional document mask with a sliding window, zero-init o;
* MLP: down(relu(up(x))²), hidden ceil(r·d/256)·256, zero-init down;
* skips: encoder outputs are pushed on a stack; before decoder layer i, x += w_i · pop() (w init 1);
* head: norm -> dense d×d -> exact GELU -> decoder d×V + bias -> c·tanh(z/c) (c = 32), optionally
  tied to the token embedding; or (`model.head=linear`) the Dec-2024 zero-init d×V matrix.

`transformer` is the same stack without λ mixing, value embeddings or skips.

Norms have no weights (F.rms_norm). Linear weights stay fp32 and are cast to the activation dtype
at call time, so bf16 training keeps fp32 master weights; logits are returned in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import AttnContext, attend, build_context, choose
from ..config import ModelConfig, mlp_hidden
from ..fp8 import fp8_linear
from ..vocab import MASK


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def linear(x: torch.Tensor, weight: torch.Tensor, fp8: bool = False) -> torch.Tensor:
    """x · weightᵀ with the fp32 weight cast to the activation dtype, or as an FP8 GEMM (speedrun/fp8.py)
    when `fp8` is set and the activations are bf16."""
    if fp8 and x.dtype == torch.bfloat16:
        return fp8_linear(x, weight)
    return F.linear(x, weight.to(x.dtype))


class CastedLinear(nn.Linear):
    """Bias-free linear layer whose fp32 weight is cast to the input's dtype at call time; `fp8` (set
    by `ProteinLM.enable_fp8` on the hidden matrices) switches it to FP8 GEMMs under bf16."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.fp8 = False
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.fp8)


class Rotary(nn.Module):
    """Half-split rotary embedding: dims [0, D/2) and [D/2, D) rotate as pairs; positions 0..T-1 of the
    packed stream (RoPE is relative, so stream positions act like positions within each document).
    `forward` builds the cos/sin tables once per model forward and every layer reuses them (computing
    them inside each layer repeated the transcendentals in every layer, forward and backward)."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.register_buffer("inv_freq", base ** (-torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)

    def forward(self, T: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin tables of shape (T, 1, D/2) in `dtype`."""
        t = torch.arange(T, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        return freqs.cos()[:, None, :].to(dtype), freqs.sin()[:, None, :].to(dtype)


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate x (T, H, D) by the tables of `Rotary.forward`."""
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, value_mix: bool):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.q, self.k, self.v = CastedLinear(dim, dim), CastedLinear(dim, dim), CastedLinear(dim, dim)
        self.o = CastedLinear(dim, dim, zero_init=True)
        self.lambdas = nn.Parameter(torch.tensor([0.5, 0.5])) if value_mix else None
        self.fused_rope = False  # hand-written Triton kernels for QK-norm + RoPE (+ the value mix): speedrun/kernels

    def forward(self, x: torch.Tensor, ve: Optional[torch.Tensor], ctx: AttnContext,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        T = x.size(0)
        shape = (T, self.n_heads, self.head_dim)
        # one GEMM for q, k and v (the three weights stay separate parameters, as Muon wants them)
        w = torch.cat((self.q.weight, self.k.weight, self.v.weight))
        qkv = linear(x, w, self.q.fp8).view(T, 3, *shape[1:])
        if self.fused_rope:
            from ..kernels.rope import qk_norm_rope, qkv_norm_rope_mix

            if self.lambdas is not None and ve is not None:
                q, k, v = qkv_norm_rope_mix(qkv, ve.view(shape), self.lambdas, rope)
            else:
                q, k, v = qkv.unbind(1)
                q, k = qk_norm_rope(q, k, rope)
        else:
            q, k, v = qkv.unbind(1)
            if self.lambdas is not None and ve is not None:
                v = self.lambdas[0] * v + self.lambdas[1] * ve.view(shape)
            q, k = apply_rotary(norm(q), rope), apply_rotary(norm(k), rope)
        y = attend(q, k, v, ctx)
        return self.o(y.reshape(T, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = CastedLinear(dim, hidden)
        self.down = CastedLinear(hidden, dim, zero_init=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, unet: bool):
        super().__init__()
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0])) if unet else None
        self.attn = Attention(cfg.dim, cfg.n_heads, value_mix=unet and cfg.value_embeddings)
        self.mlp = MLP(cfg.dim, mlp_hidden(cfg))

    def forward(self, x, x0, ve, ctx, rope):
        if self.lambdas is not None:
            x = self.lambdas[0] * x + self.lambdas[1] * x0
        x = x + self.attn(norm(x), ve, ctx, rope)
        return x + self.mlp(norm(x))


class LMHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.soft_cap = cfg.head, cfg.soft_cap
        if cfg.head == "mlp":
            self.dense = CastedLinear(cfg.dim, cfg.dim)
            self.decoder = CastedLinear(cfg.dim, cfg.vocab_size)
            self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        else:
            self.decoder = CastedLinear(cfg.dim, cfg.vocab_size, zero_init=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "mlp":
            z = self.decoder(F.gelu(self.dense(h))).float() + self.bias
        else:
            z = self.decoder(h).float()
        if self.soft_cap > 0:
            z = self.soft_cap * torch.tanh(z / self.soft_cap)
        return z


class ProteinLM(nn.Module):
    """`forward(input_ids, doc_ids, window)` -> final normed hidden states (T, d); `logits(h)` -> (N, V)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.unet = cfg.arch == "unet"
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        nn.init.normal_(self.embed.weight)
        self.rotary = Rotary(cfg.dim // cfg.n_heads, cfg.rope_base)
        half = cfg.n_layers // 2
        self.value_embeds = nn.ModuleList(
            [nn.Embedding(cfg.vocab_size, cfg.dim) for _ in range(half)]
            if self.unet and cfg.value_embeddings else [])
        for ve in self.value_embeds:
            nn.init.normal_(ve.weight)
        self.blocks = nn.ModuleList([Block(cfg, self.unet) for _ in range(cfg.n_layers)])
        self.skip_weights = nn.Parameter(torch.ones(half)) if self.unet else None
        self.lm_head = LMHead(cfg)
        if cfg.tie_embeddings:
            self.lm_head.decoder.weight = self.embed.weight
        self.attn_backend = "sdpa"
        self.max_segment_len = 0

    def set_attention_backend(self, device: torch.device, max_segment_len: int = 0, window_binds: bool = False,
                              tokens: int = 65536, dtype: torch.dtype = torch.bfloat16) -> str:
        """Choose the attention back-end (speedrun.attention.choose; `self.attn_reason` says why).
        `max_segment_len` > 0 promises that no document of a packed batch is longer, which allows the
        FlashAttention varlen kernels on CUDA (the trailing padding is cut into pieces that fit);
        `window_binds`: the sliding window can be shorter than a document."""
        head_dim = self.cfg.dim // self.cfg.n_heads
        self.attn_backend, self.attn_reason = choose(self.cfg.attention, device, n_heads=self.cfg.n_heads,
                                                     head_dim=head_dim, dtype=dtype, bound=max_segment_len,
                                                     window_binds=window_binds, tokens=tokens)
        self.max_segment_len = max_segment_len
        return self.attn_backend

    def make_context(self, doc_ids: torch.Tensor, window: int | torch.Tensor) -> AttnContext:
        """Attention masks for one forward, built outside any compiled region."""
        return build_context(doc_ids, window, self.attn_backend, self.max_segment_len)

    def enable_fp8(self, on: bool = True) -> int:
        """Run the blocks' attention and MLP matrices as FP8 GEMMs under bf16 (speedrun/fp8.py); the
        embeddings, value embeddings and head stay bf16. Returns the number of layers switched."""
        n = 0
        for block in self.blocks:
            for lin in (block.attn.q, block.attn.k, block.attn.v, block.attn.o, block.mlp.up, block.mlp.down):
                if lin.in_features % 16 or lin.out_features % 16:
                    raise ValueError(f"hardware.fp8 needs widths that are multiples of 16, got a "
                                     f"{lin.in_features}x{lin.out_features} matrix: choose model.dim accordingly")
                lin.fp8 = on
                n += 1
        return n

    def enable_fused_rope(self, on: bool = True) -> None:
        """QK-norm + RoPE (and the value-embedding mix) as hand-written Triton kernels (speedrun/kernels/rope.py:
        one pass forward, one backward that writes the QKV gradient itself); hardware.triton_rope."""
        for block in self.blocks:
            block.attn.fused_rope = on

    def num_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def embed_tokens(self, input_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = self.embed(input_ids)
        if self.cfg.token_dropout:
            x = x.masked_fill((input_ids == MASK).unsqueeze(-1), 0.0)
        return norm(x.to(dtype))

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor, window: int | torch.Tensor,
                dtype: torch.dtype = torch.float32, ctx: Optional[AttnContext] = None,
                return_layers: bool = False):
        """Hidden states for a packed stream. `input_ids`, `doc_ids`: (T,) tensors.

        With return_layers, also returns the list of every block's output (for probes/embeddings).
        """
        if ctx is None:
            ctx = self.make_context(doc_ids, window)
        x0 = self.embed_tokens(input_ids, dtype)
        # the first block gets a copy: were x and x0 the same tensor there, torch.compile would guard on
        # the aliasing and compile the block twice (one graph for layer 0, one for the rest)
        x = x0.clone()
        rope = self.rotary(x.size(0), dtype)
        ves = [ve(input_ids).to(dtype) for ve in self.value_embeds]
        layers = []
        if self.unet:
            half = self.cfg.n_layers // 2
            ves = ves + ves[::-1] if ves else [None] * self.cfg.n_layers
            skips = []
            for i, block in enumerate(self.blocks):
                if i >= half:
                    x = x + self.skip_weights[i - half].to(dtype) * skips.pop()
                x = block(x, x0, ves[i], ctx, rope)
                if i < half:
                    skips.append(x)
                if return_layers:
                    layers.append(x)
        else:
            for block in self.blocks:
                x = block(x, x0, None, ctx, rope)
                if return_layers:
                    layers.append(x)
        h = norm(x)
        return (h, layers) if return_layers else h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)


def count_params_formula(cfg: ModelConfig) -> int:
    """Closed-form parameter count (RECIPE.md §4.3), used by tests and dry runs."""
    d, L, V, h = cfg.dim, cfg.n_layers, cfg.vocab_size, mlp_hidden(cfg)
    unet = cfg.arch == "unet"
    per_block = 4 * d * d + 2 * d * h + (2 if unet else 0) + (2 if unet and cfg.value_embeddings else 0)
    n = V * d + L * per_block
    if unet:
        n += L // 2
        if cfg.value_embeddings:
            n += (L // 2) * V * d
    if cfg.head == "mlp":
        n += d * d + V + (0 if cfg.tie_embeddings else d * V)
    else:
        n += d * V
    return n


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in matrix multiplies per token (excludes embedding look-ups)."""
    d, L, V, h = cfg.dim, cfg.n_layers, cfg.vocab_size, mlp_hidden(cfg)
    return L * (4 * d * d + 2 * d * h) + (d * d + d * V if cfg.head == "mlp" else d * V)


def flops_per_token(cfg: ModelConfig, mean_context: float, head_fraction: float = 1.0) -> float:
    """Training FLOPs per token: 6 x matmul params (+ the head only on `head_fraction` of tokens)
    plus attention 12 x L x d x mean_context (QK^T and PV, forward and backward)."""
    d, L, V = cfg.dim, cfg.n_layers, cfg.vocab_size
    head = (d * d + d * V) if cfg.head == "mlp" else d * V
    body = matmul_params(cfg) - head
    return 6 * (body + head * head_fraction) + 12 * L * d * mean_context


def estimate_memory_gib(cfg: ModelConfig, micro_batch_tokens: int, precision: str) -> Optional[float]:
    """Rough training memory on one GPU: fp32 weights + gradients + optimizer state (~12 bytes per
    parameter), plus saved activations of ~35 bytes per token, layer and width in bf16 (twice that in
    fp32). Calibrated on an H200 with the 133M UNet: 41.0 GiB at 65,536 tokens, 79.6 at 131,072
    (predicted 40.9 and 80.3). None for the Patch-UNet, whose levels shrink the sequence."""
    if cfg.arch == "patch_unet":
        return None
    params = count_params_formula(cfg)
    act = micro_batch_tokens * cfg.n_layers * cfg.dim * 35.0 * (2 if precision == "fp32" else 1)
    return (params * 12 + act) / 2**30


__all__ = ["ProteinLM", "count_params_formula", "estimate_memory_gib", "flops_per_token", "matmul_params", "norm"]
