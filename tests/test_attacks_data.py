"""The data side of the reliability/security issue, one test per item: each is a way a user's files or a
run went wrong silently (or with a traceback) before, and now stops with one line or does the right thing.

1 one owner per prepare folder · 2 never delete a user's file · 3 nonsense shards never train or evaluate ·
4 one line instead of a traceback · 5 workers die with prepare · 6 workers from the usable CPUs ·
7 no import cycle in speedrun/data · 8 one CLI error style.
"""
from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from speedrun.data import prepare as prep
from speedrun.data.loader import EvalSet, TrainStream
from speedrun.data.prepare import PrepareOptions, format_report, prepare
from speedrun.data.shards import HEADER_BYTES, DataError, find_shards, open_shard, shard_name, write_shard
from speedrun.errors import SpeedrunError
from speedrun.vocab import PAD, encode

ROOT = Path(__file__).resolve().parent.parent
QUIET = dict(log=lambda s: None)
AA = list("ACDEFGHIKLMNPQRSTVWY")


def _fasta(path: Path, n: int = 80, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f">s{i}\n{''.join(rng.choice(AA, rng.integers(5, 120)))}\n" for i in range(n)))
    return path


def _docs(n: int = 30, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([encode("".join(rng.choice(AA, rng.integers(5, 60)))) for _ in range(n)])


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg
    return msg


# ---- 3. nonsense never finishes as done ------------------------------------------------------------
def test_3_an_empty_valid_split_is_refused_instead_of_a_nan_loss(tmp_path):
    p = tmp_path / shard_name("x", "valid", 0)
    write_shard(p, np.zeros(0, np.uint8))
    with pytest.raises(DataError) as err:
        EvalSet.build([p], 512, 100)
    assert str(p) in _one_line(err.value) and "no documents" in str(err.value)


def test_3_an_all_pad_train_shard_is_refused(tmp_path):
    p = tmp_path / shard_name("x", "train", 0)
    write_shard(p, np.full(5000, PAD, np.uint8))
    with pytest.raises(DataError) as err:
        TrainStream([p], 512, 100).next_batch()
    assert str(p) in _one_line(err.value) and "residue" in str(err.value)


def test_3_token_ids_outside_the_vocabulary_name_the_file_and_the_offset(tmp_path):
    toks = _docs(80)
    toks[1234] = 40
    p = tmp_path / shard_name("x", "train", 0)
    write_shard(p, toks)
    with pytest.raises(DataError) as err:
        TrainStream([p], 512, 100).next_batch()
    msg = _one_line(err.value)
    assert str(p) in msg and "40" in msg and "1234" in msg and str(HEADER_BYTES + 1234) in msg
    with pytest.raises(DataError, match="1234"):
        open_shard(p)


def test_3_resuming_onto_re_prepared_data_is_refused(tmp_path):
    files = []
    for i in range(2):
        files.append(tmp_path / shard_name("x", "train", i))
        write_shard(files[-1], _docs(seed=i))
    a = TrainStream(files, 512, 100)
    a.next_batch()
    state = a.state_dict()
    TrainStream(files, 512, 100).load_state_dict(state)  # the same data resumes
    write_shard(files[1], _docs(40, seed=7))  # re-prepared: same names, other content
    with pytest.raises(DataError) as err:
        TrainStream(files, 512, 100).load_state_dict(state)
    assert "changed" in _one_line(err.value) and "new run" in str(err.value)
    with pytest.raises(DataError, match="2 shard"):
        TrainStream(files[:1], 512, 100).load_state_dict(state)


# ---- 4. one line instead of a traceback ------------------------------------------------------------
def test_4_an_unwritable_cache_is_one_line(tmp_path, monkeypatch):
    from speedrun.data import sample_dir

    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("SPEEDRUN_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(SpeedrunError) as err:
        sample_dir()
    assert "SPEEDRUN_CACHE" in _one_line(err.value) and str(tmp_path / "file") in str(err.value)
