"""Generation by iterative unmasking (speedrun/generate.py, DSM's sampler): determinism, valid letters
only, in-filling, the exact commit schedule, greedy limits, Patch-UNet checkpoints, the CLI and a tiny
trained run end to end."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import save_checkpoint

from speedrun import checkpoint as ckpt
from speedrun.config import DataConfig, RunConfig, make, to_dict
from speedrun.generate import (CANONICAL_IDS, EXTENDED_IDS, GenerateConfig, GenerateError, commit_schedule,
                               generate, infill_template, letters, main, read_infill, sample,
                               unconditional_template)
from speedrun.models.unet import ProteinLM
from speedrun.vocab import CLS, EOS, MASK, TOKEN_TO_ID

CANONICAL = set("ACDEFGHIKLMNPQRSTVWY")
EXTENDED = CANONICAL | set("XBUZO")


def _lm(seed=0, **kw) -> ProteinLM:
    torch.manual_seed(seed)
    m = ProteinLM(make("model", dim=32, n_layers=2, n_heads=2, **kw))
    for b in m.blocks:  # zero-init projections would make every position context-free
        torch.nn.init.normal_(b.attn.o.weight, std=0.2)
        torch.nn.init.normal_(b.mlp.down.weight, std=0.2)
    return m.eval()


def _templates():
    return [unconditional_template(30), infill_template("MK##LV_<mask>A#"), unconditional_template(17)]


# ---------------------------------------------------------------------------------------- schedule
def test_commit_schedule_splits_evenly_first_steps_get_the_extra():
    assert commit_schedule(10, 4) == [3, 3, 2, 2]
    assert commit_schedule(12, 4) == [3, 3, 3, 3]
    assert commit_schedule(3, 5) == [1, 1, 1, 0, 0]
    assert commit_schedule(7, 1) == [7]
    for m in range(0, 40):
        for s in range(1, 12):
            plan = commit_schedule(m, s)
            assert sum(plan) == m and max(plan) - min(plan) <= 1 and plan == sorted(plan, reverse=True)


class _Counting(torch.nn.Module):
    """Wraps a ProteinLM and records the number of <mask> tokens per document at every forward."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, ids, doc, window, dtype=torch.float32):
        n = int(doc.max()) + 1
        self.seen.append([int(((ids == MASK) & (doc == d)).sum()) for d in range(n)])
        return self.model(ids, doc, window, dtype=dtype)

    def logits(self, h):
        return self.model.logits(h)


@pytest.mark.parametrize("steps", [4, 7, 40])
def test_exact_number_committed_per_step(steps):
    wrapped = _Counting(_lm())
    templates = _templates()
    masks = [int((t == MASK).sum()) for t in templates]
    trace = []
    out = sample(wrapped, templates, steps=steps, seed=3, trace=trace)
    plans = [commit_schedule(m, steps) for m in masks]
    assert trace == [[[p[s] for p in plans] for s in range(steps)]]
    # what the model actually saw: masks remaining before each forward (steps with no commits are skipped)
    active = [s for s in range(steps) if any(p[s] for p in plans)]
    assert len(wrapped.seen) == len(active)
    for k, s in enumerate(active):
        assert wrapped.seen[k] == [m - sum(p[:s]) for m, p in zip(masks, plans)]
    assert all(int((x == MASK).sum()) == 0 for x in out)


def test_default_steps_is_dsm_divisor_ten():
    trace = []
    sample(_lm(), [unconditional_template(45)], steps=0, trace=trace)
    assert len(trace[0]) == 4 and [c[0] for c in trace[0]] == [12, 11, 11, 11]


