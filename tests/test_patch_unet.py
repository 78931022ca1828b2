"""Patch-UNet (RECIPE.md §4.4): parameter count, width schedule, shapes, gradients, and the fixed
document-boundary defect (documents never see each other across PatchMerge / PatchExpand)."""
from __future__ import annotations

import pytest
import torch

from speedrun.config import ConfigError, make
from speedrun.models.patch_unet import PatchUNet, hidden_sizes
from speedrun.vocab import CLS, EOS, MASK, PAD

REFERENCE = dict(arch="patch_unet", dim=768, n_heads=12, n_layers=12, n_extra_layers=4, mlp_ratio=2.0)


def _meta(L=2048, **kw) -> PatchUNet:
    with torch.device("meta"):
        return PatchUNet(make("model", **kw), L)


def test_reference_patch_unet_has_212_279_127_parameters():
    m = _meta(**REFERENCE)
    assert m.num_params() == 212_279_127
    assert m.hidden_sizes == [768, 960, 1152, 1344, 1536, 1536]
    assert m.in_proj is None and m.out_proj is None and len(m.merges) == 5 and len(m.expands) == 5


def test_width_schedule_caps_head_dim_at_128():
    assert hidden_sizes(768, 6, 6) == [768] * 6  # 6 heads: cap 768, no growth (test.yaml)
    assert hidden_sizes(768, 6, 12) == [768, 960, 1152, 1344, 1536, 1536]
    assert hidden_sizes(768, 1, 12) == [768]


def test_conf_yaml_is_the_reference_model():
    from conftest import typed

    m = typed(["model=patch_unet", "data.max_length=2048", "hardware.micro_batch_tokens=8192"]).model
    assert _meta(**{k: getattr(m, k) for k in REFERENCE}).num_params() == 212_279_127
    assert m.token_dropout is False  # patch_unet.yaml: token_dropout false
    tiny = typed(["model=patch_unet_tiny"]).model
    assert tiny.arch == "patch_unet"
    PatchUNet(tiny, 64)


@pytest.mark.parametrize("L", [100, 2047, 0])
def test_length_must_be_a_power_of_two(L):
    with pytest.raises(ConfigError, match="power of two"):
        _meta(L=L, **REFERENCE)
    m = _tiny()
    with pytest.raises(ConfigError, match="power-of-two"):
        m(torch.full((1, 48), 5), torch.zeros(1, 48, dtype=torch.int32), 64)


def test_odd_unet_layers_rejected():
    with pytest.raises(ConfigError, match="even model.n_layers"):
        _meta(**{**REFERENCE, "n_layers": 5})


# ---------------------------------------------------------------------------------------------- tiny
def _tiny(L=64, randomize=True, **kw) -> PatchUNet:
    torch.manual_seed(0)
    cfg = dict(arch="patch_unet", dim=64, n_heads=4, n_layers=4, n_extra_layers=1, mlp_ratio=2.0)
    cfg.update(kw)
    m = PatchUNet(make("model", **cfg), L)
    if randomize:  # zero-init projections would hide attention and the decoder from the tests
        for name, p in m.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                torch.nn.init.normal_(p, std=0.3 / p.size(1) ** 0.5)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lambdas" in name:
                    p.add_(0.2)
    return m


