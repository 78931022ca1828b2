"""The packed-shard format (RECIPE.md §2), compatible with the published `Synthyra/*_packed` shards.

A shard is a 1,024-byte header of 256 little-endian int32 — [0] magic 20240520, [1] version 1,
[2] number of tokens N (< 2**31), the rest 0 — followed by N uint8 token ids. Documents are
`<cls> residues <eos>` back to back, with no separator. Files are named
`{name}_{split}_{index:06d}.bin` with split one of train / valid / test.

Writing is atomic (`fsutil.atomic_write`): an interrupted writer never leaves a shard that looks whole,
and a full or read-only disk is one line naming the file. Reading checks magic, version and length, and
opening a shard (`open_shard`) also checks its content once (cached per file version): every token id
is in the 33-token vocabulary, and a non-empty shard holds residues (not only `<pad>` or other special
tokens). Every read failure is a `DataError` with one line naming the file.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import DataError  # noqa: F401  (re-exported: missing, corrupt or unreadable data)
from ..fsutil import atomic_write, write_error
from ..vocab import AA_FIRST, VOCAB_SIZE

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SPLITS = ("train", "valid", "test")
_NAME_RE = re.compile(r"^(?P<name>.+)_(?P<split>train|valid|test)_(?P<index>\d{6})\.bin$")


def shard_name(name: str, split: str, index: int) -> str:
    return f"{name}_{split}_{index:06d}.bin"


def write_shard(path: str | os.PathLike, tokens: np.ndarray, where: str = "choose another folder") -> int:
    """Write `tokens` (any int array with values < 256) as one shard, atomically. Returns N.

    A failed write (full disk, read-only, permission) is a one-line `fsutil.WriteError` naming the file
    and `where` to go instead."""
    path = Path(path)
    tokens = np.ascontiguousarray(tokens, dtype=np.uint8)
    n = int(tokens.size)
    if n >= 2**31:
        raise DataError(f"{path}: {n} tokens do not fit one shard (limit 2**31): write smaller shards")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(path, exc, where) from exc
    atomic_write(path, header_bytes(n) + tokens.tobytes(), where=where)
    return n


def header_bytes(n: int) -> bytes:
    """The 1,024-byte header of a shard of `n` tokens."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, n
    return header.tobytes()


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
    """The tokens of a validated shard (header and content) as a read-only uint8 memmap."""
    n = read_header(path)
    if n == 0:
        return np.zeros(0, dtype=np.uint8)
    tokens = np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER_BYTES, shape=(n,))
    check_tokens(path, tokens)
    return tokens


_CHECKED: dict[tuple, None] = {}  # file versions whose content passed check_tokens


def check_tokens(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Raise a one-line DataError if a shard's tokens are not protein tokens of the vocabulary.

    One vectorised max over the shard (about 30 ms per 10^8 tokens), once per file version (path, inode,
    size, modification time): an id >= 33 (named with its offset; the embedding would fail far from here,
    naming no file) or a shard with no residue at all (only <cls>/<pad>/<eos>/<unk>: loss 0 every step).
    """
    try:
        st = os.stat(path)
        key = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key is not None and key in _CHECKED:
        return
    top = int(tokens.max()) if tokens.size else 0
    if top >= VOCAB_SIZE:
        i = int(np.argmax(np.asarray(tokens) >= VOCAB_SIZE))
        raise DataError(f"{path}: token id {int(tokens[i])} at token {i} (byte {HEADER_BYTES + i}) is outside the "
                        f"{VOCAB_SIZE}-token vocabulary: not a shard of this vocabulary or corrupt; re-prepare or "
                        "re-download it")
    if tokens.size and top < AA_FIRST:
        raise DataError(f"{path}: {tokens.size} tokens but no residue (only <cls>/<pad>/<eos>/<unk>): nothing to "
                        "train or evaluate on; re-prepare it from the sequences")
    if key is not None:
        if len(_CHECKED) > 4096:
            _CHECKED.clear()
        _CHECKED[key] = None


def empty_split_error(files: list, split: str = "evaluation") -> DataError:
    """The one-line error for a split whose shards hold no document (an evaluation loss would be NaN)."""
    shown = ", ".join(str(f) for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return DataError(f"{shown or f'no {split} shards'}: the {split} split holds no documents (0 tokens), so its "
                     "loss would be NaN: re-prepare the data with more sequences (or a larger --valid-frac / "
                     "--test-frac)")


def fingerprint(files: Iterable[str | os.PathLike]) -> str:
    """A cheap fingerprint of a shard list: the file names and sizes, in order (no file is read).

    Re-preparing or re-downloading a dataset almost always changes a size; a run resuming onto
    different data is refused on it (`loader._DocCursor.load_state_dict`)."""
    parts = []
    for f in files:
        f = Path(f)
        try:
            size = f.stat().st_size
        except OSError:
            size = read_header(f)  # raises the one-line DataError naming the file
        parts.append(f"{f.name}:{size}")
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=8).hexdigest()


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
