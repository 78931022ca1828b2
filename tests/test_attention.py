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
    from speedrun.attention import varlen_offsets
    from speedrun.packing import max_docs

    _, _, _, doc = _packed()  # documents of 30, 7, 40 tokens, then 19 tokens of padding
    off = varlen_offsets(doc, 8, 64)
    assert off.dtype == torch.int32 and off.shape == (8 + 2 + 1,)
    # unused document slots are empty segments; the padding is cut at the bound (here one piece)
    assert off.tolist() == [0, 30, 37, 77, 77, 77, 77, 77, 77, 96, 96]
    assert max_docs(65536) == 1024


def _short_docs(T: int, n_docs: int, length: int) -> torch.Tensor:
    """doc ids of `n_docs` documents of `length` tokens, then padding: a batch at the document cap."""
    doc = torch.full((T,), -1, dtype=torch.int32)
    doc[: n_docs * length] = torch.arange(n_docs, dtype=torch.int32).repeat_interleave(length)
    return doc


def test_varlen_segments_never_exceed_the_bound():
    """A batch that hits the document cap (short peptides) leaves more padding than the kernel's bound:
    the padding must come in pieces no longer than the bound (issue 15: rows past it came back unwritten)."""
    from speedrun.attention import varlen_offsets
    from speedrun.packing import max_docs

    T, bound = 4096, 256
    doc = _short_docs(T, max_docs(T), 20)  # 64 documents of 20 tokens, 2,816 tokens of padding
    off = varlen_offsets(doc, max_docs(T), bound).tolist()
    lengths = [b - a for a, b in zip(off, off[1:])]
    assert off[0] == 0 and off[-1] == T and min(lengths) >= 0
    assert max(lengths) <= bound
    assert off[1:max_docs(T) + 1] == [20 * (i + 1) for i in range(max_docs(T))]


def emulated_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **_):
    """FlashAttention's varlen contract on the CPU: each segment attends within itself, but only its
    first max_k keys are read and only its first max_q rows are written; the rest stays uninitialised
    (NaN here), as on the GPU."""
    outs, offs = [], cu_q.tolist()
    for a, b in zip(offs[:-1], offs[1:]):
        rows, keys = min(b - a, max_q), min(b - a, max_k)
        s = torch.einsum("qhd,khd->hqk", q[a:a + rows], k[a:a + keys]) / q.size(-1) ** 0.5
        outs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), v[a:a + keys]))
        outs.append(torch.full((b - a - rows, *q.shape[1:]), float("nan"), dtype=q.dtype))
    return torch.cat(outs)


def _grads_of(model, tokens, doc, labels, dtype=torch.float32):
    """Loss, parameter gradients and the gradient reaching the input embeddings, per row."""
    from speedrun.objectives import dense_loss

    model.zero_grad(set_to_none=True)
    seen = {}

    def keep_grad(module, args, out):
        out.register_hook(lambda grad: seen.update(g=grad))

    hook = model.embed.register_forward_hook(keep_grad)
    loss = dense_loss(model.logits(model(tokens, doc, 1024, dtype=dtype)), labels)
    loss.backward()
    hook.remove()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, seen["g"]


@pytest.mark.parametrize("where", ["cpu-emulated", "cuda"])
def test_padding_past_the_document_cap_gives_exact_gradients(where, monkeypatch):
    """Forward and backward of a batch at the document cap: the gradients equal those of the same
    documents without padding, and the padding contributes exactly zero (issue 15, item 1)."""
    from speedrun.config import make
    from speedrun.models.unet import ProteinLM
    from speedrun.objectives import IGNORE
    from speedrun.packing import max_docs

    if where == "cuda" and not torch.cuda.is_available():
        pytest.skip("the real varlen kernel needs CUDA (run on the GPU machine)")
    device = torch.device("cuda" if where == "cuda" else "cpu")
    if where != "cuda":
        import torch.nn.attention.varlen as varlen

        monkeypatch.setattr(varlen, "varlen_attn", emulated_varlen)
    torch.manual_seed(0)
    model = ProteinLM(make("model", arch="unet", dim=64, n_layers=2, n_heads=2, mlp_ratio=2.0)).to(device)
    model.attn_backend, model.max_segment_len = "varlen", 256
    T, n, length = 4096, max_docs(4096), 20
    doc = _short_docs(T, n, length).to(device)
    g = torch.Generator().manual_seed(1)
    real = n * length
    tokens = torch.full((T,), 1, dtype=torch.long)  # <pad>
    tokens[:real] = torch.randint(4, 24, (real,), generator=g)
    labels = torch.full((T,), IGNORE, dtype=torch.long)
    picked = torch.rand(real, generator=g) < 0.2
    labels[:real] = torch.where(picked, tokens[:real], torch.full_like(tokens[:real], IGNORE))
    tokens, labels = tokens.to(device), labels.to(device)
    dtype = torch.bfloat16 if where == "cuda" else torch.float32  # the FlashAttention kernels are bf16/fp16
    loss, grads, x_grad = _grads_of(model, tokens, doc, labels, dtype)
    model.attn_backend = "sdpa"  # the reference: the same documents without padding, exact attention
    loss_ref, grads_ref, x_grad_ref = _grads_of(model, tokens[:real], doc[:real], labels[:real], dtype)
    assert torch.equal(x_grad[real:], torch.zeros_like(x_grad[real:]))  # padding contributes exactly zero
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), f"{name}: non-finite gradient"
    if where == "cuda":  # another kernel in bf16: the same gradients up to bf16 rounding
        torch.testing.assert_close(loss, loss_ref, rtol=1e-2, atol=1e-3)
        for name, grad in grads.items():
            if grads_ref[name].norm() > 0:
                cos = torch.nn.functional.cosine_similarity(grad.flatten(), grads_ref[name].flatten(), dim=0)
                assert cos > 0.999, (name, float(cos))
        return
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(x_grad[:real], x_grad_ref, rtol=1e-4, atol=1e-6)


