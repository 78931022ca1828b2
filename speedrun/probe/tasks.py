"""Labelled tasks for representation probes (issue 8; RECIPE.md §8 quality track, §11 Protify).

A task is a `ProbeTask`: a name, a kind (`classification` | `regression`), a level (`sequence`: one
label per protein | `residue`: one label per residue, -1 = skip) and three splits (train / valid /
test) of sequences and labels. Built-in tasks load the real data that DATA.md lists:

    ss3           FLIP secondary structure, 3 states C/E/H per residue (flip_secondary_structure.zip;
                  unresolved residues of mask.fasta are skipped); FLIP's train / validation / test
    conservation  FLIP conservation, 9 classes per residue (flip_conservation.zip)
    meltome       FLIP meltome, melting temperature (regression; flip_meltome.zip,
                  tasks/clustered_task.csv); validation carved from train by homology clusters
    solubility    aaanalysis SEQ_SOLUBLE.tsv (binary, balanced); homology-aware 80/10/10 folds

The FLIP zips are looked up in `--data-dir` / `$SPEEDRUN_PROBE_DATA` (default /work/shared/data/probes,
valid only on the project's machines). aaanalysis is found with `importlib.util.find_spec` without
importing it (`pip install --no-deps aaanalysis==1.0.3`).

Every task accepts its data from a local path instead: `ss3@PATH` (PATH = the zip, a folder holding it,
or the unzipped folder with `splits/`), `meltome@FILE.csv|zip`, `solubility@FILE.tsv`. A task can
also be declared (a dict, or a YAML/JSON file whose path is given as the task):

    name: mytask
    path: data/my.csv                # .csv / .tsv (also aaanalysis:SEQ_CAPSID for a packaged table)
    sequence_column: sequence
    label_column: label
    type: classification             # or regression
    level: sequence                  # or residue (labels: one letter per residue, or comma-separated)
    split_column: set                # optional: values train / valid / test; without it -> `split`
    split: homology                  # homology (default) | random: 80/10/10 folds (valid_frac, test_frac)
    metric: mcc                      # optional primary metric (accuracy | mcc | spearman)

Homology-aware folds (`homology_clusters`) link two sequences that share at least 20 % of the
distinct 5-mers of the shorter one (≈ 75 % identity or more, fragments included) and keep each
connected cluster inside one split, so near-identical proteins never straddle train and test. The
folds depend only on the data (fixed seed), so every run is scored on the same split.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from ..errors import SpeedrunError

DEFAULT_DATA_DIR = "/work/shared/data/probes"
DATA_ENV = "SPEEDRUN_PROBE_DATA"
AAANALYSIS_HINT = "pip install --no-deps aaanalysis==1.0.3"
SPLITS = ("train", "valid", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "valid", "val": "valid", "validation": "valid",
                 "dev": "valid", "test": "test", "testing": "test"}
FOLD_SEED = 20240520  # homology folds depend on the data only, never on a run's seed
RESIDUES = "ACDEFGHIKLMNPQRSTVWYXBZUO"  # the residue letters of the ESM vocabulary
DEFAULT_TASKS = ("ss3", "meltome", "solubility")


class ProbeError(SpeedrunError):
    """A probe that cannot run (bad option, unreadable run). One line, naming the fix."""


class ProbeDataError(SpeedrunError):
    """Task data is missing or malformed. The message is one line: the file and how to get it."""


@dataclass
class ProbeTask:
    name: str
    kind: str  # classification | regression
    level: str  # sequence | residue
    splits: Dict[str, tuple]  # split -> (list of sequences, labels); labels: (N,) array or list of (L,) int arrays
    classes: tuple = ()
    metric: str = ""  # primary metric; default: accuracy (residue classes), mcc (sequence classes), spearman
    source: str = ""

    def __post_init__(self):
        if self.kind not in ("classification", "regression"):
            raise ProbeDataError(f"task {self.name}: type={self.kind!r} must be classification or regression")
        if self.level not in ("sequence", "residue"):
            raise ProbeDataError(f"task {self.name}: level={self.level!r} must be sequence or residue")
        if not self.metric:
            self.metric = ("spearman" if self.kind == "regression"
                           else "accuracy" if self.level == "residue" else "mcc")
        for s in SPLITS:
            if s not in self.splits or not len(self.splits[s][0]):
                raise ProbeDataError(f"task {self.name}: the {s} split is empty ({self.source})")

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def sizes(self) -> dict:
        return {s: len(self.splits[s][0]) for s in SPLITS}


# ---------------------------------------------------------------- files: zip, folder or plain file

def data_dir(explicit: Optional[str] = None) -> Path:
    """The folder with the FLIP zips: `explicit`, else $SPEEDRUN_PROBE_DATA, else the machines' default."""
    return Path(explicit or os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR).expanduser()


