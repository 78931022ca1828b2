"""Datasets: where a run's shards come from.

* `data=sample` — the embedded default data: a 18.5k-protein sample of UniProtKB/Swiss-Prot release
  2014_01 (CC BY 4.0, "UniProtKB/Swiss-Prot release 2014_01, The UniProt Consortium"), shipped as
  `speedrun/assets/swissprot2014_sample.fasta.gz` and tokenized into shards on first use, into a cache
  folder (`$SPEEDRUN_CACHE`, default `~/.cache/speedrun-plm`). `scripts/build_sample.py` rebuilds it.
* `data=local data.path=DIR` — any folder of `*_{train,valid,test}_NNNNNN.bin` shards (ours, or the
  reference's published `Synthyra/*_packed` shards, which load unchanged).
* `data=omgprot50 | uniref50 | og_prot90` — the published packed shards, fetched into
  `${data.root}/<name>` by `python -m speedrun.data download data=NAME data.num_chunks=N` (hub.py).
* `data=swissprot2014` — the full Swiss-Prot 2014_01 corpus, made by
  `python -m speedrun.data prepare sp2014.fasta --dedup --out data/swissprot2014` (prepare.py).

A run asks `data_files(cfg.data, split)` for its shard list: it knows every dataset's folder and, when
something is missing, stops with one line that names the missing files and the command that makes or
fetches them (`dataset_dir` + `require_shards`, the older pair, still work and say the same for the
named datasets).

Splits are a hash of the sequence (`split_of`), so duplicates never straddle two splits.
"""
from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np

from ..fsutil import atomic_write, write_error
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
    """The embedded sample as shards, tokenized on first use (atomic writes; safe to race).

    An unwritable cache (read-only, full, not a folder) is one line naming it and `$SPEEDRUN_CACHE`."""
    if not ASSET.exists():
        raise DataError(f"{ASSET}: the embedded sample is missing from the package: reinstall speedrun-plm")
    digest = hashlib.blake2b(ASSET.read_bytes(), digest_size=6).hexdigest()
    out = cache_root() / f"sample-{digest}"
    if all(find_shards(out, s) for s in ("train", "valid", "test")):
        return out
    where = "set SPEEDRUN_CACHE to a writable folder (data=sample is tokenized there on first use)"
    try:  # before the work: an unwritable cache fails at once
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(out, exc, where) from exc
    splits: dict[str, list[np.ndarray]] = {"train": [], "valid": [], "test": []}
    with gzip.open(ASSET, "rt") as f:
        for _, seq in read_fasta(f):
            splits[split_of(seq, **SAMPLE_SPLIT)].append(encode(seq))
    for split, docs in splits.items():
        write_shard(out / shard_name(SAMPLE_NAME, split, 0), np.concatenate(docs), where=where)
    atomic_write(out / "ATTRIBUTION.txt", ATTRIBUTION + "\n", where=where)
    return out


PREPARED = {  # datasets made by `prepare`: config name -> how to make them (for the missing-data message)
    "swissprot2014": "python ../shared/tools/swissprot2014_fasta.py sp2014.fasta && "
                     "python -m speedrun.data prepare sp2014.fasta --dedup --out {folder}",
}


def dataset_dir(name: str, path: str | None) -> Path:
    """The shard folder of a data config.

    For the named datasets (hub: omgprot50, uniref50, og_prot90; prepared: swissprot2014) a missing
    or incomplete folder is a one-line DataError naming the missing files and the command that makes
    them (the download list comes from the folder's download.json; `data_files` also knows
    data.num_chunks).
    """
    if name == "sample" and not path:
        return sample_dir()
    if not path:
        raise DataError(f"data={name} needs data.path=DIR (a folder of *_train_*.bin / *_valid_*.bin shards)")
    folder = Path(path).expanduser()
    from .hub import HUB_DATASETS, check_folder

    if name in HUB_DATASETS:
        check_folder(folder, name, HUB_DATASETS[name][1], None, ("train", "valid"))
    elif name in PREPARED:
        _check_prepared(folder, name, ("train", "valid"))
    return folder


def _check_prepared(folder: Path, name: str, splits) -> None:
    missing = [s for s in splits if not (folder.is_dir() and find_shards(folder, s))]
    if missing:
        state = "does not exist" if not folder.is_dir() else f"has no {'/'.join(missing)} shards"
        raise DataError(f"data={name}: {folder} {state}: make it with {PREPARED[name].format(folder=folder)}")


def data_files(data, split: str) -> list[Path]:
    """The shard files a run of `data` (a DataConfig) uses for `split` ('train', 'valid' or 'test').

    Hub datasets (data.repo and data.file_prefix set): every file the run needs must be present and
    sound — the valid shard, the first data.num_chunks train shards (all present ones if 0), and the
    test shard when asked for — else one DataError lists every missing file and gives the download
    command. With data.num_chunks=N the run trains on exactly those N shards, even if more are there.
    Other datasets: `dataset_dir` + `require_shards`.
    """
    from .shards import require_shards

    repo, prefix = getattr(data, "repo", None), getattr(data, "file_prefix", None)
    if not (repo and prefix and data.path):
        return require_shards(dataset_dir(data.name, data.path), split)
    from .hub import check_folder, expected_files

    folder = Path(data.path).expanduser()
    num_chunks = int(getattr(data, "num_chunks", 0) or 0)
    splits = ("train", "valid") + (("test",) if split == "test" else ())
    check_folder(folder, data.name, prefix, num_chunks or None, splits)
    if split == "train" and num_chunks:
        return [folder / n for n in expected_files(prefix, num_chunks, ("train",))]
    if split == "train":
        return require_shards(folder, "train")
    return [folder / n for n in expected_files(prefix, 1, (split,))]
