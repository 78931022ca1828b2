"""Your own sequences as shards: `python -m speedrun.data prepare INPUT... --out DIR`.

Inputs are FASTA (plain or gzip/bz2/xz-compressed, detected by content, not by name), CSV/TSV with a
sequence column, or parquet (needs the optional `pyarrow`). The output is a folder of
`{name}_{split}_{index:06d}.bin` shards in the reference format (speedrun/data/shards.py), which the
loader and the reference trainer read unchanged.

Why it is built the way it is:

* **Streaming.** The main process reads the inputs in blocks of a few MB (FASTA blocks cut at a record
  boundary; CSV/parquet rows in batches) and hands them to worker processes; at most a few blocks are
  in flight, and each shard is written straight to disk as it fills. Memory is bounded by the block
  size, never by the corpus (de-duplication, when asked for, keeps one 64-bit hash per distinct
  sequence: about 100 bytes each).
* **Parallel and deterministic.** Workers encode and hash blocks; results come back in input order
  (`_ordered_map`, a bounded order-preserving imap), so the shards are byte-identical for any number of
  workers. `Pool.imap` itself is not used because it reads its whole input ahead (the corpus would end
  up in the task queue).
* **Split by a hash of the sequence** (`speedrun.data.split_of`, the rule the embedded sample uses), so a
  sequence lands in the same split wherever and however often it occurs: duplicates never straddle
  two splits, and with the default fractions the sample's splits nest inside those of the full
  Swiss-Prot corpus.
* **Encoding exactly as the ESM tokenizer** (`speedrun.vocab.encode`): white space dropped, lower-case
  letters / `*` / digits become `<unk>` (one per run), `-` and `.` are gap tokens. The report counts
  the letters that were mapped to `<unk>` so a surprise is visible.
* **Refuse what is not sequences.** Binary files, HTML pages, empty files, a missing or wrong column
  (mostly letters outside the vocabulary), and nucleotide FASTA stop with one line naming the file.
* **Atomic.** Everything is written into a hidden staging folder next to `--out`, each shard as a
  `.tmp` file renamed only once complete; the files move into `--out` only at the very end (the shards
  first, `prepare.json` last). An interrupted run leaves no shard — and no dataset — that looks complete.
  A full or read-only disk is one line naming the file (`fsutil.WriteError`).
* **One owner, and never a user's file.** A prepare holds `--out`'s lock (`fsutil.FolderLock`) for the
  whole run: a second prepare into the same folder stops with one line naming the holder. It writes
  only into a new or empty folder, or over its own earlier output with `--overwrite`, which removes
  only the files its manifest (`.speedrun-manifest.json`, `fsutil.claim_output`) lists — never a file
  the user put there, and never with an input inside `--out`.
* **Workers die with prepare** (`PR_SET_PDEATHSIG` on Linux, and a parent-pid check): a killed prepare
  leaves no worker blocked forever on its queue. Their number defaults to the CPUs this process may
  use (`os.sched_getaffinity`), which the report states.
"""
from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import hashlib
import io
import lzma
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from ..errors import FolderError, cli_main
from ..fsutil import LOCK_NAME, FolderLock, Manifest, atomic_write, claim_output, write_error, write_json
from ..vocab import LETTERS, UNK, encode
from . import split_of
from .shards import HEADER_BYTES, SPLITS, DataError, header_bytes, shard_name

DEFAULT_SHARD_TOKENS = 10**8  # the reference's --shard_size: about 100 MB per shard
FASTA_EXT = {".fa", ".fasta", ".faa", ".fas", ".fsa", ".pep", ".mpfa", ".aa"}
CSV_EXT = {".csv"}
TSV_EXT = {".tsv", ".tab"}
PARQUET_EXT = {".parquet", ".pq"}
SEQUENCE_COLUMNS = ("sequence", "seq", "sequences", "protein_sequence", "aa_seq")
TOOL = "prepare"  # the name in --out's manifest
OUT_FIX = "choose another --out"
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, which some editors put first

# letters the vocabulary knows, plus white space (dropped): everything else becomes <unk>
_KNOWN = np.zeros(256, dtype=bool)
_KNOWN[np.frombuffer(LETTERS.encode(), dtype=np.uint8)] = True
_KNOWN[np.frombuffer(b" \t\r\n\x0b\x0c", dtype=np.uint8)] = True
_LETTER = np.zeros(256, dtype=bool)  # any non-white-space byte
_LETTER[:] = True
_LETTER[np.frombuffer(b" \t\r\n\x0b\x0c", dtype=np.uint8)] = False
_NUCLEOTIDE = np.zeros(256, dtype=bool)
_NUCLEOTIDE[np.frombuffer(b"ACGTUNacgtun", dtype=np.uint8)] = True