class _Source:
    """Members read from a zip file or from a folder (an unzipped archive)."""

    def __init__(self, path: Path):
        self.path = path
        self.zip = zipfile.ZipFile(path) if path.is_file() else None

    def has(self, member: str) -> bool:
        if self.zip is not None:
            return member in self.zip.namelist()
        return (self.path / member).is_file()

    def text(self, member: str) -> str:
        try:
            if self.zip is not None:
                return self.zip.read(member).decode("utf-8", errors="replace")
            return (self.path / member).read_text(errors="replace")
        except (KeyError, OSError) as exc:
            raise ProbeDataError(f"{self.path} has no {member}: is it the right archive?") from exc


def _flip_source(path: Optional[str], zip_name: str, probe_member: str, what: str, data: Optional[str]) -> _Source:
    """Resolve a FLIP archive from an explicit path (zip, folder holding the zip, unzipped folder) or the data dir."""
    how = (f"download splits.zip of {what} from https://github.com/J-SNACKKB/FLIP (splits/) and save it as "
           f"DIR/{zip_name}, then pass --data-dir DIR or set {DATA_ENV}=DIR")
    candidates = []
    if path:
        p = Path(path).expanduser()
        candidates = [p, p / zip_name]
    else:
        candidates = [data_dir(data) / zip_name]
    for c in candidates:
        if c.is_file() and zipfile.is_zipfile(c):
            return _Source(c)
        if c.is_dir() and (c / probe_member).is_file():
            return _Source(c)
    raise ProbeDataError(f"missing {candidates[-1] if not path else path} ({zip_name}): {how}")


def _read_fasta(text: str) -> List[tuple]:
    """[(header, sequence)] of a FASTA text; the header keeps everything after '>'."""
    out, head, chunks = [], None, []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith(">"):
            if head is not None:
                out.append((head, "".join(chunks)))
            head, chunks = line[1:].strip(), []
        else:
            chunks.append(line)
    if head is not None:
        out.append((head, "".join(chunks)))
    return out


def _header_fields(header: str) -> tuple:
    parts = header.split()
    kv = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    return parts[0], kv


# ---------------------------------------------------------------- FLIP per-residue tasks

def _flip_residue_task(name: str, src: _Source, label_file: str, classes: str, mask_file: Optional[str]) -> ProbeTask:
    seqs = {_header_fields(h)[0]: s for h, s in _read_fasta(src.text("splits/sequences.fasta"))}
    masks = {}
    if mask_file and src.has(mask_file):
        masks = {_header_fields(h)[0]: s for h, s in _read_fasta(src.text(mask_file))}
    lut = np.full(256, -1, dtype=np.int64)
    for i, c in enumerate(classes):
        lut[ord(c)] = i
    buckets = {s: ([], []) for s in SPLITS}
    for header, labels in _read_fasta(src.text(label_file)):
        ident, kv = _header_fields(header)
        seq = seqs.get(ident)
        if seq is None or len(seq) != len(labels):
            continue
        y = lut[np.frombuffer(labels.encode("latin-1"), dtype=np.uint8)]
        mask = masks.get(ident)
        if mask is not None and len(mask) == len(seq):
            y[np.frombuffer(mask.encode("latin-1"), dtype=np.uint8) == ord("0")] = -1
        if not (y >= 0).any():
            continue
        split = "test" if kv.get("SET", "train").lower() == "test" else (
            "valid" if kv.get("VALIDATION", "False").lower() == "true" else "train")
        buckets[split][0].append(seq)
        buckets[split][1].append(y)
    return ProbeTask(name, "classification", "residue", buckets, classes=tuple(classes), source=str(src.path))


