"""Representation probes: how good are a model's embeddings, layer by layer (issue 8; RECIPE.md §8, §11).

    python -m speedrun.probe RUN_DIR                                   # ss3, meltome, solubility; every layer
    python -m speedrun.probe RUN_DIR tasks=[ss3,meltome] layers=all
    python -m speedrun.probe RUN_DIR tasks=[ss3@/data/flip_secondary_structure.zip] layers=[0,3,6]
    python -m speedrun.probe RUN_DIR tasks=[mytask.yaml] max_sequences=2000 --data-dir DIR

For each task (speedrun/probe_tasks.py) and each layer (0 = normed input embedding, k = output of
block k), the task's sequences are embedded with `speedrun.embed.embed` (mean-pooled for sequence
tasks, per residue for residue tasks), the features are standardised on the train split, and a
simple probe is fitted on train: multinomial logistic regression (classes) or ridge regression
(values), with the L2 strength chosen on the validation split. The test split is scored with the
chosen probe: accuracy and MCC for classes, Spearman (and Pearson) for values. The best layer is the
one with the best *validation* score, and its test score is the task's result — so choosing the
layer never looks at test.

Baselines go in the same table, fitted the same way on the same sequences and residues:

* `onehot`: context-free features — the residue's one-hot letter (residue tasks), or amino-acid
  composition plus log length (sequence tasks);
* `random_init`: an untrained model of the same shape (seeded). The model's own initialisation
  zero-initialises the attention and MLP output projections, which makes every block an identity,
  so the baseline re-draws those like the other linear layers: a genuinely random contextual network.

Results go to RUN_DIR/probe.json (every layer, split and metric) and RUN_DIR/probe.png (test score
per layer, one panel per task); the flat metrics (`probe/ss3/test_acc`, ...) are merged into
RUN_DIR/summary.json, so sweep reports see them. During training, `run_probes(model, ...)` returns
the same flat metrics on a fast subset (`eval.probe_every`, `eval.probe_*`).

Options (`key=value`): tasks, layers (all | last | int | list), baselines ([onehot,random_init] | []),
max_sequences (per split; 0 = all), max_residues (sampled residues per split for residue tasks; 0 =
all), seed, device (auto | cpu | cuda), dtype (fp32 | bf16), batch_tokens, max_length (default: the
run's data.max_length, at most 1024), data_dir (the FLIP zips; also --data-dir or
$SPEEDRUN_PROBE_DATA), out (folder for probe.json/probe.png; default RUN_DIR), update_summary, plot.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .errors import SpeedrunError

from .probe_tasks import SPLITS, ProbeDataError, ProbeTask, load_task, task_name

DEFAULT_TASKS = ("ss3", "meltome", "solubility")
BASELINES = ("onehot", "random_init")
LOGISTIC_L2 = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)  # strongest first: each fit warm-starts the next
RIDGE_ALPHA = (1e2, 1e1, 1.0, 1e-1, 1e-2, 1e-3, 1e-4)
SHORT = {"accuracy": "acc", "mcc": "mcc", "spearman": "spearman", "pearson": "pearson"}
CANONICAL = "ACDEFGHIKLMNPQRSTVWY"
_VOCAB_RESIDUES = set("ACDEFGHIKLMNPQRSTVWYXBZUO")


class ProbeError(SpeedrunError):
    """A probe that cannot run (bad option, unreadable run). One line, naming the fix."""


# ---------------------------------------------------------------------------------------- options

def parse_layers(spec: Any, n_layers: int) -> List[int]:
    """Layers as absolute indices in 0..n_layers: "all", "last", an int, a list, or "0,6,12"."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("all", "")):
        return list(range(n_layers + 1))
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "last":
            return [n_layers]
        items = [x for x in s.replace(" ", ",").replace(";", ",").strip("[]").split(",") if x]
    elif isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        items = [int(spec)]
    else:
        items = list(spec)
    out = []
    for it in items:
        if isinstance(it, str) and it.strip().lower() == "last":
            k = n_layers
        else:
            try:
                k = int(it)
            except (TypeError, ValueError):
                raise ProbeError(f"layers={spec!r}: use all, last, an int or a list of ints") from None
        a = k if k >= 0 else n_layers + 1 + k
        if not 0 <= a <= n_layers:
            raise ProbeError(f"layer {k} is out of range for a model with {n_layers} blocks (0..{n_layers})")
        if a not in out:
            out.append(a)
    if not out:
        raise ProbeError(f"layers={spec!r} names no layer")
    return sorted(out)