@dataclass
class PrepareOptions:
    """What `prepare` does with the sequences (the CLI flags, one to one)."""
    name: Optional[str] = None  # shard name prefix; default: the --out folder's name
    valid_frac: float = 0.03  # the embedded sample's fractions, so its splits nest in a full corpus's
    test_frac: float = 0.03
    dedup: bool = False  # drop exact repeats of a sequence (first occurrence wins)
    min_length: int = 1  # residues; shorter sequences (and empty records) are dropped
    max_length: int = 0  # residues; longer sequences are dropped (0 = keep all; the loader crops)
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    workers: int = 0  # worker processes (0 = every CPU this process may use; 1 = no pool)
    column: Optional[str] = None  # CSV/TSV/parquet column holding the sequences (default: 'sequence')
    uppercase: bool = False  # upper-case letters first (soft-masked / lower-case inputs)
    strip_stop: bool = False  # drop trailing '*' (stop codons of translated ORFs) instead of <unk>
    overwrite: bool = False  # replace what an earlier prepare wrote into --out (never other files)
    attribution: Optional[str] = None  # written to ATTRIBUTION.txt next to the shards (licences such as CC BY)
    block_bytes: int = 4 << 20  # input block handed to a worker


# ================================================ reading =============================================
def _open_bytes(path: Path):
    """A binary handle on the (decompressed) content; compression is recognised by its magic bytes."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")
    if magic[:3] == b"BZh":
        return bz2.open(path, "rb")
    if magic[:6] == b"\xfd7zXZ\x00":
        return lzma.open(path, "rb")
    return open(path, "rb")


def _base_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".gzip"):
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def sniff(path: Path) -> str:
    """'fasta', 'csv', 'tsv' or 'parquet' — or a one-line DataError saying why the file is not sequences."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a folder: pass the sequence files themselves")
    with open(path, "rb") as f:
        raw_magic = f.read(4)
    if raw_magic == b"PAR1":
        return "parquet"
    ext = _base_suffix(path)
    if ext in PARQUET_EXT:
        raise DataError(f"{path}: not a parquet file (no PAR1 magic): the file is corrupt or misnamed")
    try:
        with _open_bytes(path) as f:
            head = f.read(1 << 16)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise DataError(f"{path}: cannot decompress ({exc}): the file is truncated or corrupt") from None
    if head.startswith(BOM):
        head = head[len(BOM):]
    if not head.strip():
        raise DataError(f"{path}: empty file: no sequences")
    if b"\x00" in head:
        raise DataError(f"{path}: binary file, not sequences: pass FASTA, CSV/TSV or parquet")
    start = head.lstrip()[:64].lower()
    if start.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")) or start.startswith(b"<"):
        raise DataError(f"{path}: looks like an HTML/XML page, not sequences (a saved web or error page?): "
                        "download the raw file")
    if ext in FASTA_EXT or start.startswith(b">"):
        if not start.startswith(b">"):
            raise DataError(f"{path}: not FASTA: the first line does not start with '>'")
        return "fasta"
    if ext in TSV_EXT:
        return "tsv"
    if ext in CSV_EXT:
        return "csv"
    first_line = head.lstrip().split(b"\n", 1)[0]
    if b"\t" in first_line:
        return "tsv"
    if b"," in first_line:
        return "csv"
    raise DataError(f"{path}: unknown format: expected FASTA ('>' headers), CSV/TSV with a sequence column, "
                    "or parquet")


def _fasta_blocks(path: Path, block_bytes: int) -> Iterator[bytes]:
    """Raw FASTA bytes in blocks that end at a record boundary (just before a line starting with '>')."""
    carry, first = b"", True
    with _open_bytes(path) as f:
        while True:
            try:
                chunk = f.read(block_bytes)
            except (OSError, EOFError, lzma.LZMAError) as exc:
                raise DataError(f"{path}: cannot decompress ({exc}): the file is truncated or corrupt") from None
            if not chunk:
                break
            if first and chunk.startswith(BOM):
                chunk = chunk[len(BOM):]
            first = False
            buf = carry + chunk
            cut = buf.rfind(b"\n>")
            if cut <= 0:  # no record boundary yet (a huge record): keep reading
                carry = buf
                continue
            yield buf[:cut + 1]
            carry = buf[cut + 1:]
    if carry.strip():
        yield carry


