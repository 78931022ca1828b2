"""Datasets: where a run's shards come from.

* `data=sample` — the embedded default data: a 18.5k-protein sample of UniProtKB/Swiss-Prot release
  2014_01 (CC BY 4.0, "UniProtKB/Swiss-Prot release 2014_01, The UniProt Consortium"), shipped as
  `speedrun/assets/swissprot2014_sample.fasta.gz` and tokenized into shards on first use, into a cache
  folder (`$SPEEDRUN_CACHE`, default `~/.cache/speedrun-plm`). `scripts/build_sample.py` rebuilds it.
* `data=local data.path=DIR` — any folder of `*_{train,valid,test}_NNNNNN.bin` shards (ours, or the
  reference's published `Synthyra/*_packed` shards, which load unchanged).

Splits are a hash of the sequence (`split_of`), so duplicates never straddle two splits.
"""
from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np

from ..vocab import encode
from .shards import DataError, find_shards, shard_name, write_shard

ASSET = Path(__file__).resolve().parent.parent / "assets" / "swissprot2014_sample.fasta.gz"
SAMPLE_NAME = "swissprot2014sample"
SAMPLE_SPLIT = {"valid_frac": 0.03, "test_frac": 0.03}
ATTRIBUTION = "UniProtKB/Swiss-Prot release 2014_01, The UniProt Consortium (CC BY 4.0)"


def split_of(residues: str | bytes, valid_frac: float, test_frac: float, salt: str = "speedrun-split-v1") -> str:
    """'train', 'valid' or 'test' from a hash of the (upper-cased, white-space-free) sequence."""
    if isinstance(residues, str):
        residues = residues.encode("latin-1")
    key = b"".join(residues.upper().split())
    h = int.from_bytes(hashlib.blake2b(salt.encode() + key, digest_size=8).digest(), "little") / 2**64
    if h < valid_frac:
        return "valid"
    if h < valid_frac + test_frac:
        return "test"
    return "train"


def read_fasta(handle):
    """Yield (header, sequence) from an open text FASTA handle."""
    header, parts = None, []
    for line in handle:
        if line.startswith(">"):
            if header is not None:
                yield header, "".join(parts)
            header, parts = line[1:].strip(), []
        else:
            parts.append(line.strip())
    if header is not None:
        yield header, "".join(parts)


def cache_root() -> Path:
    return Path(os.environ.get("SPEEDRUN_CACHE") or Path.home() / ".cache" / "speedrun-plm")


def sample_dir() -> Path:
    """The embedded sample as shards, tokenized on first use (atomic writes; safe to race)."""
    if not ASSET.exists():
        raise DataError(f"{ASSET}: the embedded sample is missing from the package: reinstall speedrun-plm")
    digest = hashlib.blake2b(ASSET.read_bytes(), digest_size=6).hexdigest()
    out = cache_root() / f"sample-{digest}"
    if all(find_shards(out, s) for s in ("train", "valid", "test")):
        return out
    splits: dict[str, list[np.ndarray]] = {"train": [], "valid": [], "test": []}
    with gzip.open(ASSET, "rt") as f:
        for _, seq in read_fasta(f):
            splits[split_of(seq, **SAMPLE_SPLIT)].append(encode(seq))
    out.mkdir(parents=True, exist_ok=True)
    for split, docs in splits.items():
        write_shard(out / shard_name(SAMPLE_NAME, split, 0), np.concatenate(docs))
    (out / "ATTRIBUTION.txt").write_text(ATTRIBUTION + "\n")
    return out


def dataset_dir(name: str, path: str | None) -> Path:
    """The shard folder of a data config."""
    if name == "sample" and not path:
        return sample_dir()
    if not path:
        raise DataError(f"data={name} needs data.path=DIR (a folder of *_train_*.bin / *_valid_*.bin shards)")
    return Path(path).expanduser()
