"""Shards, the tokenizer, the embedded sample, and the training/eval packers."""
from __future__ import annotations

import numpy as np
import pytest

from speedrun.data import sample_dir, split_of
from speedrun.data.loader import EvalSet, TrainStream
from speedrun.data.shards import (HEADER_BYTES, MAGIC, DataError, doc_bounds, find_shards, open_shard, read_header,
                                  require_shards, shard_name, write_shard)
from speedrun.vocab import CLS, EOS, PAD, UNK, decode, encode, encode_residues


def test_vocab_ids_match_esm():
    assert list(encode("LAGV")) == [CLS, 4, 5, 6, 7, EOS]
    assert list(encode_residues("XBUZO.-")) == [24, 25, 26, 27, 28, 29, 30]
    assert decode(encode("MKTAYIAK")) == "MKTAYIAK"


def test_encoder_handles_odd_letters_like_the_esm_tokenizer():
    assert list(encode_residues("M K\nT\t")) == list(encode_residues("MKT"))  # white space dropped
    assert list(encode_residues("MKab*")) == [20, 15, UNK]  # a run of unknown letters is one <unk>
    assert list(encode_residues("Mk Tq")) == [20, UNK, 11, UNK]  # white space ends a run
    assert list(encode("MKT*", max_length=4)) == [CLS, 20, 15, EOS]  # truncation keeps <eos>


def test_shard_roundtrip_and_header(tmp_path):
    toks = np.concatenate([encode("MKV"), encode("AAAAG")])
    p = tmp_path / shard_name("demo", "train", 0)
    assert write_shard(p, toks) == toks.size
    raw = np.fromfile(p, dtype="<i4", count=256)
    assert (raw[0], raw[1], raw[2]) == (MAGIC, 1, toks.size) and not raw[3:].any()
    assert p.stat().st_size == HEADER_BYTES + toks.size
    np.testing.assert_array_equal(open_shard(p), toks)
    s, e = doc_bounds(open_shard(p))
    assert list(zip(s, e)) == [(0, 5), (5, 12)]
    assert find_shards(tmp_path, "train") == [p] and find_shards(tmp_path, "valid") == []


@pytest.mark.parametrize("damage,needle", [
    (lambda b: b[:100], "shorter than the 1024-byte"),
    (lambda b: b"\x00\x00\x00\x00" + b[4:], "wrong magic number"),
    (lambda b: b[:4] + (2).to_bytes(4, "little") + b[8:], "unsupported shard version"),
    (lambda b: b[:-3], "header says"),
])
def test_corrupt_shards_fail_with_one_line_naming_the_file(tmp_path, damage, needle):
    p = tmp_path / shard_name("x", "train", 0)
    write_shard(p, encode("MKVLAAG" * 10))
    p.write_bytes(damage(p.read_bytes()))
    with pytest.raises(DataError) as err:
        read_header(p)
    msg = str(err.value)
    assert needle in msg and str(p) in msg and "\n" not in msg


def test_missing_data_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="does not exist: pass data.path"):
        require_shards(tmp_path / "nope", "train")
    with pytest.raises(DataError, match="no \\*_valid_NNNNNN.bin shards"):
        require_shards(tmp_path, "valid")


def test_split_is_a_hash_of_the_sequence():
    assert split_of("MKV", 0.5, 0.2) == split_of("mkv", 0.5, 0.2) == split_of("M K V", 0.5, 0.2)
    splits = [split_of(f"MK{i}AAV", 0.1, 0.1) for i in range(4000)]
    frac = {s: splits.count(s) / len(splits) for s in ("train", "valid", "test")}
    assert abs(frac["valid"] - 0.1) < 0.02 and abs(frac["test"] - 0.1) < 0.02


def test_embedded_sample_is_real_swissprot_and_split():
    d = sample_dir()
    counts = {}
    for split in ("train", "valid", "test"):
        (f,) = find_shards(d, split)
        toks = open_shard(f)
        s, e = doc_bounds(toks)
        counts[split] = s.size
        assert toks[0] == CLS and toks[-1] == EOS
    assert sum(counts.values()) == 18505
    assert 400 < counts["valid"] < 700 and counts["train"] > 17000
    assert (d / "ATTRIBUTION.txt").read_text().startswith("UniProtKB/Swiss-Prot release 2014_01")
    assert sample_dir() == d  # second call reuses the shards


