"""Packing documents into batches: a resumable training stream, a fixed evaluation set, a prefetcher.

Training (`TrainStream`, one per rank). Each epoch visits the shards in a seeded random order; inside a
shard, the documents are put in a seeded random order and rank r takes every world-th of them, so ranks
read disjoint data. Documents are packed back to back into a flat stream of exactly T tokens; a
document that does not fit the space left starts the next batch (the rest is `<pad>`); a document
longer than `max_length` is randomly cropped to `max_length` tokens (offset seeded by its position).
Alongside the tokens comes `doc_ids` (T,) int32: 0, 1, 2... per document, -1 on padding — the
attention mask is built from it.

The cursor (epoch, shard position, document position) is the whole state: `state_dict()` /
`load_state_dict()` make a resumed run see exactly the batches an uninterrupted run would.

Evaluation (`EvalSet`): the split's documents in file order, each longer than `max_length` split into
consecutive pieces, packed the same way; batch k belongs to rank k mod world. Built once per run.

`Prefetcher` prepares batches in a background thread (pinned memory on CUDA) and copies the next batch
to the device on a side stream while the current one computes. A failure in the thread surfaces as
one `DataError` naming the shard, never a hang.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..vocab import PAD
from .shards import DataError, doc_bounds, open_shard


class Shards:
    """Memory-mapped shards with their document boundaries, opened lazily and cached."""

    def __init__(self, files: list[Path]):
        self.files = [Path(f) for f in files]
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.files)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if i not in self._cache:
            tokens = open_shard(self.files[i])
            starts, ends = doc_bounds(tokens)
            if len(self._cache) >= 4:  # keep a few open; big corpora have hundreds of shards
                self._cache.pop(next(iter(self._cache)))
            self._cache[i] = (tokens, starts, ends)
        return self._cache[i]


class _Packer:
    """Fills a T-token buffer document by document."""

    def __init__(self, T: int):
        self.T = T
        self.tokens = np.full(T, PAD, dtype=np.uint8)
        self.doc_ids = np.full(T, -1, dtype=np.int32)
        self.pos = 0
        self.n_docs = 0

    def fits(self, n: int) -> bool:
        return self.pos + n <= self.T

    def add(self, doc: np.ndarray) -> None:
        n = doc.size
        self.tokens[self.pos:self.pos + n] = doc
        self.doc_ids[self.pos:self.pos + n] = self.n_docs
        self.pos += n
        self.n_docs += 1


class TrainStream:
    """Infinite, deterministic, resumable stream of packed training batches for one rank."""

    def __init__(self, files: list[Path], tokens_per_batch: int, max_length: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if max_length > tokens_per_batch:
            raise DataError(f"data.max_length={max_length} exceeds the micro-batch of {tokens_per_batch} tokens")
        self.shards = Shards(files)
        self.T, self.max_length, self.seed = tokens_per_batch, max_length, seed
        self.rank, self.world = rank, world_size
        self.epoch, self.shard_pos, self.doc_pos = 0, 0, 0
        self._order_key: Optional[tuple] = None
        self._order: Optional[np.ndarray] = None

    # -- cursor ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "doc_pos": self.doc_pos,
                "seed": self.seed, "world_size": self.world, "n_files": len(self.shards)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.shard_pos, self.doc_pos = int(state["epoch"]), int(state["shard_pos"]), int(state["doc_pos"])

    # -- order ----------------------------------------------------------------------------------
    def _shard_index(self) -> int:
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        return int(perm[self.shard_pos])

    def _doc_order(self, shard: int, n_docs: int) -> np.ndarray:
        key = (self.epoch, shard)
        if key != self._order_key:
            perm = np.random.default_rng([self.seed, self.epoch, shard, 1]).permutation(n_docs)
            self._order, self._order_key = perm[self.rank::self.world], key
        return self._order

    def _current(self):
        """(shard index, tokens, start, end, doc index) of the document under the cursor."""
        empty_passes = 0
        while True:
            shard = self._shard_index()
            try:
                tokens, starts, ends = self.shards.get(shard)
            except DataError:
                raise
            except Exception as exc:  # an unreadable file: name it
                raise DataError(f"{self.shards.files[shard]}: cannot read shard: {exc}") from exc
            order = self._doc_order(shard, starts.size)
            if self.doc_pos < order.size:
                d = int(order[self.doc_pos])
                return shard, tokens, int(starts[d]), int(ends[d]), d
            self.doc_pos = 0
            self.shard_pos += 1
            if self.shard_pos >= len(self.shards):
                self.shard_pos, self.epoch = 0, self.epoch + 1
                empty_passes += 1
                if empty_passes > 1:
                    raise DataError(f"rank {self.rank} gets no training documents from {len(self.shards)} shard(s) "
                                    f"({self.shards.files[0].parent}): use fewer ranks or more data")

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        pk = _Packer(self.T)
        while True:
            shard, tokens, s, e, d = self._current()
            n = e - s
            if n > self.max_length:
                off = int(np.random.default_rng([self.seed, self.epoch, shard, d, 2]).integers(0, n - self.max_length + 1))
                s, n = s + off, self.max_length
            if not pk.fits(n):
                break
            pk.add(tokens[s:s + n])
            self.doc_pos += 1
            if pk.pos == pk.T:
                break
        return pk.tokens, pk.doc_ids

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while True:
            yield self.next_batch()


@dataclass
class EvalSet:
    """A fixed, packed evaluation split.

    `batches` are (tokens uint8, doc_ids int32, u float32) triples: `u` holds one uniform number per
    token, drawn per *document* from a generator seeded by (seed, document number, piece), so the masks
    (`u < rate` on maskable tokens) do not depend on the batch size or the number of ranks, and the
    masks at a lower rate are a subset of those at a higher one.
    """
    batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    n_docs: int
    n_tokens: int

    @classmethod
    def build(cls, files: list[Path], tokens_per_batch: int, max_length: int, max_tokens: int = 0,
              seed: int = 0) -> "EvalSet":
        batches, pk, n_docs, n_tokens = [], _Packer(tokens_per_batch), 0, 0
        u = np.zeros(tokens_per_batch, dtype=np.float32)
        for f in files:
            tokens = open_shard(f)
            starts, ends = doc_bounds(tokens)
            for s, e in zip(starts.tolist(), ends.tolist()):
                for j, ps in enumerate(range(s, e, max_length)):
                    piece = tokens[ps:min(e, ps + max_length)]
                    if not pk.fits(piece.size):
                        batches.append((pk.tokens, pk.doc_ids, u))
                        pk, u = _Packer(tokens_per_batch), np.zeros(tokens_per_batch, dtype=np.float32)
                    u[pk.pos:pk.pos + piece.size] = np.random.default_rng([seed, n_docs, j]).random(
                        piece.size, dtype=np.float32)
                    pk.add(piece)
                n_docs += 1
                n_tokens += e - s
                if max_tokens and n_tokens >= max_tokens:
                    break
            if max_tokens and n_tokens >= max_tokens:
                break
        if pk.pos:
            batches.append((pk.tokens, pk.doc_ids, u))
        return cls(batches, n_docs, n_tokens)

    def for_rank(self, rank: int, world: int) -> list[tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        return [(k, b) for k, b in enumerate(self.batches) if k % world == rank]


class Prefetcher:
    """Runs a TrainStream in a background thread; hands out device tensors plus the cursor after them."""

    _DONE = object()

    def __init__(self, stream: TrainStream, device: torch.device, depth: int = 2):
        self.stream, self.device = stream, device
        self.pin = device.type == "cuda"
        self.q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._copy_stream = torch.cuda.Stream(device) if self.pin else None
        self._ready = None
        self._thread = threading.Thread(target=self._work, name="speedrun-loader", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                tokens, doc_ids = self.stream.next_batch()
                t, d = torch.from_numpy(tokens), torch.from_numpy(doc_ids)
                if self.pin:
                    t, d = t.pin_memory(), d.pin_memory()
                item = (t, d, self.stream.state_dict())
                while not self._stop.is_set():
                    try:
                        self.q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # surfaced by next()
            self.q.put(exc)

    def _fetch_host(self):
        while True:
            try:
                item = self.q.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise DataError("the data loader thread died without an error: restart the run") from None
                continue
            if isinstance(item, BaseException):
                if isinstance(item, DataError):
                    raise DataError(str(item)) from item
                raise DataError(f"data loader failed: {type(item).__name__}: {item}") from item
            return item

    def _to_device(self, item):
        t, d, state = item
        if self._copy_stream is None:
            return t.to(self.device), d.to(self.device), state, None
        with torch.cuda.stream(self._copy_stream):
            t, d = t.to(self.device, non_blocking=True), d.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self._copy_stream)
        return t, d, state, ev

    def next(self):
        """(tokens (T,) uint8, doc_ids (T,) int32, cursor after this batch) on the device."""
        if self._ready is None:
            self._ready = self._to_device(self._fetch_host())
        t, d, state, ev = self._ready
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
            t.record_stream(torch.cuda.current_stream(self.device))
            d.record_stream(torch.cuda.current_stream(self.device))
        self._ready = self._to_device(self._fetch_host()) if self._copy_stream is not None else None
        return t, d, state

    def close(self) -> None:
        self._stop.set()
        try:
            while True:
                self.q.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5)
