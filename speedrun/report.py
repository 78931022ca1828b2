"""Leaderboard, arms and loss curves for a sweep, or for one run.

    python -m speedrun.report SWEEP_DIR [--target LOSS] [--baseline KEY=VALUE ...] [--price-per-gpu-hour USD] [--out DIR]
    python -m speedrun.report RUN_DIR

Reads only what each run leaves in its own folder -- `summary.json`, `metrics.jsonl`, `run.json` and
`reproduce.yaml` (checkpoints and Hydra's `.hydra/` are not needed, so a results folder that keeps just
those four files per run reports the same) -- and never imports torch: quick on a login node, and fine
while a sweep is still running or after some of its jobs failed. SWEEP_DIR is searched recursively
(hidden folders and checkpoints skipped): a sweep root (`outputs/sweeps/<name>/<time>/`) and a folder of
several sweeps (`outputs/sweeps/<name>/`) both work. Writes into DIR (default: the given folder):

    leaderboard.md    the table, best first: runs that reached the target loss by time to target, then the
                      rest by final validation loss; missing, running and failed jobs are named; then the
                      arms and their differences from the baseline; and the command that regenerates it
    leaderboard.csv   the leaderboard rows, unformatted numbers, for pandas/spreadsheets
    arms.csv          one row per arm: seeds, mean val_loss, seed spread, differences from the baseline
    loss_vs_tokens.png, loss_vs_time.png
                      train loss (left) and validation loss (right) of every run against tokens seen and
                      against train time (the speedrun clock: optimizer steps only); the legend names the
                      varied knobs, and the seeds of one arm share its colour

Knobs are the config keys whose values differ across the runs, read from each run's OWN resolved config
(run.json's "config", else reproduce.yaml; settings that do not change what is trained are left out, as
for run identity: speedrun.config.NON_SEMANTIC). A run with neither file (a job that never started)
shows the values its overrides name.

Arms: runs that differ only in `seed` are replicates of one arm. Per arm: the mean final val_loss, the
spread over seeds (std and the standard error of the mean) and `val_loss_stderr`, the evaluation's own
mask-sampling standard error (summary.json; for an arm, that of its mean). Each arm's difference from the
baseline arm (--baseline KEY=VALUE, repeatable to pin several knobs; else the first arm) comes with
se = sqrt(se_arm^2 + se_baseline^2), where an arm's se is its seed standard error when it has >= 2 seeds,
else its val_loss_stderr; the table says which was used.

Columns of the leaderboard: the varied knobs, status, final and best validation loss, the unigram
baseline, train time / tokens / steps to the target loss, tokens/s, parameters, tokens, train and wall
time, ranks, GPU-hours (= ranks x wall-clock hours summed over every (re)start, as billed) and the
estimated cost at --price-per-gpu-hour, plus any namespaced summary keys (`probe/...`) and `test_*`.

The target loss is --target when given (computed from the validation rows of metrics.jsonl, so it can be
chosen after the fact), else each run's own `target_loss`. The jobs a sweep should have come from
`jobs.json` (our SLURM launcher) and `multirun.yaml` (basic grid, paired list, or an Optuna search's
n_trials), so jobs that never started show up as `missing` (re-issuing the sweep with
hydra.sweep.dir=SWEEP_DIR fills exactly those). An Optuna search's best trial is named.
"""
from __future__ import annotations

import argparse
import csv
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import SpeedrunError, cli_main
from .rundir import read_json, read_metrics

DEFAULT_PRICE = 2.99  # USD per GPU-hour: the reference's 8x H100 SXM5 rate ($23.92/h for the node)
RUN_FILES = ("summary.json", "metrics.jsonl", "run.json", "reproduce.yaml")
SKIP_DIRS = {"checkpoints", "wandb"}
EXTRA_KEYS = ("peak_memory_gib", "model_tflops_per_s")
SECONDS = ("time_to_target_s", "train_seconds", "wall_seconds")
REPLICATE = "seed"  # runs that differ only in this key are replicates of one arm
ARM_LOSS_COLUMNS = ("val_loss_mean", "seed_std", "seed_sem", "val_loss_stderr", "se", "diff", "diff_se")


