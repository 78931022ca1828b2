"""speedrun.kernels: the FA4 custom op's registration, window mapping and fallback (CPU), the Triton
QK-norm + RoPE kernel under Triton's interpreter (skipped without triton), its sm90 compile, and FA4
against FA2 on a GPU (skipped without CUDA).

Interpreter tests: PYTHONPATH=$PWD:/work/.triton-site TRITON_INTERPRET=1 pytest tests/test_kernels.py
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

from speedrun.kernels import fa4, rope
from speedrun.models.unet import Rotary, apply_rotary, norm

try:
    import triton  # noqa: F401

    TRITON = True
except Exception:  # not installed (CI), or broken
    TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not (TRITON and INTERPRET), reason="needs triton and TRITON_INTERPRET=1 (PYTHONPATH=...:/work/.triton-site)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def fresh_fa4(monkeypatch):
    """fa4 with empty caches (import result, probe results, warnings already given)."""
    monkeypatch.setattr(fa4, "_interface", None)
    monkeypatch.setattr(fa4, "_import_error", None)
    monkeypatch.setattr(fa4, "_probed", {})
    monkeypatch.setattr(fa4, "_warned", set())
    return fa4


def _packed(T=80, H=2, D=16, dtype=torch.float32, seed=0):
    """q, k, v, dout and offsets: documents 20, 0 (empty slot), 25, 1, 6 tokens, then padding in pieces."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(T, H, D, generator=g).to(dtype) for _ in range(4))
    cu = torch.tensor([0, 20, 20, 45, 46, 52, 68, T], dtype=torch.int32)
    return q, k, v, dout, cu


def _grads(fn, q, k, v, dout):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves, dout))


# ----------------------------------------------------------------------------------------------------
# FA4: CPU


def test_available_says_why_not_on_cpu():
    ok, why = fa4.available("cpu")
    assert not ok and "CUDA" in why


def test_window_maps_to_fa_window_size():
    assert fa4.window_bounds(-1, 1024) == (None, None)
    assert fa4.window_bounds(256, 1024) == (255, 255)  # |q - k| < 256  <=>  q - 255 <= k <= q + 255
    assert fa4.window_bounds(1, 1024) == (0, 0)
    assert fa4.window_bounds(1024, 1024) == (None, None)  # cannot bind: the kernel without a window
    with pytest.raises(ValueError):
        fa4.window_bounds(0, 1024)


@pytest.mark.parametrize("window", [-1, 5])
def test_op_on_cpu_matches_the_reference_and_compiles_without_a_break(window):
    from torch._dynamo.testing import CompileCounterWithBackend

    q, k, v, dout, cu = _packed()
    want = _grads(lambda *t: fa4.reference_varlen(*t, cu, window)[0], q, k, v, dout)
    got = _grads(lambda *t: fa4.fa4_varlen(*t, cu, 32, window), q, k, v, dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.library.opcheck(torch.ops.speedrun.fa4_varlen_fwd, (q, k, v, cu, 32, torch.tensor(window), 0.25))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda a, b, c: fa4.fa4_varlen(a * 1.0, b, c, cu, 32, window), backend=counter,
                             fullgraph=True)
    for a, b in zip(_grads(compiled, q, k, v, dout), got):
        torch.testing.assert_close(a, b)
    assert counter.frame_count == 1


def test_a_window_tensor_changes_without_recompiling():
    """The sliding window grows during training: as a 0-d CPU tensor it is an input, not a guard."""
    from torch._dynamo.testing import CompileCounterWithBackend

    q, k, v, dout, cu = _packed()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda a, b, c, w: fa4.fa4_varlen(a, b, c, cu, 32, w), backend=counter, fullgraph=True)
    for window in (3, 9, 31, 64):
        got = _grads(lambda *t: compiled(*t, torch.tensor(window)), q, k, v, dout)
        want = _grads(lambda *t: fa4.reference_varlen(*t, cu, window)[0], q, k, v, dout)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1
    with pytest.raises(ValueError, match="on the CPU"):
        fa4.fa4_varlen(q, k, v, cu, 32, torch.tensor([3, 4]))


