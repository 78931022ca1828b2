"""Packing documents into batches: resumable training streams, a fixed evaluation set, a prefetcher.

Training, one stream per rank. Each epoch visits the shards in a seeded random order; inside a shard,
the documents are put in a seeded random order and rank r takes every world-th of them, so ranks read
disjoint data and every epoch is reshuffled. A document longer than `max_length` is randomly cropped
to `max_length` tokens (offset seeded by seed, epoch, shard and document, so it is reproducible) —
or, with crop=False (data.crop=false, the reference's way), kept whole and only cut into pieces past
`packing.segment_bound` (8 x max_length), the sliding window then limiting its attention.

* `TrainStream` (UNet and transformer paths): documents back to back in a flat stream of exactly T
  tokens; a document that does not fit the space left starts the next batch (the rest is `<pad>`).
* `RowStream` (Patch-UNet path): B = T // max_length rows of L = max_length tokens; documents never
  span two rows — one that does not fit the rest of a row starts the next row (the rest is `<pad>`),
  and the batch ends after B rows.

Alongside the tokens comes `doc_ids` (int32, same shape): 0, 1, 2... per document of the batch, -1 on
padding — the attention mask is built from it.

The cursor (epoch, shard position, document position) is the whole state: `state_dict()` /
`load_state_dict()` make a resumed run see exactly the batches an uninterrupted run would. The state
also names the data it is a cursor into (shard count and `shards.fingerprint`: names and sizes), and
resuming onto other data — a dataset re-prepared or re-downloaded under the run — is refused.

Every shard's content is checked when it is opened (`shards.open_shard`: token ids in the vocabulary,
residues present), and an evaluation split without a document is refused (its loss would be NaN).

Speed: the loader must cost no GPU time, so a batch is built with a handful of numpy calls, not a
Python loop over documents: per shard the rank's document order, lengths and their cumulative sums
are computed once; a batch (or row) is then one `searchsorted` to find how many documents fit, and
one gather from the memory-mapped shard. Only documents that need cropping get a Python-level RNG.

Evaluation (`EvalSet`): the split's documents in file order, each longer than `max_length` split into
consecutive pieces, packed the same way (flat, or rows with `rows=True`); batch k belongs to rank
k mod world. Built once per run.

`Prefetcher` prepares batches in a background thread and, on CUDA, pins them and copies them to the
device on a side stream from that thread, so the training loop only waits on an event. A failure in
the thread surfaces as one `DataError` naming the shard being read, never a hang (a host
MemoryError also names what to lower: hardware.micro_batch_tokens or data.prefetch).
"""
from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..packing import max_docs, segment_bound
from ..vocab import CLS, PAD
from .shards import DataError, doc_bounds, empty_split_error, fingerprint, open_shard


class Shards:
    """Memory-mapped shards with their document boundaries, opened lazily and cached.

    Each access re-checks the file size (one `stat`): a shard truncated or rewritten under a running
    loader becomes a DataError naming it instead of a SIGBUS when the memory map is read past its end.
    """

    def __init__(self, files: list[Path]):
        self.files = [Path(f) for f in files]
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._sizes: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.files)

    def verify(self, i: int) -> None:
        """Raise a DataError if open shard i changed size since it was mapped."""
        if i not in self._sizes:
            return
        try:
            size = os.stat(self.files[i]).st_size
        except OSError as exc:
            raise DataError(f"{self.files[i]}: shard disappeared while being read ({exc.strerror}): "
                            "restore it and resume the run") from None
        if size != self._sizes[i]:
            raise DataError(f"{self.files[i]}: shard changed size while being read ({self._sizes[i]} -> {size} "
                            "bytes): it was truncated or rewritten; restore it and resume the run")

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if i in self._cache:
            self.verify(i)
            return self._cache[i]
        try:
            tokens = open_shard(self.files[i])
        except DataError:
            raise
        except Exception as exc:  # an unreadable file: name it
            raise DataError(f"{self.files[i]}: cannot read shard: {type(exc).__name__}: {exc}") from exc
        tokens = tokens.view(np.ndarray)  # plain ndarray view of the map: no memmap overhead per slice
        starts, ends = doc_bounds(tokens)
        if len(self._cache) >= 4:  # keep a few open; big corpora have hundreds of shards
            old = next(iter(self._cache))
            self._cache.pop(old)
            self._sizes.pop(old)
        self._cache[i] = (tokens, starts, ends)
        self._sizes[i] = os.stat(self.files[i]).st_size
        return self._cache[i]


