"""Leaderboard and loss curves for a sweep, or for one run.

    python -m speedrun.report SWEEP_DIR [--target LOSS] [--price-per-gpu-hour USD] [--out DIR]
    python -m speedrun.report RUN_DIR

Reads what the runs left behind -- `summary.json`, `metrics.jsonl` and Hydra's `.hydra/overrides.yaml` --
and never imports torch, so it is quick on a login node and can run while a sweep is still going.
SWEEP_DIR is searched recursively (hidden folders and checkpoints skipped), so a sweep root
(`outputs/sweeps/<name>/<time>/`) and a folder of several sweeps (`outputs/sweeps/<name>/`) both work.
Writes into DIR (default: the given folder):

    leaderboard.md    the table, best first: runs that reached the target loss by time to target,
                      then the rest by final validation loss; missing and failed jobs are listed too
    leaderboard.csv   the same rows, unformatted numbers, for pandas/spreadsheets
    loss_vs_tokens.png, loss_vs_time.png
                      train loss (left) and validation loss (right) of every run against tokens seen
                      and against train time (the speedrun clock: optimizer steps only)

Columns: the knobs the runs differ in (from each job's overrides; overrides shared by every run are
listed above the table instead), status, final and best validation loss, the unigram baseline, train
time / tokens / steps to the target loss, tokens/s, parameters, tokens, train and wall time, ranks,
GPU-hours (= ranks x wall-clock hours summed over every (re)start, as billed) and the estimated cost at
--price-per-gpu-hour, plus any namespaced summary keys (`probe/...`) and `test_*` metrics that exist.

The target loss is --target when given (computed from the validation rows of metrics.jsonl, so it can be
chosen after the fact), else each run's own `target_loss`. A sweep root's `multirun.yaml` tells how
many jobs the sweep has, so jobs that never started show up as `missing` (re-issuing the sweep with
hydra.sweep.dir=SWEEP_DIR fills exactly those).
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

from .rundir import read_json, read_metrics

DEFAULT_PRICE = 2.99  # USD per GPU-hour: the reference's 8x H100 SXM5 rate ($23.92/h for the node)
RUN_FILES = ("summary.json", "metrics.jsonl")
SKIP_DIRS = {"checkpoints", "wandb"}
EXTRA_KEYS = ("peak_memory_gib", "model_tflops_per_s")
SECONDS = ("time_to_target_s", "train_seconds", "wall_seconds")


# ----------------------------------------------------------------------------------------- loading ----
def is_run_dir(path: Path) -> bool:
    return any((path / f).exists() for f in RUN_FILES) or (path / ".hydra" / "overrides.yaml").exists()


def find_runs(root: Path) -> list[Path]:
    """Run directories under `root` (or `root` itself), in a stable order (job numbers numerically)."""
    root = Path(root)
    if is_run_dir(root):
        return [root]
    found = []

    def walk(d: Path) -> None:
        for child in sorted(d.iterdir()):
            if not child.is_dir() or child.name.startswith(".") or child.name in SKIP_DIRS:
                continue
            if is_run_dir(child):
                found.append(child)
            else:
                walk(child)

    walk(root)
    return sorted(found, key=lambda p: [(0, int(x), "") if x.isdigit() else (1, 0, x)
                                        for x in p.relative_to(root).parts])


def read_overrides(run: Path) -> list[str]:
    path = run / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    import yaml

    try:
        return [str(x) for x in (yaml.safe_load(path.read_text()) or [])]
    except yaml.YAMLError:
        return []


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """['model.tie_embeddings=true', '+sweep=x'] -> {'model.tie_embeddings': 'true', 'sweep': 'x'}."""
    out = {}
    for o in overrides:
        if "=" not in o or o.startswith("~"):
            continue
        key, value = o.split("=", 1)
        out[key.lstrip("+")] = value
    return out


def expected_jobs(sweep_root: Path) -> dict[str, list[str]]:
    """{job number: overrides} from a sweep root's multirun.yaml, as Hydra's BasicSweeper expands it.
    Empty when there is no multirun.yaml or it cannot be expanded (another sweeper, say)."""
    path = sweep_root / "multirun.yaml"
    if not path.exists():
        return {}
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(path)
        if "BasicSweeper" not in str(OmegaConf.select(cfg, "hydra.sweeper._target_") or ""):
            return {}
        params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
        args = [f"{k}={v}" for k, v in params.items()] + list(OmegaConf.select(cfg, "hydra.overrides.task") or [])
        (batch,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)
        return {str(i): list(job) for i, job in enumerate(batch)}
    except Exception:  # a report should never fail because of a sweep it cannot expand
        return {}


def load_runs(root: Path) -> list[dict]:
    root = Path(root)
    runs = []
    for d in find_runs(root):
        runs.append({"run": "." if d == root else str(d.relative_to(root)), "dir": d,
                     "summary": read_json(d / "summary.json"), "metrics": read_metrics(d / "metrics.jsonl"),
                     "overrides": read_overrides(d)})
    if not is_run_dir(root):  # jobs a sweep should have but that never started
        have = {r["run"] for r in runs}
        sweep_roots = [root] + sorted(p.parent for p in root.rglob("multirun.yaml")
                                      if p.parent != root and not any(x.startswith(".") for x in p.parts))
        for sroot in sweep_roots:
            for num, overrides in expected_jobs(sroot).items():
                rel = str((sroot / num).relative_to(root))
                if rel not in have:
                    runs.append({"run": rel, "dir": sroot / num, "summary": {"status": "missing"}, "metrics": [],
                                 "overrides": overrides})
        runs.sort(key=lambda r: [(0, int(x), "") if x.isdigit() else (1, 0, x) for x in Path(r["run"]).parts])
    return runs


# ------------------------------------------------------------------------------------------ table ----
def knob_columns(runs: list[dict]) -> tuple[list[str], dict[str, str]]:
    """(keys that differ between runs, {key: value} shared by all runs)."""
    parsed = [parse_overrides(r["overrides"]) for r in runs]
    keys = []
    for p in parsed:
        keys += [k for k in p if k not in keys]
    varied = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    common = {k: parsed[0][k] for k in keys if k not in varied} if parsed else {}
    return varied, common


def to_target(run: dict, target: Optional[float]) -> Optional[dict]:
    """{'loss', 'step', 'tokens', 'train_seconds'} when the run's validation loss first reached `target`."""
    s = run["summary"]
    hit = s.get("target")
    if target is None:
        return hit or None
    if hit and hit.get("loss") is not None and math.isclose(hit["loss"], target):
        return hit
    for row in run["metrics"]:
        v = row.get("val_loss")
        if v is not None and v <= target:
            return {"loss": target, "step": row.get("step"), "tokens": row.get("tokens"),
                    "train_seconds": row.get("train_seconds"), "val_loss": v}
    return None