def _reference_interface(calls: list) -> types.SimpleNamespace:
    """A stand-in for flash_attn.cute.interface on the CPU with FA's window semantics (key k kept for
    query q when q - left <= k <= q + right), recording its arguments."""
    def keep(s, e, left, right):
        i = torch.arange(e - s)
        d = i[None, :] - i[:, None]  # k - q
        return (d >= -(left if left is not None else 10 ** 9)) & (d <= (right if right is not None else 10 ** 9))

    def dense(q, k, v, cu, scale, left, right):
        out, lse = torch.zeros_like(q), torch.full((q.size(1), q.size(0)), -math.inf)
        b = cu.tolist()
        for s, e in zip(b[:-1], b[1:]):
            if e > s:
                sc = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) * scale
                sc = sc.masked_fill(~keep(s, e, left, right), -math.inf)
                out[s:e] = torch.einsum("hqk,khd->qhd", sc.softmax(-1), v[s:e])
                lse[:, s:e] = sc.logsumexp(-1)
        return out, lse

    def fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size,
            return_lse):
        calls.append(("fwd", window_size, softmax_scale, max_seqlen_q, causal))
        return dense(q, k, v, cu_seqlens_q, softmax_scale, *window_size)

    def bwd(q, k, v, out, dout, lse, softmax_scale, causal, softcap, window_size_left, window_size_right,
            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, deterministic):
        # no autograd inside a custom op: the closed form, for the symmetric windows the op passes
        calls.append(("bwd", (window_size_left, window_size_right), softmax_scale, max_seqlen_q, causal))
        assert window_size_left == window_size_right
        window = -1 if window_size_left is None else window_size_left + 1
        return fa4.reference_varlen_grads(dout, q, k, v, cu_seqlens_q, window, softmax_scale)

    return types.SimpleNamespace(flash_attn_varlen_func=fwd, _flash_attn_bwd=bwd)


