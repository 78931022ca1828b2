"""`python -m speedrun.data prepare`: FASTA/CSV/TSV/parquet -> shards; hash split, de-duplication, length
filter, shard size, determinism across workers, bad inputs, atomic output."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from speedrun.data import read_fasta, split_of
from speedrun.data import prepare as prep
from speedrun.data.loader import TrainStream
from speedrun.data.prepare import PrepareOptions, prepare
from speedrun.data.shards import DataError, doc_bounds, find_shards, open_shard
from speedrun.errors import SpeedrunError
from speedrun.vocab import CLS, EOS, UNK, encode

AA = list("ACDEFGHIKLMNPQRSTVWY")
QUIET = dict(log=lambda s: None)


def _seqs(n=300, seed=0, lo=5, hi=200):
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(AA, rng.integers(lo, hi))) for _ in range(n)]


def _write_fasta(path, seqs, width=60, opener=open):
    with opener(path, "wt") as f:
        for i, s in enumerate(seqs):
            f.write(f">seq{i} some description\n")
            for k in range(0, len(s), width):
                f.write(s[k:k + width] + "\n")


def _split_tokens(folder, split):
    files = find_shards(folder, split)
    return np.concatenate([open_shard(f) for f in files]) if files else np.zeros(0, np.uint8)


def _expected(seqs, vf=0.03, tf=0.03, dedup=False):
    out, seen = {"train": [], "valid": [], "test": []}, set()
    for s in seqs:
        key = "".join(s.upper().split())
        if dedup and key in seen:
            continue
        seen.add(key)
        out[split_of(s, vf, tf)].append(encode(s))
    return {k: (np.concatenate(v) if v else np.zeros(0, np.uint8)) for k, v in out.items()}


def test_fasta_to_shards_matches_the_tokenizer_and_the_hash_split(tmp_path):
    seqs = _seqs(400) + ["MKtl*", "AC-DE.FG", "M K V\tL", "XBZUO", "mkv"]  # odd letters, gaps, white space
    _write_fasta(tmp_path / "in.fasta", seqs)
    rep = prepare([tmp_path / "in.fasta"], tmp_path / "out", PrepareOptions(valid_frac=0.1, test_frac=0.1, workers=1),
                  **QUIET)
    exp = _expected(seqs, 0.1, 0.1)
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(_split_tokens(tmp_path / "out", split), exp[split])
    assert rep["sequences_read"] == len(seqs) and sum(rep["sequences"].values()) == len(seqs)
    assert rep["unk_letters"] == 3 + 3  # "tl*" and "mkv"; gaps and white space are not <unk>
    assert rep["unk_tokens"] == 1 + 1  # 'tl*' is one run, 'mkv' another
    assert rep["tokens"]["train"] == exp["train"].size
    saved = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert saved["sequences"] == rep["sequences"]
    assert find_shards(tmp_path / "out", "train")[0].name == "out_train_000000.bin"


def test_gzip_fasta_and_multiple_inputs(tmp_path):
    a, b = _seqs(100, seed=1), _seqs(100, seed=2)
    _write_fasta(tmp_path / "a.fa.gz", a, opener=gzip.open)
    _write_fasta(tmp_path / "b.faa", b, width=1000)
    prepare([tmp_path / "a.fa.gz", tmp_path / "b.faa"], tmp_path / "out", PrepareOptions(workers=1), **QUIET)
    exp = _expected(a + b)
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(_split_tokens(tmp_path / "out", split), exp[split])


@pytest.mark.parametrize("sep,ext", [(",", "csv"), ("\t", "tsv")])
def test_csv_and_tsv_sequence_column(tmp_path, sep, ext):
    seqs = _seqs(150)
    lines = [sep.join(["entry", "sequence", "label"])]
    lines += [sep.join([f"P{i}", s, str(i % 2)]) for i, s in enumerate(seqs)]
    (tmp_path / f"t.{ext}").write_text("\n".join(lines) + "\n")
    rep = prepare([tmp_path / f"t.{ext}"], tmp_path / "out", PrepareOptions(workers=1), **QUIET)
    exp = _expected(seqs)
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(_split_tokens(tmp_path / "out", split), exp[split])
    assert rep["sequences_read"] == 150


def test_csv_named_column_and_wrong_columns(tmp_path):
    seqs = _seqs(50)
    (tmp_path / "t.csv").write_text("id,aa,label\n" + "".join(f"x{i},{s},{i % 2}\n" for i, s in enumerate(seqs)))
    with pytest.raises(DataError) as err:
        prepare([tmp_path / "t.csv"], tmp_path / "o1", PrepareOptions(workers=1), **QUIET)
    assert str(tmp_path / "t.csv") in str(err.value) and "--column" in str(err.value) and "aa" in str(err.value)
    with pytest.raises(DataError, match="not amino-acid letters") as err:  # a column of labels
        prepare([tmp_path / "t.csv"], tmp_path / "o2", PrepareOptions(workers=1, column="label"), **QUIET)
    assert "\n" not in str(err.value)
    prepare([tmp_path / "t.csv"], tmp_path / "o3", PrepareOptions(workers=1, column="aa"), **QUIET)
    np.testing.assert_array_equal(_split_tokens(tmp_path / "o3", "train"), _expected(seqs)["train"])
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    seqs = _seqs(120)
    pq.write_table(pa.table({"name": [f"p{i}" for i in range(120)], "sequence": seqs}), tmp_path / "t.parquet")
    prepare([tmp_path / "t.parquet"], tmp_path / "out", PrepareOptions(workers=1), **QUIET)
    np.testing.assert_array_equal(_split_tokens(tmp_path / "out", "train"), _expected(seqs)["train"])


def test_parquet_without_pyarrow_names_the_install(tmp_path, monkeypatch):
    import builtins

    (tmp_path / "t.parquet").write_bytes(b"PAR1" + b"\x00" * 16 + b"PAR1")
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError("no pyarrow")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(DataError, match="pip install pyarrow") as err:
        prepare([tmp_path / "t.parquet"], tmp_path / "out", PrepareOptions(workers=1), **QUIET)
    assert str(tmp_path / "t.parquet") in str(err.value)


def test_dedup_and_duplicates_never_straddle_splits(tmp_path):
    base = _seqs(200, seed=3)
    seqs = base + base[:80] + [s.lower() for s in base[80:100]]  # exact and case-only repeats
    _write_fasta(tmp_path / "in.fasta", seqs)
    rep = prepare([tmp_path / "in.fasta"], tmp_path / "d", PrepareOptions(workers=1, dedup=True, valid_frac=0.2,
                                                                         test_frac=0.2), **QUIET)
    assert rep["duplicates"] == 100 and sum(rep["sequences"].values()) == 200
    exp = _expected(seqs, 0.2, 0.2, dedup=True)
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(_split_tokens(tmp_path / "d", split), exp[split])
    # without dedup the repeats are kept, each in the same split as its first copy
    prepare([tmp_path / "in.fasta"], tmp_path / "n", PrepareOptions(workers=1, valid_frac=0.2, test_frac=0.2), **QUIET)
    docs = {}
    for split in ("train", "valid", "test"):
        t = _split_tokens(tmp_path / "n", split)
        s, e = doc_bounds(t)
        for a, b in zip(s, e):
            if UNK not in t[a:b]:  # the lower-case copies all encode to <cls><unk><eos>
                docs.setdefault(t[a:b].tobytes(), set()).add(split)
    assert len(docs) == 200 and all(len(v) == 1 for v in docs.values())


def test_length_filter_and_empty_records(tmp_path):
    (tmp_path / "in.fasta").write_text(">a\nMK\n>b\n\n>c\nMKVLA\n>d\n" + "A" * 50 + "\n>e\nMKVLAG\n")
    rep = prepare([tmp_path / "in.fasta"], tmp_path / "out",
                  PrepareOptions(workers=1, min_length=3, max_length=20, valid_frac=0, test_frac=0), **QUIET)
    assert (rep["too_short"], rep["too_long"], rep["empty"]) == (1, 1, 1)
    assert rep["sequences"]["train"] == 2
    t = _split_tokens(tmp_path / "out", "train")
    np.testing.assert_array_equal(t, np.concatenate([encode("MKVLA"), encode("MKVLAG")]))


def test_shards_hold_whole_documents_up_to_the_size(tmp_path):
    seqs = _seqs(300, seed=4)
    _write_fasta(tmp_path / "in.fasta", seqs)
    prepare([tmp_path / "in.fasta"], tmp_path / "out",
            PrepareOptions(workers=1, shard_tokens=2000, valid_frac=0, test_frac=0), **QUIET)
    files = find_shards(tmp_path / "out", "train")
    assert len(files) > 5
    for f in files:
        t = open_shard(f)
        assert t.size <= 2000 and t[0] == CLS and t[-1] == EOS
    assert [f.name for f in files] == [f"out_train_{i:06d}.bin" for i in range(len(files))]
    np.testing.assert_array_equal(_split_tokens(tmp_path / "out", "train"), _expected(seqs, 0, 0)["train"])
    st = TrainStream(files, 1024, 128, seed=0)  # the loader reads what prepare wrote
    tokens, ids = st.next_batch()
    assert tokens.shape == (1024,) and ids.max() > 0


def test_parallel_output_is_byte_identical(tmp_path):
    seqs = _seqs(2000, seed=5)
    _write_fasta(tmp_path / "in.fasta", seqs)
    for w in (1, 2):
        prepare([tmp_path / "in.fasta"], tmp_path / f"w{w}", PrepareOptions(name="x", workers=w, dedup=True,
                                                                          block_bytes=20_000, shard_tokens=50_000),
                **QUIET)
    names = sorted(p.name for p in (tmp_path / "w1").glob("*.bin"))
    assert len(names) > 3 and names == sorted(p.name for p in (tmp_path / "w2").glob("*.bin"))
    for n in names:
        assert (tmp_path / "w1" / n).read_bytes() == (tmp_path / "w2" / n).read_bytes()


@pytest.mark.parametrize("content,needle", [
    (b"", "empty file"),
    (b"\n  \n", "empty file"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary file"),
    (b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n", "HTML"),
    (b"MKVLAAGLLA\nMKKKLLL\n", "does not start with '>'"),
    (b">dna\n" + b"ACGTTGCA" * 200 + b"\n", "nucleotide"),
    (b">a\n>b\n>c\n", "no residues"),
])
def test_not_sequences_stops_with_one_line_naming_the_file(tmp_path, content, needle):
    p = tmp_path / "bad.fasta"
    p.write_bytes(content)
    with pytest.raises(DataError) as err:
        prepare([p], tmp_path / "out", PrepareOptions(workers=1), **QUIET)
    msg = str(err.value)
    assert needle in msg and str(p) in msg and "\n" not in msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_csv_header_only_and_missing_file(tmp_path):
    (tmp_path / "h.csv").write_text("id,sequence\n")
    with pytest.raises(DataError, match="no sequences"):
        prepare([tmp_path / "h.csv"], tmp_path / "out", PrepareOptions(workers=1), **QUIET)
    with pytest.raises(DataError, match="no such file"):
        prepare([tmp_path / "nope.fasta"], tmp_path / "out", PrepareOptions(workers=1), **QUIET)


def test_bad_file_among_good_ones_writes_nothing(tmp_path):
    _write_fasta(tmp_path / "good.fasta", _seqs(300))
    (tmp_path / "bad.fasta").write_bytes(b">x\n" + b"ACGT" * 2000 + b"\n")
    with pytest.raises(DataError, match="bad.fasta"):
        prepare([tmp_path / "good.fasta", tmp_path / "bad.fasta"], tmp_path / "out", PrepareOptions(workers=1), **QUIET)
    assert not (tmp_path / "out").exists()


def test_interrupted_run_leaves_no_shard_that_looks_complete(tmp_path, monkeypatch):
    _write_fasta(tmp_path / "in.fasta", _seqs(600, seed=6))
    real = prep.ShardWriter._close
    calls = {"n": 0}

    def close_then_die(self):
        real(self)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(prep.ShardWriter, "_close", close_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare([tmp_path / "in.fasta"], tmp_path / "out", PrepareOptions(workers=1, shard_tokens=3000), **QUIET)
    assert calls["n"] == 2  # two shards had been completed in the staging folder
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.glob(".out*"))


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    _write_fasta(tmp_path / "in.fasta", _seqs(100))
    prepare([tmp_path / "in.fasta"], tmp_path / "out", PrepareOptions(workers=1), **QUIET)
    with pytest.raises(SpeedrunError, match="--overwrite"):  # fsutil.claim_output's FolderError
        prepare([tmp_path / "in.fasta"], tmp_path / "out", PrepareOptions(workers=1), **QUIET)
    _write_fasta(tmp_path / "in2.fasta", _seqs(50, seed=9))
    prepare([tmp_path / "in2.fasta"], tmp_path / "out", PrepareOptions(workers=1, overwrite=True), **QUIET)
    np.testing.assert_array_equal(_split_tokens(tmp_path / "out", "train"), _expected(_seqs(50, seed=9))["train"])
    assert not list(tmp_path.glob(".out.*"))


def test_options_uppercase_and_strip_stop(tmp_path):
    (tmp_path / "in.fasta").write_text(">a\nmkvla*\n>b\nMKVLAGGG*\n")
    rep = prepare([tmp_path / "in.fasta"], tmp_path / "a", PrepareOptions(workers=1, valid_frac=0, test_frac=0),
                  **QUIET)
    assert list(_split_tokens(tmp_path / "a", "train")) == [CLS, UNK, EOS] + list(encode("MKVLAGGG*"))
    assert rep["unk_letters"] == 7 and list(encode("MKVLAGGG*"))[-2] == UNK  # as the ESM tokenizer does
    prepare([tmp_path / "in.fasta"], tmp_path / "b",
            PrepareOptions(workers=1, valid_frac=0, test_frac=0, uppercase=True, strip_stop=True), **QUIET)
    np.testing.assert_array_equal(_split_tokens(tmp_path / "b", "train"),
                                  np.concatenate([encode("MKVLA"), encode("MKVLAGGG")]))
    (tmp_path / "lower.fasta").write_text(">a\nmkvlaggg\n")  # all lower case: refused, with the fix
    with pytest.raises(DataError, match="--uppercase"):
        prepare([tmp_path / "lower.fasta"], tmp_path / "c", PrepareOptions(workers=1), **QUIET)


def test_cli(tmp_path, capsys):
    from speedrun.data.__main__ import main

    _write_fasta(tmp_path / "in.fasta", _seqs(100))
    assert main(["prepare", str(tmp_path / "in.fasta"), "--out", str(tmp_path / "out"), "--dedup",
                 "--workers", "1", "--attribution", "Made up proteins, CC0"]) == 0
    assert (tmp_path / "out" / "ATTRIBUTION.txt").read_text() == "Made up proteins, CC0\n"
    out = capsys.readouterr().out
    assert "letters mapped to <unk>: 0" in out and "kept 100 sequences" in out
    (tmp_path / "page.csv").write_text("<html><body>oops</body></html>\n")
    assert main(["prepare", str(tmp_path / "page.csv"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "page.csv" in err[0] and "HTML" in err[0]


def test_read_fasta_semantics_are_kept_for_wrapped_lines():
    # a run of unknown letters continues across a line break, as when the lines are joined first
    block = b">a\nMKab\ncdT\n>b\nMK  \nV\n"
    seqs, n = prep._parse_fasta_block(block)
    ref = [s for _, s in read_fasta(block.decode().splitlines(keepends=True))]
    assert n == 2 and [s.decode() for s in seqs] == ref
    assert list(encode(seqs[0])) == [CLS, 20, 15, UNK, 11, EOS]


def test_a_killed_worker_stops_prepare_with_one_line_instead_of_hanging():
    """multiprocessing.Pool waits forever for the block of a worker the OOM killer took; the executor
    behind _ordered_map notices, and prepare stops with a DataError naming the fix."""
    import multiprocessing
    import os
    import signal

    seqs = _seqs(50)
    block = "".join(f">s{i}\n{s}\n" for i, s in enumerate(seqs)).encode()
    tasks = [("fasta", block, 0)] * 40
    it = prep._ordered_map(iter(tasks), PrepareOptions(), workers=2)
    assert next(it).records == 50
    for child in multiprocessing.active_children():
        os.kill(child.pid, signal.SIGKILL)
    with pytest.raises(DataError, match="worker process died.*--workers 1"):
        for _ in it:
            pass
