"""Representation probes (the speedrun/probe/ package) on tiny synthetic fixtures.

The fixtures' labels are simple functions of the sequence (tests/fixtures/probes/generate.py), so a
correct probe on context-free features scores almost perfectly and a misaligned one cannot.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, save_checkpoint
from speedrun.config import make
from speedrun.probe import tasks as pt
from speedrun.models.unet import ProteinLM
from speedrun.probe import (ProbeError, classification_metrics, flat_metrics, onehot_features,
                            parse_layers, prepare, probe_model, random_init_like, run_probes, spearman)
from speedrun.probe import tasks as pt

FIX = Path(__file__).resolve().parent / "fixtures" / "probes"
SS3 = f"ss3@{FIX / 'flip_ss3'}"
MELT = f"meltome@{FIX / 'meltome.csv'}"
SOL = f"solubility@{FIX / 'soluble.tsv'}"
REAL = Path(os.environ.get(pt.DATA_ENV) or pt.DEFAULT_DATA_DIR)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return ProteinLM(make("model", dim=32, n_layers=2, n_heads=2, mlp_ratio=2.0)).eval()


# ------------------------------------------------------------------------------------------ loaders

def _check_ss3(task):
    assert task.kind == "classification" and task.level == "residue" and task.classes == ("C", "E", "H")
    assert task.sizes() == {"train": 18, "valid": 6, "test": 6}  # `bad-A` (label length mismatch) skipped
    for split in pt.SPLITS:
        for seq, y in zip(*task.splits[split]):
            assert y.shape == (len(seq),)
            assert y[0] == -1 and y[-1] == -1  # mask.fasta's unresolved residues are skipped
            want = ["H" if c in "AELMQKR" else "E" if c in "VIYFWTC" else "C" for c in seq[1:-1]]
            assert [task.classes[i] for i in y[1:-1]] == want


def test_ss3_loader_from_folder_zip_and_data_dir(tmp_path):
    _check_ss3(pt.load_task(SS3))
    archive = tmp_path / "flip_secondary_structure.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in (FIX / "flip_ss3" / "splits").iterdir():
            z.write(f, f"splits/{f.name}")
    _check_ss3(pt.load_task(f"ss3@{archive}"))  # the zip itself
    _check_ss3(pt.load_task(f"ss3@{tmp_path}"))  # a folder holding the zip
    _check_ss3(pt.load_task("ss3", data=str(tmp_path)))  # --data-dir
    _check_ss3(pt.load_task({"name": "ss3", "path": str(archive)}))


def test_missing_data_is_one_line_naming_the_file_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(pt.DATA_ENV, str(tmp_path))
    with pytest.raises(pt.ProbeDataError) as e:
        pt.load_task("meltome")
    msg = str(e.value)
    assert "\n" not in msg and "flip_meltome.zip" in msg and str(tmp_path) in msg
    assert "--data-dir" in msg and pt.DATA_ENV in msg
    with pytest.raises(pt.ProbeDataError, match="no such|missing"):
        pt.load_task(f"ss3@{tmp_path / 'nowhere'}")
    with pytest.raises(pt.ProbeDataError, match="unknown probe task 'sss3'"):
        pt.load_task("sss3")


def test_aaanalysis_missing_names_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "aaanalysis" else real(name, *a))
    with pytest.raises(pt.ProbeDataError) as e:
        pt.load_task("solubility")
    assert "pip install --no-deps aaanalysis==1.0.3" in str(e.value) and "\n" not in str(e.value)


def test_aaanalysis_is_located_without_importing(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "aaanalysis"
    (pkg / "_data" / "benchmarks").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    shutil.copy(FIX / "soluble.tsv", pkg / "_data" / "benchmarks" / "SEQ_SOLUBLE.tsv")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    task = pt.load_task("solubility")
    assert sum(task.sizes().values()) == 60 and "aaanalysis" not in sys.modules


def test_meltome_regression_with_validation_carved_from_train():
    task = pt.load_task(MELT)
    assert task.kind == "regression" and task.level == "sequence" and task.metric == "spearman"
    n = task.sizes()
    assert n["test"] == 20 and n["train"] + n["valid"] == 40 and n["valid"] >= 2
    assert not set(task.splits["train"][0]) & set(task.splits["valid"][0])


def test_solubility_homology_folds_keep_families_together():
    task = pt.load_task(SOL)
    assert task.metric == "mcc" and task.classes == ("0", "1")
    split_of = {s: name for name in pt.SPLITS for s in task.splits[name][0]}
    rows = (FIX / "soluble.tsv").read_text().splitlines()[1:]
    seqs = [r.split("\t")[1] for r in rows]
    for fam in range(10):  # three near-identical variants per family, the first 30 rows
        assert len({split_of[s] for s in seqs[3 * fam:3 * fam + 3]}) == 1
    sizes = task.sizes()
    assert sizes["train"] >= 40 and sizes["valid"] >= 3 and sizes["test"] >= 3


def test_homology_clusters():
    rng = random.Random(0)
    aa = "ACDEFGHIKLMNPQRSTVWY"
    base = ["".join(rng.choice(aa) for _ in range(120)) for _ in range(5)]
    seqs, fam = [], []
    for f, b in enumerate(base):
        for _ in range(4):
            s = list(b)
            for p in rng.sample(range(120), 6):  # 95 % identity
                s[p] = rng.choice(aa)
            seqs.append("".join(s))
            fam.append(f)
    seqs.append(base[0][30:90])  # a fragment joins its family
    fam.append(0)
    seqs += ["".join(rng.choice(aa) for _ in range(100)) for _ in range(20)]  # unrelated
    fam += list(range(100, 120))
    seqs += ["MK", "MK"]  # identical short sequences, no 5-mers to share
    fam += [200, 200]
    c = pt.homology_clusters(seqs)
    for i in range(len(seqs)):
        for j in range(len(seqs)):
            assert (c[i] == c[j]) == (fam[i] == fam[j]), (i, j)
    assert pt.homology_clusters([]).size == 0


def test_declared_tasks_from_dict_and_yaml(tmp_path):
    rows = ["seq,y,fold"]
    rng = random.Random(1)
    for i in range(40):
        s = "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(30))
        lab = ",".join("1" if c in "KR" else "0" for c in s)
        rows.append(f"{s},\"{lab}\",{['train', 'val', 'test'][i % 3]}")
    (tmp_path / "res.csv").write_text("\n".join(rows) + "\n")
    decl = {"name": "kr", "path": "res.csv", "sequence_column": "seq", "label_column": "y",
            "type": "classification", "level": "residue", "split_column": "fold"}
    (tmp_path / "kr.yaml").write_text("\n".join(f"{k}: {v}" for k, v in decl.items()) + "\n")
    task = pt.load_task(str(tmp_path / "kr.yaml"))  # relative path resolved next to the YAML
    assert task.name == "kr" and task.level == "residue" and task.classes == ("0", "1")
    assert task.sizes() == {"train": 14, "valid": 13, "test": 13}
    seq, y = task.splits["train"][0][0], task.splits["train"][1][0]
    assert list(y) == [1 if c in "KR" else 0 for c in seq]
    # a regression table with no split column: homology folds
    t2 = pt.load_task({"name": "tm", "path": str(FIX / "meltome.csv"), "label_column": "target",
                       "type": "regression"})
    assert sum(t2.sizes().values()) == 60 and t2.metric == "spearman"
    with pytest.raises(pt.ProbeDataError, match="no column 'nope'"):
        pt.load_task({"name": "x", "path": str(FIX / "meltome.csv"), "label_column": "nope"})
    with pytest.raises(pt.ProbeDataError, match="unknown field"):
        pt.load_task({"name": "x", "path": str(FIX / "meltome.csv"), "lable_column": "target"})


@pytest.mark.skipif(not (REAL / "flip_secondary_structure.zip").is_file(), reason="FLIP zips not on this machine")
def test_real_flip_ss3_sizes():
    task = pt.load_task("ss3", data=str(REAL))
    assert task.sizes() == {"train": 9712, "valid": 1080, "test": 364}


# ------------------------------------------------------------------------------------------ metrics and probes

def test_metrics():
    y = np.array([0, 0, 1, 1, 2, 2])
    assert classification_metrics(y, y, 3) == {"accuracy": 1.0, "mcc": 1.0}
    yb, pb = np.array([1, 1, 1, 0, 0, 0, 1, 0]), np.array([1, 1, 0, 0, 0, 1, 1, 0])
    tp, tn, fp, fn = 3, 3, 1, 1
    want = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    m = classification_metrics(yb, pb, 2)
    assert m["accuracy"] == 0.75 and abs(m["mcc"] - want) < 1e-12
    assert classification_metrics(yb, np.zeros(8, int), 2)["mcc"] == 0.0
    a = np.array([1.0, 2.0, 2.0, 3.0, 10.0])
    assert abs(spearman(a, a ** 3) - 1.0) < 1e-12 and abs(spearman(a, -a) + 1.0) < 1e-12
    # ties averaged, as scipy.stats.spearmanr: ranks [1, 2.5, 2.5, 4, 5] vs [5, 4, 3, 2, 1]
    assert abs(spearman(a, np.array([5.0, 4, 3, 2, 1])) - (-0.9746794344808963)) < 1e-12


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3, 4]
    assert parse_layers("last", 4) == [4] and parse_layers(-1, 4) == [4]
    assert parse_layers("0,2", 4) == [0, 2] and parse_layers([3, 0, 3], 4) == [0, 3]
    with pytest.raises(ProbeError, match="out of range"):
        parse_layers([5], 4)
    with pytest.raises(ProbeError):
        parse_layers("first", 4)


def test_prepare_subsamples_deterministically():
    task = pt.load_task(SS3)
    a = prepare(task, max_sequences=5, max_residues=60, seed=3)
    b = prepare(task, max_sequences=5, max_residues=60, seed=3)
    for s in pt.SPLITS:
        assert a.splits[s].seqs == b.splits[s].seqs and np.array_equal(a.splits[s].y, b.splits[s].y)
        assert len(a.splits[s].seqs) <= 5 and a.splits[s].y.size <= 60
        assert (a.splits[s].y >= 0).all()  # masked residues never sampled
        assert sum(p.size for p in a.splits[s].positions) == a.splits[s].y.size


def test_onehot_probe_is_near_perfect_on_the_synthetic_tasks(tiny_model):
    res = probe_model(tiny_model, [SS3, MELT, SOL], "all", baselines=("onehot",), max_sequences=0, max_residues=0)
    ss3 = res["ss3"]
    assert ss3["models"]["onehot"]["test"]["accuracy"] > 0.97  # labels and features line up residue by residue
    assert res["meltome"]["models"]["onehot"]["test"]["spearman"] > 0.9
    assert set(ss3["models"]["trained"]["layers"]) == {0, 1, 2}
    # the trained (here: freshly initialised) model's layer 0 is a per-letter embedding: as good as one-hot
    assert ss3["models"]["trained"]["layers"][0]["test"]["accuracy"] > 0.9
    assert ss3["n"]["test_residues"] == sum(len(s) - 2 for s in pt.load_task(SS3).splits["test"][0])


def test_run_probes_flat_metrics_rng_and_mode(tiny_model):
    tiny_model.train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    np_before = np.random.get_state()[1].copy()
    out = run_probes(tiny_model, [SS3, MELT, SOL], "all", None, max_sequences=10, max_residues=200,
                     baselines=("onehot", "random_init"))
    assert torch.equal(before, torch.get_rng_state()) and np.array_equal(np_before, np.random.get_state()[1])
    assert tiny_model.training  # mode restored
    for key in ("probe/ss3/best_layer", "probe/ss3/test_acc", "probe/ss3/test_mcc", "probe/meltome/test_spearman",
                "probe/meltome/test_pearson", "probe/solubility/test_mcc", "probe/solubility/test_acc",
                "probe/ss3/onehot/test_acc", "probe/ss3/random_init/test_acc", "probe/score", "probe_seconds"):
        assert key in out, key
    assert out["probe/ss3/best_layer"] in (0, 1, 2)
    assert all(isinstance(v, (int, float)) for v in out.values())
    json.dumps(out)
    # same subset and model -> same numbers (the subset is cached and seeded)
    again = run_probes(tiny_model, [SS3, MELT, SOL], "all", None, max_sequences=10, max_residues=200,
                       baselines=("onehot", "random_init"))
    assert {k: v for k, v in again.items() if k != "probe_seconds"} == {k: v for k, v in out.items()
                                                                        if k != "probe_seconds"}


def test_random_init_baseline_is_contextual_and_seeded(tiny_model):
    a, b = random_init_like(tiny_model, seed=0), random_init_like(tiny_model, seed=0)
    for (n1, p1), (n2, p2) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p1, p2)
    assert a.blocks[0].attn.o.weight.abs().sum() > 0 and a.blocks[0].mlp.down.weight.abs().sum() > 0
    assert not torch.equal(a.embed.weight, random_init_like(tiny_model, seed=1).embed.weight)
    assert not any(p.requires_grad and p.grad is not None for p in a.parameters())


def test_flat_metrics_full():
    task = pt.load_task(MELT)
    prep = prepare(task)
    feats = onehot_features(prep)
    from speedrun.probe import fit_layers

    r = fit_layers(prep, feats)
    results = {"meltome": {"metric": "spearman", "models": {"trained": r}}}
    full = flat_metrics(results, full=True)
    assert "probe/meltome/valid_spearman" in full and "probe/meltome/layer0/test_spearman" in full
    assert set(flat_metrics(results)) == {"probe/meltome/best_layer", "probe/meltome/test_spearman",
                                          "probe/meltome/test_pearson", "probe/score"}


# ------------------------------------------------------------------------------------------ config and CLI

def test_eval_config_probe_fields_and_quality_track():
    from conftest import typed

    cfg = typed([])
    assert cfg.eval.probe_every == 0  # off by default
    cfg = typed(["eval.probe_every=50", "eval.probe_tasks=[ss3,meltome]", "eval.probe_layers=last"])
    assert cfg.eval.probe_every == 50 and cfg.eval.probe_tasks == ["ss3", "meltome"]
    q = typed(["experiment=quality_track"])
    assert q.eval.probe_every > 0 and q.train.max_minutes == 480 and q.model.arch == "unet"
    from dataclasses import replace

    from speedrun.probe import check_eval_config

    check_eval_config(q.eval)
    check_eval_config(replace(q.eval, probe_tasks=[MELT], probe_max_sequences=5), load=True)  # loads now
    with pytest.raises(pt.ProbeDataError, match="flip_meltome.zip"):
        check_eval_config(replace(q.eval, probe_tasks=["meltome"], probe_data_dir="/nonexistent"), load=True)
    with pytest.raises(ProbeError, match="eval.probe_layers"):
        check_eval_config(replace(q.eval, probe_layers="first"))
    with pytest.raises(ProbeError, match="probe_every"):
        check_eval_config(replace(q.eval, probe_every=-1))


def _fake_run(tmp_path) -> Path:
    """A run directory with one complete checkpoint of a tiny model, as the trainer leaves it."""
    from speedrun import checkpoint as ckpt
    from speedrun.config import RunConfig, to_dict

    cfg = RunConfig()
    cfg.model = make("model", dim=32, n_layers=2, n_heads=2, mlp_ratio=2.0)
    cfg.data.max_length = 256
    torch.manual_seed(0)
    model = ProteinLM(cfg.model)
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints", 7, model, cfg)
    (run / "summary.json").write_text(json.dumps({"status": "done", "val_loss": 2.5}))
    return run


def _cli(*args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "speedrun.probe", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_cli_writes_json_png_and_summary(tmp_path, capsys):
    from speedrun.probe import main

    run = _fake_run(tmp_path)
    rc = main([str(run), f"tasks=[{SS3},{MELT}]", "layers=all", "max_sequences=12", "baselines=[onehot,random_init]"])
    out = capsys.readouterr().out
    assert rc == 0
    report = json.loads((run / "probe.json").read_text())
    assert report["step"] == 7 and report["settings"]["layers"] == [0, 1, 2]
    assert report["settings"]["max_length"] == 256  # the run's training context
    assert set(report["tasks"]) == {"ss3", "meltome"}
    assert set(report["tasks"]["ss3"]["models"]) == {"trained", "onehot", "random_init"}
    assert "probe/ss3/layer2/test_acc" in report["metrics"]
    assert (run / "probe.png").stat().st_size > 1000
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_loss"] == 2.5 and "probe/ss3/test_acc" in summary and "probe/score" in summary
    assert "probe/ss3/layer0/test_acc" not in summary  # compact: every key is a sweep-report column
    assert "ss3" in out and "random_init" in out
    # a checkpoint folder works too, and out= sends the files elsewhere
    ck = next((run / "checkpoints").glob("step-*"))
    inline = f"{{name: tm, path: {FIX / 'meltome.csv'}, label_column: target, type: regression, split_column: set}}"
    assert main([str(ck), f"tasks=[{inline}]", "layers=last", "baselines=[]", f"out={tmp_path / 'o'}",
                 "plot=false"]) == 0
    report = json.loads((tmp_path / "o" / "probe.json").read_text())
    assert report["settings"]["layers"] == [2] and list(report["tasks"]) == ["tm"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    from speedrun.probe import main

    run = _fake_run(tmp_path)
    for args, words in (([str(run), "taks=[ss3]"], "did you mean tasks"),
                        ([str(run), "tasks=[meltome]", "--data-dir", str(tmp_path / "empty")], "flip_meltome.zip"),
                        ([str(run), f"tasks=[{MELT}]", "layers=[9]"], "out of range"),
                        ([str(run), f"tasks=[{MELT}]", "baselines=[zeros]"], "unknown baseline"),
                        ([str(tmp_path / "nope")], "no such run directory")):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.strip().count("\n") == 0 and words in err, err


@pytest.mark.slow
def test_cli_module_entry_point(tmp_path):
    run = _fake_run(tmp_path)
    r = _cli(str(run), f"tasks=[{SOL}]", "layers=all", "baselines=[onehot]")
    assert r.returncode == 0, r.stderr
    assert "solubility" in r.stdout and (run / "probe.png").exists()
    r = _cli(str(run), f"tasks=[{SOL}]", "--data-dir")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
