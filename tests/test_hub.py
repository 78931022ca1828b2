"""`python -m speedrun.data download` and the missing-shard messages, against a local fixture standing in
for the Hugging Face hub (no test touches the network)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import typed
from speedrun.data import data_files, dataset_dir
from speedrun.data import hub
from speedrun.data.loader import EvalSet, TrainStream
from speedrun.data.shards import DataError, find_shards, open_shard, shard_name, write_shard
from speedrun.vocab import encode

SECRET = "hf_TEST_TOKEN_MUST_NOT_LEAK_42"
REPO = "Synthyra/omg_prot50_packed"


class RemoteEntryNotFoundError(Exception):
    """Named like huggingface_hub's: the hub has no such file."""


class LocalEntryNotFoundError(Exception):
    """Named like huggingface_hub's: the hub could not be reached."""


@pytest.fixture
def remote(tmp_path):
    """A folder playing the hub repo: valid, test and 3 train shards of omg_prot50."""
    root = tmp_path / "remote"
    rng = np.random.default_rng(0)
    for split, count in (("valid", 1), ("test", 1), ("train", 3)):
        for i in range(count):
            docs = [encode("".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), rng.integers(5, 300)))) for _ in range(40)]
            write_shard(root / shard_name("omg_prot50", split, i), np.concatenate(docs))
    return root


@pytest.fixture
def fake_hub(remote, monkeypatch):
    """Replace the hub client calls by copies from `remote`; record every call."""
    calls = []

    def download(repo, filename, folder, revision, token):
        calls.append({"repo": repo, "filename": filename, "revision": revision, "token": token})
        src = remote / filename
        if not src.exists():
            raise RemoteEntryNotFoundError(f"404 {filename}")
        dst = Path(folder) / filename
        shutil.copyfile(src, dst)
        return str(dst)

    def listing(repo, revision, token):
        calls.append({"list": repo, "token": token})
        return sorted(p.name for p in remote.iterdir()) + ["README.md"]

    monkeypatch.setattr(hub, "_hf_download", download)
    monkeypatch.setattr(hub, "_hf_list", listing)
    return calls


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    import huggingface_hub

    def refuse(*a, **k):
        raise AssertionError("a test tried to reach the Hugging Face hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", refuse)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def _download(folder, n, **kw):
    return hub.download("omgprot50", REPO, "omg_prot50", folder, n, log=lambda s: None, **kw)


def test_download_fetches_valid_test_and_n_train_shards_and_verifies_them(tmp_path, fake_hub, remote):
    out = tmp_path / "data" / "omg_prot50"
    r = _download(out, 2)
    assert sorted(r["fetched"]) == sorted(["omg_prot50_valid_000000.bin", "omg_prot50_test_000000.bin",
                                           "omg_prot50_train_000000.bin", "omg_prot50_train_000001.bin"])
    assert [p.name for p in find_shards(out, "train")] == ["omg_prot50_train_000000.bin", "omg_prot50_train_000001.bin"]
    for f in out.glob("*.bin"):
        np.testing.assert_array_equal(open_shard(f), open_shard(remote / f.name))
    assert r["tokens"] == sum(open_shard(f).size for f in out.glob("*.bin"))
    assert all(c["repo"] == REPO and c["token"] is False for c in fake_hub)  # anonymous without HF_TOKEN
    assert hub.read_manifest(out)["complete"] is True
    # again: everything is there and sound, so the hub is not asked at all
    fake_hub.clear()
    r2 = _download(out, 2)
    assert r2["fetched"] == [] and len(r2["present"]) == 4 and fake_hub == []
    # more chunks later: only the new one is fetched
    assert _download(out, 3)["fetched"] == ["omg_prot50_train_000002.bin"]


def test_token_comes_from_hf_token_and_is_never_written(tmp_path, fake_hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    out = tmp_path / "d"
    hub.download("omgprot50", REPO, "omg_prot50", out, 1)
    assert fake_hub and all(c["token"] == SECRET for c in fake_hub)
    printed = capsys.readouterr()
    assert SECRET not in printed.out + printed.err
    for p in out.rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), p