# ---------------------------------------------------------------------------------------- sampling
def test_fixed_seed_gives_the_same_samples_and_seeds_differ():
    m = _lm()
    kw = dict(steps=6, temperature=1.0, top_k=5, top_p=0.9)
    a = sample(m, _templates(), seed=7, **kw)
    b = sample(m, _templates(), seed=7, **kw)
    c = sample(m, _templates(), seed=8, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_samples_do_not_depend_on_batching():
    m = _lm()
    ts = [unconditional_template(24) for _ in range(5)]
    together = sample(m, ts, steps=8, seed=1, batch=64)
    apart = sample(m, ts, steps=8, seed=1, batch=2)
    assert all(torch.equal(x, y) for x, y in zip(together, apart))
    assert len({letters(x) for x in together}) == 5  # distinct sequences, distinct streams


@pytest.mark.parametrize("remasking", ["random", "low_confidence", "low_logit", "dual"])
@pytest.mark.parametrize("extended", [False, True])
def test_only_valid_letters_even_when_specials_are_favoured(remasking, extended):
    m = _lm()
    with torch.no_grad():  # make every special, gap and rare letter far more likely than any amino acid
        for tok in ("<cls>", "<pad>", "<eos>", "<unk>", "<mask>", "<null_1>", ".", "-"):
            m.lm_head.bias[TOKEN_TO_ID[tok]] = 25.0
        for tok in "XBUZO":
            m.lm_head.bias[TOKEN_TO_ID[tok]] = 20.0
    out = sample(m, _templates(), steps=5, temperature=1.5, remasking=remasking, extended=extended, seed=0)
    allowed = set(EXTENDED_IDS if extended else CANONICAL_IDS)
    for x, t in zip(out, _templates()):
        assert x[0] == CLS and x[-1] == EOS and x.numel() == t.numel()
        assert set(x[1:-1].tolist()) <= allowed
        s = letters(x)
        assert set(s) <= (EXTENDED if extended else CANONICAL) and len(s) == t.numel() - 2
    if extended:  # the favoured rare letters do get sampled
        assert any(set(letters(x)) & set("XBUZO") for x in out)


def test_infill_keeps_given_letters_and_fills_only_masked_positions():
    m = _lm()
    given = "MKT_#<mask>LVEX__A<MASK>#w"
    t = infill_template(given)
    assert letters(t) == "MKTLVEXAW" and int((t == MASK).sum()) == 7
    (x,) = sample(m, [t], steps=3, seed=2)
    keep = t != MASK
    assert torch.equal(x[keep], t[keep])  # given letters (even X) unchanged
    assert set(letters(x[~keep])) <= CANONICAL and x.numel() == t.numel()
    filled = letters(x)
    assert re.fullmatch(r"MKT...LVEX..A..W", filled)


def test_infill_input_forms(tmp_path):
    fa = tmp_path / "in.fasta"
    fa.write_text(">p1 some description\nMK__\nLV\n>p2\n#A#\n")
    assert read_infill(str(fa)) == [("p1", "MK__LV"), ("p2", "#A#")]
    txt = tmp_path / "in.txt"
    txt.write_text("MK_\n\nA#\n")
    assert read_infill(str(txt)) == [("infill_0", "MK_"), ("infill_1", "A#")]
    assert read_infill("MK_,A#") == [("infill_0", "MK_"), ("infill_1", "A#")]
    with pytest.raises(GenerateError, match="holds '-'"):
        infill_template("MK-_")


def _greedy_reference(model, template, steps):
    """Independent greedy sampler: argmax over the canonical letters, commit the highest logits."""
    x = template.clone()
    allowed = torch.tensor(CANONICAL_IDS)
    for n in commit_schedule(int((x == MASK).sum()), steps):
        if n == 0:
            continue
        pos = torch.nonzero(x == MASK).flatten()
        with torch.no_grad():
            h = model(x, torch.zeros_like(x, dtype=torch.int32), 1 << 30)
            z = model.logits(h[pos])[:, allowed]
        best, arg = z.max(-1)
        top = torch.sort(best, descending=True, stable=True).indices[:n]
        x[pos[top]] = allowed[arg[top]]
    return x


def test_top_k_1_and_temperature_to_zero_equal_greedy_argmax():
    m = _lm()
    t = unconditional_template(26)
    ref = _greedy_reference(m, t, steps=6)
    for kw in (dict(temperature=0.0), dict(top_k=1, temperature=1.0), dict(top_k=1, temperature=1e-6),
               dict(temperature=1e-9), dict(top_p=1e-9, temperature=1.0)):
        (x,) = sample(m, [t], steps=6, remasking="low_logit", seed=5, **kw)
        assert torch.equal(x, ref), kw
    # with random commit order too, top_k=1 is the T=0 sampler (same draws, same order)
    a = sample(m, [t], steps=6, top_k=1, temperature=2.0, seed=9)
    b = sample(m, [t], steps=6, temperature=0.0, seed=9)
    assert torch.equal(a[0], b[0])
    c = sample(m, [t], steps=6, temperature=1.0, seed=9)
    assert not torch.equal(a[0], c[0])  # and sampling at T=1 is not greedy


# ---------------------------------------------------------------------------------------- run dirs
def _save_run(run_dir: Path, model, model_cfg: ModelConfig, max_length: int, step=2):
    cfg = RunConfig(model=model_cfg, data=DataConfig(max_length=max_length))
    save_checkpoint(run_dir / "checkpoints", step, model, cfg)


def _read_fasta(path: Path) -> list[tuple[str, str]]:
    recs = []
    for block in path.read_text().split(">")[1:]:
        head, *lines = block.splitlines()
        recs.append((head.split()[0], "".join(lines)))
    return recs


def test_patch_unet_checkpoint_generates_and_infills(tmp_path):
    from speedrun.models.patch_unet import PatchUNet

    mc = make("model", arch="patch_unet", dim=32, n_heads=2, n_layers=4, n_extra_layers=1, mlp_ratio=2.0)
    torch.manual_seed(0)
    _save_run(tmp_path, PatchUNet(mc, 64), mc, 64)
    recs = generate(tmp_path, GenerateConfig(num=3, length=40, steps=5, seed=1, device="cpu"))
    assert [len(s) for _, s in recs] == [40, 40, 40] and all(set(s) <= CANONICAL for _, s in recs)
    again = generate(tmp_path, GenerateConfig(num=3, length=40, steps=5, seed=1, device="cpu"))
    assert recs == again
    (name, s), = generate(tmp_path, GenerateConfig(infill="MK##LV", steps=2, device="cpu"))
    assert name == "infill_0" and s[:2] == "MK" and s[4:] == "LV" and set(s) <= CANONICAL
    with pytest.raises(GenerateError, match="use length<=62"):
        generate(tmp_path, GenerateConfig(num=1, length=63, device="cpu"))


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no complete checkpoint" in err and "run" in err
    assert main([str(tmp_path), "tempreature=1"]) == 2
    assert "did you mean temperature" in capsys.readouterr().err
    assert main([str(tmp_path), "remasking=best"]) == 2
    assert "remasking='best' is not one of" in capsys.readouterr().err
    assert main([str(tmp_path), "top_p=0"]) == 2
    assert "top_p=0.0 must be in (0, 1]" in capsys.readouterr().err


def test_cli_on_a_saved_protein_lm(tmp_path, capsys):
    mc = make("model", dim=32, n_layers=2, n_heads=2)
    _save_run(tmp_path / "run", _lm(), mc, 128)
    out = tmp_path / "s.fasta"
    assert main([str(tmp_path / "run"), "num=5", "length=33", "steps=4", "seed=4", f"out={out}"]) == 0
    assert "wrote 5 sequence(s)" in capsys.readouterr().err
    recs = _read_fasta(out)
    assert [n for n, _ in recs] == [f"sample_{i}" for i in range(5)]
    assert all(len(s) == 33 and set(s) <= CANONICAL for _, s in recs)
    assert "steps=4 T=1 top_k=0 top_p=1 remasking=random seed=4" in out.read_text().splitlines()[0]
    assert main([str(tmp_path / "run"), "infill=MA##_W,K#", "num=2", "temperature=0"]) == 0
    recs = [l for l in capsys.readouterr().out.splitlines()]
    names = [l.split()[0][1:] for l in recs if l.startswith(">")]
    seqs = [l for l in recs if not l.startswith(">")]
    assert names == ["infill_0_sample0", "infill_0_sample1", "infill_1_sample0", "infill_1_sample1"]
    assert seqs[0] == seqs[1] and seqs[0][:2] == "MA" and seqs[0][-1] == "W" and len(seqs[0]) == 6
    assert seqs[2][0] == "K" and len(seqs[2]) == 2


@pytest.mark.slow
def test_tiny_trained_run_end_to_end(tiny_cfg, tmp_path):
    from speedrun.train import run

    summary = run(tiny_cfg("train.max_steps=2"), tmp_path / "run")
    assert summary["status"] == "done"
    a, b = tmp_path / "a.fasta", tmp_path / "b.fasta"
    args = [str(tmp_path / "run"), "num=4", "length=20", "steps=5", "seed=11", "remasking=low_confidence"]
    assert main(args + [f"out={a}"]) == 0 and main(args + [f"out={b}"]) == 0
    assert a.read_text() == b.read_text()
    recs = _read_fasta(a)
    assert len(recs) == 4 and all(len(s) == 20 and set(s) <= CANONICAL for _, s in recs)
