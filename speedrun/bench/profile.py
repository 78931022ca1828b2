"""Where a training step's time goes: `python -m speedrun.bench ... bench.profile=TRACE.json`.

The benchmark calls the profiler's `step` from `speedrun.train.STEP_HOOK`, so the steps after the
warm-up are recorded with `torch.profiler` (the compile and warm-up steps are not). `kernel_table`
groups the recorded kernels (CUDA) or operators (CPU) by what they do and prints milliseconds per
optimizer step, biggest first; the Chrome trace goes to TRACE.json (open it in https://ui.perfetto.dev).
"""
from __future__ import annotations

import re
from contextlib import contextmanager

# first match wins: attention kernels are CUTLASS/CuTe code too, so they are tested before GEMMs
CATEGORIES = (
    ("attention", re.compile(r"flash|fmha|cudnn|attention|attn", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|matmul|\bmm\b|addmm|bmm", re.I)),
    ("fused (Inductor/Triton)", re.compile(r"^triton_|triton", re.I)),
    ("communication", re.compile(r"nccl|all_reduce|allreduce|gloo", re.I)),
    ("copy / fill", re.compile(r"memcpy|memset|copy_|fill_|Memcpy|Memset", re.I)),
)


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other (eager ops)"


def _self_time_us(event, on_device: bool) -> float:
    if on_device:
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(event, attr):
                return float(getattr(event, attr))
        return 0.0
    return float(event.self_cpu_time_total)


def kernel_table(prof, steps: int, on_device: bool, top: int = 25) -> dict:
    """{'categories': {label: ms per step}, 'kernels': [(name, category, ms per step, calls per step)],
    'total_ms': ms per step}, from a finished profiler that recorded `steps` optimizer steps."""
    rows = []
    for ev in prof.key_averages():
        us = _self_time_us(ev, on_device)
        if us <= 0 or ev.key.startswith("ProfilerStep") or "#" in ev.key:
            continue  # the profiler's and optimizers' record_function ranges, not operators
        if on_device and not str(getattr(ev, "device_type", "")).endswith("CUDA"):
            continue  # host-side operators: their device time is the kernels' own, counted once below
        rows.append((ev.key, category(ev.key), us / 1e3 / steps, ev.count / steps))
    rows.sort(key=lambda r: -r[2])
    cats: dict[str, float] = {}
    for _, cat, ms, _ in rows:
        cats[cat] = cats.get(cat, 0.0) + ms
    return {"categories": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "kernels": rows[:top], "total_ms": sum(cats.values())}


def format_table(table: dict, on_device: bool) -> str:
    what = "device kernels" if on_device else "CPU operators"
    total = table["total_ms"] or 1.0
    lines = [f"profile: {what}, self time per optimizer step ({table['total_ms']:.1f} ms in all)"]
    for cat, ms in table["categories"].items():
        lines.append(f"  {cat:<26} {ms:9.2f} ms  {100 * ms / total:5.1f} %")
    lines.append(f"  top {len(table['kernels'])}:")
    for name, cat, ms, calls in table["kernels"]:
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"    {ms:8.2f} ms  x{calls:<6.0f} [{cat}] {short}")
    return "\n".join(lines)


@contextmanager
def profiling(trace_path: str, skip_steps: int, active_steps: int, cuda: bool):
    """Profile `active_steps` optimizer steps after `skip_steps` (warm-up). Yields a dict whose 'hook'
    must be called after every optimizer step (train.STEP_HOOK); it holds {'table': ..., 'text': ...}
    once the block ends."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    result: dict = {}

    def on_ready(p):
        result["table"] = kernel_table(p, active_steps, on_device=cuda)
        result["text"] = format_table(result["table"], on_device=cuda)
        p.export_chrome_trace(trace_path)

    prof = profile(activities=activities, on_trace_ready=on_ready,
                   schedule=schedule(wait=max(0, skip_steps - 1), warmup=1, active=active_steps, repeat=1))
    prof.start()
    result["hook"] = lambda step: prof.step()
    try:
        yield result
    finally:
        try:
            prof.stop()
        except Exception:  # the schedule already finished: stop() has nothing left to do
            pass
        if torch.cuda.is_available():
            torch.cuda.synchronize()