def check_eval_config(ev, load: bool = False) -> None:
    """One-line ProbeError / ProbeDataError for bad `eval.probe_*` settings, for the trainer to call at
    start-up. With load=True (and probes on) the tasks are also loaded and subsampled now (cached for
    the process), so a missing data file stops the run before training rather than at the first probe."""
    if ev.probe_every < 0:
        raise ProbeError(f"eval.probe_every={ev.probe_every} must be >= 0 (0 = off)")
    if ev.probe_every and not ev.probe_tasks:
        raise ProbeError("eval.probe_every is set but eval.probe_tasks is empty: name at least one task")
    if ev.probe_max_sequences < 0 or ev.probe_max_residues < 0:
        raise ProbeError("eval.probe_max_sequences and eval.probe_max_residues must be >= 0 (0 = all)")
    spec = str(ev.probe_layers).strip().lower()
    if spec not in ("all", "last", ""):
        try:
            parse_layers(spec, 10**6)  # syntax only; the range is checked against the model at probe time
        except ProbeError as exc:
            raise ProbeError(f"eval.probe_layers: {exc}") from None
    if load and ev.probe_every:
        for t in ev.probe_tasks:
            get_prepared(t, data_dir=ev.probe_data_dir, max_sequences=ev.probe_max_sequences,
                         max_residues=ev.probe_max_residues, seed=0)


# ---------------------------------------------------------------------------------------- data subsets

def clean_sequence(seq: str) -> str:
    """Upper-case, letters outside the vocabulary -> X, so every residue is exactly one token."""
    s = seq.strip().upper()
    if set(s) <= _VOCAB_RESIDUES:
        return s
    return "".join(c if c in _VOCAB_RESIDUES else "X" for c in s if not c.isspace())


@dataclass
class Split:
    seqs: List[str]
    y: np.ndarray  # (n,) per sequence, or (total selected residues,) for residue tasks
    positions: Optional[List[np.ndarray]] = None  # residue tasks: selected residue indices per sequence


@dataclass
class Prepared:
    """A task reduced to the sequences (and residues) that are probed; the same for every model."""
    task: ProbeTask
    splits: Dict[str, Split] = field(default_factory=dict)

    def sizes(self) -> dict:
        out = {s: len(sp.seqs) for s, sp in self.splits.items()}
        if self.task.level == "residue":
            out.update({f"{s}_residues": int(sp.y.size) for s, sp in self.splits.items()})
        return out


def _rng(seed: int, *keys: str) -> np.random.Generator:
    return np.random.default_rng([seed] + [zlib.crc32(k.encode()) for k in keys])


