"""FlexAttention and the SDPA path give the same output on the same packed batch, under one mask rule."""
from __future__ import annotations

import pytest
import torch

from speedrun.attention import allowed, attend, build_context


def _packed(T=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    doc = torch.full((T,), -1, dtype=torch.int32)
    pos, d = 0, 0
    for n in (30, 7, 40):
        doc[pos:pos + n] = d
        pos, d = pos + n, d + 1
    H, D = 2, 16
    q, k, v = (torch.randn(T, H, D, generator=g) for _ in range(3))
    return q, k, v, doc


def _reference(q, k, v, doc, window):
    T = doc.numel()
    i = torch.arange(T)
    mask = allowed(doc.view(T, 1), doc.view(1, T), i.view(T, 1), i.view(1, T), window)
    s = torch.einsum("qhd,khd->hqk", q, k) / q.size(-1) ** 0.5
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


@pytest.mark.parametrize("window", [1024, 16, 5])
def test_sdpa_matches_dense_reference(window):
    q, k, v, doc = _packed()
    out = attend(q, k, v, build_context(doc, window, "sdpa"))
    torch.testing.assert_close(out, _reference(q, k, v, doc, window), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1024, 16])
def test_flex_matches_sdpa_on_the_same_packed_batch(window):
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v, doc = _packed(T=256)
    try:
        flex = attend(q, k, v, build_context(doc, window, "flex"))
    except Exception as exc:  # pragma: no cover - platform without the CPU forward
        pytest.skip(f"FlexAttention forward unavailable here: {exc}")
    sdpa = attend(q, k, v, build_context(doc, window, "sdpa"))
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)


def test_padding_never_leaks_into_documents():
    q, k, v, doc = _packed()
    out = attend(q, k, v, build_context(doc, 1024, "sdpa"))
    pads = doc < 0
    assert torch.isfinite(out).all()
    v2 = v.clone()
    v2[pads] += 100.0
    out2 = attend(q, k, v2, build_context(doc, 1024, "sdpa"))
    torch.testing.assert_close(out2[~pads], out[~pads])


def test_sdpa_gradients_flow():
    q, k, v, doc = _packed()
    q.requires_grad_(True)
    attend(q, k, v, build_context(doc, 8, "sdpa")).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_varlen_offsets_describe_the_segments():
    from speedrun.attention import max_segments, varlen_offsets

    _, _, _, doc = _packed()  # documents of 30, 7, 40 tokens, then 19 tokens of padding
    off = varlen_offsets(doc, 8)
    assert off.dtype == torch.int32 and off.shape == (10,)
    assert off.tolist() == [0, 30, 37, 77, 77, 77, 77, 77, 77, 96]  # unused slots are empty segments
    assert max_segments(65536) == 1024


def test_varlen_matches_sdpa_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("varlen FlashAttention needs CUDA")
    q, k, v, doc = (t.cuda() for t in _packed(T=512))
    q, k, v = (t.bfloat16() for t in (q, k, v))
    ref = attend(q.float(), k.float(), v.float(), build_context(doc, 1024, "sdpa"))
    out = attend(q, k, v, build_context(doc, 1024, "varlen", max_len=64))
    real = doc >= 0
    torch.testing.assert_close(out.float()[real], ref[real], atol=2e-2, rtol=2e-2)