# ----------------------------------------------------------------------------------------- loading ----
def is_run_dir(path: Path) -> bool:
    return any((path / f).exists() for f in RUN_FILES) or (path / ".hydra" / "overrides.yaml").exists()


def _job_order(parts: Sequence[str]) -> list:
    return [(0, int(x), "") if x.isdigit() else (1, 0, x) for x in parts]


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
    return sorted(found, key=lambda p: _job_order(p.relative_to(root).parts))


def _yaml(path: Path) -> Any:
    if not path.exists():
        return None
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None


def read_overrides(run: Path) -> list[str]:
    return [str(x) for x in (_yaml(run / ".hydra" / "overrides.yaml") or [])]


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """['model.tie_embeddings=true', '+sweep=x'] -> {'model.tie_embeddings': 'true', 'sweep': 'x'}."""
    out = {}
    for o in overrides:
        if "=" not in o or o.startswith("~"):
            continue
        key, value = o.split("=", 1)
        out[key.lstrip("+")] = value
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_config(run: Path) -> Optional[dict[str, Any]]:
    """The run's own resolved config as {dotted key: value}, what is trained only (run.json's "config",
    else reproduce.yaml through speedrun.config.semantic_dict); None when the run has neither."""
    from .config import ADDED, semantic_dict

    cfg = read_json(run / "run.json").get("config")
    if not isinstance(cfg, dict):
        raw = _yaml(run / "reproduce.yaml")
        if not isinstance(raw, dict):
            return None
        cfg = semantic_dict({k: v for k, v in raw.items() if k not in ("defaults", "hydra")})
    flat = flatten(cfg)
    for key, default in ADDED.items():  # left out of run.json while at their default
        flat.setdefault(key, default)
    return flat


def knob_str(value: Any) -> Optional[str]:
    """One spelling for a knob value, whether it came from a config (0.1, True) or an override ('0.10',
    'true'): str() of the value the override's text parses to."""
    if isinstance(value, str):
        import yaml

        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        return str(parsed) if isinstance(parsed, (bool, int, float)) else value
    return str(value)


