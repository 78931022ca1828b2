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
