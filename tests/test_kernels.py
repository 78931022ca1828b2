"""speedrun.kernels: the FA4 custom op's registration, window mapping and fallback (CPU)."""
from __future__ import annotations

import math
import sys
import types
import warnings

import pytest
import torch

from speedrun.kernels import fa4



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
    torch.library.opcheck(torch.ops.speedrun.fa4_varlen_fwd, (q, k, v, cu, 32, window, 0.25))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda a, b, c: fa4.fa4_varlen(a * 1.0, b, c, cu, 32, window), backend=counter,
                             fullgraph=True)
    for a, b in zip(_grads(compiled, q, k, v, dout), got):
        torch.testing.assert_close(a, b)
    assert counter.frame_count == 1


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

    monkeypatch.setattr(fa4, "_interface", types.SimpleNamespace(flash_attn_varlen_func=broken, _flash_attn_bwd=broken))
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