def _parse_fasta_block(block: bytes) -> tuple[list[bytes], int]:
    """(sequences, records) of a FASTA block; lines are stripped and joined like `read_fasta` does."""
    seqs = []
    records = 0
    for rec in block.split(b"\n>"):
        if rec.startswith(b">"):
            rec = rec[1:]
        elif records == 0 and not rec.strip():
            continue
        records += 1
        _, _, body = rec.partition(b"\n")
        seqs.append(b"".join(line.strip() for line in body.split(b"\n")))
    return seqs, records


def _table_batches(path: Path, kind: str, column: Optional[str], block_bytes: int) -> Iterator[list]:
    """Lists of sequence strings from one column of a CSV/TSV file, about `block_bytes` at a time."""
    csv.field_size_limit(2**31 - 1)
    handle = io.TextIOWrapper(_open_bytes(path), encoding="utf-8-sig", errors="replace", newline="")
    with handle:
        rows = _table_rows(path, kind, csv.reader(handle, delimiter="\t" if kind == "tsv" else ",", strict=True))
        header = next(rows, None)
        if header is None:
            raise DataError(f"{path}: empty file: no sequences")
        col = _pick_column(path, [h.strip() for h in header], column)
        batch, size = [], 0
        for row in rows:
            value = row[col] if col < len(row) else ""
            batch.append(value)
            size += len(value) + 16
            if size >= block_bytes:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch


def _table_rows(path: Path, kind: str, reader) -> Iterator[list]:
    """The rows of a CSV/TSV reader, one line each: a record spanning lines is refused, naming its first
    line — an unterminated quote swallows the rows after it into one chimeric field."""
    while True:
        first = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{path}: line {first}: malformed {kind.upper()} ({exc}; an unterminated or stray "
                            "quote?): fix the quoting or convert the file to FASTA") from None
        if reader.line_num > first:
            raise DataError(f"{path}: line {first}: a quoted field runs on to line {reader.line_num} (an unterminated "
                            "quote?): fix the quoting or convert the file to FASTA")
        yield row


def _pick_column(path: Path, names: list[str], column: Optional[str]) -> int:
    lower = [n.lower() for n in names]
    wanted = [column] if column else list(SEQUENCE_COLUMNS)
    for w in wanted:
        if w.lower() in lower:
            return lower.index(w.lower())
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    what = f"column '{column}'" if column else "'sequence' column"
    hint = "pass --column NAME" if not column else "pick one of them with --column"
    raise DataError(f"{path}: no {what} (columns: {shown}): {hint}")


