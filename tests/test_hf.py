"""Hugging Face folders (speedrun/hf): transformers loads them and computes what speedrun computes.

Tiny models with random weights, written the way speedrun/export.py writes an export (the export
record as meta, then the speedrun.hf writer); no network. Tests that load the folders with
transformers skip only when it is not installed.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from speedrun.config import make, to_dict
from speedrun.hf import tokenizer_files, write_esm2_export, write_remote_code_export
from speedrun.hf.write import TEMPLATE_FILES, HFExportError, template
from speedrun.models import build_model, open_model
from speedrun.vocab import MASK, PAD, TOKENS, encode

from conftest import ROOT

TOL = 1e-5
MAX_LENGTH, WINDOW = 64, 24  # the window binds: sequences here are up to 51 tokens
NEEDS_HF = "transformers is not installed (pip install -e '.[hf]')"
SEQUENCES = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "MSDNE", "ACDEFGHIKLMNPQRSTVWYACDEFGHIKLMNPQRSTVWYACDEFGHI"]
TINY = {"unet": dict(dim=64, n_layers=4, n_heads=2, mlp_ratio=2.0),
        "transformer": dict(dim=64, n_layers=2, n_heads=2, mlp_ratio=2.0, tie_embeddings=True),
        "patch_unet": dict(dim=64, n_layers=4, n_heads=2, mlp_ratio=2.0, n_extra_layers=1),
        "unet_linear_head": dict(arch="unet", dim=64, n_layers=2, n_heads=2, mlp_ratio=2.0, head="linear",
                                 value_embeddings=False, soft_cap=0.0)}


def export_record(cfg) -> dict:
    """What speedrun/export.py puts in config.json."""
    return {"format": "speedrun-plm", "format_version": 1, "architecture": "ProteinLM", "model": to_dict(cfg),
            "vocab": list(TOKENS), "max_length": MAX_LENGTH, "window": WINDOW, "n_params": 0, "step": 7,
            "tokens": 1000, "run": {"name": "tiny"}, "training": {}, "metrics": {}}


def random_model(cfg, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg, MAX_LENGTH)
    with torch.no_grad():  # zero-initialised projections too: every block must matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason=NEEDS_HF)


@pytest.fixture(scope="module", params=list(TINY))
def remote_export(request, tmp_path_factory):
    kw = dict(TINY[request.param])
    cfg = make("model", **{"arch": request.param, **kw})
    folder = tmp_path_factory.mktemp(request.param)
    files = write_remote_code_export(folder, random_model(cfg), export_record(cfg))
    return folder, files


def batch(tokenizer, masked: bool = True) -> dict:
    enc = tokenizer(SEQUENCES, padding=True, return_tensors="pt")
    if masked:
        enc["input_ids"][0, 5] = MASK
        enc["input_ids"][2, 7:9] = MASK
    return enc


def speedrun_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row alone, as speedrun computes a document that starts its stream (rows: padded to max_length)."""
    out = []
    with torch.no_grad():
        for row, m in zip(ids, mask.bool()):
            x = row[m]
            if model.cfg.arch == "patch_unet":
                padded = torch.full((1, MAX_LENGTH), PAD)
                padded[0, : x.numel()] = x
                doc = torch.where(torch.arange(MAX_LENGTH) < x.numel(), 0, -1).to(torch.int32)[None]
                out.append(model.logits(model(padded, doc, WINDOW))[0, : x.numel()])
            else:
                out.append(model.logits(model(x, torch.zeros(x.numel(), dtype=torch.int32), WINDOW)))
    return out


def test_remote_code_export_equals_speedrun(transformers, remote_export):
    folder, files = remote_export
    assert set(files) == {"config.json", "model.safetensors", *TEMPLATE_FILES, *tokenizer_files(MAX_LENGTH)}
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    ours = open_model(folder)
    hf, info = transformers.AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True,
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for masked in (False, True):
        enc = batch(tokenizer, masked)
        with torch.no_grad():
            out = hf.eval()(**enc, output_hidden_states=True)
        want = speedrun_logits(ours, enc["input_ids"], enc["attention_mask"])
        got = [z[m.bool()] for z, m in zip(out.logits, enc["attention_mask"])]
        assert out.logits.dtype == torch.float32
        assert max((a - b).abs().max().item() for a, b in zip(got, want)) <= TOL
    assert len(out.hidden_states) == len(ours.blocks) + 1
    assert out.hidden_states[0].shape == out.hidden_states[-1].shape == (*enc["input_ids"].shape, ours.cfg.dim)


def test_automodel_gives_the_final_normed_states(transformers, remote_export):
    folder, _ = remote_export
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    enc = batch(tokenizer)
    base = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    mlm = transformers.AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        h = base(**enc).last_hidden_state
        full = mlm(**enc, output_hidden_states=True, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0,
                                                                                       -100))
        tup = mlm(**enc, return_dict=False)
    assert torch.equal(h, full.hidden_states[-1]) and torch.isfinite(full.loss)
    assert torch.equal(tup[0], full.logits)  # no labels: the tuple starts with the logits
    pooled = (h * enc["attention_mask"][..., None]).sum(1) / enc["attention_mask"].sum(1, keepdim=True)
    assert pooled.shape == (len(SEQUENCES), h.size(-1))