def _corpus(tmp_path, n_docs=200, seed=0):
    rng = np.random.default_rng(seed)
    docs = [encode("".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), rng.integers(5, 120)))) for _ in range(n_docs)]
    files = []
    for i in range(3):
        p = tmp_path / shard_name("c", "train", i)
        write_shard(p, np.concatenate(docs[i::3]))
        files.append(p)
    return files, docs


def test_train_stream_packs_whole_documents(tmp_path):
    files, docs = _corpus(tmp_path)
    st = TrainStream(files, 512, 100, seed=0)
    tokens, doc_ids = st.next_batch()
    assert tokens.size == 512 and doc_ids.size == 512
    n = doc_ids.max() + 1
    for d in range(n):
        seg = tokens[doc_ids == d]
        assert seg.size <= 100
        if seg.size < 100:  # uncropped documents are whole: <cls> ... <eos>
            assert seg[0] == CLS and seg[-1] == EOS
    assert (tokens[doc_ids < 0] == PAD).all()
    assert (doc_ids[doc_ids >= 0] == np.sort(doc_ids[doc_ids >= 0])).all()


def test_train_stream_is_deterministic_and_resumable(tmp_path):
    files, _ = _corpus(tmp_path)
    a = TrainStream(files, 256, 64, seed=3)
    first = [a.next_batch() for _ in range(5)]
    state = a.state_dict()
    rest = [a.next_batch() for _ in range(40)]  # crosses shard and epoch boundaries
    b = TrainStream(files, 256, 64, seed=3)
    b.load_state_dict(state)
    for (t1, d1), (t2, d2) in zip(rest, (b.next_batch() for _ in range(40))):
        np.testing.assert_array_equal(t1, t2)
        np.testing.assert_array_equal(d1, d2)
    c = TrainStream(files, 256, 64, seed=3)
    np.testing.assert_array_equal(c.next_batch()[0], first[0][0])
    assert a.epoch >= 1


def test_epochs_reshuffle(tmp_path):
    files, _ = _corpus(tmp_path, n_docs=30)
    st = TrainStream(files, 4096, 200, seed=0)
    e0 = st.next_batch()[0]
    while st.epoch == 0:
        st.next_batch()
    e1 = st.next_batch()[0]
    assert not np.array_equal(e0, e1)


def test_ranks_read_disjoint_documents(tmp_path):
    files, docs = _corpus(tmp_path, n_docs=90)
    seen = []
    for rank in range(3):
        st = TrainStream(files, 512, 200, seed=1, rank=rank, world_size=3)
        got = set()
        while True:
            toks, ids = st.next_batch()
            if st.epoch > 0:  # this batch may already hold next-epoch documents
                break
            got |= {toks[ids == d].tobytes() for d in range(ids.max() + 1)}
        seen.append(got)
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    everything = {d.tobytes() for d in docs}
    union = seen[0] | seen[1] | seen[2]
    assert union <= everything and len(union) > 0.8 * len(everything)


def test_eval_set_is_fixed_and_batch_size_independent(tmp_path):
    files, docs = _corpus(tmp_path, n_docs=60)
    a = EvalSet.build(files, 1024, 50, seed=7)
    b = EvalSet.build(files, 2048, 50, seed=7)
    assert a.n_docs == b.n_docs == 60
    def masked(es):
        out = []
        for t, d, u in es.batches:
            sel = (u < 0.15) & (t >= 4)
            out.extend(t[sel].tolist())
        return out
    assert masked(a) == masked(b)  # same masks whatever the batch size
    assert all(((d >= 0).sum() > 0) for _, d, _ in a.batches)
    for t, d, _ in a.batches:
        assert np.bincount(d[d >= 0]).max() <= 50  # long documents split into pieces


def test_batches_never_exceed_the_document_cap(tmp_path):
    """The varlen attention kernel takes a fixed number of segments: the packers close a batch at
    max_docs(T) documents even when more would fit."""
    from speedrun.data.loader import max_docs
    tiny = [encode("MK") for _ in range(500)]  # 4-token documents: 128 would fit in 512 tokens
    p = tmp_path / shard_name("t", "train", 0)
    write_shard(p, np.concatenate(tiny))
    (tmp_path / "v").mkdir()
    q = tmp_path / "v" / shard_name("t", "valid", 0)
    write_shard(q, np.concatenate(tiny))
    assert max_docs(512) == 8
    st = TrainStream([p], 512, 100)
    for _ in range(5):
        toks, ids = st.next_batch()
        assert ids.max() + 1 == 8 and (ids >= 0).sum() == 32
    es = EvalSet.build([q], 512, 100)
    assert all(d.max() + 1 <= 8 for _, d, _ in es.batches) and es.n_docs == 500
