"""FP8 GEMMs (speedrun/fp8.py, hardware.fp8) and the compile memory budget. The FP8 arithmetic also runs
on the CPU, so its numerics are checked here against bf16/fp32 references; the speed is measured on the
GPU by speedrun.bench."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from speedrun.config import ConfigError
from speedrun.fp8 import E4M3, E5M2, fp8_linear, quantize


def _cos(a, b):
    return F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_quantize_uses_the_full_range_and_round_trips(dtype):
    x = torch.randn(64, 96) * 1e-3  # tiny values: the scale must lift them into range
    x8, inv = quantize(x, dtype)
    assert x8.dtype == dtype
    assert x8.float().abs().max().item() == pytest.approx(torch.finfo(dtype).max, rel=1e-6)
    back = x8.float() * inv
    rel = ((back - x).norm() / x.norm()).item()
    assert rel < (0.05 if dtype == E4M3 else 0.1)


def test_fp8_linear_matches_the_bf16_matmul_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(256, 128, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(192, 128) / 128 ** 0.5).requires_grad_()
    y = fp8_linear(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (256, 192)
    g = torch.randn_like(y)
    y.backward(g)
    gx, gw = x.grad.clone(), w.grad.clone()
    assert gw.dtype == torch.float32  # accumulates into the fp32 master weight

    x.grad = w.grad = None
    ref = F.linear(x.float(), w)
    ref.backward(g.float())
    assert _cos(y, ref) > 0.998
    assert _cos(gx, x.grad) > 0.99
    assert _cos(gw, w.grad) > 0.99
    assert ((y.float() - ref).norm() / ref.norm()).item() < 0.06


def test_fp8_linear_keeps_leading_dimensions():
    x = torch.randn(2, 32, 64, dtype=torch.bfloat16)
    w = torch.randn(48, 64)
    assert fp8_linear(x, w).shape == (2, 32, 48)


def test_enable_fp8_switches_only_the_block_matrices_and_training_step_matches(tiny_cfg):
    from speedrun.models import build_model

    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.set_attention_backend(torch.device("cpu"))
    T = 256
    ids = torch.randint(4, 24, (T,))
    docs = torch.zeros(T, dtype=torch.long)
    docs[T // 2:] = 1

    def loss_and_grads():
        model.zero_grad()
        h = model(ids, docs, 256, dtype=torch.bfloat16)
        loss = model.logits(h).float().logsumexp(-1).mean()
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    # zero-initialised output matrices would hide the FP8 path: give every matrix a random start
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.05)
    base_loss, base_grad = loss_and_grads()
    n = model.enable_fp8()
    assert n == 6 * cfg.model.n_layers
    assert not model.lm_head.decoder.fp8
    fp8_loss, fp8_grad = loss_and_grads()
    assert fp8_loss != base_loss  # the FP8 path really ran
    assert fp8_loss == pytest.approx(base_loss, rel=0.02)
    assert _cos(fp8_grad, base_grad) > 0.97


def test_fp8_needs_bf16_precision(tiny_cfg):
    with pytest.raises(ConfigError, match="hardware.precision=bf16"):
        tiny_cfg("hardware.fp8=true")


@pytest.mark.slow
def test_fp8_training_run_on_cpu(tiny_cfg, tmp_path):
    from speedrun.train import run

    summary = run(tiny_cfg("hardware.fp8=true", "hardware.precision=bf16", "train.max_steps=2", "eval.max_tokens=1024",
                           "checkpoint.final=false"), tmp_path)
    assert summary["status"] == "done"
    assert summary["step"] == 2 and summary["precision"] == "bf16+fp8" and torch.isfinite(torch.tensor(summary["val_loss"]))


@pytest.mark.parametrize("bad", ["0", "-0.5", "1.5"])
def test_memory_budget_must_be_in_zero_one(tiny_cfg, bad):
    with pytest.raises(ConfigError, match="hardware.memory_budget"):
        tiny_cfg(f"hardware.memory_budget={bad}")


def test_compile_model_sets_the_activation_memory_budget(tiny_cfg):
    import torch._functorch.config as functorch_config

    from speedrun.models import build_model
    from speedrun.setup import compile_model

    before = functorch_config.activation_memory_budget
    try:
        compile_model(build_model(tiny_cfg().model), "blocks", 0.9)  # lazy: nothing is compiled until a call
        assert functorch_config.activation_memory_budget == 0.9
    finally:
        functorch_config.activation_memory_budget = before
