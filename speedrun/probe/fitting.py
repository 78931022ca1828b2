"""The probes and what they are measured against: the metrics, the linear probes (logistic regression
for classes, ridge for values) whose strength and best layer are chosen on validation only, the
one-hot and random-init baselines fitted the same way, and the loop that probes one model on every task.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .features import Prepared, get_prepared, model_features, parse_layers
from .tasks import DEFAULT_TASKS, SPLITS, ProbeError

BASELINES = ("onehot", "random_init")
LOGISTIC_L2 = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)  # strongest first: each fit warm-starts the next
RIDGE_ALPHA = (1e2, 1e1, 1.0, 1e-1, 1e-2, 1e-3, 1e-4)
CANONICAL = "ACDEFGHIKLMNPQRSTVWY"


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


# ---------------------------------------------------------------------------------------- baselines

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
    from ..models import build_model

    cfg = copy.deepcopy(model.cfg)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=_cuda_devices()):
        torch.manual_seed(seed)
        fresh = build_model(cfg, getattr(model, "max_length", 1024))
        with torch.no_grad():
            for name, mod in fresh.named_modules():
                if isinstance(mod, torch.nn.Linear) and name.endswith((".o", ".down")):
                    torch.nn.init.kaiming_uniform_(mod.weight, a=math.sqrt(5))
    if hasattr(fresh, "set_attention_backend") and hasattr(model, "attn_backend"):
        fresh.attn_backend = model.attn_backend
    return fresh.to(device).eval()


# ---------------------------------------------------------------------------------------- one model, every task

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