def load_ss3(path: Optional[str] = None, data: Optional[str] = None) -> ProbeTask:
    src = _flip_source(path, "flip_secondary_structure.zip", "splits/sampled.fasta",
                       "secondary_structure", data)
    return _flip_residue_task("ss3", src, "splits/sampled.fasta", "CEH", "splits/mask.fasta")


def load_conservation(path: Optional[str] = None, data: Optional[str] = None) -> ProbeTask:
    src = _flip_source(path, "flip_conservation.zip", "splits/sampled.fasta", "conservation", data)
    return _flip_residue_task("conservation", src, "splits/sampled.fasta", "123456789", None)


# ---------------------------------------------------------------- tables (CSV / TSV)

def _read_table(text: str, name_hint: str) -> List[dict]:
    delim = "\t" if name_hint.endswith(".tsv") or ("\t" in text.split("\n", 1)[0]) else ","
    return list(csv.DictReader(io.StringIO(text), delimiter=delim))


def _aaanalysis_file(dataset: str) -> Path:
    spec = importlib.util.find_spec("aaanalysis")  # locate, never import (its import pulls heavy packages)
    if spec is None or not spec.submodule_search_locations:
        raise ProbeDataError(f"aaanalysis is not installed (needed for {dataset}): {AAANALYSIS_HINT}")
    f = Path(list(spec.submodule_search_locations)[0]) / "_data" / "benchmarks" / f"{dataset}.tsv"
    if not f.is_file():
        raise ProbeDataError(f"missing {f}: reinstall with {AAANALYSIS_HINT}")
    return f


def _resolve_table(path: str, base: Optional[Path] = None) -> tuple:
    """(text, display name) of a table given as FILE, aaanalysis:DATASET, or ARCHIVE.zip!member."""
    if path.startswith("aaanalysis:"):
        f = _aaanalysis_file(path.split(":", 1)[1])
        return f.read_text(), str(f)
    member = None
    if "!" in path:
        path, member = path.split("!", 1)
    p = Path(path).expanduser()
    if base is not None and not p.is_absolute():
        p = base / p
    if not p.exists():
        raise ProbeDataError(f"missing {p}: check the task's path")
    if p.is_file() and (member is not None or zipfile.is_zipfile(p)):
        with zipfile.ZipFile(p) as z:
            names = [n for n in z.namelist() if n.endswith((".csv", ".tsv"))]
            if member is None:
                if len(names) != 1:
                    raise ProbeDataError(f"{p} holds {len(names)} tables: name one as {p}!MEMBER")
                member = names[0]
            return z.read(member).decode("utf-8", errors="replace"), f"{p}!{member}"
    return p.read_text(errors="replace"), str(p)


def _parse_residue_labels(value: str, length: int) -> Optional[list]:
    """Per-residue labels given as one letter per residue or comma-separated values; None if misaligned."""
    value = value.strip()
    items = value.split(",") if "," in value else list(value)
    if len(items) != length:
        return None
    return [it.strip() for it in items]