def build_rows(runs: list[dict], target: Optional[float] = None, price: float = DEFAULT_PRICE) -> tuple[list[dict], list[str]]:
    """Leaderboard rows (sorted, ranked) and the column order."""
    varied, _ = knob_columns(runs)
    extras: list[str] = []
    for r in runs:
        for k in r["summary"]:
            if ("/" in k or k.startswith("test_") or k in EXTRA_KEYS) and k not in extras:
                extras.append(k)
    rows = []
    for r in runs:
        s, m = r["summary"], r["metrics"]
        knobs = parse_overrides(r["overrides"])
        vals = [x["val_loss"] for x in m if x.get("val_loss") is not None]
        world = (s.get("batch") or {}).get("world_size")
        wall = s.get("wall_seconds")
        gpu_hours = world * wall / 3600 if world and wall is not None else None
        tgt_loss = target if target is not None else s.get("target_loss")
        hit = to_target(r, target) if tgt_loss is not None else None
        status = s.get("status") or ("no summary" if m or r["overrides"] else "missing")
        row = {"run": r["run"], **{k: knobs.get(k) for k in varied}, "status": status,
               "val_loss": s.get("val_loss"),
               "best_val_loss": s.get("best_val_loss") if s.get("best_val_loss") is not None else (min(vals) if vals else None),
               "unigram_loss": s.get("unigram_loss"),
               "target_loss": tgt_loss,
               "time_to_target_s": hit.get("train_seconds") if hit else None,
               "tokens_to_target": hit.get("tokens") if hit else None,
               "steps_to_target": hit.get("step") if hit else None,
               "tokens_per_s": s.get("tokens_per_s"), "n_params": s.get("n_params"), "tokens": s.get("tokens"),
               "step": s.get("step"), "train_seconds": s.get("train_seconds"), "wall_seconds": wall,
               "world_size": world, "device": s.get("device"), "gpu_hours": gpu_hours,
               "cost_usd": gpu_hours * price if gpu_hours is not None else None,
               **{k: s.get(k) for k in extras}}
        rows.append(row)

    def order(row):
        done = row["status"] in ("done", "running", "preempted", "interrupted")
        t = row["time_to_target_s"]
        v = row["val_loss"] if row["val_loss"] is not None else math.inf
        return (0 if t is not None else 1 if done and v < math.inf else 2, t if t is not None else v, row["run"])

    rows.sort(key=order)
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    columns = ["rank", "run", *varied, "status", "val_loss", "best_val_loss", "unigram_loss", "target_loss",
               "time_to_target_s", "tokens_to_target", "steps_to_target", "tokens_per_s", "n_params", "tokens",
               "step", "train_seconds", "wall_seconds", "world_size", "device", "gpu_hours", "cost_usd", *extras]
    return rows, columns


def _num(x: float, digits: int = 2) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.{digits}f}{unit}"
    return f"{x:.{digits}f}".rstrip("0").rstrip(".") if isinstance(x, float) else str(x)


def _seconds(x: float) -> str:
    return f"{x:.1f} s" if x < 600 else f"{x / 60:.1f} min" if x < 3 * 3600 else f"{x / 3600:.2f} h"


