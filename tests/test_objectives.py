"""Masking statistics: realised rates, special tokens never masked, 80/10/10, the rate schedule."""
from __future__ import annotations

import pytest
import torch

from speedrun.config import make
from speedrun.objectives import IGNORE, generator_for, mask_rate_at, mask_tokens
from speedrun.vocab import CLS, EOS, MASK, PAD, UNK


def _tokens(n=200_000):
    g = torch.Generator().manual_seed(1)
    t = torch.randint(4, 24, (n,), generator=g)
    t[::50], t[49::50], t[25::97], t[-1000:] = CLS, EOS, UNK, PAD
    return t


def test_rate_and_specials():
    t = _tokens()
    m = mask_tokens(t, 0.2, generator_for(torch.device("cpu"), 0))
    sel = m.labels != IGNORE
    special = (t == CLS) | (t == EOS) | (t == PAD) | (t == UNK)
    assert not sel[special].any()
    assert (m.inputs[special] == t[special]).all()
    rate = sel.sum().item() / (~special).sum().item()
    assert abs(rate - 0.2) < 0.005
    assert (m.inputs[sel] == MASK).all() and (m.labels[sel] == t[sel]).all()
    assert (m.inputs[~sel] == t[~sel]).all()


def test_80_10_10():
    t = _tokens()
    m = mask_tokens(t, 0.3, generator_for(torch.device("cpu"), 3), replace=True)
    sel = m.labels != IGNORE
    n = sel.sum().item()
    is_mask = (m.inputs[sel] == MASK).float().mean().item()
    same = (m.inputs[sel] == t[sel]).float().mean().item()
    changed = 1 - is_mask - same
    # 10 % random amino acids (a 1-in-20 draw hits the original letter) + 10 % unchanged
    assert abs(is_mask - 0.8) < 0.01 and abs(same - 0.105) < 0.01 and abs(changed - 0.095) < 0.01
    assert n > 0 and ((m.inputs[sel] >= 4) & (m.inputs[sel] <= 23) | (m.inputs[sel] == MASK)).all()


def test_same_seed_same_masks():
    t = _tokens(5000)
    a = mask_tokens(t, 0.15, generator_for(torch.device("cpu"), 1, 2, 3))
    b = mask_tokens(t, 0.15, generator_for(torch.device("cpu"), 1, 2, 3))
    c = mask_tokens(t, 0.15, generator_for(torch.device("cpu"), 1, 2, 4))
    assert torch.equal(a.labels, b.labels) and not torch.equal(a.labels, c.labels)


def test_schedule_takes_effect_each_step():
    cfg = make("objective", mask_rate=0.4, mask_rate_start=0.1, mask_rate_steps=100)
    assert mask_rate_at(cfg, 0) == 0.1 and abs(mask_rate_at(cfg, 50) - 0.25) < 1e-12
    assert mask_rate_at(cfg, 100) == 0.4 and mask_rate_at(cfg, 10_000) == 0.4
    t = _tokens()
    maskable = ((t >= 4) & (t <= 30)).sum().item()
    for step in (0, 50, 100):
        m = mask_tokens(t, mask_rate_at(cfg, step), generator_for(torch.device("cpu"), step))
        realised = (m.labels != IGNORE).sum().item() / maskable
        assert abs(realised - mask_rate_at(cfg, step)) < 0.01
    assert mask_rate_at(make("objective", mask_rate=0.2), 5) == 0.2


# ---- masked diffusion (DSM) and the MLM -> diffusion warm-up ----------------------------------------
from speedrun.objectives import apply_objective, diffusion_fraction, mask_per_document, masked_loss  # noqa: E402


def _docs(n_docs=400, length=100):
    g = torch.Generator().manual_seed(2)
    t = torch.randint(4, 24, (n_docs * length,), generator=g)
    doc = torch.arange(n_docs, dtype=torch.int32).repeat_interleave(length)
    t[::length], t[length - 1::length] = CLS, EOS
    t[-length:], doc[-length:] = PAD, -1  # a padded tail
    return t, doc


