"""The benchmark's code path runs on CPU with a tiny model (figures are measured on the GPU, not here)."""
from __future__ import annotations

import json

from speedrun.bench.__main__ import main


def test_bench_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    res = main(["model=unet_tiny", "hardware.micro_batch_tokens=1024", "data.max_length=256",
                "train.window_start=256", "bench.steps=4", "bench.warmup=1", f"bench.out={out}"])
    assert res["timed_steps"] == 4 and res["tokens_per_s"] > 0 and res["step_ms_median"] > 0
    assert res["flops_per_token"] > 0 and res["mean_context"] > 0 and res["mfu"] is None
    assert json.loads(out.read_text())["tokens_per_s"] == res["tokens_per_s"]
    assert "tokens_per_s" in capsys.readouterr().out


def test_bench_profile_groups_the_time(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    res = main(["model=unet_tiny", "hardware.micro_batch_tokens=1024", "data.max_length=256",
                "train.window_start=256", "bench.steps=2", "bench.warmup=1", f"bench.profile={trace}"])
    prof = res["profile"]
    assert trace.exists() and json.loads(trace.read_text())["traceEvents"]
    assert prof["total_ms"] > 0 and abs(sum(prof["categories"].values()) - prof["total_ms"]) < 1e-6
    assert "gemm" in prof["categories"]  # the tiny model's linear layers are CPU matmuls
    assert all(cat in prof["categories"] for _, cat, _, _ in prof["kernels"])
    assert "self time per optimizer step" in capsys.readouterr().out


def test_profile_categories():
    from speedrun.bench.profile import category

    assert category("flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel") == "attention"
    assert category("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT") == "gemm"
    assert category("triton_per_fused__to_copy_mul_rms_norm_0") == "fused (Inductor/Triton)"
    assert category("aten::addmm") == "gemm"
    assert category("void at::native::vectorized_elementwise_kernel<4>") == "other (eager ops)"


def test_parity_options_and_cpu_refusal(monkeypatch):
    import pytest

    from speedrun.bench import parity

    overrides, opts = parity.parse(["model=unet_tiny", "parity.batches=3", "parity.cos_tol=0.99"])
    assert overrides == ["model=unet_tiny"] and opts["batches"] == 3 and opts["cos_tol"] == 0.99
    from speedrun.errors import SpeedrunError

    with pytest.raises(SpeedrunError, match="unknown parity option parity.nope"):
        parity.parse(["parity.nope=1"])
    with pytest.raises(SpeedrunError, match="parity.overwrite=maybe: use parity.overwrite=true"):
        parity.parse(["parity.overwrite=maybe"])
    assert parity.parse(["parity.overwrite=false"])[1]["overwrite"] is False
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SpeedrunError, match="run it on a GPU machine"):
        parity.main(["model=unet_tiny"])


def test_bench_cli_mistakes_are_one_line(tmp_path):
    """No GPU for hardware=gpu, an existing results file, a bad option value: one line each, exit 2,
    and the file that was there is left as it was."""
    import os
    import subprocess
    import sys

    existing = tmp_path / "mine.json"
    existing.write_text("{}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cases = [(["model=unet_tiny", "hardware=gpu"], "no CUDA GPU is visible"),
             (["model=unet_tiny", f"bench.out={existing}"], "bench.overwrite=true"),
             (["bench.steps=many"], "bench.steps=many is not an int")]
    for args, needle in cases:
        r = subprocess.run([sys.executable, "-m", "speedrun.bench", *args], capture_output=True, text=True,
                           env=env, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr
    assert existing.read_text() == "{}"


def test_bench_counts_graphs_compiled_after_the_first_step(monkeypatch):
    import torch._dynamo.utils as dynamo_utils

    from speedrun import train

    def fake_run(cfg, run_dir):  # two steps; a "recompile" lands between them
        train.STEP_HOOK(1)
        dynamo_utils.counters["stats"]["unique_graphs"] += 2
        train.STEP_HOOK(2)
        dynamo_utils.counters["stats"]["unique_graphs"] += 5  # the final evaluation's graphs: not counted
        return {"step_times_ms": [10.0, 10.0], "batch": {"batch_tokens": 1024, "micro_batch_tokens": 1024,
                "grad_accum": 1, "world_size": 1}, "flops_per_token": 1.0, "n_params": 1, "device": "cpu",
                "attention": "sdpa"}

    monkeypatch.setattr(train, "run", fake_run)
    res = main(["model=unet_tiny", "bench.steps=1", "bench.warmup=0"])
    assert res["recompiles_after_first_step"] == 2
    assert train.STEP_HOOK is None
