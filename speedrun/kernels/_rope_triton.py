"""The Triton kernels behind `speedrun.kernels.rope` (imported only where triton is importable).

One program normalises and rotates BLOCK_R rows (a row = one token of one head, D values) of q or k:
grid axis 1 picks the tensor, so q and k take one launch (the `qkv` pair adds a third index for the
value mix, and its backward writes into one (T, 3, H, D) gradient). The row is loaded once as its two
halves [0, D/2) and [D/2, D), everything is computed in fp32 and stored once in the output dtype.
Inputs may be strided views (the q and k slices of the fused QKV GEMM's output); the last dimension
must be contiguous. Outputs are contiguous (T, H, D). Offsets are int64 (T x stride can pass 2^31 at
large micro-batches).

Forward, per row x (D values), r = rsqrt(mean(x^2) + eps), n = x r, (c, s) = the table row of its token:
    y1 = n1 c + n2 s,   y2 = n2 c - n1 s
Backward, from dy: dn1 = dy1 c - dy2 s, dn2 = dy1 s + dy2 c (the transposed rotation), then the
RMS-norm backward dx = r (dn - n mean(dn n)). x is re-read rather than saved as n (the saved input is
a view of the QKV output, which the value-mix backward keeps anyway), so the op saves no activations.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_STRIDES = ("sq_t", "sq_h", "sk_t", "sk_h", "sc_t", "gq_t", "gq_h", "gk_t", "gk_h")


@triton.jit
def _rows(pid, n_rows, H, HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < n_rows)[:, None] & (cols < HALF)[None, :]
    t = (rows // H).to(tl.int64)
    h = (rows % H).to(tl.int64)
    return rows.to(tl.int64), cols, mask, t, h


@triton.jit
def _load_row(X, t, h, s_t, s_h, cols, mask, HALF: tl.constexpr):
    ptr = X + (t * s_t + h * s_h)[:, None] + cols[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def _normed(x1, x2, eps, HALF: tl.constexpr):
    r = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)
    return x1 * r[:, None], x2 * r[:, None], r


@triton.jit
def _table(Cos, Sin, t, sc_t, cols, mask):
    off = (t * sc_t)[:, None] + cols[None, :]
    c = tl.load(Cos + off, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(Sin + off, mask=mask, other=0.0).to(tl.float32)
    return c, s


@triton.jit
def _store_row(Y, rows, cols, mask, y1, y2, HALF: tl.constexpr):
    """Store into a contiguous (T, H, D) tensor (row = t H + h)."""
    _store_at(Y, rows, 0, 2 * HALF, 0, cols, mask, y1, y2, HALF)


@triton.jit
def _store_at(Y, t, h, s_t, s_h, cols, mask, y1, y2, HALF: tl.constexpr):
    ptr = Y + (t * s_t + h * s_h)[:, None] + cols[None, :]
    tl.store(ptr, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(ptr + HALF, y2.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_rope_row(x1, x2, c, s, eps, HALF: tl.constexpr):
    n1, n2, _ = _normed(x1, x2, eps, HALF)
    return n1 * c + n2 * s, n2 * c - n1 * s


@triton.jit
def _norm_rope_row_grad(x1, x2, g1, g2, c, s, eps, HALF: tl.constexpr):
    n1, n2, r = _normed(x1, x2, eps, HALF)
    dn1 = g1 * c - g2 * s
    dn2 = g1 * s + g2 * c
    dot = (tl.sum(dn1 * n1, 1) + tl.sum(dn2 * n2, 1)) / (2 * HALF)
    return r[:, None] * (dn1 - n1 * dot[:, None]), r[:, None] * (dn2 - n2 * dot[:, None])


@triton.jit
def triton_qk_norm_rope_fwd(Xq, Xk, Yq, Yk, Cos, Sin, n_rows, H, sq_t, sq_h, sk_t, sk_h, sc_t, eps,
                            HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    rows, cols, mask, t, h = _rows(tl.program_id(0), n_rows, H, HALF, BLOCK_R, BLOCK_H)
    if tl.program_id(1) == 0:
        x1, x2 = _load_row(Xq, t, h, sq_t, sq_h, cols, mask, HALF)
    else:
        x1, x2 = _load_row(Xk, t, h, sk_t, sk_h, cols, mask, HALF)
    c, s = _table(Cos, Sin, t, sc_t, cols, mask)
    y1, y2 = _norm_rope_row(x1, x2, c, s, eps, HALF)
    if tl.program_id(1) == 0:
        _store_row(Yq, rows, cols, mask, y1, y2, HALF)
    else:
        _store_row(Yk, rows, cols, mask, y1, y2, HALF)


@triton.jit
def triton_qk_norm_rope_bwd(Xq, Xk, Gq, Gk, DXq, DXk, Cos, Sin, n_rows, H, sq_t, sq_h, sk_t, sk_h, sc_t,
                            gq_t, gq_h, gk_t, gk_h, eps,
                            HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    rows, cols, mask, t, h = _rows(tl.program_id(0), n_rows, H, HALF, BLOCK_R, BLOCK_H)
    if tl.program_id(1) == 0:
        x1, x2 = _load_row(Xq, t, h, sq_t, sq_h, cols, mask, HALF)
        g1, g2 = _load_row(Gq, t, h, gq_t, gq_h, cols, mask, HALF)
    else:
        x1, x2 = _load_row(Xk, t, h, sk_t, sk_h, cols, mask, HALF)
        g1, g2 = _load_row(Gk, t, h, gk_t, gk_h, cols, mask, HALF)
    c, s = _table(Cos, Sin, t, sc_t, cols, mask)
    dx1, dx2 = _norm_rope_row_grad(x1, x2, g1, g2, c, s, eps, HALF)
    if tl.program_id(1) == 0:
        _store_row(DXq, rows, cols, mask, dx1, dx2, HALF)
    else:
        _store_row(DXk, rows, cols, mask, dx1, dx2, HALF)


@triton.jit
def triton_qkv_norm_rope_mix_fwd(QKV, VE, Lam, Yq, Yk, Yv, Cos, Sin, n_rows, H, s_t, s_slot, s_h, sc_t, eps,
                                 HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """Slots 0, 1 (grid axis 1) of the (T, 3, H, D) QKV output: norm + RoPE; slot 2: v = l0 v + l1 ve.
    VE and the outputs are contiguous (T, H, D); Lam holds (l0, l1) in fp32."""
    rows, cols, mask, t, h = _rows(tl.program_id(0), n_rows, H, HALF, BLOCK_R, BLOCK_H)
    which = tl.program_id(1)
    x1, x2 = _load_row(QKV + which * s_slot, t, h, s_t, s_h, cols, mask, HALF)
    if which == 2:
        e1, e2 = _load_row(VE, rows, 0, 2 * HALF, 0, cols, mask, HALF)
        l0 = tl.load(Lam).to(tl.float32)
        l1 = tl.load(Lam + 1).to(tl.float32)
        _store_row(Yv, rows, cols, mask, l0 * x1 + l1 * e1, l0 * x2 + l1 * e2, HALF)
    else:
        c, s = _table(Cos, Sin, t, sc_t, cols, mask)
        y1, y2 = _norm_rope_row(x1, x2, c, s, eps, HALF)
        if which == 0:
            _store_row(Yq, rows, cols, mask, y1, y2, HALF)
        else:
            _store_row(Yk, rows, cols, mask, y1, y2, HALF)


@triton.jit
def triton_qkv_norm_rope_mix_bwd(QKV, VE, Lam, Gq, Gk, Gv, DQKV, DVE, Partial, Cos, Sin, n_rows, H, s_t, s_slot,
                                 s_h, sc_t, eps,
                                 HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """Writes dq, dk, dv straight into the (T, 3, H, D) gradient of the QKV output (DQKV, contiguous), dve
    into DVE, and per program (sum g_v v, sum g_v ve) into Partial[pid, 0:2] (the lambdas' gradient is
    their sum over programs: deterministic, no atomics). G*, VE: contiguous (T, H, D)."""
    pid = tl.program_id(0)
    rows, cols, mask, t, h = _rows(pid, n_rows, H, HALF, BLOCK_R, BLOCK_H)
    which = tl.program_id(1)
    x1, x2 = _load_row(QKV + which * s_slot, t, h, s_t, s_h, cols, mask, HALF)
    d_t = 3 * H * 2 * HALF  # DQKV strides (contiguous)
    if which == 2:
        g1, g2 = _load_row(Gv, rows, 0, 2 * HALF, 0, cols, mask, HALF)
        e1, e2 = _load_row(VE, rows, 0, 2 * HALF, 0, cols, mask, HALF)
        l0 = tl.load(Lam).to(tl.float32)
        l1 = tl.load(Lam + 1).to(tl.float32)
        _store_at(DQKV + 2 * H * 2 * HALF, t, h, d_t, 2 * HALF, cols, mask, l0 * g1, l0 * g2, HALF)
        _store_row(DVE, rows, cols, mask, l1 * g1, l1 * g2, HALF)
        tl.store(Partial + 2 * pid, tl.sum(tl.sum(g1 * x1 + g2 * x2, 1), 0))
        tl.store(Partial + 2 * pid + 1, tl.sum(tl.sum(g1 * e1 + g2 * e2, 1), 0))
    else:
        if which == 0:
            g1, g2 = _load_row(Gq, rows, 0, 2 * HALF, 0, cols, mask, HALF)
        else:
            g1, g2 = _load_row(Gk, rows, 0, 2 * HALF, 0, cols, mask, HALF)
        c, s = _table(Cos, Sin, t, sc_t, cols, mask)
        dx1, dx2 = _norm_rope_row_grad(x1, x2, g1, g2, c, s, eps, HALF)
        _store_at(DQKV + which * H * 2 * HALF, t, h, d_t, 2 * HALF, cols, mask, dx1, dx2, HALF)


TILE = 1024  # values per half-row tile and program (1,024: 16 rows of D = 128; 72 / 116 registers on sm90)


def _launch_shape(n_rows: int, half: int) -> tuple[tuple[int, int], int, int, int]:
    """(grid, BLOCK_R, BLOCK_H, num_warps): BLOCK_R rows of one tensor per program, TILE values a half."""
    block_h = triton.next_power_of_2(half)
    block_r = max(1, min(64, TILE // block_h))
    return (triton.cdiv(n_rows, block_r), 2), block_r, block_h, 4


def forward(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised, rotated q and k (contiguous, in their dtype). cos/sin: (T, D/2) with unit last stride."""
    T, H, D = q.shape
    yq, yk = q.new_empty(q.shape), k.new_empty(k.shape)
    if T * H == 0:
        return yq, yk
    grid, block_r, block_h, warps = _launch_shape(T * H, D // 2)
    triton_qk_norm_rope_fwd[grid](q, k, yq, yk, cos, sin, T * H, H, q.stride(0), q.stride(1), k.stride(0),
                                  k.stride(1), cos.stride(0), eps, HALF=D // 2, BLOCK_R=block_r,
                                  BLOCK_H=block_h, num_warps=warps)
    return yq, yk


def backward(q: torch.Tensor, k: torch.Tensor, gq: torch.Tensor, gk: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients with respect to q and k (contiguous) from those of the outputs."""
    T, H, D = q.shape
    dq, dk = q.new_empty(q.shape), k.new_empty(k.shape)
    if T * H == 0:
        return dq, dk
    grid, block_r, block_h, warps = _launch_shape(T * H, D // 2)
    triton_qk_norm_rope_bwd[grid](q, k, gq, gk, dq, dk, cos, sin, T * H, H, q.stride(0), q.stride(1),
                                  k.stride(0), k.stride(1), cos.stride(0), gq.stride(0), gq.stride(1),
                                  gk.stride(0), gk.stride(1), eps, HALF=D // 2, BLOCK_R=block_r,
                                  BLOCK_H=block_h, num_warps=warps)
    return dq, dk


def mix_forward(qkv: torch.Tensor, ve: torch.Tensor, lambdas: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k (normalised, rotated) and the mixed v from the (T, 3, H, D) QKV output; contiguous."""
    T, _, H, D = qkv.shape
    yq, yk, yv = (qkv.new_empty(T, H, D) for _ in range(3))
    if T * H == 0:
        return yq, yk, yv
    grid, block_r, block_h, warps = _launch_shape(T * H, D // 2)
    triton_qkv_norm_rope_mix_fwd[(grid[0], 3)](
        qkv, ve, lambdas, yq, yk, yv, cos, sin, T * H, H, qkv.stride(0), qkv.stride(1), qkv.stride(2),
        cos.stride(0), eps, HALF=D // 2, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=warps)
    return yq, yk, yv


def mix_backward(qkv: torch.Tensor, ve: torch.Tensor, lambdas: torch.Tensor, gq: torch.Tensor, gk: torch.Tensor,
                 gv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d qkv (T, 3, H, D), d ve (T, H, D), d lambdas (2,) fp32)."""
    T, _, H, D = qkv.shape
    dqkv, dve = qkv.new_empty(T, 3, H, D), ve.new_empty(T, H, D)
    grid, block_r, block_h, warps = _launch_shape(T * H, D // 2)
    partial = torch.zeros(max(1, grid[0]), 2, dtype=torch.float32, device=qkv.device)
    if T * H > 0:
        triton_qkv_norm_rope_mix_bwd[(grid[0], 3)](
            qkv, ve, lambdas, gq, gk, gv, dqkv, dve, partial, cos, sin, T * H, H, qkv.stride(0), qkv.stride(1),
            qkv.stride(2), cos.stride(0), eps, HALF=D // 2, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=warps)
    return dqkv, dve, partial.sum(0).to(lambdas.dtype)


def compile_for(arch: int = 90, dtype: str = "bf16", head_dim: int = 128) -> dict[str, object]:
    """Compile every kernel ahead of time for `arch` (e.g. 90: H100/H200) without a GPU, through the
    ptxas that ships with triton: catches what the interpreter lets through (types, layouts, register
    allocation). Pointers and strides are taken 16-divisible, as the JIT specialises them at run time
    for the model's shapes (D = 128, strides 128, 768 and 2,304). Needs a process without
    TRITON_INTERPRET (the decorators then build JIT functions)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    half = head_dim // 2
    _, block_r, block_h, warps = _launch_shape(1, half)
    fp32_pointers = {"Lam", "Partial"}
    pointers = {"Xq", "Xk", "Yq", "Yk", "Yv", "Gq", "Gk", "Gv", "DXq", "DXk", "Cos", "Sin", "QKV", "VE", "DQKV",
                "DVE"}
    strides = {*_STRIDES, "s_t", "s_slot", "s_h"}
    out = {}
    for kernel in (triton_qk_norm_rope_fwd, triton_qk_norm_rope_bwd, triton_qkv_norm_rope_mix_fwd,
                   triton_qkv_norm_rope_mix_bwd):
        signature = {n: ("*fp32" if n in fp32_pointers else "*" + dtype if n in pointers
                         else "i32" if n in strides or n in ("n_rows", "H") else "fp32" if n == "eps"
                         else "constexpr") for n in kernel.arg_names}
        aligned = pointers | fp32_pointers | (strides if head_dim % 16 == 0 else set())
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if n in aligned}
        src = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                        constexprs={"HALF": half, "BLOCK_R": block_r, "BLOCK_H": block_h})
        out[kernel.__name__] = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    return out