def test_varlen_matches_sdpa_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("varlen FlashAttention needs CUDA")
    q, k, v, doc = (t.cuda() for t in _packed(T=512))
    q, k, v = (t.bfloat16() for t in (q, k, v))
    ref = attend(q.float(), k.float(), v.float(), build_context(doc, 1024, "sdpa"))
    out = attend(q, k, v, build_context(doc, 1024, "varlen", max_len=64))
    real = doc >= 0
    torch.testing.assert_close(out.float()[real], ref[real], atol=2e-2, rtol=2e-2)


# ---- the back-end choice (model.attention=auto) and its fallback --------------------------------------
def _choose(monkeypatch, *, fa4=(True, "ok"), varlen=True, window_ok=True, **kw):
    import speedrun.attention as A
    from speedrun.kernels import fa4 as F

    monkeypatch.setattr(A, "flex_available", lambda device: True)
    monkeypatch.setattr(A, "varlen_available", lambda device: varlen)
    monkeypatch.setattr(A, "varlen_window_supported", lambda: window_ok)
    monkeypatch.setattr(F, "probe", lambda *a, **k: fa4)
    args = dict(n_heads=6, head_dim=128, dtype=torch.bfloat16, bound=1024, window_binds=False, tokens=65536)
    return A.choose(kw.pop("want", "auto"), torch.device("cuda"), **{**args, **kw})


def test_auto_prefers_fa4_then_varlen_then_flex(monkeypatch):
    assert _choose(monkeypatch)[0] == "fa4"
    name, why = _choose(monkeypatch, fa4=(False, "cannot import flash_attn.cute"))
    assert name == "varlen" and "cannot import flash_attn.cute" in why  # the fallback says why
    assert _choose(monkeypatch, fa4=(False, "x"), window_binds=True, window_ok=False)[0] == "flex"
    assert _choose(monkeypatch, fa4=(False, "x"), window_binds=True)[0] == "varlen"  # FA2 with window_size
    assert _choose(monkeypatch, fa4=(False, "x"), varlen=False)[0] == "flex"
    assert _choose(monkeypatch, dtype=torch.float32)[0] == "flex"  # the FlashAttention kernels are bf16/fp16
    assert _choose(monkeypatch, bound=0)[0] == "flex"  # no bound on a document's length


def test_a_back_end_asked_for_by_name_that_cannot_run_is_one_line(monkeypatch):
    from speedrun.attention import choose
    from speedrun.errors import ConfigError

    with pytest.raises(ConfigError, match="model.attention=fa4 needs CUDA"):
        choose("fa4", torch.device("cpu"), n_heads=2, head_dim=16, dtype=torch.float32)
    with pytest.raises(ConfigError, match="model.attention=fa4 .*broken.*model.attention=auto"):
        _choose(monkeypatch, want="fa4", fa4=(False, "broken kernel"))
    assert choose("auto", torch.device("cpu"), n_heads=2, head_dim=16, dtype=torch.float32)[0] == "sdpa"


def test_the_run_records_which_back_end_ran_and_why(tiny_cfg, tmp_path):
    from speedrun.train import run

    summary = run(tiny_cfg("train.max_steps=1", "checkpoint.final=false"), tmp_path)
    assert summary["attention"] == "sdpa" and "SDPA" in summary["attention_reason"]
    assert "attention: sdpa" in (tmp_path / "rank0.log").read_text()
