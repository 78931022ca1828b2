"""Training-throughput benchmark: `python -m speedrun.bench [group=option ...] [key=value ...] [bench.*=...]`.

Composed by Hydra exactly like a run (`python -m speedrun.bench model=unet optimizer=muon hardware=gpu
data=local data.path=DIR`), then it runs the real training loop (speedrun.train.run) for
`bench.warmup + bench.steps` optimizer steps with evaluation and checkpoints off, and prints:

* tokens/s (from the median step time, and overall), step time median / p10 / p90;
* MFU = tokens/s x FLOPs per token / peak FLOP/s, with FLOPs per token
  = 6 x (matrix parameters) + 12 x layers x width x mean attended context (speedrun.models.unet.flops_per_token;
  the mean context is sum(L_i^2) / sum(L_i) over the documents of the batches) and the peak given by
  `bench.peak_tflops` (default 793: the bf16 matmul ceiling measured on an H200);
* time to the first optimizer step (from process start, compilation included), compile seconds;
* peak GPU memory; the data loader's share of train time (host time spent waiting for batches);
* recompiles: torch.compile graphs compiled after the first optimizer step (0 when neither the
  sliding window nor the mask-rate schedule forces a recompile).

Bench-only keys: bench.steps (timed steps, default 20), bench.warmup (steps excluded from the
statistics, default 3), bench.peak_tflops, bench.out (a JSON file for the results; an existing one needs bench.overwrite=true), bench.profile
(a Chrome-trace path: profile up to 3 steps after the warm-up and print where the time goes, grouped
into attention / GEMM / fused Triton kernels / other; speedrun/bench/profile.py). Profiled steps run
slower than the others, so read speed from a run without bench.profile.
On CPU with a tiny model it exercises the same code path (tests/test_bench.py).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from ..errors import SpeedrunError, cli_main


def _value(key: str, text: str, default):
    if default is None:
        return text
    if isinstance(default, bool):
        if text.lower() not in ("true", "false"):
            raise SpeedrunError(f"{key}={text}: use {key}=true or {key}=false")
        return text.lower() == "true"
    try:
        return type(default)(text)
    except ValueError:
        raise SpeedrunError(f"{key}={text} is not a{'n' if type(default) is int else ''} "
                            f"{type(default).__name__}") from None


CONF = Path(__file__).resolve().parent.parent.parent / "conf"


def split_options(argv: list[str], prefix: str, defaults: dict) -> tuple[list[str], dict]:
    """Split `PREFIX.key=value` tool options from Hydra overrides. Each value takes the type of its
    default (None: a string); an unknown key fails with one line listing the known ones."""
    opts, overrides = dict(defaults), []
    for a in argv:
        if a.startswith(prefix + "."):
            k, _, v = a[len(prefix) + 1:].partition("=")
            if k not in opts:
                raise SpeedrunError(f"unknown {prefix} option {prefix}.{k}: choose from {', '.join(opts)}")
            opts[k] = _value(f"{prefix}.{k}", v, defaults[k])
        else:
            overrides.append(a)
    return overrides, opts


def parse(argv: list[str]) -> tuple[list[str], dict]:
    return split_options(argv, "bench", {"steps": 20, "warmup": 3, "peak_tflops": 793.0, "out": None,
                                         "overwrite": False, "profile": None})


def compose(overrides: list[str]):
    from ..compose import compose as compose_run

    return compose_run(overrides)


def claim_out(opts: dict, prefix: str):
    """The results files, refused before any work when they exist (`PREFIX.overwrite=true` replaces them)."""
    from ..fsutil import claim_output_file

    for key in ("out", "profile"):
        if opts.get(key):
            claim_output_file(opts[key], opts["overwrite"], flag=f"{prefix}.overwrite=true")


def write_out(opts: dict, result: dict):
    if opts["out"]:
        from ..fsutil import write_json

        write_json(opts["out"], result)


def main(argv: list[str] | None = None) -> dict:
    overrides, bench = parse(sys.argv[1:] if argv is None else argv)
    claim_out(bench, "bench")
    cfg = compose(overrides)
    cfg.train.max_steps = bench["warmup"] + bench["steps"] + 1  # +1: the first step has no predecessor
    cfg.train.log_every = max(1, cfg.train.max_steps)
    cfg.eval.every_steps = 0
    cfg.eval.max_tokens = cfg.hardware.micro_batch_tokens  # the final evaluation: one batch
    cfg.checkpoint.every_steps = 0
    cfg.checkpoint.final = False
    cfg.optimizer.lr_warmup_steps = min(cfg.optimizer.lr_warmup_steps, 1)

    import torch
    import torch._dynamo.utils as dynamo_utils

    from .. import train

    run_dir = Path(tempfile.mkdtemp(prefix="speedrun-bench-"))
    t0 = time.time()
    profiled: dict = {}
    # torch.compile graphs compiled so far, after the first and after the latest optimizer step (the
    # final evaluation, which compiles its own no-grad graphs, comes after the last step: not counted)
    graphs = {"first": None, "last": None}

    def hook(step: int) -> None:
        graphs["last"] = dynamo_utils.counters["stats"]["unique_graphs"]
        if step == 1:
            graphs["first"] = graphs["last"]
        if "hook" in profiled:
            profiled["hook"](step)

    train.STEP_HOOK = hook
    try:
        if bench["profile"]:
            if cfg.hardware.gpus > 1:
                raise SpeedrunError("bench.profile profiles one process: set hardware.gpus=1")
            from .profile import profiling

            on_gpu = cfg.hardware.device == "cuda" or (cfg.hardware.device == "auto" and torch.cuda.is_available())
            with profiling(bench["profile"], bench["warmup"], min(3, bench["steps"]), cuda=on_gpu) as profiled:
                summary = train.run(cfg, run_dir)
        else:
            summary = train.run(cfg, run_dir)
    finally:
        train.STEP_HOOK = None
    # graphs compiled after the first step: recompiles as the window, mask rate or batch change (want 0);
    # None when the ranks ran in child processes (hardware.gpus > 1), whose counters are not visible here
    recompiles = graphs["last"] - graphs["first"] if graphs["first"] is not None else None
    times = summary.get("step_times_ms") or []
    steady = times[bench["warmup"]:] if len(times) > bench["warmup"] else times
    import numpy as np

    st = np.asarray(steady) if steady else np.asarray([float("nan")])
    batch = summary["batch"]["batch_tokens"]
    tps = batch / (np.median(st) / 1e3)
    fpt = summary["flops_per_token"]
    result = {
        "model": cfg.model.arch, "n_params": summary["n_params"], "device": summary["device"],
        "attention": summary["attention"], "attention_reason": summary.get("attention_reason"),
        "precision": cfg.hardware.precision, "fp8": cfg.hardware.fp8, "triton_rope": cfg.hardware.triton_rope,
        "crop": cfg.data.crop, "compile": cfg.hardware.compile,
        "compile_scope": cfg.hardware.compile_scope,
        "batch_tokens": batch, "micro_batch_tokens": summary["batch"]["micro_batch_tokens"],
        "grad_accum": summary["batch"]["grad_accum"], "world_size": summary["batch"]["world_size"],
        "tokens_per_s": float(tps), "tokens_per_s_overall": summary.get("tokens_per_s"),
        "step_ms_median": float(np.median(st)), "step_ms_p10": float(np.percentile(st, 10)),
        "step_ms_p90": float(np.percentile(st, 90)), "timed_steps": int(len(steady)),
        "flops_per_token": fpt, "mean_context": summary.get("mean_context"),
        "mfu": float(tps * fpt / (bench["peak_tflops"] * 1e12)) if cfg.hardware.device != "cpu" else None,
        "time_to_first_step_s": summary.get("time_to_first_step"), "compile_s": summary.get("compile_seconds"),
        "peak_memory_gib": summary.get("peak_memory_gib"), "recompiles_after_first_step": recompiles,
        "loader_wait_frac": summary.get("loader_wait_frac"),
        "bench_wall_s": time.time() - t0, "run_dir": str(run_dir),
    }
    if profiled.get("table"):
        result["profile"] = {"trace": bench["profile"], **profiled["table"]}
    width = max(len(k) for k in result if k != "profile")
    print("\nspeedrun.bench")
    for k, v in result.items():
        if k == "profile":
            continue
        shown = f"{v:,.4g}" if isinstance(v, float) else v
        print(f"  {k:<{width}}  {shown}")
    if profiled.get("text"):
        print(profiled["text"])
    write_out(bench, result)
    return result


def _cli(argv=None) -> int:
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(_cli))