def test_diffusion_draws_t_per_sequence_and_weights_by_one_over_t():
    t, doc = _docs()
    m = mask_per_document(t, doc, 0.2, 1.0, 1e-3, generator_for(torch.device("cpu"), 5))
    sel = m.labels != IGNORE
    special = (t == CLS) | (t == EOS) | (t == PAD)
    assert not sel[special].any()
    rates = []
    for d in range(399):
        idx = doc == d
        w = m.weights[idx & sel]
        if w.numel():
            assert torch.allclose(w, w[0].expand_as(w))  # one level per sequence
            t_d = 1 / w[0].item()
            assert 1e-3 <= t_d <= 1.0
            rates.append((sel[idx].sum().item() / 98, t_d))
    realised = torch.tensor(rates)
    assert torch.corrcoef(realised.T)[0, 1] > 0.9  # the realised rate of each sequence follows its t
    levels = realised[:, 1]
    assert levels.std() > 0.2 and abs(levels.mean() - 0.5) < 0.06  # t ~ U(eps, 1) across sequences
    assert (m.weights[~sel] == 0).all()
    assert m.denom.item() == (doc >= 0).sum().item()  # normalised by real tokens


def test_diffusion_loss_is_dsm_weighted_sum():
    t, doc = _docs(20, 30)
    m = mask_per_document(t, doc, 0.2, 1.0, 1e-3, generator_for(torch.device("cpu"), 1))

    class Head:
        def logits(self, h):
            return h

    hidden = torch.randn(t.numel(), 33)
    loss, logits, targets = masked_loss(Head(), hidden, m.labels, weights=m.weights, denom=m.denom)
    sel = m.labels != IGNORE
    ce = torch.nn.functional.cross_entropy(hidden[sel], t[sel], reduction="none")
    expected = (ce * m.weights[sel]).sum() / (doc >= 0).sum()
    torch.testing.assert_close(loss, expected)


def test_mlm_to_diffusion_schedule():
    cfg = make("objective", name="mlm_to_diffusion", mlm_steps=100, ramp="linear", ramp_steps=50)
    assert diffusion_fraction(cfg, 0) == 0.0 and diffusion_fraction(cfg, 99) == 0.0
    assert diffusion_fraction(cfg, 124) == pytest.approx(0.5)
    assert diffusion_fraction(cfg, 149) == 1.0 and diffusion_fraction(cfg, 10_000) == 1.0
    step_cfg = make("objective", name="mlm_to_diffusion", mlm_steps=100, ramp="step")
    assert diffusion_fraction(step_cfg, 99) == 0.0 and diffusion_fraction(step_cfg, 100) == 1.0
    assert diffusion_fraction(make("objective", name="diffusion"), 0) == 1.0
    assert diffusion_fraction(make("objective", name="mlm"), 10**6) == 0.0
    # during warm-up every sequence is masked at the MLM rate: the realised rate per step is 0.2
    t, doc = _docs()
    m = apply_objective(cfg, t, doc, 10, generator_for(torch.device("cpu"), 3))
    maskable_count = ((t >= 4) & (t <= 30)).sum().item()
    assert abs((m.labels != IGNORE).sum().item() / maskable_count - 0.2) < 0.01
    assert torch.allclose(m.weights[m.labels != IGNORE], torch.tensor(5.0))
    half = apply_objective(cfg, t, doc, 124, generator_for(torch.device("cpu"), 3))
    sel = half.labels != IGNORE
    in_diffusion = [(half.weights[(doc == d) & sel] != 5.0).any().item() for d in range(399)
                    if ((doc == d) & sel).any()]
    assert 0.4 < sum(in_diffusion) / len(in_diffusion) < 0.6  # about half the sequences draw a diffusion t


def test_dense_head_gives_the_same_loss_and_sees_every_row():
    t, doc = _docs(20, 30)
    m = mask_per_document(t, doc, 0.2, 1.0, 1e-3, generator_for(torch.device("cpu"), 2))
    seen = []

    class Head:
        def logits(self, h):
            seen.append(h.shape[0])
            return h * 2.0

    hidden = torch.randn(t.numel(), 33)
    sparse = masked_loss(Head(), hidden, m.labels, reduction="none")
    dense = masked_loss(Head(), hidden, m.labels, reduction="none", dense_head=True)
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(a, b)
    n_masked = int((m.labels != IGNORE).sum())
    assert seen == [n_masked, t.numel()]  # the dense head's input has the batch's static shape
