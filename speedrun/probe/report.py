"""What a probe run hands on: the flat metrics that metrics.jsonl and summary.json carry (and
`run_probes`, the trainer's entry point, which returns them), the terminal table, probe.png, probe.json
and the probe/ metrics merged into summary.json.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from ..rundir import read_json, write_json
from .fitting import _cuda_devices, probe_model
from .tasks import DEFAULT_TASKS

SHORT = {"accuracy": "acc", "mcc": "mcc", "spearman": "spearman", "pearson": "pearson"}


# ---------------------------------------------------------------------------------------- flat metrics

def flat_metrics(results: Dict[str, dict], prefix: str = "probe/", *, baselines: bool = True,
                 full: bool = False) -> dict:
    """Flat metrics for metrics.jsonl / summary.json (compact: each key becomes a sweep-report column):

        probe/<task>/best_layer                 chosen on validation
        probe/<task>/test_acc, test_mcc         at the best layer (classification)
        probe/<task>/test_spearman, test_pearson                  (regression)
        probe/<task>/<baseline>/test_<primary>  when baselines were probed (and baselines=True)
        probe/score                             mean of the tasks' primary test scores (acc for per-residue
                                                classes, MCC for sequence classes, Spearman for values)

    full=True adds probe/<task>/valid_<primary>, probe/<task>/layer<k>/test_<primary> and the
    baselines' best layers.
    """
    out, scores = {}, []
    for name, r in results.items():
        m = r["metric"]
        ms = SHORT.get(m, m)
        tr = r["models"]["trained"]
        p = f"{prefix}{name}/"
        out[p + "best_layer"] = int(tr["best_layer"])
        for key, v in tr["test"].items():
            out[p + f"test_{SHORT.get(key, key)}"] = float(v)
        scores.append(tr["test"][m])
        if full:
            out[p + f"valid_{ms}"] = float(tr["valid"][m])
            for k, lr in tr["layers"].items():
                out[p + f"layer{k}/test_{ms}"] = float(lr["test"][m])
        if baselines:
            for b, br in r["models"].items():
                if b == "trained":
                    continue
                out[p + f"{b}/test_{ms}"] = float(br["test"][m])
                if full and len(br["layers"]) > 1:
                    out[p + f"{b}/best_layer"] = int(br["best_layer"])
    if scores:
        out[prefix + "score"] = float(np.mean(scores))
    return out


def run_probes(model, tasks: Sequence = DEFAULT_TASKS, layers: Any = "all", device=None, *,
               max_sequences: int = 500, max_residues: int = 20000, baselines: Sequence[str] = (),
               data_dir: Optional[str] = None, seed: int = 0, batch_tokens: int = 16384, max_length: int = 1024,
               dtype: torch.dtype = torch.float32, prefix: str = "probe/", full: bool = False) -> dict:
    """Fast probes for use during training: flat metrics, e.g.

        {"probe/ss3/best_layer": 4, "probe/ss3/test_acc": 0.61, "probe/ss3/test_mcc": 0.41,
         "probe/meltome/best_layer": 2, "probe/meltome/test_spearman": 0.42, "probe/meltome/test_pearson": 0.40,
         "probe/solubility/best_layer": 3, "probe/solubility/test_acc": 0.58, "probe/solubility/test_mcc": 0.17,
         "probe/score": 0.39, "probe_seconds": 12.3}

    (full=True adds valid scores and every layer's test score, see `flat_metrics`; baselines add
    probe/<task>/<baseline>/test_<primary>.)

    The task subsets (at most `max_sequences` sequences and `max_residues` residues per split, drawn
    with `seed`) are loaded once per process and reused, so successive calls are comparable. The
    model's train/eval mode and the global RNG states are left as they were; nothing is written.
    Tasks are names (`ss3`, `ss3@PATH`), declaration dicts, YAML paths or `ProbeTask` objects.
    """
    t0 = time.time()
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=_cuda_devices()):
            results = probe_model(model, tasks, layers, device, baselines=baselines, max_sequences=max_sequences,
                                  max_residues=max_residues, seed=seed, data_dir=data_dir, batch_tokens=batch_tokens,
                                  max_length=max_length, dtype=dtype)
    finally:
        model.train(was_training)
    out = flat_metrics(results, prefix=prefix, full=full)
    out[prefix.rstrip("/") + "_seconds"] = round(time.time() - t0, 2)  # no "/": not a sweep-report column
    return out


def run_probes_from_config(model, eval_cfg, device=None, *, max_length: int = 1024,
                           dtype: torch.dtype = torch.float32) -> dict:
    """`run_probes` with the `eval.probe_*` settings of a RunConfig's EvalConfig."""
    return run_probes(model, list(eval_cfg.probe_tasks), eval_cfg.probe_layers, device,
                      max_sequences=eval_cfg.probe_max_sequences, max_residues=eval_cfg.probe_max_residues,
                      data_dir=eval_cfg.probe_data_dir, max_length=max_length, dtype=dtype)


