"""The embeddings API: shapes, order, batch independence, layer semantics, long sequences."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import speedrun
from speedrun.config import make
from speedrun.embed import embed
from speedrun.models.unet import ProteinLM, norm
from speedrun.vocab import encode

SEQS = ["MKTAYIAKQRQISFVKSHFSRQ", "MSDNE", "GAVLIPFWMSTCYNQDEKRH" * 3, "MKV", "ACDEFGHIKLMNPQRSTVWY"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = ProteinLM(make("model", dim=32, n_layers=2, n_heads=2))
    with torch.no_grad():  # the zero-initialised projections would make every block an identity
        for p in m.parameters():
            p.normal_(0.0, 0.2)
    return m


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to fp32 rounding (packing changes matmul shapes; activations reach ~20 here)."""
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def _alone(model, seq, layer):
    """Per-residue states of one sequence from a direct forward of it alone."""
    ids = torch.from_numpy(encode(seq)).long()
    with torch.no_grad():
        if layer == 0:
            h = model.embed_tokens(ids, torch.float32)
        else:
            _, layers = model(ids, torch.zeros_like(ids, dtype=torch.int32), ids.numel(), return_layers=True)
            h = layers[layer - 1]
    return h[1:-1]


def test_shapes(model):
    n, d = len(SEQS), model.cfg.dim
    assert embed(model, SEQS).shape == (n, d)
    assert embed(model, SEQS, pool="cls", layer=1).shape == (n, d)
    per_res = embed(model, SEQS, pool="none")
    assert [t.shape for t in per_res] == [(len(s), d) for s in SEQS]
    many = embed(model, SEQS, layer=[0, -1, 1])
    assert list(many) == [0, -1, 1] and all(v.shape == (n, d) for v in many.values())
    assert torch.equal(many[-1], embed(model, SEQS, layer=2))
    every = embed(model, SEQS, layer="all", pool="none")
    assert list(every) == [0, 1, 2] and all(len(v) == n for v in every.values())
    single = embed(model, "MKTAYIAK")
    assert single.shape == (1, d) and single.dtype == torch.float32 and not single.requires_grad


def test_layer0_is_the_normed_embedding_and_blocks_match_a_direct_forward(model):
    for seq in SEQS:
        ids = torch.from_numpy(encode(seq)).long()
        want = norm(model.embed.weight[ids])[1:-1]
        got = embed(model, [seq], layer=0, pool="none")[0]
        assert _close(got, want)
    got = embed(model, SEQS, layer=[1, 2], pool="none")
    for i, seq in enumerate(SEQS):
        for k in (1, 2):
            assert _close(got[k][i], _alone(model, seq, k))
    mean = embed(model, SEQS, layer=2)
    cls = embed(model, SEQS, layer=2, pool="cls")
    for i, seq in enumerate(SEQS):
        assert _close(mean[i], _alone(model, seq, 2).mean(0))
        ids = torch.from_numpy(encode(seq)).long()
        with torch.no_grad():
            _, layers = model(ids, torch.zeros_like(ids, dtype=torch.int32), ids.numel(), return_layers=True)
        assert _close(cls[i], layers[-1][0])


def test_independent_of_batch_mates_and_order_preserved(model):
    alone = torch.cat([embed(model, [s], layer=-1) for s in SEQS])
    together = embed(model, SEQS, layer=-1, batch_tokens=4096)  # one stream
    tight = embed(model, SEQS, layer=-1, batch_tokens=64, max_length=64)  # several streams, other neighbours
    assert _close(together, alone)
    assert _close(tight, alone)
    rev = embed(model, SEQS[::-1], layer=-1)
    assert _close(rev, alone.flip(0))
    extra = embed(model, ["W" * 40] + SEQS + ["MKVLAAGIV" * 5], layer=-1)
    assert _close(extra[1:-1], alone)


def test_long_sequences_are_split_into_pieces(model):
    seq = SEQS[2] + SEQS[0]  # 82 residues, 84 tokens
    ids = torch.from_numpy(encode(seq)).long()
    got = embed(model, [seq, "MKV"], layer=1, pool="none", max_length=30, batch_tokens=64)
    assert got[0].shape == (len(seq), model.cfg.dim)
    # 84 tokens -> 3 consecutive pieces of 28; <cls> only in the first, <eos> only in the last
    with torch.no_grad():
        outs = []
        for a, b in ((0, 28), (28, 56), (56, 84)):
            piece = ids[a:b]
            _, layers = model(piece, torch.zeros_like(piece, dtype=torch.int32), 30, return_layers=True)
            outs.append(layers[0])
    want = torch.cat(outs)[1:-1]
    assert _close(got[0], want)
    mean = embed(model, [seq], layer=1, max_length=30, batch_tokens=64)
    assert _close(mean[0], want.mean(0))


def test_mode_restored_and_errors(model):
    model.train()
    embed(model, SEQS[:2])
    assert model.training
    model.eval()
    with pytest.raises(ValueError, match="pool"):
        embed(model, SEQS, pool="max")
    with pytest.raises(ValueError, match="out of range"):
        embed(model, SEQS, layer=3)
    with pytest.raises(ValueError, match="batch_tokens"):
        embed(model, SEQS, batch_tokens=16, max_length=32)
    with pytest.raises(ValueError, match="no residues"):
        embed(model, ["MKV", ""])


def test_top_level_embed_is_lazy_and_callable(model):
    out = speedrun.embed(model, SEQS[:2])
    assert torch.equal(out, embed(model, SEQS[:2]))
    code = "import sys, speedrun; assert 'torch' not in sys.modules; print(callable(speedrun.load))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "True", res.stderr
