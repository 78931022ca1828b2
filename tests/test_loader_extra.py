"""The loader beyond tests/test_data.py: the vectorised packer against a plain per-document one, the
(B, L) row stream of the Patch-UNet path, row-packed evaluation, and the prefetcher's failure handling."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from speedrun.data.loader import EvalSet, Prefetcher, RowStream, TrainStream
from speedrun.data.shards import DataError, doc_bounds, open_shard, require_shards, shard_name, write_shard
from speedrun.vocab import CLS, EOS, PAD, encode


def _corpus(tmp_path, n_docs=240, n_files=3, seed=0, hi=300):
    rng = np.random.default_rng(seed)
    docs = [encode("".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), rng.integers(1, hi)))) for _ in range(n_docs)]
    files = []
    for i in range(n_files):
        p = tmp_path / shard_name("c", "train", i)
        write_shard(p, np.concatenate(docs[i::n_files]))
        files.append(p)
    return files, docs


def _reference_batches(files, T, L, seed, rank, world, n):
    """The packing rule written the slow, obvious way: one document at a time."""
    epoch, shard_pos, doc_pos, out = 0, 0, 0, []
    shards = [(open_shard(f), *doc_bounds(open_shard(f))) for f in files]

    def current():
        nonlocal epoch, shard_pos, doc_pos
        while True:
            shard = int(np.random.default_rng([seed, epoch]).permutation(len(files))[shard_pos])
            tokens, starts, ends = shards[shard]
            order = np.random.default_rng([seed, epoch, shard, 1]).permutation(starts.size)[rank::world]
            if doc_pos < order.size:
                d = int(order[doc_pos])
                return shard, tokens, int(starts[d]), int(ends[d]), d
            doc_pos, shard_pos = 0, shard_pos + 1
            if shard_pos == len(files):
                shard_pos, epoch = 0, epoch + 1

    for _ in range(n):
        tokens_out, ids, pos, k = np.full(T, PAD, np.uint8), np.full(T, -1, np.int32), 0, 0
        while pos < T and k < max(8, T // 64):  # the per-batch document cap (loader.max_docs)
            shard, tokens, s, e, d = current()
            m = e - s
            if m > L:
                s += int(np.random.default_rng([seed, epoch, shard, d, 2]).integers(0, m - L + 1))
                m = L
            if pos + m > T:
                break
            tokens_out[pos:pos + m], ids[pos:pos + m] = tokens[s:s + m], k
            pos, k, doc_pos = pos + m, k + 1, doc_pos + 1
        out.append((tokens_out, ids, (epoch, shard_pos, doc_pos)))
    return out


@pytest.mark.parametrize("T,L,world", [(512, 100, 1), (300, 37, 2), (1024, 1024, 3)])
def test_vectorised_packing_equals_the_per_document_rule(tmp_path, T, L, world):
    files, _ = _corpus(tmp_path)
    for rank in range(world):
        st = TrainStream(files, T, L, seed=4, rank=rank, world_size=world)
        for tok, ids, cursor in _reference_batches(files, T, L, 4, rank, world, 120):  # several epochs
            a, b = st.next_batch()
            np.testing.assert_array_equal(a, tok)
            np.testing.assert_array_equal(b, ids)
            s = st.state_dict()
            assert (s["epoch"], s["shard_pos"], s["doc_pos"]) == cursor
        assert st.epoch >= 2


def _row_docs(tokens, ids):
    """Documents of a (B, L) batch in order, checking that none spans two rows."""
    docs = []
    for r in range(tokens.shape[0]):
        row_ids = ids[r]
        assert (tokens[r][row_ids < 0] == PAD).all()
        real = row_ids[row_ids >= 0]
        if real.size:  # documents fill the front of the row, in order, contiguously
            assert (row_ids[:real.size] >= 0).all()
            assert (np.diff(real) >= 0).all()
        for d in np.unique(real):
            docs.append((int(d), r, tokens[r][row_ids == d]))
    ids_seen = [d for d, _, _ in docs]
    assert ids_seen == list(range(len(docs)))  # ids unique in the batch: no document in two rows
    return [t for _, _, t in docs]


def test_row_stream_packs_rows_and_crops_long_documents(tmp_path):
    files, _ = _corpus(tmp_path, hi=400)
    st = RowStream(files, 8 * 128, 128, seed=0)
    for _ in range(30):
        tokens, ids = st.next_batch()
        assert tokens.shape == (8, 128) and ids.shape == (8, 128)
        assert tokens.dtype == np.uint8 and ids.dtype == np.int32
        for doc in _row_docs(tokens, ids):
            assert doc.size <= 128
            if doc.size < 128:
                assert doc[0] == CLS and doc[-1] == EOS  # uncropped documents are whole


def test_row_stream_visits_documents_in_the_cursor_order(tmp_path):
    """Same cursor as TrainStream: over one epoch the rows hold the same documents in the same order."""
    files, _ = _corpus(tmp_path)
    flat, rows = TrainStream(files, 512, 64, seed=2), RowStream(files, 4 * 64, 64, seed=2)
    seq_flat, seq_rows = [], []
    while flat.epoch == 0:
        t, d = flat.next_batch()
        seq_flat += [t[d == k].tobytes() for k in range(d.max() + 1)]
    while rows.epoch == 0:
        t, d = rows.next_batch()
        seq_rows += [x.tobytes() for x in _row_docs(t, d)]
    n = min(len(seq_flat), len(seq_rows)) - 10  # the last batch may already hold next-epoch documents
    assert n > 150 and seq_flat[:n] == seq_rows[:n]


def test_row_stream_resumes_exactly_and_ranks_are_disjoint(tmp_path):
    files, docs = _corpus(tmp_path, n_docs=90)
    a = RowStream(files, 4 * 64, 64, seed=3)
    for _ in range(7):
        a.next_batch()
    state = a.state_dict()
    rest = [a.next_batch() for _ in range(40)]  # crosses shard and epoch boundaries
    b = RowStream(files, 4 * 64, 64, seed=3)
    b.load_state_dict(state)
    for (t1, d1), (t2, d2) in zip(rest, (b.next_batch() for _ in range(40))):
        np.testing.assert_array_equal(t1, t2)
        np.testing.assert_array_equal(d1, d2)
    seen = []
    for rank in range(2):
        st, got = RowStream(files, 4 * 256, 256, seed=1, rank=rank, world_size=2), set()
        while True:
            t, d = st.next_batch()
            if st.epoch > 0:
                break
            got |= {x.tobytes() for x in _row_docs(t, d)}
        seen.append(got)
    assert not (seen[0] & seen[1]) and seen[0] and seen[1]


def test_row_eval_set_has_the_flat_sets_masks(tmp_path):
    files, _ = _corpus(tmp_path, n_docs=60, hi=200)
    flat = EvalSet.build(files, 1024, 64, seed=7)
    rows = EvalSet.build(files, 8 * 64, 64, seed=7, rows=True)
    assert flat.n_docs == rows.n_docs == 60 and flat.n_tokens == rows.n_tokens

    def masked(es):
        out = []
        for t, d, u in es.batches:
            t, d, u = t.reshape(-1), d.reshape(-1), u.reshape(-1)
            order = np.argsort(np.where(d >= 0, d, 1 << 30), kind="stable")  # pieces in order
            out += t[order][((u[order] < 0.15) & (t[order] >= 4))].tolist()
        return out

    assert masked(flat) == masked(rows)
    for t, d, u in rows.batches:
        assert t.shape == d.shape == u.shape == (8, 64)
        for r in range(8):
            real = d[r][d[r] >= 0]
            assert all(x not in d[:r] and x not in d[r + 1:] for x in np.unique(real))  # a piece stays in its row


def test_prefetcher_yields_the_streams_batches_and_cursors(tmp_path):
    files, _ = _corpus(tmp_path)
    ref = TrainStream(files, 512, 100, seed=1)
    pf = Prefetcher(TrainStream(files, 512, 100, seed=1), torch.device("cpu"), depth=3)
    try:
        for _ in range(20):
            t, d, state = pf.next()
            a, b = ref.next_batch()
            assert t.dtype == torch.uint8 and d.dtype == torch.int32
            np.testing.assert_array_equal(t.numpy(), a)
            np.testing.assert_array_equal(d.numpy(), b)
            assert state == ref.state_dict()
    finally:
        pf.close()
    rows = Prefetcher(RowStream(files, 4 * 64, 64, seed=1), torch.device("cpu"))
    try:
        t, d, _ = rows.next()
        assert tuple(t.shape) == (4, 64) and tuple(d.shape) == (4, 64)
    finally:
        rows.close()


def _expect_loader_error(pf, needle, timeout=10.0):
    t0 = time.time()
    with pytest.raises(DataError) as err:
        for _ in range(10_000):
            pf.next()
    assert time.time() - t0 < timeout  # an error, not a hang
    msg = str(err.value)
    assert needle in msg and "\n" not in msg
    return msg


def test_a_shard_truncated_after_the_folder_was_listed_is_one_error_naming_it(tmp_path):
    _corpus(tmp_path, n_docs=300)
    files = require_shards(tmp_path, "train")  # the trainer lists the folder ...
    victim = files[1]
    victim.write_bytes(victim.read_bytes()[:-100])  # ... and a shard is cut short before it is read
    pf = Prefetcher(TrainStream(files, 512, 100, seed=0), torch.device("cpu"), depth=2)
    try:
        msg = _expect_loader_error(pf, "header says")
        assert str(victim) in msg
    finally:
        pf.close()


def test_a_shard_truncated_while_mapped_is_one_error_naming_it(tmp_path):
    files, _ = _corpus(tmp_path, n_docs=300, n_files=1)
    st = TrainStream(files, 256, 64, seed=0)
    st.next_batch()  # the shard is now memory-mapped
    with open(files[0], "r+b") as f:
        f.truncate(2000)
    pf = Prefetcher(st, torch.device("cpu"), depth=1)
    try:
        msg = _expect_loader_error(pf, "changed size while being read")
        assert str(files[0]) in msg
    finally:
        pf.close()


def test_an_unexpected_loader_failure_names_the_shard(tmp_path, monkeypatch):
    files, _ = _corpus(tmp_path)
    st = TrainStream(files, 512, 100, seed=0)
    calls = {"n": 0}
    real = TrainStream.next_batch

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("cannot allocate\nbuffer")
        return real(self)

    monkeypatch.setattr(TrainStream, "next_batch", flaky)
    pf = Prefetcher(st, torch.device("cpu"), depth=1)
    try:
        pf.next()
        pf.next()
        msg = _expect_loader_error(pf, "MemoryError")
        assert "c_train_" in msg and ".bin" in msg
    finally:
        t0 = time.time()
        pf.close()
        assert time.time() - t0 < 2


def test_close_is_prompt_with_a_full_queue(tmp_path):
    files, _ = _corpus(tmp_path)
    pf = Prefetcher(TrainStream(files, 512, 100, seed=0), torch.device("cpu"), depth=1)
    pf.next()
    time.sleep(0.2)  # the thread is now blocked on a full queue
    t0 = time.time()
    pf.close()
    assert time.time() - t0 < 2 and not pf._thread.is_alive()


def test_whole_proteins_keep_long_documents_and_cut_only_past_the_bound(tmp_path):
    """data.crop=false: a document longer than data.max_length is kept whole (the window limits its
    attention), cut into pieces only past packing.segment_bound; data.crop=true crops it."""
    import numpy as np

    from speedrun.data.loader import TrainStream
    from speedrun.data.shards import write_shard
    from speedrun.packing import segment_bound

    lengths = [40, 300, 2100, 25]  # with max_length 256: bound 2048 whole
    docs = [np.concatenate([[0], np.full(n - 2, 5 + i % 10), [2]]).astype(np.uint8) for i, n in enumerate(lengths)]
    f = tmp_path / "d_train_000000.bin"
    write_shard(f, np.concatenate(docs))
    whole = TrainStream([f], 4096, 256, seed=0, crop=False)
    tokens, ids = whole.next_batch()
    counts = sorted(np.bincount(ids[ids >= 0]).tolist())
    assert segment_bound(4096, 256, False) == 2048
    assert counts == sorted([40, 300, 2048, 2100 - 2048, 25])  # every token, the long one in two pieces
    cropped = TrainStream([f], 4096, 256, seed=0, crop=True)
    _, ids = cropped.next_batch()
    assert max(np.bincount(ids[ids >= 0]).tolist()) == 256


def test_the_contiguous_stream_is_dec2024s_loader(tmp_path):
    """data.packing=stream: rank r reads [pos + r*T, pos + (r+1)*T), pos advances by W*T, a shard with
    fewer than W*T tokens left is left; documents are the runs between <cls> tokens; it resumes exactly."""
    import numpy as np

    from speedrun.data.loader import ContiguousStream
    from speedrun.data.shards import write_shard

    rng = np.random.default_rng(0)
    docs = [np.concatenate([[0], rng.integers(4, 24, n), [2]]) for n in rng.integers(40, 120, 200)]
    stream = np.concatenate(docs).astype(np.uint8)
    f = tmp_path / "s_train_000000.bin"
    write_shard(f, stream)
    T, W = 256, 2
    ranks = [ContiguousStream([f], T, 64, rank=r, world_size=W) for r in range(W)]
    for step in range(3):
        for r, s in enumerate(ranks):
            tokens, ids = s.next_batch()
            start = step * W * T + r * T
            assert np.array_equal(tokens, stream[start:start + T])
            starts = np.flatnonzero(tokens == 0)
            assert ids[0] == 0 and np.all(np.diff(ids) >= 0) and (ids >= 0).all()
            assert all(ids[i] != ids[i - 1] for i in starts if i > 0)
    saved = ranks[0].state_dict()
    want = ranks[0].next_batch()
    again = ContiguousStream([f], T, 64, rank=0, world_size=W)
    again.load_state_dict(saved)
    got = again.next_batch()
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    per_epoch = len(stream) // (W * T)
    for _ in range(per_epoch):
        again.next_batch()
    assert again.epoch == 1  # the remainder is skipped and the data repeats in the same order