@dataclass
class _View:
    """One shard as one rank sees it in one epoch: its documents in order, lengths cropped, summed."""
    key: tuple
    shard: int
    tokens: np.ndarray
    docs: np.ndarray  # document indices (into the shard's doc_bounds), in this rank's order
    starts: np.ndarray  # int64 start offset of each of those documents
    raw: np.ndarray  # int64 length before cropping
    cum: np.ndarray  # int64 cumulative cropped lengths, with a leading 0 (size n + 1)

    @property
    def n(self) -> int:
        return int(self.docs.size)


def _pieces(docs: np.ndarray, starts: np.ndarray, raw: np.ndarray, piece: int) -> tuple:
    """Documents longer than `piece` cut into consecutive pieces of at most `piece` tokens (each piece a
    document of the batch: the attention kernels bound a segment's length)."""
    counts = np.maximum(1, -(-raw // piece))
    if (counts == 1).all():
        return docs, starts, raw
    first = np.repeat(np.cumsum(counts) - counts, counts)
    k = np.arange(int(counts.sum()), dtype=np.int64) - first  # piece number within its document
    rep = np.repeat(np.arange(docs.size), counts)
    return docs[rep], starts[rep] + k * piece, np.minimum(raw[rep] - k * piece, piece)


class _DocCursor:
    """The shared cursor: which document comes next, for one rank, across shards and epochs."""

    def __init__(self, files: list[Path], tokens_per_batch: int, max_length: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, crop: bool = True):
        if max_length > tokens_per_batch:
            raise DataError(f"data.max_length={max_length} exceeds the micro-batch of {tokens_per_batch} tokens")
        if not files:
            raise DataError("no training shards given: check data.path")
        self.shards = Shards(files)
        self.fingerprint = fingerprint(self.shards.files)
        self.T, self.max_length, self.seed = tokens_per_batch, max_length, seed
        self.crop = crop
        # documents longer than `piece` are cropped to it at a seeded offset (crop) or cut into pieces of it
        self.piece = segment_bound(tokens_per_batch, max_length, crop)
        self.rank, self.world = rank, world_size
        self.max_docs = max_docs(tokens_per_batch)
        self._docs_left = self.max_docs
        self.epoch, self.shard_pos, self.doc_pos = 0, 0, 0
        self._perm_epoch: Optional[int] = None
        self._perm: Optional[np.ndarray] = None
        self._view: Optional[_View] = None

    # -- cursor ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "doc_pos": self.doc_pos,
                "seed": self.seed, "world_size": self.world, "n_files": len(self.shards),
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state`'s cursor; refused (one line) when it is a cursor into other data."""
        n_then, fp_then = state.get("n_files"), state.get("fingerprint")  # older checkpoints lack them
        changed = (n_then is not None and int(n_then) != len(self.shards)) or (fp_then is not None
                                                                            and fp_then != self.fingerprint)
        if changed:
            then = f"{n_then} shard(s)" if n_then is not None else "other shards"
            raise DataError(f"the training data changed since the checkpoint ({then}, fingerprint {fp_then}; now "
                            f"{len(self.shards)} in {self.shards.files[0].parent}, fingerprint {self.fingerprint}): "
                            "a resumed run must read the data it started with: restore that data (or point "
                            "data.path at it), or start a new run in a new run directory")
        self.epoch, self.shard_pos, self.doc_pos = int(state["epoch"]), int(state["shard_pos"]), int(state["doc_pos"])

    def current_file(self) -> Optional[Path]:
        """The shard under the cursor (for error messages)."""
        try:
            return self.shards.files[self._shard_index()]
        except Exception:
            return None

    # -- order ----------------------------------------------------------------------------------
    def _shard_index(self) -> int:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
            self._perm_epoch = self.epoch
        return int(self._perm[self.shard_pos])

    def _current_view(self) -> _View:
        """The view of the shard under the cursor, moving past exhausted shards (and epochs)."""
        empty_passes = 0
        while True:
            shard = self._shard_index()
            key = (self.epoch, shard)
            v = self._view
            if v is None or v.key != key:
                tokens, starts, ends = self.shards.get(shard)
                perm = np.random.default_rng([self.seed, self.epoch, shard, 1]).permutation(starts.size)
                docs = perm[self.rank::self.world]
                s = starts[docs]
                raw = ends[docs] - s
                if not self.crop:
                    docs, s, raw = _pieces(docs, s, raw, self.piece)
                cum = np.zeros(docs.size + 1, dtype=np.int64)
                np.cumsum(np.minimum(raw, self.piece), out=cum[1:])
                v = self._view = _View(key, shard, tokens, docs, s, raw, cum)
            if self.doc_pos < v.n:
                return v
            self.doc_pos = 0
            self.shard_pos += 1
            if self.shard_pos >= len(self.shards):
                self.shard_pos, self.epoch = 0, self.epoch + 1
                empty_passes += 1
                if empty_passes > 1:
                    raise DataError(f"rank {self.rank} gets no training documents from {len(self.shards)} shard(s) "
                                    f"({self.shards.files[0].parent}): use fewer ranks or more data")

    def _plan(self, room: int, base: int, plan: list) -> int:
        """Advance the cursor over the whole (cropped) documents that fit in `room` tokens, stopping at the
        first that does not; append (view, first doc, end doc, destination offset) pieces to `plan`.
        Returns the tokens planned."""
        used = 0
        while used < room and self._docs_left > 0:
            v = self._current_view()
            a = self.doc_pos
            # documents a..b-1 fit: cum[b] - cum[a] <= room - used (and the batch's document cap)
            b = int(np.searchsorted(v.cum, v.cum[a] + (room - used), side="right")) - 1
            b = min(b, a + self._docs_left)
            if b <= a:
                break
            self._docs_left -= b - a
            plan.append((v, a, b, base + used))
            used += int(v.cum[b] - v.cum[a])
            self.doc_pos = b
            if b < v.n:  # the next document of this shard does not fit
                break
        return used

    def _gather(self, plan: list, out: np.ndarray, ids: np.ndarray, contiguous: bool) -> None:
        """Copy the planned documents into the flat buffers `out` / `ids` (doc ids 0, 1, ... in order).

        Consecutive pieces from one shard are merged so that a batch costs a few numpy calls per shard,
        not per document or row; only documents longer than max_length get a (seeded) crop offset.
        """
        first_id, i = 0, 0
        for shard in {p[0].shard for p in plan}:
            self.shards.verify(shard)  # a shard truncated under us: a DataError, not a SIGBUS
        while i < len(plan):
            v, A, B, _ = plan[i]
            j = i + 1
            while j < len(plan) and plan[j][0] is v and plan[j][1] == plan[j - 1][2]:
                B = plan[j][2]
                j += 1
            src = v.starts[A:B].copy()
            raw = v.raw[A:B]
            lens = np.minimum(raw, self.piece)
            for k in np.flatnonzero(raw > self.piece).tolist():  # random crop of long documents (data.crop)
                d = int(v.docs[A + k])
                src[k] += int(np.random.default_rng([self.seed, v.key[0], v.shard, d, 2]).integers(
                    0, int(raw[k]) - self.piece + 1))
            rel = v.cum[A:B] - v.cum[A]  # offset of each document within the merged pieces
            total = int(v.cum[B] - v.cum[A])
            run = np.arange(total, dtype=np.int64)
            src_index = np.repeat(src - rel, lens)
            src_index += run
            doc_ids = np.repeat(np.arange(first_id, first_id + (B - A), dtype=np.int32), lens)
            if contiguous:  # one flat run of tokens
                pos = plan[i][3]
                np.take(v.tokens, src_index, out=out[pos:pos + total])
                ids[pos:pos + total] = doc_ids
            else:  # pieces land at their own offsets (rows)
                counts = np.array([plan[k][2] - plan[k][1] for k in range(i, j)], dtype=np.int64)
                shift = np.array([plan[k][3] - (v.cum[plan[k][1]] - v.cum[A]) for k in range(i, j)], dtype=np.int64)
                dst = np.repeat(np.repeat(shift, counts), lens)
                dst += run
                out[dst] = v.tokens[src_index]
                ids[dst] = doc_ids
            first_id += B - A
            i = j


class TrainStream(_DocCursor):
    """Infinite, deterministic, resumable stream of flat packed training batches for one rank."""

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (T,) uint8, doc_ids (T,) int32 with -1 on padding)."""
        tokens = np.full(self.T, PAD, dtype=np.uint8)
        doc_ids = np.full(self.T, -1, dtype=np.int32)
        plan: list = []
        self._docs_left = self.max_docs
        self._plan(self.T, 0, plan)
        self._gather(plan, tokens, doc_ids, contiguous=True)
        return tokens, doc_ids

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while True:
            yield self.next_batch()


class ContiguousStream:
    """Dec-2024's packing (data.packing=stream): no alignment to documents. Rank r of W takes the T
    tokens [pos + r·T, pos + (r+1)·T) of the shard, pos advances by W·T, and the next shard starts when
    fewer than W·T tokens are left (the rest is skipped); shards in file order, every epoch the same
    (RECIPE.md §2, `DistributedDataLoader`). Documents are the runs between `<cls>` tokens, so a batch
    starts and ends mid-document; no padding. Same interface and resumable cursor as TrainStream."""

    def __init__(self, files: list[Path], tokens_per_batch: int, max_length: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if not files:
            raise DataError("no training shards given: check data.path")
        self.shards = Shards(files)
        self.fingerprint = fingerprint(self.shards.files)
        self.T, self.max_length, self.seed, self.rank, self.world = tokens_per_batch, max_length, seed, rank, world_size
        self.max_docs, self.piece = max_docs(tokens_per_batch), tokens_per_batch
        self.epoch, self.shard_pos, self.pos = 0, 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "pos": self.pos, "world_size": self.world,
                "n_files": len(self.shards), "fingerprint": self.fingerprint, "packing": "stream"}

    def load_state_dict(self, state: dict) -> None:
        if state.get("packing") != "stream" or state.get("fingerprint") != self.fingerprint:
            raise DataError("the checkpoint's data cursor is not a data.packing=stream cursor over these shards: "
                            "resume with the data and data.packing the run started with")
        self.epoch, self.shard_pos, self.pos = int(state["epoch"]), int(state["shard_pos"]), int(state["pos"])

    def current_file(self) -> Optional[Path]:
        return self.shards.files[self.shard_pos] if self.shard_pos < len(self.shards) else None

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (T,) uint8, doc_ids (T,) int32: 0 for the tokens before the first <cls>, then one id
        per <cls>)."""
        span = self.world * self.T
        for _ in range(2 * len(self.shards) + 1):
            tokens = self.shards.get(self.shard_pos)[0]
            if self.pos + span <= tokens.size:
                break
            self.pos, self.shard_pos = 0, self.shard_pos + 1
            if self.shard_pos >= len(self.shards):
                self.shard_pos, self.epoch = 0, self.epoch + 1
        else:
            raise DataError(f"data.packing=stream needs shards of at least {span:,} tokens ({self.world} rank(s) x "
                            f"{self.T:,}): use fewer ranks, a smaller micro-batch or data.packing=documents")
        start = self.pos + self.rank * self.T
        chunk = np.array(tokens[start:start + self.T], dtype=np.uint8)
        self.pos += span
        starts = chunk == CLS
        ids = np.cumsum(starts, dtype=np.int32) - (1 if starts[0] else 0)
        if int(ids[-1]) + 1 > self.max_docs:
            raise DataError(f"data.packing=stream: a batch of {self.shards.files[self.shard_pos].name} holds "
                            f"{int(ids[-1]) + 1} documents, more than the attention kernels' {self.max_docs}: use "
                            "data.packing=documents (or a larger micro-batch)")
        return chunk, ids.astype(np.int32)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while True:
            yield self.next_batch()


class RowStream(_DocCursor):
    """Infinite, deterministic, resumable stream of (B, L) row batches for one rank (Patch-UNet path).

    B = tokens_per_batch // max_length rows of L = max_length tokens. A row takes documents until the
    next one does not fit (no document spans two rows; long ones are cropped to L), then the next row
    starts; the batch ends after B rows. Same cursor and state as `TrainStream`.
    """

    def __init__(self, files: list[Path], tokens_per_batch: int, max_length: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        super().__init__(files, tokens_per_batch, max_length, seed, rank, world_size)
        self.B, self.L = tokens_per_batch // max_length, max_length

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (B, L) uint8, doc_ids (B, L) int32 with -1 on padding; ids unique within the batch)."""
        tokens = np.full((self.B, self.L), PAD, dtype=np.uint8)
        doc_ids = np.full((self.B, self.L), -1, dtype=np.int32)
        plan: list = []
        self._docs_left = self.max_docs
        for r in range(self.B):
            self._plan(self.L, r * self.L, plan)
        self._gather(plan, tokens.reshape(-1), doc_ids.reshape(-1), contiguous=False)
        return tokens, doc_ids

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while True:
            yield self.next_batch()


class _FlatPacker:
    """Fills one T-token buffer document by document (evaluation)."""

    def __init__(self, T: int):
        self.T = T
        self.tokens = np.full(T, PAD, dtype=np.uint8)
        self.doc_ids = np.full(T, -1, dtype=np.int32)
        self.u = np.zeros(T, dtype=np.float32)
        self.pos = 0
        self.n_docs = 0
        self.max_docs = max_docs(T)

    def place(self, n: int) -> Optional[slice]:
        """Where a piece of n tokens goes, or None if it does not fit (the batch is then complete)."""
        if self.pos + n > self.T or self.n_docs >= self.max_docs:
            return None
        s = slice(self.pos, self.pos + n)
        self.pos += n
        return s

    @property
    def empty(self) -> bool:
        return self.pos == 0

    def batch(self):
        return self.tokens, self.doc_ids, self.u


class _RowPacker(_FlatPacker):
    """Fills B rows of L tokens; a piece that does not fit the rest of a row starts the next row."""

    def __init__(self, T: int, L: int):
        super().__init__((T // L) * L)
        self.L = L
        self.row_end = L

    def place(self, n: int) -> Optional[slice]:
        if self.n_docs >= self.max_docs:
            return None
        if self.pos + n > self.row_end:
            self.pos, self.row_end = self.row_end, self.row_end + self.L
        if self.pos + n > self.row_end or self.row_end > self.T:
            return None
        s = slice(self.pos, self.pos + n)
        self.pos += n
        return s

    def batch(self):
        shape = (self.T // self.L, self.L)
        return self.tokens.reshape(shape), self.doc_ids.reshape(shape), self.u.reshape(shape)


@dataclass
class EvalSet:
    """A fixed, packed evaluation split.

    `batches` are (tokens uint8, doc_ids int32, u float32) triples — flat (T,), or (B, L) rows with
    `rows=True`: `u` holds one uniform number per token, drawn per *document piece* from a generator
    seeded by (seed, document number, piece), so the masks (`u < rate` on maskable tokens) do not depend
    on the batch size, the layout or the number of ranks, and the masks at a lower rate are a subset of
    those at a higher one.
    """
    batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    n_docs: int
    n_tokens: int

    @classmethod
    def build(cls, files: list[Path], tokens_per_batch: int, max_length: int, max_tokens: int = 0,
              seed: int = 0, rows: bool = False) -> "EvalSet":
        def packer():
            return _RowPacker(tokens_per_batch, max_length) if rows else _FlatPacker(tokens_per_batch)

        batches, pk, n_docs, n_tokens = [], packer(), 0, 0
        for f in files:
            tokens = open_shard(f)
            starts, ends = doc_bounds(tokens)
            for s, e in zip(starts.tolist(), ends.tolist()):
                for j, ps in enumerate(range(s, e, max_length)):
                    piece = tokens[ps:min(e, ps + max_length)]
                    where = pk.place(piece.size)
                    if where is None:
                        batches.append(pk.batch())
                        pk = packer()
                        where = pk.place(piece.size)
                    pk.tokens[where] = piece
                    pk.doc_ids[where] = pk.n_docs
                    pk.u[where] = np.random.default_rng([seed, n_docs, j]).random(piece.size, dtype=np.float32)
                    pk.n_docs += 1
                n_docs += 1
                n_tokens += e - s
                if max_tokens and n_tokens >= max_tokens:
                    break
            if max_tokens and n_tokens >= max_tokens:
                break
        if not pk.empty:
            batches.append(pk.batch())
        if n_docs == 0:
            raise empty_split_error(files)
        return cls(batches, n_docs, n_tokens)

    def for_rank(self, rank: int, world: int) -> list[tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        return [(k, b) for k, b in enumerate(self.batches) if k % world == rank]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class Prefetcher:
    """Runs a stream (TrainStream or RowStream) in a background thread; hands out device tensors plus the
    cursor after them.

    On CUDA the thread also pins each batch and starts its copy to the device on a side stream, and the
    consumer's stream waits on that copy's event: neither building nor copying a batch blocks the
    training loop. `depth` batches are prepared ahead.
    """

    _POLL = 0.1

    def __init__(self, stream, device: torch.device, depth: int = 2):
        self.stream, self.device = stream, torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:  # 'cuda' means the current device of the caller
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.depth = max(1, depth)
        self.q: queue.Queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._thread = threading.Thread(target=self._work, name="speedrun-loader", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self.q.put(item, timeout=self._POLL)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            if self.cuda:
                torch.cuda.set_device(self.device)
            while not self._stop.is_set():
                tokens, doc_ids = self.stream.next_batch()
                t, d = torch.from_numpy(tokens), torch.from_numpy(doc_ids)
                ev = None
                if self.cuda:
                    t, d = t.pin_memory(), d.pin_memory()
                    with torch.cuda.stream(self._copy_stream):
                        t = t.to(self.device, non_blocking=True)
                        d = d.to(self.device, non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record(self._copy_stream)
                if not self._put((t, d, self.stream.state_dict(), ev)):
                    return
        except BaseException as exc:  # surfaced by next(), naming the shard
            if not isinstance(exc, DataError):
                where = getattr(self.stream, "current_file", lambda: None)()
                hint = ""
                if isinstance(exc, MemoryError):  # host RAM: what the loader holds scales with these two
                    hint = (f"; the host ran out of memory: lower hardware.micro_batch_tokens (now "
                            f"{getattr(self.stream, 'T', '?')}) or data.prefetch (now {self.depth})")
                exc = DataError(_one_line(f"{where or 'data loader'}: loader failed while reading it: "
                                          f"{type(exc).__name__}: {exc}{hint}"))
            self._put(exc)

    def next(self):
        """(tokens uint8, doc_ids int32, cursor after this batch) on the device."""
        while True:
            try:
                item = self.q.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise DataError("the data loader thread stopped without an error (closed?): "
                                    "restart the run") from None
        if isinstance(item, BaseException):
            raise DataError(_one_line(str(item))) from item
        t, d, state, ev = item
        if ev is not None:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(ev)
            t.record_stream(cur)  # the caching allocator must not hand this memory back to the copy stream early
            d.record_stream(cur)
        return t, d, state

    def close(self) -> None:
        self._stop.set()
        try:
            while True:
                self.q.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5)