def table_task(spec: dict, base: Optional[Path] = None) -> ProbeTask:
    """A task declared as a table: see the module docstring for the fields."""
    spec = dict(spec)
    known = {"name", "path", "sequence_column", "label_column", "type", "level", "split_column", "split",
             "valid_frac", "test_frac", "metric", "classes"}
    unknown = set(spec) - known
    if unknown:
        raise ProbeDataError(f"task {spec.get('name', '?')}: unknown field(s) {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(sorted(known))})")
    name = spec.get("name") or "custom"
    if not spec.get("path"):
        raise ProbeDataError(f"task {name}: needs path=FILE (a .csv/.tsv table)")
    kind = spec.get("type", "classification")
    level = spec.get("level", "sequence")
    scol, lcol = spec.get("sequence_column", "sequence"), spec.get("label_column", "label")
    text, shown = _resolve_table(str(spec["path"]), base)
    rows = _read_table(text, shown)
    if not rows:
        raise ProbeDataError(f"task {name}: {shown} has no rows")
    for col in (scol, lcol) + ((spec["split_column"],) if spec.get("split_column") else ()):
        if col not in rows[0]:
            raise ProbeDataError(f"task {name}: {shown} has no column {col!r} (columns: {', '.join(rows[0])})")
    seqs, raw, split_of = [], [], []
    for r in rows:
        seq = (r[scol] or "").strip()
        lab = (r[lcol] or "").strip()
        if not seq or lab == "" or lab.lower() in ("nan", "na", "none"):
            continue
        if level == "residue":
            lab = _parse_residue_labels(lab, len(seq))
            if lab is None:
                continue
        seqs.append(seq)
        raw.append(lab)
        if spec.get("split_column"):
            split_of.append(SPLIT_ALIASES.get((r[spec["split_column"]] or "").strip().lower()))
    # labels
    classes = tuple(str(c) for c in spec.get("classes") or ())
    if kind == "classification":
        if not classes:
            flat = sorted({x for lab in raw for x in (lab if level == "residue" else [lab])})
            classes = tuple(flat)
        index = {c: i for i, c in enumerate(classes)}
        if level == "residue":
            labels = [np.array([index.get(x, -1) for x in lab], dtype=np.int64) for lab in raw]
        else:
            labels = np.array([index.get(x, -1) for x in raw], dtype=np.int64)
    else:
        try:
            if level == "residue":
                labels = [np.array([float(x) if x not in ("", "nan") else np.nan for x in lab]) for lab in raw]
            else:
                labels = np.array([float(x) for x in raw], dtype=np.float64)
        except ValueError as exc:
            raise ProbeDataError(f"task {name}: type=regression but a label is not a number ({exc})") from None
    # splits
    if split_of:
        assign = np.array([s or "" for s in split_of])
        if not (assign == "valid").any():  # carve validation out of train, by homology
            tr = np.flatnonzero(assign == "train")
            sub = homology_split([seqs[i] for i in tr], {"train": 0.9, "valid": 0.1})
            assign[tr[sub == "valid"]] = "valid"
    else:
        vf, tf = float(spec.get("valid_frac", 0.1)), float(spec.get("test_frac", 0.1))
        fracs = {"train": 1.0 - vf - tf, "valid": vf, "test": tf}
        how = spec.get("split", "homology")
        if how == "homology":
            assign = homology_split(seqs, fracs)
        elif how == "random":
            assign = random_split(seqs, fracs)
        else:
            raise ProbeDataError(f"task {name}: split={how!r} must be homology or random (or give split_column)")
    splits = {}
    for s in SPLITS:
        idx = np.flatnonzero(assign == s)
        lab = [labels[i] for i in idx] if level == "residue" else labels[idx]
        splits[s] = ([seqs[i] for i in idx], lab)
    return ProbeTask(name, kind, level, splits, classes=classes, metric=spec.get("metric") or "", source=shown)


def load_meltome(path: Optional[str] = None, data: Optional[str] = None) -> ProbeTask:
    member = "tasks/clustered_task.csv"
    if path and Path(path).expanduser().is_file() and not zipfile.is_zipfile(Path(path).expanduser()):
        table = str(path)
    else:
        src = _flip_source(path, "flip_meltome.zip", member, "meltome", data)
        table = f"{src.path}!{member}" if src.zip is not None else str(src.path / member)
    return table_task({"name": "meltome", "path": table, "sequence_column": "sequence", "label_column": "target",
                       "type": "regression", "split_column": "set"})


def load_solubility(path: Optional[str] = None, data: Optional[str] = None) -> ProbeTask:
    return table_task({"name": "solubility", "path": path or "aaanalysis:SEQ_SOLUBLE", "sequence_column": "sequence",
                       "label_column": "label", "type": "classification", "classes": ["0", "1"]})


BUILTIN = {"ss3": load_ss3, "conservation": load_conservation, "meltome": load_meltome, "solubility": load_solubility}