def _rows(B=2, L=64, seed=0):
    """Row 0: doc 0 = [0, 21), doc 1 = [21, 51) (odd start: straddling pairs), padding after.
    Row 1: doc 2 = [0, 37), doc 3 = [37, 64)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 24, (B, L), generator=g)
    doc = torch.full((B, L), -1, dtype=torch.int32)
    doc[0, :21], doc[0, 21:51] = 0, 1
    ids[0, 0], ids[0, 20], ids[0, 21], ids[0, 50] = CLS, EOS, CLS, EOS
    ids[0, 51:] = PAD
    if B > 1:
        doc[1, :37], doc[1, 37:] = 2, 3
        ids[1, 0], ids[1, 36], ids[1, 37], ids[1, 63] = CLS, EOS, CLS, EOS
    return ids, doc


def test_forward_shapes_dtypes_and_layers():
    m = _tiny()
    ids, doc = _rows()
    h, layers = m(ids, doc, 64, return_layers=True)
    assert h.shape == (2, 64, 64)
    assert [tuple(t.shape) for t in layers] == [(2, 64, 64), (2, 32, 128), (2, 32, 128), (2, 64, 64), (2, 64, 64)]
    z = m.logits(h.reshape(-1, 64)[:7])
    assert z.shape == (7, 33) and z.dtype == torch.float32 and z.abs().max() <= 32.0
    hb = m(ids, doc, 64, dtype=torch.bfloat16)
    assert hb.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in m.parameters())
    assert m.logits(hb[0]).dtype == torch.float32


def test_zero_init_projections():
    m = _tiny(randomize=False)
    for blk in list(m.encoder) + list(m.decoder) + list(m.extra):
        assert blk.attn.o.weight.abs().sum() == 0 and blk.mlp.down.weight.abs().sum() == 0
    assert m.extra[0].lambdas is None and m.extra[0].attn.lambdas is None


@pytest.mark.parametrize("kw,L", [({}, 64), (dict(n_layers=10, n_extra_layers=0), 8), (dict(tie_embeddings=True), 64)])
def test_forward_backward_every_parameter_gets_a_gradient(kw, L):
    m = _tiny(L=L, **kw)
    ids, doc = _rows(L=64)
    ids, doc = ids[:, :L].clone(), doc[:, :L].clone()
    ids[0, 3] = MASK
    h = m(ids, doc, L)
    m.logits(h.reshape(-1, 64)).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_bottleneck_levels_when_the_length_reaches_one():
    from speedrun.models.patch_unet import BottleneckMLP

    m = _tiny(L=8, n_layers=10, n_extra_layers=0)  # E=5 depths, log2(8)=3 -> depths 3, 4 are MLPs
    assert [type(b).__name__ for b in m.encoder] == ["RowBlock"] * 3 + ["BottleneckMLP"] * 2
    assert isinstance(m.decoder[0], BottleneckMLP) and isinstance(m.decoder[1], BottleneckMLP)
    assert len(m.merges) == 3 and len(m.expands) == 3
    assert len(m.encoder_embed) == 3 and len(m.decoder_embed) == 3  # no tables where nothing reads them


def test_doc_ids_per_level_follow_the_both_halves_rule():
    m = _tiny(L=8, n_layers=6)
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, -1, -1]], dtype=torch.int32)
    ctx = m.make_context(doc, 8)
    assert ctx.docs[1].tolist() == [[0, -1, 1, -1]]
    assert ctx.docs[2].tolist() == [[-1, -1]]
    assert ctx.gates[0].squeeze(-1).tolist() == [[True, True, False, False, True, True, False, False]]
    # level 1: position 1 straddles docs 0/1 and attends only to itself
    assert ctx.masks[1][0, 0].tolist() == [[True, False, False, False], [False, True, False, False],
                                           [False, False, True, False], [False, False, False, True]]


def test_documents_do_not_see_each_other():
    """Changing one document leaves every other document's outputs unchanged, even where PatchMerge
    pairs straddle the boundary (doc 1 starts at an odd position) and next to padding."""
    m = _tiny()
    ids, doc = _rows()
    h1 = m(ids, doc, 64)
    ids2 = ids.clone()
    ids2[0, 22:50] = torch.randint(4, 24, (28,))  # doc 1
    ids2[1, 1:36] = torch.randint(4, 24, (35,))  # doc 2
    h2 = m(ids2, doc, 64)
    torch.testing.assert_close(h1[0, :21], h2[0, :21], rtol=0, atol=0)  # doc 0
    torch.testing.assert_close(h1[1, 37:], h2[1, 37:], rtol=0, atol=0)  # doc 3
    torch.testing.assert_close(h1[0, 51:], h2[0, 51:], rtol=0, atol=0)  # padding
    assert not torch.allclose(h1[0, 21:51], h2[0, 21:51])
    ids3 = ids.clone()
    ids3[0, 51:] = torch.randint(4, 24, (13,))  # garbage in the padding
    torch.testing.assert_close(m(ids3, doc, 64)[0, :51], h1[0, :51], rtol=0, atol=0)


def test_documents_attend_within_themselves_at_every_level():
    """Sanity: context does flow inside a document (through attention and the deeper level)."""
    m = _tiny()
    ids, doc = _rows()
    h1 = m(ids, doc, 64)
    ids2 = ids.clone()
    ids2[0, 2] = 7 if ids[0, 2] != 7 else 8
    h2 = m(ids2, doc, 64)
    assert not torch.allclose(h1[0, 15], h2[0, 15])


def test_sliding_window_per_level():
    m = _tiny()
    ids, doc = _rows()
    ctx = m.make_context(doc, 4)
    mask0 = ctx.masks[0][1, 0]
    assert mask0[10, 13] and not mask0[10, 14]
    assert ctx.masks[1][1, 0][5, 8] and not ctx.masks[1][1, 0][5, 9]  # the same window number at level 1


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_and_sdpa_agree():
    pytest.importorskip("torch.nn.attention.flex_attention")
    m = _tiny()
    ids, doc = _rows()
    with torch.no_grad():  # FlexAttention has no CPU backward
        ref = m(ids, doc, 16)
    m.attn_backend = "flex"
    try:
        with torch.no_grad():
            out = m(ids, doc, 16)
    except Exception as exc:  # pragma: no cover - a platform without FlexAttention's CPU forward
        pytest.skip(f"FlexAttention forward unavailable here: {exc}")
    finally:
        m.attn_backend = "sdpa"
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_set_attention_backend_and_optimizer_groups():
    from speedrun.optim import param_groups

    m = _tiny()
    assert m.set_attention_backend(torch.device("cpu")) == "sdpa"
    assert m.set_attention_backend(torch.device("cpu"), 1024) == "sdpa"  # ProteinLM's signature
    assert len(m.blocks) == 2 + 2 + 1 and len({id(p) for b in m.blocks for p in b.parameters()}) > 0
    with pytest.raises(ConfigError, match="varlen does not apply"):
        PatchUNet(make("model", arch="patch_unet", dim=64, n_heads=4, n_layers=4, attention="varlen"),
                  64).set_attention_backend(torch.device("cpu"))
    g = param_groups(m)
    names = {k: [n for n, _ in v] for k, v in g.items()}
    assert all("embed" in n for n in names["embed"]) and len(names["embed"]) == 1 + 2 + 2
    assert all(p.ndim == 2 for _, p in g["hidden"]) and any("merges" in n for n in names["hidden"])
    assert any("expands" in n for n in names["hidden"]) and any("x0_proj" in n for n in names["hidden"])