# ---------------------------------------------------------------------------------------- table, plot, JSON

def format_table(results: dict) -> str:
    lines = []
    for name, r in results.items():
        m = r["metric"]
        n = r["n"]
        lines.append(f"{name}: {r['level']} {r['type']}, metric {m}; sequences train {n['train']} / valid "
                     f"{n['valid']} / test {n['test']}")
        all_layers = sorted({k for mr in r["models"].values() for k in mr["layers"]})
        col = "test " + SHORT.get(m, m)
        w = max(10, len(col))
        head = f"  {'model':<12} {'best':>4} {col:>{w}}  " + " ".join(f"{'L' + str(k):>6}" for k in all_layers)
        lines.append(head)
        for model_name, mr in r["models"].items():
            cells = " ".join(f"{mr['layers'][k]['test'][m]:6.3f}" if k in mr["layers"] else f"{'':>6}"
                             for k in all_layers)
            lines.append(f"  {model_name:<12} {mr['best_layer']:>4} {mr['test'][m]:{w}.4f}  {cells}")
    return "\n".join(lines)


def plot(results: dict, path: Path, title: str = "") -> None:
    """Test score per layer, one panel per task: trained vs random-init, one-hot as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    styles = {"trained": dict(color="C0", marker="o", lw=2), "random_init": dict(color="C1", marker="s", ls="--")}
    for ax, (name, r) in zip(axes[0], results.items()):
        m = r["metric"]
        for model_name, mr in r["models"].items():
            ks = sorted(mr["layers"])
            vals = [mr["layers"][k]["test"][m] for k in ks]
            if model_name == "onehot" or len(ks) == 1 and model_name != "trained":
                ax.axhline(vals[0], color="C2", ls=":", lw=1.5, label=f"{model_name} {vals[0]:.3f}")
                continue
            st = styles.get(model_name, {})
            ax.plot(ks, vals, label=f"{model_name} (best L{mr['best_layer']}: {mr['test'][m]:.3f})", **st)
            ax.plot([mr["best_layer"]], [mr["layers"][mr["best_layer"]]["test"][m]], marker="*", ms=14,
                    color=st.get("color", "k"), ls="none")
        ax.set_title(f"{name} ({r['level']}, {m})")
        ax.set_xlabel("layer (0 = input embedding)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"test {m}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj


def write_probe_json(path: Path, results: dict, *, run_dir: Path, checkpoint: str, step: Optional[int],
                     seconds: float, settings: dict) -> None:
    """probe.json: which model and settings, every layer's scores, and the flat metrics (full=True)."""
    write_json(path, {"run_dir": str(run_dir), "checkpoint": checkpoint, "step": step,
                      "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": seconds, "settings": settings,
                      "tasks": _jsonable(results), "metrics": flat_metrics(results, full=True)})


def merge_summary(path: Path, results: dict, step: Optional[int]) -> None:
    """Replace summary.json's probe/ metrics by these, compact ones only: each becomes a sweep-report column."""
    summary = {k: v for k, v in read_json(path).items() if not k.startswith("probe/")}
    summary.update(flat_metrics(results, baselines=False))
    summary["probe_step"] = step
    write_json(path, summary)
