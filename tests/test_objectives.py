"""Masking statistics: realised rates, special tokens never masked, 80/10/10, the rate schedule."""
from __future__ import annotations

import torch

from speedrun.config import ObjectiveConfig
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
    cfg = ObjectiveConfig(mask_rate=0.4, mask_rate_start=0.1, mask_rate_steps=100)
    assert mask_rate_at(cfg, 0) == 0.1 and abs(mask_rate_at(cfg, 50) - 0.25) < 1e-12
    assert mask_rate_at(cfg, 100) == 0.4 and mask_rate_at(cfg, 10_000) == 0.4
    t = _tokens()
    maskable = ((t >= 4) & (t <= 30)).sum().item()
    for step in (0, 50, 100):
        m = mask_tokens(t, mask_rate_at(cfg, step), generator_for(torch.device("cpu"), step))
        realised = (m.labels != IGNORE).sum().item() / maskable
        assert abs(realised - mask_rate_at(cfg, step)) < 0.01
    assert mask_rate_at(ObjectiveConfig(mask_rate=0.2), 5) == 0.2