@pytest.mark.parametrize("window", [-1, 1, 7, 64])
def test_fa4_call_path_passes_fa_window_semantics(fresh_fa4, monkeypatch, window):
    """Through the FA4 branch of the op (with a CPU stand-in for FA4): |q - k| < window."""
    calls: list = []
    monkeypatch.setattr(fa4, "_interface", _reference_interface(calls))
    monkeypatch.setattr(fa4, "_on_fa4", lambda t: True)
    q, k, v, dout, cu = _packed()
    got = _grads(lambda *t: fa4.fa4_varlen(*t, cu, 32, window), q, k, v, dout)
    want = _grads(lambda *t: fa4.reference_varlen(*t, cu, window)[0], q, k, v, dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    w = (None, None) if window < 0 or window >= 32 else (window - 1, window - 1)
    assert calls == [("fwd", w, 0.25, 32, False), ("bwd", w, 0.25, 32, False)]


def test_import_failure_falls_back_with_one_warning(fresh_fa4, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # `import flash_attn...` raises ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.warns(RuntimeWarning, match="cannot import flash_attn.cute") as record:
        ok, why = fa4.probe("cuda", 6, 128)
        ok2, _ = fa4.probe("cuda", 6, 128)
        fa4.probe("cuda", 6, 64)  # another shape, the same reason: no second warning
    assert not ok and not ok2 and "flash-attn-4==" in why
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    q, k, v, _, cu = _packed()
    monkeypatch.setattr(fa4, "_on_fa4", lambda t: True)
    with pytest.raises(fa4.FA4Unavailable, match="cannot import"):
        fa4.fa4_varlen(q, k, v, cu, 32)


def test_failure_on_first_call_falls_back_with_one_warning(fresh_fa4, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("cute DSL: ptxas failed")

    broken_fa4 = types.SimpleNamespace(flash_attn_varlen_func=broken, _flash_attn_bwd=broken)
    monkeypatch.setattr(fa4, "_interface", broken_fa4)
    monkeypatch.setattr(fa4, "available", lambda device: (True, "pretend"))
    monkeypatch.setattr(fa4, "_on_fa4", lambda t: True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        results = [fa4.probe("cpu", 2, 16, max_seqlen=64, tokens_per_batch=1024) for _ in range(2)]
    assert [ok for ok, _ in results] == [False, False]
    assert "forward failed: RuntimeError: cute DSL: ptxas failed" in results[0][1]
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1


def test_self_test_batch_and_tolerance_on_the_reference_path():
    assert "matches" in fa4.self_test(torch.device("cpu"), 2, 16, torch.float32, window=9, max_seqlen=64,
                                      tokens_per_batch=4096, tokens=256)


def test_probe_on_cpu_is_quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fa4.probe("cpu", 6, 128)[0] is False


# ----------------------------------------------------------------------------------------------------
# QK norm + RoPE


def _rope_case(T, H, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(T, 3, H, D, generator=g) * 2 + 0.3).to(dtype)
    grads = [torch.randn(T, H, D, generator=g).to(dtype) for _ in range(2)]
    return qkv, Rotary(D, 10000.0)(T, dtype), grads


def _rope_results(fn, qkv, tables, grads, dtype=None):
    """yq, yk, dq, dk with q, k strided views of the QKV output (cast to `dtype` first)."""
    if dtype is not None:
        qkv, tables, grads = qkv.to(dtype), tuple(t.to(dtype) for t in tables), [g.to(dtype) for g in grads]
    qkv = qkv.detach().requires_grad_()
    q, k, _ = qkv.unbind(1)
    yq, yk = fn(q, k, tables)
    return (yq.detach(), yk.detach(), *torch.autograd.grad((yq, yk), (q, k), grads))


def _model_formula(q, k, tables):
    return apply_rotary(norm(q), tables), apply_rotary(norm(k), tables)


def test_default_eps_is_the_computation_dtype_epsilon():
    x = torch.randn(4, 64) * 1e-3  # small rows, where eps matters
    for dtype in (torch.float32, torch.bfloat16):
        want = torch.nn.functional.rms_norm(x.to(dtype), (64,))
        got = torch.nn.functional.rms_norm(x.to(dtype), (64,), eps=rope.default_eps(dtype))
        assert torch.equal(got, want)
    assert rope.default_eps(torch.bfloat16) == torch.finfo(torch.float32).eps


def test_rope_eager_path_matches_the_model_and_compiles(monkeypatch):
    from torch._dynamo.testing import CompileCounterWithBackend

    monkeypatch.setattr(rope, "_use_triton", lambda x: False)
    qkv, tables, grads = _rope_case(12, 3, 32, torch.float32)
    want = _rope_results(_model_formula, qkv, tables, grads)
    got = _rope_results(rope.qk_norm_rope, qkv, tables, grads)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)
    q, k, _ = qkv.unbind(1)
    torch.library.opcheck(torch.ops.speedrun.qk_norm_rope, (q.requires_grad_(), k, *tables, 1e-6))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda a, b, t: rope.qk_norm_rope(a * 1.0, b, t), backend=counter, fullgraph=True)
    for a, b in zip(_rope_results(compiled, qkv, tables, grads), want):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)
    assert counter.frame_count == 1


@needs_interpreter
@pytest.mark.parametrize("T,H,D", [(7, 3, 16), (33, 2, 128), (5, 1, 96), (4, 2, 256), (9, 6, 2), (0, 2, 8)])
def test_triton_kernel_matches_eager_in_fp32(T, H, D):
    qkv, tables, grads = _rope_case(T, H, D, torch.float32, seed=T + D)
    q = qkv[:, 0]
    assert rope._use_triton(q)
    want = _rope_results(_model_formula, qkv, tables, grads)
    got = _rope_results(rope.qk_norm_rope, qkv, tables, grads)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("T,H,D", [(17, 3, 64), (6, 2, 128)])
def test_triton_kernel_in_bf16_is_within_one_ulp_of_fp32(T, H, D):
    """The kernel computes in fp32 and rounds once (the interpreter truncates, the GPU rounds to
    nearest: one ulp covers both); the eager bf16 chain is shown no closer."""
    qkv, tables, grads = _rope_case(T, H, D, torch.bfloat16, seed=1)
    truth = _rope_results(_model_formula, qkv, tables, grads, torch.float32)
    got = _rope_results(rope.qk_norm_rope, qkv, tables, grads)
    eager = _rope_results(_model_formula, qkv, tables, grads)
    for g, e, t in zip(got, eager, truth):
        assert g.dtype == torch.bfloat16 and rope.within_one_ulp(g, t)[0]
        torch.testing.assert_close(e.float(), t, atol=0.1, rtol=0.02)  # the eager chain: same values


@needs_interpreter
def test_triton_kernel_reads_contiguous_and_strided_inputs_alike():
    qkv, tables, grads = _rope_case(11, 2, 32, torch.float32)
    strided = _rope_results(rope.qk_norm_rope, qkv, tables, grads)
    q, k = (t.detach().contiguous().requires_grad_() for t in qkv.unbind(1)[:2])
    yq, yk = rope.qk_norm_rope(q, k, tables)
    dense = (yq, yk, *torch.autograd.grad((yq, yk), (q, k), grads))
    for a, b in zip(strided, dense):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def _mix_case(T, H, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(T, 3, H, D, generator=g) * 2 + 0.3).to(dtype)
    ve = torch.randn(T, H, D, generator=g).to(dtype)
    grads = [torch.randn(T, H, D, generator=g).to(dtype) for _ in range(3)]
    return qkv, ve, torch.tensor([0.7, -0.4]), Rotary(D, 10000.0)(T, dtype), grads


def _mix_results(fn, qkv, ve, lambdas, tables, grads, dtype=None):
    """q, k, v and the gradients of qkv, ve, lambdas (inputs cast to `dtype` first; lambdas stay fp32)."""
    if dtype is not None:
        qkv, ve, grads = qkv.to(dtype), ve.to(dtype), [g.to(dtype) for g in grads]
        tables = tuple(t.to(dtype) for t in tables)
    leaves = [t.detach().requires_grad_() for t in (qkv, ve, lambdas)]
    outs = fn(*leaves, tables)
    return (*(o.detach() for o in outs), *torch.autograd.grad(outs, leaves, grads))


def _mix_formula(qkv, ve, lambdas, tables):
    """Attention.forward of speedrun.models.unet between the QKV GEMM and attention."""
    q, k, v = qkv.unbind(1)
    v = lambdas[0] * v + lambdas[1] * ve
    return (*_model_formula(q, k, tables), v)


def test_mix_eager_path_matches_the_model_and_compiles(monkeypatch):
    from torch._dynamo.testing import CompileCounterWithBackend

    monkeypatch.setattr(rope, "_use_triton", lambda x: False)
    case = _mix_case(10, 3, 32, torch.float32)
    want = _mix_results(_mix_formula, *case)
    for a, b in zip(_mix_results(rope.qkv_norm_rope_mix, *case), want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    qkv, ve, lambdas, tables, _ = case
    torch.library.opcheck(torch.ops.speedrun.qkv_norm_rope_mix,
                          (qkv.requires_grad_(), ve.requires_grad_(), lambdas.requires_grad_(), *tables, 1e-6))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda a, b, c, t: rope.qkv_norm_rope_mix(a * 1.0, b, c, t), backend=counter,
                             fullgraph=True)
    for a, b in zip(_mix_results(compiled, *case), want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1


@needs_interpreter
@pytest.mark.parametrize("T,H,D", [(7, 3, 16), (33, 2, 128), (5, 1, 96), (0, 2, 8)])
def test_triton_mix_kernel_matches_eager_in_fp32(T, H, D):
    case = _mix_case(T, H, D, torch.float32, seed=T + D)
    assert rope._use_triton(case[0])
    want = _mix_results(_mix_formula, *case)
    got = _mix_results(rope.qkv_norm_rope_mix, *case)
    for name, a, b in zip(("q", "k", "v", "dqkv", "dve", "dlambdas"), got, want):
        # d lambdas sums T x H x D products: fp32 summation order shows at ~1e-5
        torch.testing.assert_close(a, b, atol=1e-4 if name == "dlambdas" else 1e-5, rtol=1e-5, msg=name)


@needs_interpreter
def test_triton_mix_kernel_in_bf16_is_within_one_ulp_of_fp32():
    case = _mix_case(19, 3, 64, torch.bfloat16, seed=2)
    truth = _mix_results(_mix_formula, *case, dtype=torch.float32)
    got = _mix_results(rope.qkv_norm_rope_mix, *case)
    for g, t in zip(got[:5], truth[:5]):
        assert g.dtype == torch.bfloat16 and rope.within_one_ulp(g, t)[0]
    torch.testing.assert_close(got[5], truth[5], atol=1e-3, rtol=1e-4)  # d lambdas: fp32 sums of bf16 products


@pytest.mark.skipif(not TRITON, reason="needs triton")
def test_triton_kernels_compile_for_sm90():
    """The interpreter accepts code that the compiler rejects: compile every kernel for sm90 (bf16,
    D = 128) through triton's own ptxas, in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from speedrun.kernels._rope_triton import compile_for\n"
            "ks = compile_for(90, 'bf16', 128)\n"
            "print(sorted(ks), all(len(k.asm['cubin']) > 0 for k in ks.values()))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("'triton_qk_norm_rope_bwd', 'triton_qk_norm_rope_fwd', 'triton_qkv_norm_rope_mix_bwd', "
            "'triton_qkv_norm_rope_mix_fwd'] True") in done.stdout


# ----------------------------------------------------------------------------------------------------
# the integration: model.enable_fused_rope() (hardware.triton_rope) and the fa4 attention back-end


@pytest.mark.parametrize("kernels", ["eager", pytest.param("interpreter", marks=needs_interpreter)])
@pytest.mark.parametrize("arch", ["unet", "transformer"])
def test_integrated_model_matches_the_model(monkeypatch, kernels, arch):
    """The whole tiny model, loss and every gradient, with the Triton ops in Attention.forward and the fa4
    back-end (its CPU reference here) against the model as it is (SDPA); o projections randomised so
    attention's gradients are not 0."""
    from speedrun.attention import build_context
    from speedrun.config import make
    from speedrun.models.unet import ProteinLM

    if kernels == "eager":
        monkeypatch.setattr(rope, "_use_triton", lambda x: False)
    torch.manual_seed(0)
    model = ProteinLM(make("model", dim=64, n_layers=4, n_heads=2, arch=arch))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.o.weight.normal_(0, 0.05)
            if block.attn.lambdas is not None:
                block.attn.lambdas.copy_(torch.tensor([0.6, 0.45]))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 24, (96,), generator=g)
    doc = torch.full((96,), -1, dtype=torch.int32)
    doc[:30], doc[30:31], doc[31:70] = 0, 1, 2

    def loss_and_grads(ctx):
        model.zero_grad()
        loss = model.logits(model(ids, doc, 40, ctx=ctx)).logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    want = loss_and_grads(model.make_context(doc, 40))  # SDPA, the CPU back-end
    model.enable_fused_rope()
    got = loss_and_grads(build_context(doc, 40, "fa4", 40))
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    assert len(got[1]) == len(want[1])
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# GPU


@needs_cuda
def test_fa4_matches_fa2_on_packed_documents_with_padding():
    from speedrun.bench import kernels as bench

    device = torch.device("cuda")
    ok, why = fa4.available(device)
    if not ok:
        pytest.skip(why)
    inp = bench.attention_inputs(bench.packed_doc_ids(8192, max_len=1024), 6, 128, 1024, device)
    table = bench.Table()
    for window in (-1, 256):
        bench.check_attention(table, inp, window, fa4_ok=True)
    bench.check_padding(table, inp)
    assert not table.failed(), table.rows


@needs_cuda
def test_triton_rope_on_cuda_within_one_ulp():
    from speedrun.bench import kernels as bench

    if not rope._use_triton(torch.empty(1, 1, 128, device="cuda")):
        pytest.skip("triton not importable")
    table = bench.Table()
    for dtype in (torch.bfloat16, torch.float32):
        bench.check_rope(table, bench.rope_inputs(4096, 6, 128, dtype, torch.device("cuda")), dtype)
    assert not table.failed(), table.rows