def _parquet_batches(path: Path, column: Optional[str], block_bytes: int) -> Iterator[list]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid etc.
        raise DataError(f"{path}: cannot read parquet ({str(exc).splitlines()[0]}): the file is corrupt") from None
    names = list(pf.schema_arrow.names)
    col = names[_pick_column(path, names, column)]
    rows = max(1, block_bytes // 400)
    for batch in pf.iter_batches(batch_size=rows, columns=[col]):
        values = batch.column(0).to_pylist()
        if values and not isinstance(next((v for v in values if v is not None), ""), (str, bytes)):
            raise DataError(f"{path}: column '{col}' does not hold text: pick the sequence column with --column")
        yield values


# =============================================== encoding =============================================
@dataclass
class _Chunk:
    """What a worker returns for one block: per split, the tokens of the kept documents back to back."""
    file: int
    end: bool = False  # marks the end of a file (no data)
    tokens: dict = field(default_factory=dict)  # split -> uint8 array
    lengths: dict = field(default_factory=dict)  # split -> int64 array (tokens per document)
    digests: dict = field(default_factory=dict)  # split -> uint64 array (only with dedup)
    records: int = 0
    empty: int = 0
    too_short: int = 0
    too_long: int = 0
    letters: int = 0
    unknown_letters: int = 0
    nucleotide_letters: int = 0
    unk_tokens: int = 0
    seqs_with_unk: int = 0


def _encode_task(task: tuple, opts: PrepareOptions) -> _Chunk:
    """Worker: parse a block, encode every sequence, pick its split. Pure function of (task, opts)."""
    kind, payload, file_index = task
    out = _Chunk(file=file_index)
    if kind == "end":
        out.end = True
        return out
    if kind == "fasta":
        seqs, out.records = _parse_fasta_block(payload)
    else:
        seqs = [b"" if v is None else (v.encode("utf-8") if isinstance(v, str) else bytes(v)).strip()
                for v in payload]
        out.records = len(seqs)
    if opts.uppercase:
        seqs = [s.upper() for s in seqs]
    if opts.strip_stop:
        seqs = [s.rstrip(b"*") for s in seqs]
    joined = np.frombuffer(b"".join(seqs), dtype=np.uint8)
    out.letters = int(_LETTER[joined].sum())
    out.unknown_letters = int((~_KNOWN[joined]).sum())
    out.nucleotide_letters = int(_NUCLEOTIDE[joined].sum())
    docs = {s: [] for s in SPLITS}
    digests = {s: [] for s in SPLITS}
    for s in seqs:
        ids = encode(s)
        n = ids.size - 2
        if n <= 0:
            out.empty += 1
            continue
        if n < opts.min_length:
            out.too_short += 1
            continue
        if opts.max_length and n > opts.max_length:
            out.too_long += 1
            continue
        split = split_of(s, opts.valid_frac, opts.test_frac)
        docs[split].append(ids)
        if opts.dedup:  # the key split_of hashes (upper-cased, white-space free): repeats share a split
            key = b"".join(s.upper().split())
            digests[split].append(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))
    for split in SPLITS:
        if docs[split]:
            toks = np.concatenate(docs[split])
            out.tokens[split] = toks
            out.lengths[split] = np.fromiter((d.size for d in docs[split]), dtype=np.int64, count=len(docs[split]))
            n_unk = int((toks == UNK).sum())
            out.unk_tokens += n_unk
            if n_unk:
                out.seqs_with_unk += sum(1 for d in docs[split] if (d == UNK).any())
            if opts.dedup:
                out.digests[split] = np.array(digests[split], dtype=np.uint64)
    return out


_WORKER_OPTS: Optional[PrepareOptions] = None


def _read_umask() -> int:
    """The process umask, read without changing it (os.umask would, briefly, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


_UMASK = _read_umask()


def _init_worker(opts: PrepareOptions, parent: int) -> None:
    global _WORKER_OPTS
    _WORKER_OPTS = opts
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle (it ends the pool)
    _die_with(parent)


def _die_with(parent: int) -> None:
    """End this worker when process `parent` dies: a killed prepare must not leave its workers blocked
    forever on their queue. Linux: the kernel sends SIGKILL (PR_SET_PDEATHSIG); elsewhere, and for a
    parent that died before that took effect, a check of the parent pid (at once, then every second)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc, arg = ctypes.CDLL(None, use_errno=True), ctypes.c_ulong  # prctl(int, unsigned long...)
            libc.prctl(1, arg(int(signal.SIGKILL)), arg(0), arg(0), arg(0))  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="speedrun-parent-watch", daemon=True).start()


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: taskset, cgroups cpusets, SLURM), not the machine's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _pool_task(task: tuple) -> _Chunk:
    return _encode_task(task, _WORKER_OPTS)


def _ordered_map(tasks: Iterable[tuple], opts: PrepareOptions, workers: int) -> Iterator[_Chunk]:
    """Results of `_encode_task` in input order, with at most 2*workers+2 blocks in flight.

    A bounded, order-preserving `imap` (`Pool.imap` would pull the whole input into its task queue) on a
    `ProcessPoolExecutor`: unlike `multiprocessing.Pool`, which silently replaces a worker that was
    killed (say by the out-of-memory killer) and then waits forever for its block, the executor reports a
    dead worker, and prepare stops with one line. `spawn` workers import only numpy and this package, and
    are safe in a process with threads.
    """
    if workers <= 1:
        for t in tasks:
            yield _encode_task(t, opts)
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(opts, os.getpid())) as pool:
        pending: deque = deque()
        try:
            for t in tasks:
                pending.append(pool.submit(_pool_task, t))
                if len(pending) >= 2 * workers + 2:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool:
            for f in pending:
                f.cancel()
            raise DataError(f"a prepare worker process died (killed, perhaps out of memory) - no complete dataset was "
                            f"written; rerun with fewer workers (--workers {max(1, workers // 2)})") from None