def task_name(spec: Union[str, dict]) -> str:
    """The name a task spec will carry (without loading it)."""
    if isinstance(spec, dict):
        return str(spec.get("name") or "custom")
    s = str(spec)
    if "@" in s:
        return s.split("@", 1)[0]
    if s.endswith((".yaml", ".yml", ".json")):
        return Path(s).stem
    return s


def load_task(spec: Union[str, dict, ProbeTask], data: Optional[str] = None) -> ProbeTask:
    """Load a task from `NAME`, `NAME@PATH`, a declaration dict, or a YAML/JSON declaration file."""
    if isinstance(spec, ProbeTask):
        return spec
    if not isinstance(spec, dict) and hasattr(spec, "items"):  # a DictConfig
        spec = dict(spec.items())
    if isinstance(spec, dict):
        spec = dict(spec)
        name = spec.get("name")
        if name in BUILTIN and set(spec) <= {"name", "path"}:
            return BUILTIN[name](spec.get("path"), data)
        return table_task(spec)
    s = str(spec)
    if s.endswith((".yaml", ".yml", ".json")) and "@" not in s:
        p = Path(s).expanduser()
        if not p.is_file():
            raise ProbeDataError(f"missing task declaration {p}")
        if s.endswith(".json"):
            decl = json.loads(p.read_text())
        else:
            from omegaconf import OmegaConf
            decl = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
        decl.setdefault("name", p.stem)
        if decl.get("name") in BUILTIN and set(decl) <= {"name", "path"}:
            path = decl.get("path")
            if path and not Path(path).is_absolute():
                path = str(p.parent / path)
            return BUILTIN[decl["name"]](path, data)
        return table_task(decl, base=p.parent)
    name, path = (s.split("@", 1) + [None])[:2] if "@" in s else (s, None)
    if name not in BUILTIN:
        raise ProbeDataError(f"unknown probe task {name!r}: choose one of {', '.join(BUILTIN)}, "
                             "or declare one (a dict or a YAML file with path, sequence_column, label_column, type)")
    return BUILTIN[name](path, data)


# ---------------------------------------------------------------- homology-aware folds

def _codes(seqs: Sequence[str]) -> np.ndarray:
    lut = np.full(256, len(RESIDUES) - 1, dtype=np.int64)
    for i, c in enumerate(RESIDUES):
        lut[ord(c)] = lut[ord(c.lower())] = i
    joined = "".join(seqs).encode("latin-1", errors="replace")
    return lut[np.frombuffer(joined, dtype=np.uint8)]


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    a = np.sort(a)
    return a[np.concatenate([[True], a[1:] != a[:-1]])] if a.size else a


def homology_clusters(seqs: Sequence[str], k: int = 5, min_fraction: float = 0.2, min_shared: int = 3,
                      max_occurrence: int = 64) -> np.ndarray:
    """Cluster ids (N,) linking sequences that share >= min_fraction of the shorter one's distinct k-mers.

    Exact shared-k-mer counting through one sort (no all-pairs comparison); k-mers found in more than
    `max_occurrence` sequences (low complexity, His tags) carry no homology signal and are ignored.
    Identical sequences always share a cluster. Connected components become clusters (single linkage).
    """
    n = len(seqs)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    parent = np.arange(n)

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a, b):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    first = {}
    for i, s in enumerate(seqs):  # identical sequences (whatever their length)
        key = s.upper()
        if key in first:
            union(first[key], i)
        else:
            first[key] = i
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    codes = _codes(seqs)
    if codes.size >= k:
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        seq_of = np.repeat(np.arange(n), lengths)
        pos = np.arange(codes.size) - np.repeat(starts, lengths)
        valid = pos <= np.repeat(lengths, lengths) - k
        idx = np.flatnonzero(valid)
        base = len(RESIDUES)
        kmer = np.zeros(idx.size, dtype=np.int64)
        for t in range(k):
            kmer = kmer * base + codes[idx + t]
        key = _sorted_unique(kmer * n + seq_of[idx])  # distinct (k-mer, sequence), by k-mer then sequence
        km, sq = key // n, key % n
        n_kmers = np.bincount(sq, minlength=n)
        bounds = np.flatnonzero(np.diff(km)) + 1
        group_start = np.concatenate([[0], bounds])
        group_size = np.diff(np.concatenate([group_start, [km.size]]))
        size_of = np.repeat(group_size, group_size)
        keep = (size_of >= 2) & (size_of <= max_occurrence)
        km, sq = km[keep], sq[keep]
        pairs = []
        for d in range(1, max_occurrence):
            if km.size <= d:
                break
            same = km[d:] == km[:-d]
            if not same.any():
                break
            pairs.append(sq[:-d][same] * n + sq[d:][same])
        if pairs:
            pk = np.sort(np.concatenate(pairs))
            starts_ = np.flatnonzero(np.concatenate([[True], pk[1:] != pk[:-1]]))
            shared = np.diff(np.concatenate([starts_, [pk.size]]))
            pk = pk[starts_]
            a, b = pk // n, pk % n
            shorter = np.minimum(n_kmers[a], n_kmers[b])
            link = (shared >= min_shared) & (shared >= min_fraction * shorter)
            for x, y in zip(a[link].tolist(), b[link].tolist()):
                union(x, y)
    roots = np.array([find(i) for i in range(n)])
    _, cluster = np.unique(roots, return_inverse=True)
    return cluster


