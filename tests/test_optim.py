"""Muon: near-orthogonal updates, identical to torch.optim.Muon where the definitions coincide;
parameter groups; schedules."""
from __future__ import annotations

import pytest
import torch

from speedrun.config import make
from speedrun.models.unet import ProteinLM
from speedrun.optim import (Muon, apply_schedules, build_optimizers, lr_multiplier, muon_momentum,
                            param_groups, zeropower_via_newtonschulz5)


@pytest.mark.parametrize("shape", [(64, 64), (128, 48), (48, 128)])
def test_newton_schulz_is_near_orthogonal(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    o = zeropower_via_newtonschulz5(g).float()
    s = torch.linalg.svdvals(o)
    assert o.shape == g.shape
    # the quintic maps singular values into roughly [0.5, 1.5]; only the very smallest singular values of
    # a square Gaussian matrix (near 0) stay below after 5 steps
    assert s.max() < 1.5
    assert (s > 0.5).float().mean() > (0.9 if shape[0] == shape[1] else 0.999)
    # and it is (approximately) the polar factor U V^T
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cos = (o * (u @ vh)).sum() / (o.norm() * (u @ vh).norm())
    assert cos > 0.95


def test_matches_torch_optim_muon():
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    torch.manual_seed(0)
    ws = [torch.randn(96, 32), torch.randn(32, 32), torch.randn(32, 80)]
    a = [w.clone().requires_grad_(True) for w in ws]
    b = [w.clone().requires_grad_(True) for w in ws]
    ours = Muon(a, lr=0.02, momentum=0.9, nesterov=True)
    ref = torch.optim.Muon(b, lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.0, adjust_lr_fn="original")
    for step in range(4):
        grads = [torch.randn_like(w) for w in ws]
        for p, q, gr in zip(a, b, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        ours.step()
        ref.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def test_shape_scaling():
    w = torch.zeros(96, 32, requires_grad=True)
    w.grad = torch.randn(96, 32)
    opt = Muon([w], lr=1.0, momentum=0.0, nesterov=False)
    opt.step()
    expected = -(96 / 32) ** 0.5 * zeropower_via_newtonschulz5(w.grad).float()
    torch.testing.assert_close(w.detach(), expected, atol=1e-2, rtol=1e-2)


def test_param_groups_cover_every_parameter_once():
    with torch.device("meta"):
        for kw in (dict(), dict(tie_embeddings=True), dict(arch="transformer")):
            m = ProteinLM(make("model", dim=64, n_layers=4, n_heads=2, **kw))
            g = param_groups(m)
            ids = [id(p) for v in g.values() for _, p in v]
            assert len(ids) == len(set(ids)) == len({id(p) for p in m.parameters()})
            assert all(p.ndim == 2 for _, p in g["hidden"])
            assert all("embed" in n for n, _ in g["embed"]) and all("lm_head" in n for n, _ in g["head"])
            assert all(p.ndim < 2 for _, p in g["scalar"])


def test_reference_groups_and_lrs():
    m = ProteinLM(make("model", dim=64, n_layers=4, n_heads=2))
    muon, adam = build_optimizers(m, make("optimizer"), torch.device("cpu"))
    assert isinstance(muon, Muon) and muon.param_groups[0]["lr"] == 0.05
    lrs = {g["name"]: g["lr"] for g in adam.param_groups}
    assert lrs == {"embed": 0.06, "head": 0.008, "scalar": 0.04}
    assert adam.defaults["betas"] == (0.8, 0.95)
    (adamw,) = build_optimizers(m, make("optimizer", name="adamw", weight_decay=0.01), torch.device("cpu"))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["fused"]
    assert adamw.defaults["weight_decay"] == 0.01 and adamw.defaults["betas"] == (0.9, 0.999)


def test_schedules():
    c = make("optimizer", schedule="cosine", lr_warmup_steps=10)
    assert lr_multiplier(c, 0, 100) == pytest.approx(0.1)
    assert lr_multiplier(c, 9, 100) == pytest.approx(1.0)
    assert lr_multiplier(c, 55, 100) == pytest.approx(0.5, abs=1e-9)
    assert lr_multiplier(c, 100, 100) == pytest.approx(0.0, abs=1e-9)
    assert lr_multiplier(c, 0, 100, warmup=False) == pytest.approx(1.0)
    w = make("optimizer", schedule="wsd", lr_warmup_steps=10, cooldown_frac=0.2)
    assert lr_multiplier(w, 50, 100) == 1.0 and lr_multiplier(w, 90, 100) == pytest.approx(0.5)
    assert muon_momentum(make("optimizer"), 0) == pytest.approx(0.85)
    assert muon_momentum(make("optimizer"), 150) == pytest.approx(0.90)
    assert muon_momentum(make("optimizer"), 1000) == pytest.approx(0.95)
    m = ProteinLM(make("model", dim=64, n_layers=2, n_heads=2))
    opts = build_optimizers(m, c, torch.device("cpu"))
    apply_schedules(opts, c, 0, 100)
    assert opts[0].param_groups[0]["lr"] == pytest.approx(0.05)  # Muon: no warm-up
    assert opts[1].param_groups[0]["lr"] == pytest.approx(0.006)  # Adam embed: 0.06 x 0.1


def test_batched_same_shape_matrices_match_torch_muon():
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    torch.manual_seed(1)
    ws = [torch.randn(64, 48) for _ in range(3)] + [torch.randn(48, 64) for _ in range(2)]
    a = [w.clone().requires_grad_(True) for w in ws]
    b = [w.clone().requires_grad_(True) for w in ws]
    ours, ref = Muon(a, lr=0.02), torch.optim.Muon(b, lr=0.02, weight_decay=0.0, adjust_lr_fn="original")
    for _ in range(3):
        for p, q in zip(a, b):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(a, b):  # batched bf16 GEMMs may round differently from one-at-a-time ones
        torch.testing.assert_close(p, q, atol=2e-4, rtol=0)


def _two_muon_steps(shapes):
    torch.manual_seed(0)
    ps = [torch.randn(*s, requires_grad=True) for s in shapes]
    opt = Muon(ps, lr=0.05)
    for step in range(2):
        torch.manual_seed(100 + step)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    return ps


def _muon_rank(rank, world, port, shapes, out_dir):
    import os
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ps = _two_muon_steps(shapes)
    torch.save([p.detach() for p in ps], f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # no rank tears gloo down while a peer still talks to it (that aborted ~1 run in 8)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_muon_shares_work_and_matches_one_rank(tmp_path, world):
    import torch.multiprocessing as mp
    from speedrun.dist import free_port

    shapes = [(32, 16)] * 5 + [(16, 16)] * 2 + [(8, 24)]  # counts not divisible by the world size
    mp.start_processes(_muon_rank, args=(world, free_port(), shapes, str(tmp_path)), nprocs=world,
                       start_method="spawn")
    ps = _two_muon_steps(shapes)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for r in range(world):
        for got, want in zip(results[r], ps):
            torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=0)


def test_fused_qkv_orthogonalises_the_stacked_matrix():
    """optimizer.fused_qkv (Dec-2024): q, k, v of a layer are one 3d x d matrix for Muon, lr x sqrt(3)."""
    torch.manual_seed(0)
    m = ProteinLM(make("model", dim=32, n_layers=2, n_heads=2))
    (muon, _) = build_optimizers(m, make("optimizer", fused_qkv=True, momentum=0.0, nesterov=False, lr_hidden=0.1),
                                 torch.device("cpu"))
    attn = m.blocks[0].attn
    before = [attn.q.weight.detach().clone(), attn.k.weight.detach().clone(), attn.v.weight.detach().clone()]
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    g = torch.cat([attn.q.weight.grad, attn.k.weight.grad, attn.v.weight.grad])
    expected = -0.1 * 3 ** 0.5 * zeropower_via_newtonschulz5(g).float()
    muon.step()
    got = torch.cat([attn.q.weight.detach(), attn.k.weight.detach(), attn.v.weight.detach()]) - torch.cat(before)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert {len(t) for t in muon.param_groups[0]["fused_with"]} == {3} and len(muon.param_groups[0]["fused_with"]) == 2
