"""Does the fast path compute what the eager path computes? `python -m speedrun.bench.parity [overrides]`

    python -m speedrun.bench.parity model=unet optimizer=muon hardware=gpu data=local data.path=DIR

Composed by Hydra like a run. Takes `parity.batches` real training micro-batches (the run's shards,
packing and masking), and for each computes the loss and every parameter's gradient twice from the
same weights: once eager, once through the model compiled as the run would compile it
(`hardware.compile_scope`, `hardware.memory_budget`; FP8 when `hardware.fp8=true`). Prints the largest
loss difference, the cosine between the full gradient vectors, and the smallest per-parameter cosine.
Exits 1 when the losses differ by more than `parity.loss_tol` (default 2e-3, bf16) or the gradient
cosine is below `parity.cos_tol` (default 0.999). Needs CUDA: on the CPU the trainer runs eager.

`parity.eager_attention=varlen` runs the eager side on another attention back-end than the compiled
side's (model.attention, auto: FA4 on Hopper): one call then checks compiled vs eager and FA4 vs FA2.
"""
from __future__ import annotations

import copy
import sys

import torch

from ..errors import SpeedrunError, cli_main


def parse(argv: list[str]) -> tuple[list[str], dict]:
    from .__main__ import split_options

    return split_options(argv, "parity", {"batches": 2, "loss_tol": 2e-3, "cos_tol": 0.999, "out": None,
                                          "overwrite": False, "eager_attention": None})


def loss_and_grads(model, batch, backend_window, dtype) -> tuple[float, dict[str, torch.Tensor]]:
    from ..objectives import dense_loss

    inputs, doc_ids, labels, window = batch
    model.zero_grad(set_to_none=True)
    ctx = model.make_context(doc_ids, backend_window)
    h = model(inputs, doc_ids, window, dtype=dtype, ctx=ctx)
    loss = dense_loss(model.logits(h), labels)
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def main(argv: list[str] | None = None) -> dict:
    overrides, opts = parse(sys.argv[1:] if argv is None else argv)
    from . import __main__ as bench_cli

    bench_cli.claim_out(opts, "parity")
    cfg = bench_cli.compose(overrides)
    if not torch.cuda.is_available():
        raise SpeedrunError("speedrun.bench.parity compares the compiled CUDA path with eager; "
                         "run it on a GPU machine (hardware=gpu)")
    from ..data import data_files
    from ..data.loader import TrainStream
    from ..objectives import apply_objective, generator_for
    from ..models import build_model
    from ..setup import compile_model, max_segment_len, seed_everything, window_at, window_binds

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16 if cfg.hardware.precision == "bf16" else torch.float32
    seed_everything(cfg.seed)
    eager = build_model(cfg.model, cfg.data.max_length).to(device)
    window = window_at(cfg, 0)
    plan = (max_segment_len(cfg), window_binds(cfg), cfg.hardware.micro_batch_tokens, dtype)
    backend = eager.set_attention_backend(device, *plan)
    # train a few random directions into the zero-initialised output matrices, so that every
    # gradient is non-trivial (at init the o/down matrices are zero and most gradients vanish)
    with torch.no_grad():
        for n, p in eager.named_parameters():
            if p.ndim == 2 and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    fast = copy.deepcopy(eager)
    if cfg.hardware.fp8:
        eager.enable_fp8()
        fast.enable_fp8()
    if opts["eager_attention"]:
        eager.cfg = copy.deepcopy(eager.cfg)
        eager.cfg.attention = opts["eager_attention"]
        eager.set_attention_backend(device, *plan)
    compile_model(fast, cfg.hardware.compile_scope, cfg.hardware.memory_budget)
    stream = TrainStream(data_files(cfg.data, "train"), cfg.hardware.micro_batch_tokens, cfg.data.max_length,
                         cfg.data.seed)
    window_t = torch.tensor(window, dtype=torch.int32, device=device)

    def bw(model):  # what make_context takes on this back-end
        return window_t if model.attn_backend == "flex" else window
    rows = []
    for i in range(opts["batches"]):
        tok, did = stream.next_batch()
        tokens = torch.from_numpy(tok).to(device).long()
        doc_ids = torch.from_numpy(did).to(device)
        m = apply_objective(cfg.objective, tokens, doc_ids, 0, generator_for(device, cfg.seed, i))
        batch = (m.inputs, doc_ids, m.labels, window_t)
        le, ge = loss_and_grads(eager, batch, bw(eager), dtype)
        lf, gf = loss_and_grads(fast, batch, bw(fast), dtype)
        a = torch.cat([ge[n].flatten() for n in ge])
        b = torch.cat([gf[n].flatten() for n in ge])
        per = {n: float(torch.nn.functional.cosine_similarity(ge[n].flatten(), gf[n].flatten(), dim=0))
               for n in ge if ge[n].norm() > 0}
        worst = min(per, key=per.get)
        rows.append({"batch": i, "loss_eager": le, "loss_compiled": lf, "loss_diff": abs(le - lf),
                     "grad_cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
                     "worst_param": worst, "worst_param_cosine": per[worst]})
    res = {"attention": backend, "eager_attention": eager.attn_backend, "compile_scope": cfg.hardware.compile_scope,
           "fp8": cfg.hardware.fp8,
           "micro_batch_tokens": cfg.hardware.micro_batch_tokens, "batches": rows,
           "max_loss_diff": max(r["loss_diff"] for r in rows),
           "min_grad_cosine": min(r["grad_cosine"] for r in rows)}
    for r in rows:
        print(f"batch {r['batch']}: loss eager {r['loss_eager']:.6f} compiled {r['loss_compiled']:.6f} "
              f"(diff {r['loss_diff']:.2e}) | gradient cosine {r['grad_cosine']:.6f} | worst parameter "
              f"{r['worst_param']} {r['worst_param_cosine']:.6f}")
    ok = res["max_loss_diff"] <= opts["loss_tol"] and res["min_grad_cosine"] >= opts["cos_tol"]
    print(f"parity {'ok' if ok else 'FAILED'}: max loss diff {res['max_loss_diff']:.2e} (tol {opts['loss_tol']:g}), "
          f"min gradient cosine {res['min_grad_cosine']:.6f} (tol {opts['cos_tol']:g})")
    res["ok"] = ok
    bench_cli.write_out(opts, res)
    return res


def _cli(argv=None) -> int:
    return 0 if main(argv)["ok"] else 1


if __name__ == "__main__":
    sys.exit(cli_main(_cli))
