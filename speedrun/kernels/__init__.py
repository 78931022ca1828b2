"""Hand-picked kernels for the hot spots of a training step, each a `torch.library` custom op.

Why custom ops: torch.compile traces through a custom op with a registered fake (shape-only)
implementation and an autograd formula, so a block that calls one still compiles into one graph
(no graph break, no eager island between Inductor kernels), while the op itself runs our kernel.

* `fa4` — FlashAttention-4 (CuTe DSL) variable-length attention, forward and backward, for Hopper and
  Blackwell; `available()` / `probe()` tell the caller whether to use it (it falls back otherwise).
* `rope` — QK RMS-norm + half-split RoPE for q and k (`qk_norm_rope`), and the same fused with the
  value-embedding mix from the QKV GEMM's output (`qkv_norm_rope_mix`), as hand-written Triton kernels,
  forward and backward (the eager formula where Triton cannot run).

Nothing here is imported by the model yet; the attention and model modules call these ops when they
are wired in. Importing this package never imports flash_attn or triton.
"""
