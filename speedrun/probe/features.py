"""What is probed, and what a model makes of it: the layer options, each task's probed subset (drawn
once per process, so that every model and every probe of a run sees the same sequences and residues),
and a model's per-layer features for that subset. The trainer's start-up check of `eval.probe_*` lives
here because it resolves exactly these: the layers and the subsets.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .tasks import RESIDUES, SPLITS, ProbeDataError, ProbeError, ProbeTask, load_task

_VOCAB_RESIDUES = set(RESIDUES)


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
    from ..embed import embed

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
