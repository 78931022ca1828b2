"""The packed-shard format (RECIPE.md §2), compatible with the published `Synthyra/*_packed` shards.

A shard is a 1,024-byte header of 256 little-endian int32 — [0] magic 20240520, [1] version 1,
[2] number of tokens N (< 2**31), the rest 0 — followed by N uint8 token ids. Documents are
`<cls> residues <eos>` back to back, with no separator. Files are named
`{name}_{split}_{index:06d}.bin` with split one of train / valid / test.

Writing is atomic: the bytes go to a temporary file in the same folder that is renamed into place
only once complete, so an interrupted writer never leaves a shard that looks whole. Reading checks
magic, version and length and raises `DataError` with one line naming the file.
"""
from __future__ import annotations

import glob
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from ..errors import DataError  # noqa: F401  (re-exported: missing, corrupt or unreadable data)

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SPLITS = ("train", "valid", "test")
_NAME_RE = re.compile(r"^(?P<name>.+)_(?P<split>train|valid|test)_(?P<index>\d{6})\.bin$")


def shard_name(name: str, split: str, index: int) -> str:
    return f"{name}_{split}_{index:06d}.bin"


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> int:
    """Write `tokens` (any int array with values < 256) as one shard, atomically. Returns N."""
    path = Path(path)
    tokens = np.ascontiguousarray(tokens, dtype=np.uint8)
    n = int(tokens.size)
    if n >= 2**31:
        raise DataError(f"{path}: {n} tokens do not fit one shard (limit 2**31): write smaller shards")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, n
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a shard is ordinary data, readable like any file
        with os.fdopen(fd, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return n


def read_header(path: str | os.PathLike) -> int:
    """Validate a shard's header and size; return its token count N."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise DataError(f"{path}: shard not found: check data.path or fetch/prepare the data") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read shard ({exc.strerror}): check permissions") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: only {len(raw)} bytes, shorter than the 1024-byte shard header: "
                        "the file is truncated or not a shard; re-download or re-prepare it")
    header = np.frombuffer(raw, dtype="<i4")
    if int(header[0]) != MAGIC:
        raise DataError(f"{path}: wrong magic number {int(header[0])} (expected {MAGIC}): "
                        "not a speedrun/SpeedrunningPLMs shard; re-download or re-prepare it")
    if int(header[1]) != VERSION:
        raise DataError(f"{path}: unsupported shard version {int(header[1])} (expected {VERSION})")
    n = int(header[2])
    if n < 0 or size != HEADER_BYTES + n:
        raise DataError(f"{path}: header says {n} tokens but the file holds {size - HEADER_BYTES}: "
                        "the shard is truncated or corrupt; re-download or re-prepare it")
    return n


def open_shard(path: str | os.PathLike) -> np.ndarray:
    """The tokens of a validated shard as a read-only uint8 memmap."""
    n = read_header(path)
    if n == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER_BYTES, shape=(n,))


def find_shards(folder: str | os.PathLike, split: str) -> list[Path]:
    """Sorted shard files of one split in `folder` (any dataset name)."""
    folder = Path(folder)
    files = [Path(p) for p in glob.glob(str(folder / f"*_{split}_*.bin"))]
    return sorted(p for p in files if _NAME_RE.match(p.name))


def require_shards(folder: str | os.PathLike, split: str) -> list[Path]:
    """Like find_shards, but a missing folder or split is a DataError that says what to do."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist: pass data.path=DIR with *_{split}_*.bin shards "
                        "(python -m speedrun.data prepare FASTA --out DIR makes them)")
    files = find_shards(folder, split)
    if not files:
        raise DataError(f"no *_{split}_NNNNNN.bin shards in {folder}: prepare or download the {split} split first")
    return files


def doc_bounds(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the documents of a token stream: each ends just after an <eos> (id 2).

    A trailing piece with no <eos> (a cut stream) counts as a document too.
    """
    eos = np.flatnonzero(np.asarray(tokens) == 2)
    ends = eos + 1
    if tokens.size and (ends.size == 0 or ends[-1] != tokens.size):
        ends = np.append(ends, tokens.size)
    starts = np.empty_like(ends)
    if ends.size:
        starts[0] = 0
        starts[1:] = ends[:-1]
    return starts.astype(np.int64), ends.astype(np.int64)


def glob_tmp_leftovers(folder: str | os.PathLike) -> list[str]:
    """Temporary files left by an interrupted writer (never mistaken for shards: they end in .tmp)."""
    return sorted(glob.glob(os.path.join(folder, ".*.bin.*.tmp")))