def _sweeper_jobs(cfg, sweeper: str) -> dict[str, list[str]]:
    """{job number: overrides} a sweep's multirun.yaml asks for, as its sweeper expands it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    task = list(OmegaConf.select(cfg, "hydra.overrides.task") or [])
    if sweeper.endswith("OptunaSweeper"):  # the trials, whatever they will try
        return {str(i): [] for i in range(int(OmegaConf.select(cfg, "hydra.sweeper.n_trials") or 0))}
    if sweeper.endswith("ListSweeper"):  # the grid (command line + grid_params) x the paired lists
        import itertools

        grid = []
        for o in OverridesParser.create().parse_overrides(task):
            key = o.get_key_element()
            grid.append([f"{key}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
                        else [f"{key}={o.get_value_element_as_str()}"])
        for key, v in (OmegaConf.select(cfg, "hydra.sweeper.grid_params") or {}).items():
            grid.append([f"{key}={x}" for x in (str(v).split(",") if not OmegaConf.is_list(v) else v)])
        lists = OmegaConf.to_container(OmegaConf.select(cfg, "hydra.sweeper.list_params") or {})
        pairs = [[f"{k}={vals[i]}" for k, vals in lists.items()] for i in range(len(next(iter(lists.values()))))] \
            if lists else [[]]
        return {str(i): [*job[:-1], *job[-1]] for i, job in enumerate(itertools.product(*grid, pairs))}
    if sweeper.endswith("BasicSweeper"):
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
        args = [f"{k}={v}" for k, v in params.items()] + task
        (batch,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)
        return {str(i): list(job) for i, job in enumerate(batch)}
    return {}


def expected_jobs(sweep_root: Path) -> dict[str, list[str]]:
    """{job number: overrides} of every job the sweep at `sweep_root` should have: its jobs.json (what was
    submitted to SLURM), and its multirun.yaml as the sweeper expands it. Empty when neither says."""
    from .status import submitted_jobs

    jobs = {str(n): list(j.get("overrides", [])) for n, j in submitted_jobs(sweep_root).items()}
    path = sweep_root / "multirun.yaml"
    if path.exists():
        try:
            from omegaconf import OmegaConf

            cfg = OmegaConf.load(path)
            for num, overrides in _sweeper_jobs(cfg, str(OmegaConf.select(cfg, "hydra.sweeper._target_") or "")).items():
                jobs.setdefault(num, overrides)
        except Exception:  # a report never fails over a sweep it cannot expand
            pass
    return dict(sorted(jobs.items(), key=lambda kv: _job_order([kv[0]])))


def load_runs(root: Path) -> list[dict]:
    root = Path(root)
    runs = []
    for d in find_runs(root):
        runs.append({"run": "." if d == root else str(d.relative_to(root)), "dir": d,
                     "summary": read_json(d / "summary.json"), "metrics": read_metrics(d / "metrics.jsonl"),
                     "overrides": read_overrides(d), "config": read_config(d)})
    if not is_run_dir(root):  # jobs a sweep should have but that never started
        have = {r["run"] for r in runs}
        sweep_roots = [root] + sorted(p.parent for p in [*root.rglob("multirun.yaml"), *root.rglob("jobs.json")]
                                      if p.parent != root and not any(x.startswith(".") for x in p.parts))
        for sroot in dict.fromkeys(sweep_roots):
            for num, overrides in expected_jobs(sroot).items():
                rel = str((sroot / num).relative_to(root))
                if rel not in have:
                    have.add(rel)
                    runs.append({"run": rel, "dir": sroot / num, "summary": {"status": "missing"}, "metrics": [],
                                 "overrides": overrides, "config": None})
        runs.sort(key=lambda r: _job_order(Path(r["run"]).parts))
    for r in runs:
        r["knobs"] = _run_knobs(r)
    return runs


def _run_knobs(run: dict) -> dict[str, Optional[str]]:
    if run["config"] is not None:
        return {k: knob_str(v) for k, v in run["config"].items()}
    return {k: knob_str(v) for k, v in parse_overrides(run["overrides"]).items()}


# ------------------------------------------------------------------------------------------ knobs ----
def knob_columns(runs: list[dict]) -> tuple[list[str], dict[str, str]]:
    """(the knobs the runs differ in, {override: value} that every run's command line shared).

    With configs: the config keys whose values differ among the runs that know them (a run that never
    started knows only the keys its overrides name). Without any: the overrides, as Hydra recorded them."""
    knobs = [r.get("knobs", _run_knobs(r)) for r in runs]
    configured = [r["config"] for r in runs if r["config"] is not None]
    keys: list[str] = []
    for cfg in configured or knobs:
        keys += [k for k in cfg if k not in keys]
    if configured:
        varied = [k for k in keys if len({kn[k] for kn in knobs if k in kn}) > 1]
    else:
        varied = [k for k in keys if len({kn.get(k) for kn in knobs}) > 1]
    with_overrides = [parse_overrides(r["overrides"]) for r in runs if r["overrides"]]
    common = {k: v for k, v in with_overrides[0].items()
              if all(o.get(k) == v for o in with_overrides)} if with_overrides else {}
    return varied, {k: v for k, v in common.items() if k not in varied}


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


# ------------------------------------------------------------------------------------------ table ----
def _row(r: dict, varied: list[str], extras: list[str], target: Optional[float], price: float) -> dict:
    s, m = r["summary"], r["metrics"]
    vals = [x["val_loss"] for x in m if x.get("val_loss") is not None]
    world = (s.get("batch") or {}).get("world_size")
    wall = s.get("wall_seconds")
    gpu_hours = world * wall / 3600 if world and wall is not None else None
    tgt_loss = target if target is not None else s.get("target_loss")
    hit = to_target(r, target) if tgt_loss is not None else None
    status = s.get("status") or ("no summary" if m or r["overrides"] or r["config"] else "missing")
    step = s.get("step")
    if status == "running" and m:  # summary.json says where it started; metrics.jsonl where it is
        step = max(x.get("step", 0) for x in m)
    return {"run": r["run"], **{k: r["knobs"].get(k) for k in varied}, "status": status,
            "val_loss": s.get("val_loss"),
            "best_val_loss": s.get("best_val_loss") if s.get("best_val_loss") is not None else (min(vals) if vals else None),
            "unigram_loss": s.get("unigram_loss"),
            "target_loss": tgt_loss,
            "time_to_target_s": hit.get("train_seconds") if hit else None,
            "tokens_to_target": hit.get("tokens") if hit else None,
            "steps_to_target": hit.get("step") if hit else None,
            "tokens_per_s": s.get("tokens_per_s"), "n_params": s.get("n_params"), "tokens": s.get("tokens"),
            "step": step, "train_seconds": s.get("train_seconds"), "wall_seconds": wall,
            "world_size": world, "device": s.get("device"), "gpu_hours": gpu_hours,
            "cost_usd": gpu_hours * price if gpu_hours is not None else None,
            **{k: s.get(k) for k in extras}}


def build_rows(runs: list[dict], target: Optional[float] = None, price: float = DEFAULT_PRICE) -> tuple[list[dict], list[str]]:
    """Leaderboard rows (sorted, ranked) and the column order."""
    varied, _ = knob_columns(runs)
    extras: list[str] = []
    for r in runs:
        for k in r["summary"]:
            if ("/" in k or k.startswith("test_") or k in EXTRA_KEYS) and k not in extras:
                extras.append(k)
    rows = [_row(r, varied, extras, target, price) for r in runs]

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
    if column == "z":
        return f"{value:+.2f}"
    if column == "diff":
        return f"{value:+.4f}"
    if "loss" in column or "/" in column or column.startswith("test_") or column in ARM_LOSS_COLUMNS:
        return f"{value:.4f}"
    if column in ("tokens", "tokens_to_target", "n_params", "tokens_per_s"):
        return _num(float(value))
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def md_table(rows: list[dict], columns: list[str]) -> list[str]:
    table = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return table + ["| " + " | ".join(fmt(c, row.get(c)) for c in columns) + " |" for row in rows]


def markdown(rows: list[dict], columns: list[str], title: str, notes: list[str]) -> str:
    head = [f"# {title}", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(head + md_table(rows, columns)) + "\n"


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})


# ------------------------------------------------------------------------------------------- arms ----
def _arm_stats(runs: list[dict]) -> dict:
    vals = [r["summary"]["val_loss"] for r in runs]
    n = len(vals)
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n >= 2 else None
    sem = std / math.sqrt(n) if std is not None else None
    masks = [r["summary"].get("val_loss_stderr") for r in runs]
    mask = math.sqrt(sum(m * m for m in masks)) / n if all(m is not None for m in masks) else None
    se, source = (sem, f"seeds (n={n})") if n >= 2 else (mask, "val_loss_stderr")
    return {"n_seeds": n, "seeds": ",".join(str(r["knobs"].get(REPLICATE, "?")) for r in runs),
            "val_loss_mean": mean, "seed_std": std, "seed_sem": sem, "val_loss_stderr": mask, "se": se,
            "se_from": source}


def arms(runs: list[dict], varied: list[str]) -> tuple[list[dict], list[str]]:
    """(one row per arm, the knobs that define the arms). Only finished runs with a final val_loss count."""
    arm_keys = [k for k in varied if k != REPLICATE]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r["summary"].get("status") == "done" and r["summary"].get("val_loss") is not None:
            groups.setdefault(tuple(r["knobs"].get(k) for k in arm_keys), []).append(r)
    rows = []
    for key, members in groups.items():
        label = " ".join(f"{k}={v}" for k, v in zip(arm_keys, key)) or "all runs"
        rows.append({"arm": label, **dict(zip(arm_keys, key)), "runs": " ".join(r["run"] for r in members),
                     **_arm_stats(members)})
    return rows, arm_keys


def parse_baseline(specs: Sequence[str]) -> dict[str, Optional[str]]:
    out = {}
    for spec in specs:
        if "=" not in spec:
            raise SpeedrunError(f"--baseline {spec}: write it as KEY=VALUE, e.g. --baseline model.tie_embeddings=false")
        key, value = spec.split("=", 1)
        out[key.strip()] = knob_str(value.strip())
    return out


def pick_baseline(rows: list[dict], arm_keys: list[str], wanted: dict[str, Optional[str]]) -> Optional[dict]:
    """The baseline arm: the one whose knobs match every --baseline KEY=VALUE, else the first arm."""
    if not wanted:
        return rows[0] if rows else None
    unknown = [k for k in wanted if k not in arm_keys]
    if unknown:
        raise SpeedrunError(f"--baseline {unknown[0]}=...: the arms do not differ in {unknown[0]}; they differ in "
                            f"{', '.join(arm_keys) or 'nothing (one arm)'}")
    match = [r for r in rows if all(r.get(k) == v for k, v in wanted.items())]
    if len(match) != 1:
        shown = " ".join(f"{k}={v}" for k, v in wanted.items())
        if not match:
            values = sorted({str(r.get(k)) for r in rows for k in wanted})
            raise SpeedrunError(f"--baseline {shown}: no finished arm has it (values there: {', '.join(values)})")
        raise SpeedrunError(f"--baseline {shown} matches {len(match)} arms: pin another knob too (one of "
                            f"{', '.join(k for k in arm_keys if k not in wanted)})")
    return match[0]


def compare(rows: list[dict], base: Optional[dict]) -> None:
    """Each arm's difference from the baseline, with se = sqrt(se_arm^2 + se_base^2), in place."""
    for row in rows:
        row["baseline"] = row is base
        if base is None or row is base:
            continue
        row["diff"] = row["val_loss_mean"] - base["val_loss_mean"]
        if row["se"] is not None and base["se"] is not None:
            row["diff_se"] = math.sqrt(row["se"] ** 2 + base["se"] ** 2)
            row["z"] = row["diff"] / row["diff_se"] if row["diff_se"] > 0 else None
        row["diff_se_from"] = f"arm: {row['se_from']}; baseline: {base['se_from']}"


def arm_columns(arm_keys: list[str]) -> list[str]:
    return ["arm", *arm_keys, "n_seeds", "seeds", "val_loss_mean", "seed_std", "seed_sem", "val_loss_stderr",
            "se", "se_from", "baseline", "diff", "diff_se", "z", "diff_se_from", "runs"]


def arms_markdown(rows: list[dict], arm_keys: list[str], base: Optional[dict], wanted: dict) -> list[str]:
    if not rows:
        return ["## Arms", "", "No finished run with a final val_loss yet.", ""]
    how = ("`--baseline " + " ".join(f"{k}={v}" for k, v in wanted.items()) + "`") if wanted else "the first arm"
    lines = ["## Arms", "",
             f"Runs that differ only in `{REPLICATE}` are replicates of one arm (finished runs only). "
             "`seed_std` / `seed_sem`: spread of the final val_loss over seeds (std, standard error of the mean); "
             "`val_loss_stderr`: the evaluation's mask-sampling standard error of the arm's mean. "
             "`se`: `seed_sem` with >= 2 seeds, else `val_loss_stderr` (`se_from` says which).", ""]
    cols = ["arm", "n_seeds", "seeds", "val_loss_mean", "seed_std", "seed_sem", "val_loss_stderr", "se", "se_from"]
    lines += md_table(rows, cols) + [""]
    if base is not None and len(rows) > 1:
        lines += [f"### Difference from the baseline: {base['arm']} ({how})", "",
                  "`diff` = arm mean - baseline mean; `diff_se` = sqrt(se_arm^2 + se_baseline^2); `z` = diff / diff_se.",
                  ""]
        lines += md_table([r for r in rows if r is not base], ["arm", "diff", "diff_se", "z", "diff_se_from"]) + [""]
    return lines


# ------------------------------------------------------------------------------------------ plots ----
def plot(runs: list[dict], out: Path, target: Optional[float] = None) -> list[Path]:
    """loss_vs_tokens.png and loss_vs_time.png: train (left) and validation (right) loss of every run; the
    legend names the varied knobs, and the seeds of one arm share its colour (a new line style each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    varied, _ = knob_columns(runs)
    arm_keys = [k for k in varied if k != REPLICATE]
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours: dict[tuple, str] = {}
    styles: dict[tuple, int] = {}
    paths = []
    for xkey, xlabel, name in (("tokens", "tokens seen", "loss_vs_tokens.png"),
                               ("train_seconds", "train time (s)", "loss_vs_time.png")):
        fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.5))
        colours.clear()
        styles.clear()
        for r in runs:
            if not r["metrics"]:
                continue
            arm = tuple(r["knobs"].get(k) for k in arm_keys)
            colour = colours.setdefault(arm, palette[len(colours) % len(palette)])
            style = ("-", "--", ":", "-.")[styles.setdefault(arm, 0) % 4]
            styles[arm] += 1
            label = " ".join(f"{k.rsplit('.', 1)[-1]}={r['knobs'].get(k)}" for k in varied) or r["run"]
            tr = [(x[xkey], x["train_loss"]) for x in r["metrics"] if x.get("train_loss") is not None and xkey in x]
            va = [(x[xkey], x["val_loss"]) for x in r["metrics"] if x.get("val_loss") is not None and xkey in x]
            if tr:
                ax_t.plot(*zip(*tr), lw=1, ls=style, color=colour, label=label)
            if va:
                ax_v.plot(*zip(*va), marker="o", ms=3, lw=1.2, ls=style, color=colour, label=label)
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
def best_trial(sweep_dir: Path) -> Optional[dict]:
    """An Optuna search's best trial: {"params", "value", "run_dir"} from its optimization_results.yaml, the
    run directory being the job whose overrides set exactly those values (None when there is no search)."""
    res = _yaml(Path(sweep_dir) / "optimization_results.yaml")
    if not isinstance(res, dict) or "best_params" not in res:
        return None
    params = res["best_params"] or {}
    wanted = {f"{k}={v}" for k, v in params.items()}
    run_dir = next((d for d in find_runs(sweep_dir) if wanted <= set(read_overrides(d))), None)
    return {"params": params, "value": res.get("best_value"), "run_dir": run_dir}


def command(path: Path, out: Optional[Path], target: Optional[float], price: float, baseline: Sequence[str]) -> str:
    """The command that writes this report again."""
    args = ["python", "-m", "speedrun.report", str(path)]
    if target is not None:
        args += ["--target", f"{target:g}"]
    for b in baseline:
        args += ["--baseline", b]
    if price != DEFAULT_PRICE:
        args += ["--price-per-gpu-hour", f"{price:g}"]
    if out is not None and Path(out) != Path(path):
        args += ["--out", str(out)]
    return shlex.join(args)


def _notes(path: Path, runs: list[dict], rows: list[dict], target: Optional[float], price: float,
           cmd: str) -> list[str]:
    _, common = knob_columns(runs)
    if target is None:
        targets = {r["summary"].get("target_loss") for r in runs} - {None}
        target_line = (f"target loss: {', '.join(f'{t:g}' for t in sorted(targets))} (each run's target_loss)"
                       if targets else "target loss: none (pass --target LOSS)")
    else:
        target_line = f"target loss: {target:g} (--target)"
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    notes = [f"{'run' if is_run_dir(path) else 'sweep'}: `{path}`",
             "runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    by_status = {s: [r["run"] for r in runs if (r["summary"].get("status") or "") == s]
                 for s in ("missing", "running", "failed")}
    if by_status["missing"]:
        notes.append(f"missing (never started): {', '.join(by_status['missing'])} - re-issue the sweep with "
                     f"hydra.sweep.dir={path} to run exactly those")
    if by_status["running"]:
        notes.append(f"still running: {', '.join(by_status['running'])} (their final numbers are not in yet)")
    if by_status["failed"]:
        notes.append(f"failed: {', '.join(by_status['failed'])} (each summary.json says why)")
    if common:
        notes.append("common overrides: " + " ".join(f"`{k}={v}`" for k, v in common.items()))
    for sroot in [path, *sorted(p.parent for p in path.rglob("optimization_results.yaml") if p.parent != path)]:
        best = best_trial(sroot)
        if best:
            where = best["run_dir"].relative_to(path) if best["run_dir"] is not None else "?"
            notes.append(f"best trial (Optuna): `{where}` objective {best['value']:.6g} with "
                         + " ".join(f"`{k}={v}`" for k, v in best["params"].items()))
    notes += [target_line, f"cost: GPU-hours (ranks x wall-clock hours) x ${price:g}/GPU-hour (--price-per-gpu-hour)",
              f"regenerate: `{cmd}` (generated {time.strftime('%Y-%m-%d %H:%M:%S')})"]
    return notes


def report(path: Path, out: Optional[Path] = None, target: Optional[float] = None,
           price: float = DEFAULT_PRICE, baseline: Sequence[str] = ()) -> dict:
    """Write the leaderboard (Markdown + CSV), arms.csv and the plots for a sweep or run directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    out_dir = Path(out) if out else path
    runs = load_runs(path)
    if not runs:
        raise FileNotFoundError(f"{path} holds no run directories (no summary.json, metrics.jsonl, run.json, "
                                "reproduce.yaml or .hydra/)")
    wanted = parse_baseline(baseline)
    rows, columns = build_rows(runs, target, price)
    varied, _ = knob_columns(runs)
    arm_rows, arm_keys = arms(runs, varied)
    base = pick_baseline(arm_rows, arm_keys, wanted)
    compare(arm_rows, base)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes = _notes(path, runs, rows, target, price, command(path, out, target, price, baseline))
    md = markdown(rows, columns, f"Leaderboard: {path.name}", notes)
    md += "\n" + "\n".join(arms_markdown(arm_rows, arm_keys, base, wanted))
    plots = plot(runs, out_dir, target if target is not None else next(iter(
        {r["summary"].get("target_loss") for r in runs} - {None}), None))
    md += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    md_path, csv_path, arms_path = out_dir / "leaderboard.md", out_dir / "leaderboard.csv", out_dir / "arms.csv"
    md_path.write_text(md)
    write_csv(csv_path, rows, columns)
    write_csv(arms_path, arm_rows, arm_columns(arm_keys))
    return {"markdown": md_path, "csv": csv_path, "arms_csv": arms_path, "plots": plots, "rows": rows,
            "arms": arm_rows, "text": md}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m speedrun.report", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path, help="a sweep directory (outputs/sweeps/NAME/TIME) or one run directory")
    ap.add_argument("--target", type=float, default=None,
                    help="target validation loss for the time/tokens-to-target columns (default: each run's target_loss)")
    ap.add_argument("--baseline", action="append", default=[], metavar="KEY=VALUE",
                    help="the arm the others are compared with (repeat to pin several knobs; default: the first arm)")
    ap.add_argument("--price-per-gpu-hour", type=float, default=DEFAULT_PRICE, dest="price",
                    help=f"USD per GPU-hour for the cost column (default {DEFAULT_PRICE})")
    ap.add_argument("--out", type=Path, default=None, help="where to write the files (default: PATH)")
    args = ap.parse_args(argv)
    try:
        res = report(args.path, args.out, args.target, args.price, args.baseline)
    except FileNotFoundError as exc:
        raise SpeedrunError(str(exc)) from None
    print(res["text"].split("\n![")[0].rstrip())
    print(f"\nwrote {res['markdown']}, {res['csv']}, {res['arms_csv']}, " + ", ".join(str(p) for p in res["plots"]))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