def prepare(task: ProbeTask, max_sequences: int = 0, max_residues: int = 0, seed: int = 0) -> Prepared:
    """Subsample each split: at most `max_sequences` sequences, and for residue tasks at most
    `max_residues` labelled residues (drawn uniformly over the split's residues). Deterministic."""
    out = Prepared(task)
    for split in SPLITS:
        seqs, labels = task.splits[split]
        seqs = [clean_sequence(s) for s in seqs]
        idx = np.array([i for i, s in enumerate(seqs) if s], dtype=np.int64)
        rng = _rng(seed, task.name, split)
        if max_sequences and idx.size > max_sequences:
            idx = np.sort(rng.choice(idx, size=max_sequences, replace=False))
        if task.level == "sequence":
            y = np.asarray(labels)[idx]
            keep = (y >= 0) if task.kind == "classification" else np.isfinite(y.astype(np.float64))
            idx, y = idx[keep], y[keep]
            out.splits[split] = Split([seqs[i] for i in idx], y)
            continue
        per_seq = []
        for i in idx:
            lab = np.asarray(labels[i])
            ok = (lab >= 0) if task.kind == "classification" else np.isfinite(lab.astype(np.float64))
            per_seq.append(np.flatnonzero(ok[: len(seqs[i])]))
        total = sum(p.size for p in per_seq)
        if max_residues and total > max_residues:
            chosen = np.zeros(total, dtype=bool)
            chosen[rng.choice(total, size=max_residues, replace=False)] = True
            offsets = np.cumsum([0] + [p.size for p in per_seq])
            per_seq = [p[chosen[offsets[j]:offsets[j + 1]]] for j, p in enumerate(per_seq)]
        keep = [j for j, p in enumerate(per_seq) if p.size]
        sel = [int(idx[j]) for j in keep]
        positions = [per_seq[j] for j in keep]
        y = (np.concatenate([np.asarray(labels[i])[p] for i, p in zip(sel, positions)]) if sel
             else np.zeros(0))
        out.splits[split] = Split([seqs[i] for i in sel], y, positions)
    for split, sp in out.splits.items():
        if not sp.seqs:
            raise ProbeDataError(f"task {task.name}: no labelled {split} examples left after subsampling")
    return out


_TASK_CACHE: Dict[tuple, ProbeTask] = {}
_PREP_CACHE: Dict[tuple, Prepared] = {}


def _task_key(spec) -> str:
    return json.dumps(spec, sort_keys=True, default=str) if not isinstance(spec, ProbeTask) else f"obj:{id(spec)}"


def get_prepared(spec, *, data_dir: Optional[str], max_sequences: int, max_residues: int, seed: int) -> Prepared:
    """Load (cached per process) and subsample a task; the same spec and caps give the same subset."""
    if hasattr(spec, "items") and not isinstance(spec, dict):
        spec = dict(spec.items())
    tkey = (_task_key(spec), str(data_dir))
    if tkey not in _TASK_CACHE:
        _TASK_CACHE[tkey] = load_task(spec, data_dir)
    pkey = tkey + (max_sequences, max_residues, seed)
    if pkey not in _PREP_CACHE:
        _PREP_CACHE[pkey] = prepare(_TASK_CACHE[tkey], max_sequences, max_residues, seed)
    return _PREP_CACHE[pkey]


# ---------------------------------------------------------------------------------------- features

def _embed_fn():
    from .embed import embed

    return embed