def test_a_corrupt_download_is_deleted_and_named(tmp_path, fake_hub, remote):
    bad = remote / "omg_prot50_train_000001.bin"
    bad.write_bytes(bad.read_bytes()[:-10])
    out = tmp_path / "d"
    with pytest.raises(DataError) as err:
        _download(out, 2)
    msg = str(err.value)
    assert "omg_prot50_train_000001.bin" in msg and "header says" in msg and "re-run" in msg and "\n" not in msg
    assert not (out / "omg_prot50_train_000001.bin").exists()
    assert (out / "omg_prot50_train_000000.bin").exists()  # what was fine is kept


def test_more_chunks_than_the_hub_has(tmp_path, fake_hub):
    with pytest.raises(DataError, match="no such file on the hub.*lower data.num_chunks") as err:
        _download(tmp_path / "d", 5)
    assert "omg_prot50_train_000003.bin" in str(err.value)


def test_unreachable_hub_is_one_line(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise LocalEntryNotFoundError("Connection error, and we cannot find the requested files in the cache\nmore")

    monkeypatch.setattr(hub, "_hf_download", offline)
    with pytest.raises(DataError) as err:
        _download(tmp_path / "d", 1)
    assert "cannot reach the Hugging Face hub" in str(err.value) and "\n" not in str(err.value)


def test_num_chunks_zero_fetches_every_train_shard(tmp_path, fake_hub):
    r = _download(tmp_path / "d", 0)
    assert len([n for n in r["fetched"] if "_train_" in n]) == 3


def test_not_a_hub_dataset(tmp_path):
    with pytest.raises(DataError, match="not a hub dataset.*prepare"):
        hub.download("swissprot2014", None, None, tmp_path / "d", 1)


def test_cli_composes_the_config_like_launch(tmp_path, fake_hub, capsys):
    assert hub.main(["data=omgprot50", "data.num_chunks=2", f"data.root={tmp_path}"]) == 0
    assert len(find_shards(tmp_path / "omg_prot50", "train")) == 2
    assert "4 shard(s) verified" in capsys.readouterr().out
    assert hub.main(["data=omgprot50", "data.num_chunk=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean data.num_chunks" in err[0]


def test_hub_configs_compose_with_paths_under_the_data_root(monkeypatch):
    monkeypatch.delenv("SPEEDRUN_DATA", raising=False)
    for name, (repo, prefix, folder) in hub.HUB_DATASETS.items():
        d = typed([f"data={name}"]).data
        assert (d.repo, d.file_prefix, d.path, d.root) == (repo, prefix, f"data/{folder}", "data")
        assert d.num_chunks > 0
    monkeypatch.setenv("SPEEDRUN_DATA", "/scratch/plm")
    d = typed(["data=omgprot50", "data.num_chunks=10"]).data
    assert d.path == "/scratch/plm/omg_prot50" and d.num_chunks == 10
    d = typed(["data=swissprot2014", "data.root=/x"]).data
    assert d.path == "/x/swissprot2014" and d.repo is None


def test_missing_hub_shards_name_every_file_and_the_command(tmp_path, fake_hub):
    cfg = typed(["data=omgprot50", "data.num_chunks=4", f"data.root={tmp_path}"]).data
    with pytest.raises(DataError) as err:
        data_files(cfg, "train")
    msg = str(err.value)
    assert "\n" not in msg and "does not exist" in msg
    assert "omg_prot50_train_000000.bin..omg_prot50_train_000003.bin (4 files)" in msg
    assert "omg_prot50_valid_000000.bin" in msg and "omg_prot50_test_" not in msg  # test only when asked
    assert f"python -m speedrun.data download data=omgprot50 data.num_chunks=4 data.path={tmp_path}/omg_prot50" in msg
    _download(tmp_path / "omg_prot50", 2)  # only 2 of the 4 train shards
    with pytest.raises(DataError) as err:
        data_files(cfg, "valid")
    msg = str(err.value)
    assert "lacks 2 of 5" in msg and "omg_prot50_train_000002.bin..omg_prot50_train_000003.bin (2 files)" in msg
    cfg2 = typed(["data=omgprot50", "data.num_chunks=2", f"data.root={tmp_path}"]).data
    assert [p.name for p in data_files(cfg2, "train")] == ["omg_prot50_train_000000.bin", "omg_prot50_train_000001.bin"]
    assert [p.name for p in data_files(cfg2, "valid")] == ["omg_prot50_valid_000000.bin"]
    assert [p.name for p in data_files(cfg2, "test")] == ["omg_prot50_test_000000.bin"]
    _download(tmp_path / "omg_prot50", 3)
    assert len(data_files(cfg2, "train")) == 2  # num_chunks=2 trains on exactly 2 shards


def test_the_trainers_call_reports_an_interrupted_download(tmp_path, fake_hub, monkeypatch):
    folder = tmp_path / "omg_prot50"
    real = hub._hf_download

    def die_on_second_train(repo, filename, f, revision, token):
        if filename.endswith("train_000001.bin"):
            raise KeyboardInterrupt
        return real(repo, filename, f, revision, token)

    monkeypatch.setattr(hub, "_hf_download", die_on_second_train)
    with pytest.raises(KeyboardInterrupt):
        _download(folder, 3)
    assert hub.read_manifest(folder)["complete"] is False
    with pytest.raises(DataError) as err:  # the trainer's dataset_dir(name, path) call
        dataset_dir("omgprot50", str(folder))
    msg = str(err.value)
    assert "omg_prot50_train_000001.bin..omg_prot50_train_000002.bin (2 files)" in msg
    assert "download data=omgprot50 data.num_chunks=3" in msg and "\n" not in msg
    with pytest.raises(DataError, match="does not exist.*download data=omgprot50"):
        dataset_dir("omgprot50", str(tmp_path / "nowhere"))


def test_shards_from_the_reference_load_unchanged(tmp_path, remote):
    """A folder the reference trainer filled (no download.json; train 0..N) works as it is."""
    folder = tmp_path / "data" / "omg_prot50"
    shutil.copytree(remote, folder)
    assert dataset_dir("omgprot50", str(folder)) == folder
    cfg = typed(["data=omgprot50", "data.num_chunks=0", f"data.path={folder}"]).data
    train = data_files(cfg, "train")
    assert len(train) == 3
    tokens, ids = TrainStream(train, 2048, 256, seed=0).next_batch()
    assert tokens.shape == (2048,) and ids.max() > 1
    assert EvalSet.build(data_files(cfg, "valid"), 2048, 256).n_docs == 40


def test_prepared_dataset_missing_names_the_prepare_command(tmp_path):
    with pytest.raises(DataError) as err:
        dataset_dir("swissprot2014", str(tmp_path / "swissprot2014"))
    assert "python -m speedrun.data prepare" in str(err.value) and "\n" not in str(err.value)
    cfg = typed(["data=swissprot2014", f"data.root={tmp_path}"]).data
    with pytest.raises(DataError, match="prepare"):
        data_files(cfg, "train")


def test_check_command(tmp_path, fake_hub, capsys):
    from speedrun.data.__main__ import main

    assert main(["check", "data=omgprot50", "data.num_chunks=2", f"data.root={tmp_path}"]) == 2
    assert "download data=omgprot50" in capsys.readouterr().err
    _download(tmp_path / "omg_prot50", 2)
    assert main(["check", "data=omgprot50", "data.num_chunks=2", f"data.root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "train: 2 shard(s)" in out and "valid: 1 shard(s)" in out


def test_compact_folds_runs():
    names = [shard_name("x", "train", i) for i in (0, 1, 2, 5)] + ["x_valid_000000.bin"]
    assert hub.compact(names) == ("x_train_000000.bin..x_train_000002.bin (3 files), x_train_000005.bin, "
                                  "x_valid_000000.bin")