def test_padding_does_not_change_a_sequence(transformers, remote_export):
    folder, _ = remote_export
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    mlm = transformers.AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True).eval()
    alone = tokenizer(SEQUENCES[1], return_tensors="pt")
    enc = batch(tokenizer, masked=False)
    with torch.no_grad():
        a = mlm(**alone).logits[0]
        b = mlm(**enc).logits[1, : a.size(0)]
    assert (a - b).abs().max().item() <= TOL


def test_the_export_record_stays_readable(remote_export):
    folder, _ = remote_export
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "speedrun-plm" and config["window"] == WINDOW and config["step"] == 7
    assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_speedrun_plm.SpeedrunPLMForMaskedLM"
    model = open_model(folder)
    assert model.meta["max_length"] == MAX_LENGTH and model.cfg.arch == config["model"]["arch"]


def test_tokenizer_gives_our_ids(transformers, tmp_path):
    for name, text in tokenizer_files(MAX_LENGTH).items():
        (tmp_path / name).write_text(text)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(tokenizer).__name__ == "EsmTokenizer" and len(tokenizer) == len(TOKENS)
    for seq in SEQUENCES + ["MKX-UZ.B"]:
        assert tokenizer(seq)["input_ids"] == encode(seq).tolist()
    assert tokenizer.mask_token_id == MASK and tokenizer.pad_token_id == PAD


def test_esm2_export_is_a_native_esm_folder(transformers, tmp_path):
    cfg = make("model", arch="esm2", dim=64, n_layers=2, n_heads=4, ffn_dim=128)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    record = {**export_record(cfg), "architecture": "ESM2"}
    files = write_esm2_export(tmp_path, model, record)
    assert set(files) == {"config.json", "model.safetensors", *tokenizer_files(MAX_LENGTH)}
    assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    hf = transformers.EsmForMaskedLM.from_pretrained(tmp_path).eval()
    ours = open_model(tmp_path)
    assert ours.meta["step"] == 7 and ours.meta["window"] == WINDOW
    enc = batch(tokenizer)
    with torch.no_grad():
        z = hf(**enc).logits
    lengths = enc["attention_mask"].sum(1).tolist()
    ids = torch.cat([row[:n] for row, n in zip(enc["input_ids"], lengths)])
    doc_ids = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])
    with torch.no_grad():  # one packed stream: positions and token dropout per document
        mine = ours.logits(ours(ids, doc_ids, 1024)).split(lengths)
    assert max((z[i, :n] - mine[i]).abs().max().item() for i, n in enumerate(lengths)) <= TOL


def test_each_writer_refuses_the_other_kind(tmp_path):
    esm = build_model(make("model", arch="esm2", dim=64, n_layers=1, n_heads=4))
    unet = build_model(make("model", arch="unet", dim=64, n_layers=2, n_heads=2))
    with pytest.raises(HFExportError, match="write_esm2_export"):
        write_remote_code_export(tmp_path, esm, {})
    with pytest.raises(HFExportError, match="write_remote_code_export"):
        write_esm2_export(tmp_path, unet, {})


def test_the_template_is_self_contained_and_nothing_imports_transformers():
    for name in TEMPLATE_FILES:  # torch, transformers and its sibling file only
        assert not re.search(r"^\s*(import|from)\s+speedrun\b", template(name), re.M), name
    code = ("import sys, speedrun.hf, speedrun.models.esm2, speedrun.models.load; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_quick_start_run_exports_to_transformers_with_equal_logits(transformers, tmp_path):
    """The issue's bar: `python -m speedrun.export RUN --out DIR` of a quick-start-like run (unet_tiny on
    the embedded sample) loads with AutoModelForMaskedLM(trust_remote_code=True), logits equal speedrun.load's."""
    import subprocess
    import sys

    import speedrun
    from conftest import ROOT, TINY, typed
    from speedrun.train import run

    run_dir = tmp_path / "run"
    assert run(typed(TINY + ["train.max_steps=3"]), run_dir)["status"] == "done"
    out = tmp_path / "export"
    r = subprocess.run([sys.executable, "-m", "speedrun.export", str(run_dir), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True).eval()
    ours = speedrun.load(out)
    seqs = ["MKTAYIAKQRQISFVKSHFSRQ", "MSEQNNTEMTFQIQRIYTKDISFEAPNAPHVFQKDW"]
    enc = tok(seqs, return_tensors="pt", padding=True)
    with torch.no_grad():
        theirs = hf(**enc).logits
    window = ours.meta["window"]  # the export's final training window (256 here), which the HF side uses too
    for i in range(len(seqs)):
        n = int(enc["attention_mask"][i].sum())
        ids = enc["input_ids"][i, :n]
        with torch.no_grad():
            mine = ours.logits(ours(ids, torch.zeros(n, dtype=torch.int32), window))
        assert (mine - theirs[i, :n]).abs().max() <= 1e-5