def model_features(model, prep: Prepared, layers: List[int], *, batch_tokens: int = 16384, max_length: int = 1024,
                   device=None, dtype: torch.dtype = torch.float32,
                   memory_bytes: int = 1 << 30) -> Dict[str, Dict[int, np.ndarray]]:
    """{split: {layer: (n, d) float32}}: mean-pooled per sequence, or the selected residues' states."""
    embed = _embed_fn()
    residue = prep.task.level == "residue"
    d = model.cfg.dim
    # per-residue states of every layer are held for a chunk of sequences at a time
    chunk_tokens = max(max_length, memory_bytes // max(1, len(layers) * d * 4)) if residue else 1 << 62
    out = {}
    for split, sp in prep.splits.items():
        feats = {k: [] for k in layers}
        start = 0
        while start < len(sp.seqs):
            end, tokens = start, 0
            while end < len(sp.seqs) and (end == start or tokens + len(sp.seqs[end]) <= chunk_tokens):
                tokens += len(sp.seqs[end])
                end += 1
            chunk = sp.seqs[start:end]
            got = embed(model, chunk, layer=list(layers), pool="none" if residue else "mean",
                        batch_tokens=max(batch_tokens, max_length), max_length=max_length, device=device, dtype=dtype)
            for k in layers:
                if residue:
                    for j, states in enumerate(got[k]):
                        pos = sp.positions[start + j]
                        if states.shape[0] != len(chunk[j]):
                            raise ProbeError(f"embed returned {states.shape[0]} residues for a sequence of "
                                             f"{len(chunk[j])}: per-residue labels cannot be aligned")
                        feats[k].append(states[torch.from_numpy(pos)].numpy())
                else:
                    feats[k].append(torch.as_tensor(got[k]).float().cpu().numpy())
            start = end
        out[split] = {k: np.concatenate(v).astype(np.float32, copy=False) for k, v in feats.items()}
    return out


def onehot_features(prep: Prepared) -> Dict[str, Dict[int, np.ndarray]]:
    """Context-free features at 'layer 0': residue one-hot (21: 20 canonical + other), or sequence
    composition (21) plus log length."""
    lut = np.full(256, 20, dtype=np.int64)
    for i, c in enumerate(CANONICAL):
        lut[ord(c)] = i
    out = {}
    for split, sp in prep.splits.items():
        rows = []
        for j, s in enumerate(sp.seqs):
            ids = lut[np.frombuffer(s.encode("latin-1"), dtype=np.uint8)]
            if prep.task.level == "residue":
                rows.append(np.eye(21, dtype=np.float32)[ids[sp.positions[j]]])
            else:
                comp = np.bincount(ids, minlength=21).astype(np.float32) / max(1, ids.size)
                rows.append(np.concatenate([comp, [math.log(max(1, ids.size))]]).astype(np.float32)[None])
        out[split] = {0: np.concatenate(rows)}
    return out


def _cuda_devices() -> list:
    """Devices whose RNG state torch.manual_seed touches (fork_rng restores them afterwards)."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def random_init_like(model, seed: int = 0):
    """An untrained model of the same shape, on the same device; the global RNG is left untouched.

    The zero-initialised output projections (attention `o`, MLP `down`) are re-drawn like nn.Linear,
    otherwise every block would be an identity and the baseline would be context-free."""
    from .model import ProteinLM

    cfg = copy.deepcopy(model.cfg)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=_cuda_devices()):
        torch.manual_seed(seed)
        if isinstance(model, ProteinLM):
            fresh = ProteinLM(cfg)
        elif hasattr(model, "max_length"):
            fresh = type(model)(cfg, model.max_length)
        else:
            fresh = type(model)(cfg)
        with torch.no_grad():
            for name, mod in fresh.named_modules():
                if isinstance(mod, torch.nn.Linear) and name.endswith((".o", ".down")):
                    torch.nn.init.kaiming_uniform_(mod.weight, a=math.sqrt(5))
    if hasattr(fresh, "set_attention_backend") and hasattr(model, "attn_backend"):
        fresh.attn_backend = model.attn_backend
    return fresh.to(device).eval()


# ---------------------------------------------------------------------------------------- metrics

def _rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties averaged (scipy.stats.rankdata 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.concatenate([[True], xs[1:] != xs[:-1]]))
    ends = np.concatenate([starts[1:], [xs.size]])
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(x.size)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(_rankdata(a), _rankdata(b))


def classification_metrics(y: np.ndarray, pred: np.ndarray, n_classes: int) -> dict:
    """Accuracy and multi-class MCC (Gorodkin's R_K; the usual MCC for two classes)."""
    y, pred = np.asarray(y, np.int64), np.asarray(pred, np.int64)
    n = y.size
    if n == 0:
        return {"accuracy": 0.0, "mcc": 0.0}
    cm = np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    cm = cm.astype(np.float64)
    t, p, c = cm.sum(1), cm.sum(0), np.trace(cm)
    cov_xy = c * n - (t * p).sum()
    cov_xx, cov_yy = n * n - (p * p).sum(), n * n - (t * t).sum()
    mcc = cov_xy / math.sqrt(cov_xx * cov_yy) if cov_xx > 0 and cov_yy > 0 else 0.0
    return {"accuracy": c / n, "mcc": float(mcc)}


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict:
    return {"spearman": spearman(y, pred), "pearson": pearson(y, pred)}


# ---------------------------------------------------------------------------------------- probes

def _standardise(train: np.ndarray, *others: np.ndarray):
    mu = train.mean(0, dtype=np.float64)
    sd = train.std(0, dtype=np.float64)
    sd = np.where(sd > 1e-6 * max(1.0, float(sd.max(initial=0.0))), sd, 1.0)
    return [((x - mu) / sd).astype(np.float32) for x in (train,) + others]


def _key(scores: dict, metric: str) -> tuple:
    """Selection key on validation: the primary metric, ties broken by the other one (rounded so that
    float noise does not decide)."""
    other = [v for k, v in scores.items() if k != metric]
    return (round(scores[metric], 9),) + tuple(round(v, 9) for v in other)


def fit_logistic(Xtr, ytr, Xva, yva, Xte, yte, n_classes: int, metric: str, *, device=None,
                 grid: Sequence[float] = LOGISTIC_L2, max_iter: int = 100) -> dict:
    """Multinomial logistic regression (L-BFGS, L2 on the weights), strength chosen on validation."""
    device = torch.device(device or "cpu")
    Xtr, Xva, Xte = _standardise(Xtr, Xva, Xte)
    tx = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    xtr, xva, xte = tx(Xtr), tx(Xva), tx(Xte)
    t_ytr = torch.from_numpy(np.asarray(ytr, np.int64)).to(device)
    W = torch.zeros(Xtr.shape[1], n_classes, device=device, requires_grad=True)
    b = torch.zeros(n_classes, device=device, requires_grad=True)
    best = None
    with torch.inference_mode(False), torch.enable_grad():
        for lam in grid:
            opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20,
                                    line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(xtr @ W + b, t_ytr) + lam * W.square().sum()
                loss.backward()
                return loss

            opt.step(closure)
            with torch.no_grad():
                pv = (xva @ W + b).argmax(1).cpu().numpy()
            valid = classification_metrics(yva, pv, n_classes)
            if best is None or _key(valid, metric) > _key(best["valid"], metric):
                with torch.no_grad():
                    pt = (xte @ W + b).argmax(1).cpu().numpy()
                best = {"l2": lam, "valid": valid, "test": classification_metrics(yte, pt, n_classes)}
    return best


def fit_ridge(Xtr, ytr, Xva, yva, Xte, yte, metric: str = "spearman", *, grid: Sequence[float] = RIDGE_ALPHA) -> dict:
    """Ridge regression on standardised features (closed form through one eigendecomposition),
    alpha (per example) chosen on validation."""
    Xtr, Xva, Xte = (x.astype(np.float64) for x in _standardise(Xtr, Xva, Xte))
    ytr = np.asarray(ytr, np.float64)
    y_mu = ytr.mean()
    n = Xtr.shape[0]
    evals, evecs = np.linalg.eigh(Xtr.T @ Xtr / n)
    proj = evecs.T @ (Xtr.T @ (ytr - y_mu)) / n
    best = None
    for alpha in grid:
        w = evecs @ (proj / (evals + alpha))
        valid = regression_metrics(yva, Xva @ w + y_mu)
        if best is None or _key(valid, metric) > _key(best["valid"], metric):
            best = {"l2": alpha, "valid": valid, "test": regression_metrics(yte, Xte @ w + y_mu)}
    return best


def fit_layers(prep: Prepared, feats: Dict[str, Dict[int, np.ndarray]], *, device=None) -> dict:
    """Probe every layer of one featurizer: {"layers": {k: {l2, valid, test}}, "best_layer", "valid", "test"}."""
    task = prep.task
    y = {s: prep.splits[s].y for s in SPLITS}
    layers = {}
    for k in sorted(feats["train"]):
        X = [feats[s][k] for s in SPLITS]
        if task.kind == "classification":
            r = fit_logistic(X[0], y["train"], X[1], y["valid"], X[2], y["test"], task.n_classes, task.metric,
                             device=device)
        else:
            r = fit_ridge(X[0], y["train"], X[1], y["valid"], X[2], y["test"], task.metric)
        layers[k] = r
    m = task.metric
    best = max(layers, key=lambda k: (_key(layers[k]["valid"], m), -k))
    return {"layers": layers, "best_layer": best, "valid": layers[best]["valid"], "test": layers[best]["test"]}


def probe_task(model, prep: Prepared, layers: List[int], *, baselines: Sequence[str] = (), seed: int = 0,
               batch_tokens: int = 16384, max_length: int = 1024, device=None, dtype=torch.float32,
               log=None) -> dict:
    """One task: the model (and any baselines) probed at every layer. Nested results."""
    task = prep.task
    fit_device = _fit_device(model)
    res = {"type": task.kind, "level": task.level, "metric": task.metric, "classes": list(task.classes),
           "source": task.source, "n": prep.sizes(), "models": {}}
    featurizers = [("trained", lambda: model_features(model, prep, layers, batch_tokens=batch_tokens,
                                                      max_length=max_length, device=device, dtype=dtype))]
    for b in baselines:
        if b == "onehot":
            featurizers.append(("onehot", lambda: onehot_features(prep)))
        elif b == "random_init":
            featurizers.append(("random_init", lambda: model_features(
                random_init_like(model, seed), prep, layers, batch_tokens=batch_tokens, max_length=max_length,
                device=device, dtype=dtype)))
        else:
            raise ProbeError(f"unknown baseline {b!r}: choose from {', '.join(BASELINES)}")
    for name, make in featurizers:
        t0 = time.time()
        feats = make()
        t1 = time.time()
        r = fit_layers(prep, feats, device=fit_device)
        r["seconds"] = {"features": round(t1 - t0, 2), "fit": round(time.time() - t1, 2)}
        res["models"][name] = r
        if log:
            log(f"  {task.name:<12} {name:<12} best layer {r['best_layer']:>2}  test {task.metric} "
                f"{r['test'][task.metric]:.4f}  ({t1 - t0:.0f}s embed, {time.time() - t1:.0f}s fit)")
    return res


def _fit_device(model) -> torch.device:
    try:
        dev = next(model.parameters()).device
    except StopIteration:
        dev = torch.device("cpu")
    return dev if dev.type == "cuda" else torch.device("cpu")


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


# ---------------------------------------------------------------------------------------- library entry points

def probe_model(model, tasks: Sequence = DEFAULT_TASKS, layers: Any = "all", device=None, *,
                baselines: Sequence[str] = BASELINES, max_sequences: int = 0, max_residues: int = 50000,
                seed: int = 0, data_dir: Optional[str] = None, batch_tokens: int = 16384, max_length: int = 1024,
                dtype: torch.dtype = torch.float32, log=None) -> dict:
    """Probe `model` on `tasks`; nested results {task: {..., "models": {"trained": ..., baseline: ...}}}."""
    n_layers = len(model.blocks)
    ks = parse_layers(layers, n_layers)
    results = {}
    for spec in tasks:
        prep = get_prepared(spec, data_dir=data_dir, max_sequences=max_sequences, max_residues=max_residues,
                            seed=seed)
        results[prep.task.name] = probe_task(model, prep, ks, baselines=baselines, seed=seed,
                                             batch_tokens=batch_tokens, max_length=max_length, device=device,
                                             dtype=dtype, log=log)
    return results


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


# ---------------------------------------------------------------------------------------- run directories

def load_run_model(path: Union[str, Path], device=None, checkpoint: Optional[str] = None):
    """(model, info) from a run directory (newest complete checkpoint), a checkpoint folder, or an
    export folder (via speedrun.load). info: checkpoint, step, config (RunConfig dict or None)."""
    from .checkpoint import MARKER, latest
    from .config import make, migrate_legacy
    from .model import ProteinLM

    path = Path(path)
    device = torch.device(device or "cpu")
    ck = Path(checkpoint) if checkpoint else None
    if ck is None:
        if (path / MARKER).exists():
            ck = path
        elif (path / "checkpoints").is_dir():
            ck = latest(path / "checkpoints")
            if ck is None:
                raise ProbeError(f"{path} holds no complete checkpoint (checkpoints/step-*/COMPLETE): "
                                 "finish or resume the run first")
    if ck is None:
        if not path.exists():
            raise ProbeError(f"{path}: no such run directory")
        import speedrun

        try:
            model = speedrun.load(str(path), device=device)
        except Exception as exc:  # noqa: BLE001 - one line whatever went wrong
            raise ProbeError(f"cannot load a model from {path}: {str(exc).splitlines()[0]}") from None
        meta = getattr(model, "meta", None) or {}
        return model.eval(), {"checkpoint": str(path), "step": meta.get("step"), "config": meta.get("training"),
                              "max_length": meta.get("max_length")}
    try:
        state = torch.load(ck / "state.pt", map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # noqa: BLE001
        raise ProbeError(f"cannot read {ck / 'state.pt'}: {str(exc).splitlines()[0]}") from None
    cfg = state.get("config") if isinstance(state, dict) else None
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise ProbeError(f"{ck / 'state.pt'} holds no run config: not written by speedrun's trainer")
    from safetensors.torch import load_model

    try:
        mcfg = migrate_legacy({"model": cfg["model"]})["model"]
        mcfg = make("model", **mcfg)
    except TypeError as exc:
        raise ProbeError(f"{ck}: its model config does not fit this version of speedrun ({exc})") from None
    mcfg.attention = "auto"
    if mcfg.arch not in ("unet", "transformer"):
        raise ProbeError(f"model.arch={mcfg.arch} is not supported by speedrun.embed yet")
    model = ProteinLM(mcfg)
    try:
        load_model(model, str(ck / "model.safetensors"), strict=True)
    except Exception as exc:  # noqa: BLE001
        raise ProbeError(f"cannot load {ck / 'model.safetensors'}: {str(exc).splitlines()[0]}") from None
    model.to(device)
    model.set_attention_backend(device)
    return model.eval(), {"checkpoint": str(ck), "step": state.get("step"), "config": cfg,
                          "max_length": cfg.get("data", {}).get("max_length")}


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


# ---------------------------------------------------------------------------------------- CLI

CLI_DEFAULTS = {
    "tasks": list(DEFAULT_TASKS), "layers": "all", "baselines": list(BASELINES), "max_sequences": 0,
    "max_residues": 50000, "seed": 0, "device": "auto", "dtype": "fp32", "batch_tokens": 16384,
    "max_length": None, "data_dir": None, "out": None, "checkpoint": None, "update_summary": True, "plot": True,
}
USAGE = ("usage: python -m speedrun.probe RUN_DIR [tasks=[ss3,meltome,solubility]] [layers=all|last|[0,3]] "
         "[baselines=[onehot,random_init]] [max_sequences=N] [max_residues=N] [device=auto|cpu|cuda] "
         "[dtype=fp32|bf16] [out=DIR] [--data-dir DIR]")


def _parse_cli(argv: List[str]) -> tuple:
    from omegaconf import OmegaConf

    run_dir, dotlist, data_dir = None, [], None
    it = iter(argv)
    for a in it:
        if a in ("-h", "--help"):
            print(USAGE + "\n\n" + (__doc__ or ""))
            sys.exit(0)
        if a == "--data-dir":
            data_dir = next(it, None)
            if data_dir is None:
                raise ProbeError("--data-dir needs a folder")
        elif a.startswith("--data-dir="):
            data_dir = a.split("=", 1)[1]
        elif "=" in a and not a.startswith("-"):
            dotlist.append(a)
        elif run_dir is None and not a.startswith("-"):
            run_dir = a
        else:
            raise ProbeError(f"unexpected argument {a!r}; {USAGE}")
    if run_dir is None:
        raise ProbeError(f"name a run directory; {USAGE}")
    try:
        given = OmegaConf.to_container(OmegaConf.from_dotlist(dotlist), resolve=True)
    except Exception as exc:  # noqa: BLE001
        raise ProbeError(f"cannot parse {' '.join(dotlist)}: {str(exc).splitlines()[0]}") from None
    unknown = sorted(set(given) - set(CLI_DEFAULTS))
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], list(CLI_DEFAULTS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ProbeError(f"unknown option {unknown[0]!r}{hint}: options are {', '.join(CLI_DEFAULTS)}")
    opts = {**CLI_DEFAULTS, **given}
    if data_dir:
        opts["data_dir"] = data_dir
    for key in ("tasks", "baselines"):
        v = opts[key]
        opts[key] = [] if v is None else ([v] if isinstance(v, (str, dict)) else list(v))
    for b in opts["baselines"]:
        if b not in BASELINES:
            raise ProbeError(f"unknown baseline {b!r}: choose from {', '.join(BASELINES)}")
    if not opts["tasks"]:
        raise ProbeError("tasks=[] names no task")
    if opts["dtype"] not in ("fp32", "bf16"):
        raise ProbeError(f"dtype={opts['dtype']!r} must be fp32 or bf16")
    for key in ("max_sequences", "max_residues", "seed", "batch_tokens"):
        if not isinstance(opts[key], int) or isinstance(opts[key], bool) or opts[key] < 0:
            raise ProbeError(f"{key}={opts[key]!r} must be a non-negative integer")
    return Path(run_dir), opts


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        run_dir, opts = _parse_cli(argv)
        if opts["device"] == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(opts["device"])
        model, info = load_run_model(run_dir, device, opts["checkpoint"])
        run_root = Path(info["checkpoint"]).parent.parent if (run_dir / "COMPLETE").exists() else run_dir
        max_length = opts["max_length"] or min(1024, int(info.get("max_length") or 1024))
        ks = parse_layers(opts["layers"], len(model.blocks))
        dtype = torch.bfloat16 if opts["dtype"] == "bf16" else torch.float32
        print(f"probing {info['checkpoint']} (step {info.get('step')}, {len(model.blocks)} blocks, d={model.cfg.dim}) "
              f"on {', '.join(task_name(t) for t in opts['tasks'])}; layers {ks[0]}..{ks[-1]} ({len(ks)}); "
              f"baselines {', '.join(opts['baselines']) or 'none'}; device {device}", flush=True)
        t0 = time.time()
        results = probe_model(model, opts["tasks"], ks, device, baselines=opts["baselines"],
                              max_sequences=opts["max_sequences"], max_residues=opts["max_residues"], seed=opts["seed"],
                              data_dir=opts["data_dir"], batch_tokens=opts["batch_tokens"], max_length=max_length,
                              dtype=dtype, log=lambda s: print(s, flush=True))
    except (ProbeError, ProbeDataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(opts["out"]) if opts["out"] else run_root
    out_dir.mkdir(parents=True, exist_ok=True)
    from .rundir import read_json, write_json

    flat = flat_metrics(results, full=True)
    report = {"run_dir": str(run_root), "checkpoint": info["checkpoint"], "step": info.get("step"),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(time.time() - t0, 1),
              "settings": {k: v for k, v in opts.items() if k not in ("out", "update_summary", "plot")}
              | {"layers": ks, "max_length": max_length, "device": str(device)},
              "tasks": _jsonable(results), "metrics": flat}
    write_json(out_dir / "probe.json", report)
    print(format_table(results))
    print(f"wrote {out_dir / 'probe.json'}", end="")
    if opts["plot"]:
        plot(results, out_dir / "probe.png", title=f"{run_root} step {info.get('step')}")
        print(f", {out_dir / 'probe.png'}", end="")
    summary_path = run_root / "summary.json"
    if opts["update_summary"] and summary_path.exists():
        summary = read_json(summary_path)
        summary = {k: v for k, v in summary.items() if not k.startswith("probe/")}
        summary.update(flat_metrics(results, baselines=False))
        summary["probe_step"] = info.get("step")
        write_json(summary_path, summary)
        print(f"; probe metrics merged into {summary_path}", end="")
    print()
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
