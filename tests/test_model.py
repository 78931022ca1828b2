"""Model shapes, parameter counts, the UNet's skip and value-embedding pairing, tied heads."""
from __future__ import annotations

import pytest
import torch

from speedrun.config import make, mlp_hidden
from speedrun.models.unet import ProteinLM, count_params_formula
from speedrun.vocab import CLS, EOS, MASK


def _meta_model(**kw) -> ProteinLM:
    with torch.device("meta"):
        return ProteinLM(make("model", **kw))


def test_reference_unet_has_133_065_357_parameters():
    m = _meta_model()
    assert m.num_params() == 133_065_357
    assert count_params_formula(make("model")) == 133_065_357
    assert mlp_hidden(make("model")) == 2048


@pytest.mark.parametrize("kw,expected", [
    (dict(mlp_ratio=2.0), 114_190_989),  # RECIPE.md §4.3: HEAD argparse default
    (dict(mlp_ratio=3.0), 142_502_541),  # Jan-2026 dsm.yaml
])
def test_other_reference_counts(kw, expected):
    assert _meta_model(**kw).num_params() == expected


@pytest.mark.parametrize("kw", [dict(arch="transformer"), dict(tie_embeddings=True),
                                dict(head="linear", soft_cap=30.0), dict(dim=64, n_layers=2, n_heads=2)])
def test_count_formula_matches_modules(kw):
    assert _meta_model(**kw).num_params() == count_params_formula(make("model", **kw))


def test_unet_mean_99_percent_in_hidden_matrices():
    m = _meta_model()
    hidden = sum(p.numel() for n, p in m.named_parameters() if p.ndim >= 2 and "embed" not in n and "lm_head" not in n)
    assert hidden / m.num_params() > 0.99


def _tiny(**kw):
    torch.manual_seed(0)
    return ProteinLM(make("model", dim=32, n_layers=4, n_heads=2, **kw))


def _batch(T=64):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 24, (T,), generator=g)
    ids[0], ids[20], ids[21], ids[50] = CLS, EOS, CLS, EOS
    ids[51:] = 1
    doc = torch.full((T,), -1, dtype=torch.int32)
    doc[:21], doc[21:51] = 0, 1
    return ids, doc


def test_forward_shapes_and_logits_dtype():
    m = _tiny()
    ids, doc = _batch()
    h = m(ids, doc, 1024)
    assert h.shape == (64, 32)
    z = m.logits(h[:5])
    assert z.shape == (5, 33) and z.dtype == torch.float32
    assert z.abs().max() <= 32.0


def test_bf16_activations_keep_fp32_weights():
    m = _tiny()
    ids, doc = _batch()
    h = m(ids, doc, 1024, dtype=torch.bfloat16)
    assert h.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in m.parameters())
    assert m.logits(h).dtype == torch.float32


def test_zero_init_projections():
    m = _tiny()
    for b in m.blocks:
        assert b.attn.o.weight.abs().sum() == 0 and b.mlp.down.weight.abs().sum() == 0
    assert m.lm_head.bias.abs().sum() == 0
    lin = _tiny(head="linear")
    assert lin.lm_head.decoder.weight.abs().sum() == 0


def test_unet_skip_pairing_and_value_embedding_order():
    """Decoder layer i receives encoder layer L/2-1-i's output and uses value table L/2-1-i."""
    m = _tiny()
    L, half = 4, 2
    outputs, inputs, ves = {}, {}, {}

    def keep(i):
        def hook(mod, args, out):
            inputs[i] = args[0].detach().clone()
            ves[i] = args[2]
            outputs[i] = out.detach().clone()
        return hook

    for i, b in enumerate(m.blocks):
        b.register_forward_hook(keep(i))
    with torch.no_grad():
        for j in range(half):
            m.skip_weights[j] = 10.0 ** (j + 1)  # distinguishable weights
        ids, doc = _batch()
        m(ids, doc, 1024)
    for i in range(half):
        enc = half - 1 - i
        prev = outputs[half + i - 1]
        expected_in = prev + m.skip_weights[i] * outputs[enc]
        torch.testing.assert_close(inputs[half + i], expected_in)
        torch.testing.assert_close(ves[half + i], m.value_embeds[enc](ids))
        torch.testing.assert_close(ves[i], m.value_embeds[i](ids))


def test_transformer_has_no_unet_parts():
    m = _tiny(arch="transformer")
    assert m.skip_weights is None and len(m.value_embeds) == 0
    assert all(b.lambdas is None and b.attn.lambdas is None for b in m.blocks)


def test_tied_head_shares_storage():
    m = _tiny(tie_embeddings=True)
    assert m.lm_head.decoder.weight is m.embed.weight
    assert m.lm_head.decoder.weight.data_ptr() == m.embed.weight.data_ptr()
    ids, doc = _batch()
    m.logits(m(ids, doc, 1024)).sum().backward()
    assert m.embed.weight.grad is not None
    n_unique = len({id(p) for p in m.parameters()})
    assert n_unique == len(list(m.parameters()))  # parameters() already de-duplicates the tied weight


def test_token_dropout_zeroes_mask_embedding():
    m = _tiny()
    ids = torch.tensor([CLS, 5, MASK, 6, EOS])
    x = m.embed_tokens(ids, torch.float32)
    assert x[2].abs().sum() == 0 and x[1].abs().sum() > 0


def test_documents_do_not_see_each_other():
    """Changing document 1 leaves document 0's hidden states unchanged (and vice versa)."""
    m = _tiny()
    for b in m.blocks:  # make attention matter
        torch.nn.init.normal_(b.attn.o.weight, std=0.1)
        torch.nn.init.normal_(b.mlp.down.weight, std=0.1)
    ids, doc = _batch()
    h1 = m(ids, doc, 1024)
    ids2 = ids.clone()
    ids2[25:45] = torch.randint(4, 24, (20,))
    h2 = m(ids2, doc, 1024)
    torch.testing.assert_close(h1[:21], h2[:21])
    assert not torch.allclose(h1[21:51], h2[21:51])


def test_memory_estimate_matches_the_h200_measurements():
    """Measured on an H200 (speedrun/bench/results): 41.0 GiB at 65,536 tokens, 79.6 GiB at 131,072."""
    from speedrun.models.unet import estimate_memory_gib
    assert estimate_memory_gib(make("model"), 65536, "bf16") == pytest.approx(41.0, rel=0.03)
    assert estimate_memory_gib(make("model"), 131072, "bf16") == pytest.approx(79.6, rel=0.03)
    assert estimate_memory_gib(make("model", arch="patch_unet"), 65536, "bf16") is None


@pytest.mark.parametrize("arch", ["unet", "transformer"])
def test_per_block_compile_is_one_graph_for_every_layer(arch):
    """Regional compilation relies on every block hitting the same compiled graph: no guard may tell
    layer 0 from the others (the first block once got x and x0 as one tensor and compiled twice)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = ProteinLM(make("model", arch=arch, dim=64, n_layers=4, n_heads=2))
    m.set_attention_backend(torch.device("cpu"))
    for b in m.blocks:
        b.compile(backend="eager", dynamic=False)
    ids = torch.randint(4, 30, (256,))
    doc = torch.zeros(256, dtype=torch.int32)
    doc[128:] = 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            m(ids, doc, 1024).square().sum().backward()
    torch._dynamo.reset()