def _assign_clusters(cluster: np.ndarray, fracs: dict, seed: int) -> np.ndarray:
    """Whole clusters to splits, biggest first, each to the split furthest below its target share."""
    n = cluster.size
    names = [s for s in SPLITS if fracs.get(s, 0) > 0]
    target = np.array([fracs[s] for s in names], dtype=np.float64)
    target = target / target.sum() * n
    sizes = np.bincount(cluster)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(sizes.size), -sizes))
    filled = np.zeros(len(names))
    split_of_cluster = np.empty(sizes.size, dtype=object)
    for c in order:
        j = int(np.argmax((target - filled) / target))
        split_of_cluster[c] = names[j]
        filled[j] += sizes[c]
    return np.array(split_of_cluster[cluster].tolist() if n else [], dtype=object).astype(str)


def homology_split(seqs: Sequence[str], fracs: dict, seed: int = FOLD_SEED, cache: bool = True,
                   **cluster_kw) -> np.ndarray:
    """Split names (N,) with whole homology clusters kept inside one split.

    Clustering a large table takes seconds, so the clusters are cached under $SPEEDRUN_CACHE/probe_folds,
    keyed by a hash of the sequences and the clustering parameters."""
    h = hashlib.sha1(json.dumps(sorted(cluster_kw.items())).encode())
    for s in seqs:
        h.update(s.encode("latin-1", errors="replace") + b"\n")
    path = (Path(os.environ.get("SPEEDRUN_CACHE") or Path.home() / ".cache" / "speedrun-plm")
            / "probe_folds" / f"{h.hexdigest()[:20]}.npy")
    cluster = None
    if cache and path.is_file():
        try:
            cluster = np.load(path)
            if cluster.shape != (len(seqs),):
                cluster = None
        except (OSError, ValueError):
            cluster = None
    if cluster is None:
        cluster = homology_clusters(seqs, **cluster_kw)
        if cache and len(seqs) >= 1000:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.stem}.{os.getpid()}.npy")
                np.save(tmp, cluster)
                os.replace(tmp, path)
            except OSError:
                pass
    return _assign_clusters(cluster, fracs, seed)


def random_split(seqs: Sequence[str], fracs: dict) -> np.ndarray:
    """Split names from a hash of each sequence (stable under reordering; identical sequences together)."""
    names = [s for s in SPLITS if fracs.get(s, 0) > 0]
    edges = np.cumsum([fracs[s] for s in names])
    edges = edges / edges[-1]
    u = np.array([int.from_bytes(hashlib.sha1(s.encode()).digest()[:8], "little") / 2**64 for s in seqs])
    return np.array(names, dtype=object)[np.searchsorted(edges, u, side="right").clip(max=len(names) - 1)].astype(str)


__all__ = ["ProbeTask", "ProbeError", "ProbeDataError", "BUILTIN", "DEFAULT_TASKS", "load_task", "task_name",
           "table_task", "homology_clusters", "homology_split", "random_split", "data_dir"]
