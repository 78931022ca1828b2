"""Hugging Face export: files, model card, exact round trip, tied weights, push and hub loading against
local stand-ins (never the network)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import speedrun
from speedrun import checkpoint as ckpt
from speedrun.config import RunConfig, make, to_dict
from speedrun.embed import embed
from speedrun.export import ExportError, export, load, main, push
from speedrun.models.unet import ProteinLM
from speedrun.vocab import encode

SECRET = "hf_EXPORT_TOKEN_MUST_NOT_LEAK_42"
SEQS = ["MKTAYIAKQRQISFVKSHFSRQ", "MSDNELLKV", "GAVLIPFWMSTCYNQDEKRH"]


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained run directory (3 steps of unet_tiny on the embedded sample)."""
    from conftest import TINY, typed
    from speedrun.train import run

    with pytest.MonkeyPatch.context() as mp:  # the same tokenized-sample cache as conftest's fixture
        mp.setenv("SPEEDRUN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        torch.set_num_threads(1)
        run_dir = tmp_path_factory.mktemp("run")
        summary = run(typed(TINY + ["train.max_steps=3"]), run_dir)
    assert summary["status"] == "done"
    return run_dir


def _batch():
    ids = torch.from_numpy(__import__("numpy").concatenate([encode(s) for s in SEQS])).long()
    doc = torch.cat([torch.full((len(s) + 2,), i, dtype=torch.int32) for i, s in enumerate(SEQS)])
    return ids, doc


def _logits(model, window=256):
    ids, doc = _batch()
    with torch.no_grad():
        return model.logits(model(ids, doc, window))


def _from_checkpoint(run_dir: Path) -> ProteinLM:
    from speedrun.models.load import load_weights

    saved = ckpt.read(ckpt.find(run_dir / "checkpoints"))
    model = ProteinLM(make("model", **saved.config["model"]))
    load_weights(model, saved.weights)
    return model.eval()


def test_export_writes_config_weights_and_card(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    out = export(trained, tmp_path / "out")
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert {"README.md", "config.json", "model.safetensors", "modeling_speedrun_plm.py", "vocab.txt"} <= set(names)
    meta = json.loads((out / "config.json").read_text())
    summary = json.loads((trained / "summary.json").read_text())
    assert meta["format"] == "speedrun-plm" and meta["model"]["dim"] == 64 and len(meta["vocab"]) == 33
    assert meta["n_params"] == summary["n_params"] and meta["step"] == 3 and meta["run"]["checkpoint"] == "step-000003"
    assert meta["metrics"]["val_loss"] == pytest.approx(summary["val_loss"])
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: speedrun-plm" in card
    assert f"{summary['n_params']:,}" in card and f"{summary['val_loss']:.4f}" in card
    assert "Swiss-Prot" in card and "train time" in card and "AutoModelForMaskedLM" in card
    for p in out.iterdir():
        assert SECRET.encode() not in p.read_bytes()


def test_round_trip_gives_identical_logits(trained, tmp_path):
    ref = _from_checkpoint(trained)
    out = export(trained, tmp_path / "out")
    for source in (out, trained, ckpt.latest(trained / "checkpoints"), str(out)):
        model = speedrun.load(source)
        assert isinstance(model, ProteinLM) and not model.training
        assert model.state_dict().keys() == ref.state_dict().keys()
        assert torch.equal(_logits(model), _logits(ref)), source


def test_loaded_model_embeds(trained, tmp_path):
    model = load(export(trained, tmp_path / "out"))
    got = model.embed(SEQS, layer=1, pool="mean")
    assert got.shape == (3, 64)
    assert torch.equal(got, embed(model, SEQS, layer=1, pool="mean", max_length=256))
    per_res = model.embed(SEQS, layer=-1, pool="none")
    assert [t.shape[0] for t in per_res] == [len(s) for s in SEQS]
    ids = torch.tensor([0, 5, 6, 2])  # the token-embedding lookup still works as in ProteinLM
    assert torch.equal(model.embed(ids), model.embed.weight[ids])
    assert isinstance(model.embed.weight, torch.nn.Parameter)


def test_tied_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = RunConfig(model=make("model", dim=32, n_layers=2, n_heads=2, tie_embeddings=True))
    model = ProteinLM(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    ckpt.save(tmp_path / "run" / "checkpoints", 7, model, config={"run": to_dict(cfg), "model": to_dict(cfg.model)},
              trainer_state={"step": 7, "tokens": 70}, tensors={})
    out = export(tmp_path / "run", tmp_path / "out")  # no summary.json: the card says so
    assert "No validation metrics" in (out / "README.md").read_text()
    loaded = load(out)
    assert loaded.lm_head.decoder.weight is loaded.embed.weight
    assert torch.equal(_logits(loaded, 64), _logits(model.eval(), 64))


def test_push_uses_the_env_token_and_hub_loading_uses_snapshot_download(trained, tmp_path, monkeypatch):
    import huggingface_hub

    hub = tmp_path / "hub"
    calls = []

    class FakeApi:
        def __init__(self, token=None, **kw):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, **kw):
            calls.append(("upload_folder", repo_id, sorted(allow_patterns)))
            (hub / repo_id).mkdir(parents=True)
            for name in allow_patterns:
                shutil.copy(Path(folder_path) / name, hub / repo_id / name)
            return type("CommitInfo", (), {"commit_url": f"https://hub.invalid/{repo_id}/commit/1"})()

    def fake_snapshot_download(repo_id, **kw):
        calls.append(("snapshot_download", repo_id, kw.get("allow_patterns")))
        return str(hub / repo_id)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    out = tmp_path / "out"
    assert main([str(trained), "--out", str(out), "--push", "someone/tiny-plm"]) == 0
    assert calls[0] == ("init", SECRET)
    assert calls[1][0] == "create_repo" and calls[1][1] == "someone/tiny-plm" and calls[1][2]["exist_ok"] is True
    assert calls[2][:2] == ("upload_folder", "someone/tiny-plm")
    assert {"README.md", "config.json", "model.safetensors", "modeling_speedrun_plm.py"} <= set(calls[2][2])
    for p in list(out.iterdir()) + list((hub / "someone/tiny-plm").iterdir()):
        assert SECRET.encode() not in p.read_bytes()
    model = speedrun.load("someone/tiny-plm")
    assert calls[-1][:2] == ("snapshot_download", "someone/tiny-plm")
    patterns = calls[-1][2]
    assert {"config.json", "model.safetensors"} <= set(patterns) and not any(".py" in x for x in patterns)
    assert torch.equal(_logits(model), _logits(_from_checkpoint(trained)))


def test_errors_are_one_line(trained, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    with pytest.raises(ExportError, match="not a Hub repo id"):
        load(str(tmp_path / "missing"))
    with pytest.raises(ExportError, match="holds no complete checkpoint"):
        load(empty)
    (empty / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ExportError, match="is neither a run directory"):
        load(empty)

    def offline_hub(repo_id, **kw):
        raise OSError("we are offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline_hub)
    with pytest.raises(ExportError, match="cannot download someone/absent from the Hugging Face Hub"):
        load("someone/absent")
    with pytest.raises(ExportError, match="is not a torch device"):
        load(trained, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ExportError, match="no CUDA GPU is visible: load with device='cpu'"):
            load(trained, device="cuda")
    out = export(trained, tmp_path / "out")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ExportError, match="HF_TOKEN"):
        push(out, "someone/tiny-plm")