# ================================================ writing =============================================
class ShardWriter:
    """Streams one split's documents into shards of at most `shard_tokens` tokens (whole documents).

    Each shard goes to a `.{name}.*.tmp` file (header placeholder, then tokens as they come), gets its
    real header, is fsync'ed and only then renamed to `{name}_{split}_{index:06d}.bin` (a streaming
    writer: `fsutil.atomic_write` takes the whole file at once). A failed write (full disk, read-only)
    is a one-line `fsutil.WriteError` naming the shard.
    """

    def __init__(self, folder: Path, name: str, split: str, shard_tokens: int):
        self.folder, self.name, self.split, self.shard_tokens = folder, name, split, shard_tokens
        self.index, self.n, self._f, self._tmp = 0, 0, None, None
        self.files: list[Path] = []
        self.tokens = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents (`tokens` back to back, `lengths` tokens each) in order."""
        ends = np.cumsum(lengths)
        start_doc, start_tok = 0, 0
        while start_doc < lengths.size:
            room = self.shard_tokens - self.n
            # documents [start_doc, k) fit the room left in this shard
            k = int(np.searchsorted(ends, start_tok + room, side="right"))
            if k == start_doc:
                if self.n == 0:  # a document larger than a whole shard gets a shard of its own
                    k = start_doc + 1
                else:
                    self._close()
                    continue
            end_tok = int(ends[k - 1])
            self._write(tokens[start_tok:end_tok])
            start_doc, start_tok = k, end_tok
            if self.n >= self.shard_tokens:
                self._close()

    @contextlib.contextmanager
    def _disk(self):
        """OSError of a write -> one-line WriteError naming the shard."""
        try:
            yield
        except OSError as exc:
            raise write_error(self.folder / shard_name(self.name, self.split, self.index), exc, OUT_FIX) from exc

    def _write(self, toks: np.ndarray) -> None:
        if self.n + toks.size >= 2**31:
            raise DataError(f"{self.folder / shard_name(self.name, self.split, self.index)}: a shard cannot hold "
                            "2**31 tokens: lower --shard-tokens")
        with self._disk():
            if self._f is None:
                final = shard_name(self.name, self.split, self.index)
                fd, tmp = tempfile.mkstemp(prefix=f".{final}.", suffix=".tmp", dir=self.folder)
                self._f, self._tmp = os.fdopen(fd, "wb"), tmp
                self._f.write(b"\x00" * HEADER_BYTES)
            self._f.write(np.ascontiguousarray(toks, dtype=np.uint8).tobytes())
        self.n += toks.size
        self.tokens += toks.size

    def _close(self) -> None:
        if self._f is None:
            return
        final = self.folder / shard_name(self.name, self.split, self.index)
        with self._disk():
            self._f.seek(0)
            self._f.write(header_bytes(self.n))
            self._f.flush()
            os.fchmod(self._f.fileno(), 0o666 & ~_UMASK)  # mkstemp makes 0600; shards are meant to be shared
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self._tmp, final)
        self.files.append(final)
        self._f, self._tmp, self.n = None, None, 0
        self.index += 1

    def finish(self) -> list[Path]:
        self._close()
        return self.files

    def abort(self) -> None:
        if self._f is not None:
            with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                self._f.close()
            if self._tmp and os.path.exists(self._tmp):
                os.unlink(self._tmp)
            self._f = None


# ============================================== the driver ============================================
def _tasks(inputs: list[Path], kinds: list[str], opts: PrepareOptions) -> Iterator[tuple]:
    for i, (path, kind) in enumerate(zip(inputs, kinds)):
        if kind == "fasta":
            for block in _fasta_blocks(path, opts.block_bytes):
                yield ("fasta", block, i)
        elif kind in ("csv", "tsv"):
            for batch in _table_batches(path, kind, opts.column, opts.block_bytes):
                yield ("seqs", batch, i)
        else:
            for batch in _parquet_batches(path, opts.column, opts.block_bytes):
                yield ("seqs", batch, i)
        yield ("end", None, i)  # lets the driver check a file as soon as it is done


def _default_name(out: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9]+", "_", out.resolve().name).strip("_")
    return name or "dataset"


def _check_file(path: Path, c: dict, final: bool, column: Optional[str]) -> None:
    """Stop on a file whose content is not protein sequences (enough evidence, or at its end)."""
    letters = c["letters"]
    if final and c["records"] == 0:
        raise DataError(f"{path}: no sequences in the file")
    if final and letters == 0:
        raise DataError(f"{path}: {c['records']} records but no residues: the file holds no sequences"
                        + (f" in column '{column}'" if column else ""))
    if letters < (1 if final else 5000):  # mid-file: wait for enough evidence
        return
    if c["unknown"] > 0.5 * letters:
        where = f"column '{column}'" if column else "the sequences"
        raise DataError(f"{path}: {100 * c['unknown'] / letters:.0f}% of the letters in {where} are not amino-acid "
                        "letters: not protein sequences (wrong --column?), or lower case (pass --uppercase)")
    if c["nucleotide"] > 0.9 * letters and letters >= 1000:
        raise DataError(f"{path}: {100 * c['nucleotide'] / letters:.0f}% of the letters are A/C/G/T/U/N: "
                        "nucleotide sequences, not protein: translate them first")


def _check_options(inputs: list[Path], opts: PrepareOptions) -> None:
    if not inputs:
        raise DataError("prepare: no input files: pass FASTA / CSV / TSV / parquet files")
    if not (opts.valid_frac >= 0 and opts.test_frac >= 0 and opts.valid_frac + opts.test_frac < 1):
        raise DataError(f"--valid-frac {opts.valid_frac} + --test-frac {opts.test_frac} must be in [0, 1)")
    if opts.shard_tokens < 1 or opts.shard_tokens >= 2**31:
        raise DataError(f"--shard-tokens {opts.shard_tokens} must be in [1, 2**31)")


def _refuse_inputs_inside(inputs: list[Path], out: Path) -> None:
    """An input inside --out could be replaced or removed by this very run: refused, whatever the flags."""
    root = out.resolve()
    for p in inputs:
        if p.resolve().is_relative_to(root):
            raise FolderError(f"{p} is inside --out {out}: prepare writes there (and --overwrite removes what it "
                              "wrote): move the input out of that folder or choose another --out")


def prepare(inputs: list, out, opts: Optional[PrepareOptions] = None,
            log: Callable[[str], None] = print) -> dict:
    """Tokenize `inputs` into train/valid/test shards in `out`; return (and save as prepare.json) the counts.

    The run owns `out` (its lock) from the first check to the last file; see the module docstring for
    what it refuses to touch. On any failure `out` is as it was (a folder this run created is removed);
    with `overwrite` the earlier dataset is replaced only once the new one is complete.
    """
    t0 = time.time()
    opts = opts or PrepareOptions()
    inputs = [Path(p).expanduser() for p in inputs]
    out = Path(out).expanduser()
    _check_options(inputs, opts)
    kinds = [sniff(p) for p in inputs]  # every input is checked before any work starts
    _refuse_inputs_inside(inputs, out)
    if out.exists() and not out.is_dir():
        raise FolderError(f"{out}: exists and is not a folder: {OUT_FIX}")
    created = not out.exists()
    lock = FolderLock(out, "--out folder").acquire()
    try:
        manifest = claim_output(out, TOOL, opts.overwrite, remove=False)  # the old output goes once the new is done
        report = _build(inputs, kinds, out, manifest, opts, log, t0)
    except BaseException:
        if created:  # leave no empty folder behind (the lock file goes while still held)
            with contextlib.suppress(OSError):
                if all(p.name == LOCK_NAME for p in out.iterdir()):
                    (out / LOCK_NAME).unlink()
                    out.rmdir()
        raise
    finally:
        lock.release()
    log(format_report(report))
    for split in ("train", "valid"):
        if not report["sequences"][split]:
            log(f"warning: the {split} split is empty and a run needs it: add sequences"
                + (" or raise --valid-frac" if split == "valid" else ""))
    return report


def _stage(out: Path) -> Path:
    """A fresh staging folder beside `out`. Staging folders of earlier runs into `out` are leftovers of
    killed runs (this run holds `out`'s lock) and are removed."""
    out = out.resolve()  # `--out .` too: the staging folder goes beside the real folder, never inside it
    for p in out.parent.glob(f".{out.name}.partial-*"):
        shutil.rmtree(p, ignore_errors=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        staging.mkdir()
    except OSError as exc:
        raise write_error(staging, exc, OUT_FIX) from exc
    return staging


def _build(inputs: list[Path], kinds: list[str], out: Path, manifest: Manifest, opts: PrepareOptions,
           log: Callable[[str], None], t0: float) -> dict:
    """Encode everything into a staging folder, then publish it into `out`; the report."""
    name = opts.name or _default_name(out)
    workers = opts.workers or usable_cpus()
    staging = _stage(out)
    writers = {s: ShardWriter(staging, name, s, opts.shard_tokens) for s in SPLITS}
    done = False
    try:
        log(f"prepare: {len(inputs)} file(s) -> {out} ({workers} worker(s))")
        totals, per_file = _encode_all(inputs, kinds, opts, writers, workers)
        files = {s: writers[s].finish() for s in SPLITS}
        kept = {s: totals["kept_" + s] for s in SPLITS}
        report = {
            "out": str(out), "name": name, "inputs": [str(p) for p in inputs], "formats": kinds,
            "options": {k: v for k, v in asdict(opts).items()
                        if k not in ("workers", "overwrite", "block_bytes", "attribution")},
            "sequences_read": totals["records"],
            "sequences": kept, "tokens": {s: writers[s].tokens for s in SPLITS},
            "residues": sum(writers[s].tokens for s in SPLITS) - 2 * sum(kept.values()),
            "duplicates": totals["duplicates"], "empty": totals["empty"],
            "too_short": totals["too_short"], "too_long": totals["too_long"],
            "unk_letters": totals["unknown_letters"], "unk_tokens": totals["unk_tokens"],
            "sequences_with_unk": totals["seqs_with_unk"],
            "shards": {s: [p.name for p in files[s]] for s in SPLITS},
            "per_file": [{"file": str(p), "records": f["records"], "kept": f["kept"]}
                         for p, f in zip(inputs, per_file)],
            "workers": workers, "seconds": round(time.time() - t0, 2),
        }
        write_json(staging / "prepare.json", report, where=OUT_FIX)
        if opts.attribution:
            atomic_write(staging / "ATTRIBUTION.txt", opts.attribution.strip() + "\n", where=OUT_FIX)
        _publish(staging, out, manifest)
        done = True
    finally:
        if not done:
            for w in writers.values():
                w.abort()
            shutil.rmtree(staging, ignore_errors=True)
    return report


def _encode_all(inputs: list[Path], kinds: list[str], opts: PrepareOptions, writers: dict,
                workers: int) -> tuple[dict, list]:
    """Stream every input through the workers into `writers`; (totals, per-file counts)."""
    per_file = [dict(records=0, letters=0, unknown=0, nucleotide=0, kept=0) for _ in inputs]
    totals = dict(records=0, empty=0, too_short=0, too_long=0, duplicates=0, letters=0, unknown_letters=0,
                  unk_tokens=0, seqs_with_unk=0, **{"kept_" + s: 0 for s in SPLITS})
    seen: set = set()
    for chunk in _ordered_map(_tasks(inputs, kinds, opts), opts, workers):
        f = per_file[chunk.file]
        if chunk.end:  # the file is finished: check it as a whole
            _check_file(inputs[chunk.file], f, True, opts.column)
            continue
        f["records"] += chunk.records
        f["letters"] += chunk.letters
        f["unknown"] += chunk.unknown_letters
        f["nucleotide"] += chunk.nucleotide_letters
        _check_file(inputs[chunk.file], f, False, opts.column)
        for k in ("records", "empty", "too_short", "too_long", "letters", "unknown_letters", "unk_tokens",
                  "seqs_with_unk"):
            totals[k] += getattr(chunk, k)
        for split in SPLITS:
            if split not in chunk.tokens:
                continue
            toks, lengths = chunk.tokens[split], chunk.lengths[split]
            if opts.dedup:
                keep = np.fromiter(((d not in seen, seen.add(d))[0] for d in chunk.digests[split].tolist()),
                                   dtype=bool, count=lengths.size)
                totals["duplicates"] += int((~keep).sum())
                if not keep.all():
                    toks = toks[np.repeat(keep, lengths)]
                    lengths = lengths[keep]
            writers[split].add(toks, lengths)
            totals["kept_" + split] += int(lengths.size)
            f["kept"] += int(lengths.size)
    return totals, per_file


def _publish(staging: Path, out: Path, manifest: Manifest) -> None:
    """Move the finished files into `out`: the shards first, prepare.json (the mark of a complete dataset)
    last. The manifest lists them all before the first move, so that a later --overwrite also removes a
    set whose publishing was cut short."""
    names = sorted((p.name for p in staging.iterdir()), key=lambda n: (n == "prepare.json", n))
    manifest.remove_previous()  # --overwrite: the earlier dataset's files (only those) go now, not before
    manifest.record(names)
    for n in names:
        try:
            os.replace(staging / n, out / n)
        except OSError as exc:
            raise write_error(out / n, exc, OUT_FIX) from exc
    staging.rmdir()


def format_report(r: dict) -> str:
    s, t = r["sequences"], r["tokens"]
    lines = [
        f"read {r['sequences_read']:,} sequences from {len(r['inputs'])} file(s) in {r['seconds']:.1f} s "
        f"with {r['workers']} worker(s)",
        f"kept {sum(s.values()):,} sequences, {sum(t.values()):,} tokens ({r['residues']:,} residues): "
        + ", ".join(f"{k} {s[k]:,} seqs / {t[k]:,} tokens in {len(r['shards'][k])} shard(s)" for k in SPLITS),
        f"dropped: {r['duplicates']:,} duplicates, {r['empty']:,} empty, {r['too_short']:,} too short, "
        f"{r['too_long']:,} too long",
        f"letters mapped to <unk>: {r['unk_letters']:,} ({r['unk_tokens']:,} <unk> tokens in "
        f"{r['sequences_with_unk']:,} sequences)",
        f"shards: {r['out']}",
    ]
    return "\n".join(lines)


def run(argv: Optional[list] = None) -> int:
    """`python -m speedrun.data prepare ...`; a known failure raises (one line), `main` prints it."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m speedrun.data prepare",
        description="Tokenize FASTA (plain/.gz), CSV/TSV (a sequence column) or parquet into train/valid/test "
                    "shards, split by a hash of each sequence.")
    ap.add_argument("inputs", nargs="+", metavar="INPUT", help="sequence files")
    ap.add_argument("--out", required=True, help="output folder (created; must be new or empty, or hold an "
                    "earlier prepare's output with --overwrite)")
    d = PrepareOptions()
    ap.add_argument("--name", default=None, help="shard name prefix (default: the --out folder's name)")
    ap.add_argument("--valid-frac", type=float, default=d.valid_frac, help=f"default {d.valid_frac}")
    ap.add_argument("--test-frac", type=float, default=d.test_frac, help=f"default {d.test_frac}")
    ap.add_argument("--dedup", action="store_true", help="drop exact repeats of a sequence")
    ap.add_argument("--min-length", type=int, default=d.min_length, help="drop sequences with fewer residues")
    ap.add_argument("--max-length", type=int, default=d.max_length,
                    help="drop sequences with more residues (0 = keep all; training crops long ones)")
    ap.add_argument("--shard-tokens", type=int, default=d.shard_tokens, help="tokens per shard (default 1e8)")
    ap.add_argument("--workers", type=int, default=0,
                    help="worker processes (default: every CPU this process may use)")
    ap.add_argument("--column", default=None, help="CSV/TSV/parquet sequence column (default: 'sequence')")
    ap.add_argument("--uppercase", action="store_true", help="upper-case letters first (else lower case -> <unk>)")
    ap.add_argument("--strip-stop", action="store_true", help="drop trailing '*' (else it becomes <unk>)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace what an earlier prepare wrote into --out (never other files)")
    ap.add_argument("--attribution", default=None, help="text for ATTRIBUTION.txt beside the shards (e.g. the "
                    "data licence's required credit)")
    a = ap.parse_args(argv)
    opts = PrepareOptions(name=a.name, valid_frac=a.valid_frac, test_frac=a.test_frac, dedup=a.dedup,
                          min_length=a.min_length, max_length=a.max_length, shard_tokens=a.shard_tokens,
                          workers=a.workers, column=a.column, uppercase=a.uppercase, strip_stop=a.strip_stop,
                          overwrite=a.overwrite, attribution=a.attribution)

    def _terminate(signum, frame):  # SIGTERM (kill, SLURM) unwinds like Ctrl-C: the staging folder is removed
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        prepare(a.inputs, a.out, opts)
    except KeyboardInterrupt:
        print("interrupted: no new dataset was written", file=sys.stderr, flush=True)
        return 130
    return 0


def main(argv: Optional[list] = None) -> int:
    return cli_main(run, argv)