def fmt(column: str, value: Any) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value).replace("|", "\\|")
    if column in SECONDS:
        return _seconds(value)
    if column == "cost_usd":
        return f"${value:,.2f}"
    if column == "gpu_hours":
        return f"{value:.3g}"
    if "loss" in column or "/" in column or column.startswith("test_"):
        return f"{value:.4f}"
    if column in ("tokens", "tokens_to_target", "n_params", "tokens_per_s"):
        return _num(float(value))
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict], columns: list[str], title: str, notes: list[str]) -> str:
    head = [f"# {title}", ""] + [f"- {n}" for n in notes] + [""]
    table = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    table += ["| " + " | ".join(fmt(c, row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(head + table) + "\n"


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})


# ------------------------------------------------------------------------------------------ plots ----
def plot(runs: list[dict], out: Path, target: Optional[float] = None) -> list[Path]:
    """loss_vs_tokens.png and loss_vs_time.png: train (left) and validation (right) loss of every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    varied, _ = knob_columns(runs)
    paths = []
    for xkey, xlabel, name in (("tokens", "tokens seen", "loss_vs_tokens.png"),
                               ("train_seconds", "train time (s)", "loss_vs_time.png")):
        fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.5))
        for r in runs:
            if not r["metrics"]:
                continue
            knobs = parse_overrides(r["overrides"])
            label = r["run"] + "".join(f" {k.rsplit('.', 1)[-1]}={knobs.get(k)}" for k in varied)
            tr = [(x[xkey], x["train_loss"]) for x in r["metrics"] if x.get("train_loss") is not None and xkey in x]
            va = [(x[xkey], x["val_loss"]) for x in r["metrics"] if x.get("val_loss") is not None and xkey in x]
            line = None
            if tr:
                (line,) = ax_t.plot(*zip(*tr), lw=1, label=label)
            if va:
                ax_v.plot(*zip(*va), marker="o", ms=3, lw=1.2, label=label,
                          color=line.get_color() if line is not None else None)
        for ax, what in ((ax_t, "train loss"), (ax_v, "validation loss")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(what)
            ax.grid(alpha=0.3)
        if target is not None:
            ax_v.axhline(target, color="k", ls="--", lw=0.8, label=f"target {target:g}")
        handles, labels = ax_v.get_legend_handles_labels()
        if not handles:
            handles, labels = ax_t.get_legend_handles_labels()
        if handles:
            ax_v.legend(handles, labels, fontsize=7, loc="upper right")
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# -------------------------------------------------------------------------------------------- main ----
def report(path: Path, out: Optional[Path] = None, target: Optional[float] = None,
           price: float = DEFAULT_PRICE) -> dict:
    """Write the leaderboard (Markdown + CSV) and the plots for a sweep or run directory. Returns paths."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    out = Path(out) if out else path
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(path)
    if not runs:
        raise FileNotFoundError(f"{path} holds no run directories (no summary.json, metrics.jsonl or .hydra/)")
    rows, columns = build_rows(runs, target, price)
    _, common = knob_columns(runs)
    single = is_run_dir(path)
    if target is None:
        targets = {r["summary"].get("target_loss") for r in runs} - {None}
        target_line = (f"target loss: {', '.join(f'{t:g}' for t in sorted(targets))} (each run's target_loss)"
                       if targets else "target loss: none (pass --target LOSS)")
    else:
        target_line = f"target loss: {target:g} (--target)"
    notes = [f"{'run' if single else 'sweep'}: `{path}`", target_line,
             f"cost: GPU-hours (ranks x wall-clock hours) x ${price:g}/GPU-hour (--price-per-gpu-hour)",
             f"generated {time.strftime('%Y-%m-%d %H:%M:%S')} by `python -m speedrun.report`"]
    if common:
        notes.insert(1, "common overrides: " + " ".join(f"`{k}={v}`" for k, v in common.items()))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    notes.insert(1, "runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    md = markdown(rows, columns, f"Leaderboard: {path.name}", notes)
    md_path, csv_path = out / "leaderboard.md", out / "leaderboard.csv"
    plots = plot(runs, out, target if target is not None else next(iter(
        {r["summary"].get("target_loss") for r in runs} - {None}), None))
    md += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    md_path.write_text(md)
    write_csv(csv_path, rows, columns)
    return {"markdown": md_path, "csv": csv_path, "plots": plots, "rows": rows, "text": md}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m speedrun.report", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path, help="a sweep directory (outputs/sweeps/NAME/TIME) or one run directory")
    ap.add_argument("--target", type=float, default=None,
                    help="target validation loss for the time/tokens-to-target columns (default: each run's target_loss)")
    ap.add_argument("--price-per-gpu-hour", type=float, default=DEFAULT_PRICE, dest="price",
                    help=f"USD per GPU-hour for the cost column (default {DEFAULT_PRICE})")
    ap.add_argument("--out", type=Path, default=None, help="where to write the files (default: PATH)")
    args = ap.parse_args(argv)
    try:
        res = report(args.path, args.out, args.target, args.price)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(res["text"].split("\n![")[0].rstrip())
    print(f"\nwrote {res['markdown']}, {res['csv']}, " + ", ".join(str(p) for p in res["plots"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
