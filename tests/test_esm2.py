"""ESM-2 as model.arch=esm2: equal to transformers' EsmForMaskedLM, on packed streams, both ways.

The comparisons build a tiny EsmForMaskedLM with random weights locally (no network) and skip only
when transformers is not installed; the rest (presets, parameter groups, positions) needs torch only.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from speedrun.config import ConfigError, make
from speedrun.models.esm2 import (ESM2, PRESETS, count_params, hf_config, hf_state_dict, load_hf_weights,
                                  open_hf_folder, segments)
from speedrun.vocab import CLS, EOS, MASK, PAD

from conftest import CONF

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
TOL = 1e-5
NEEDS_HF = "transformers is not installed (pip install -e '.[hf]')"


def tiny_cfg():
    return make("model", arch="esm2", dim=64, n_layers=2, n_heads=4, ffn_dim=128)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A saved EsmForMaskedLM (ESM-2 settings, tiny) with random weights, biases and norms perturbed."""
    transformers = pytest.importorskip("transformers", reason=NEEDS_HF)
    config = transformers.EsmConfig(vocab_size=33, position_embedding_type="rotary", token_dropout=True,
                                    mask_token_id=MASK, pad_token_id=PAD, layer_norm_eps=1e-5,
                                    emb_layer_norm_before=False, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0, max_position_embeddings=258, **TINY)
    torch.manual_seed(0)
    model = transformers.EsmForMaskedLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("esm_tiny")
    model.save_pretrained(folder)
    return folder, model.eval()


def documents(masked: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    docs = [torch.cat([torch.tensor([CLS]), torch.randint(4, 24, (n,), generator=g), torch.tensor([EOS])])
            for n in (9, 17, 4)]
    if masked:  # different mask ratios per document: token dropout's scale is per sequence
        docs[0][[2, 5, 6]] = MASK
        docs[1][3] = MASK
    return docs


def stream(docs: list[torch.Tensor], pad: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat([*docs, torch.full((pad,), PAD)])
    doc_ids = torch.cat([*(torch.full((d.numel(),), i, dtype=torch.int32) for i, d in enumerate(docs)),
                         torch.full((pad,), -1, dtype=torch.int32)])
    return ids, doc_ids


def our_logits(model: ESM2, docs: list[torch.Tensor]) -> list[torch.Tensor]:
    ids, doc_ids = stream(docs)
    model.set_attention_backend(torch.device("cpu"))
    with torch.no_grad():
        z = model.logits(model(ids, doc_ids, 256))
    return list(z[: sum(d.numel() for d in docs)].split([d.numel() for d in docs]))


def their_logits(hf_model, docs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per sequence, as one padded batch with an attention mask."""
    L = max(d.numel() for d in docs)
    ids = torch.full((len(docs), L), PAD)
    mask = torch.zeros(len(docs), L, dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : d.numel()], mask[i, : d.numel()] = d, 1
    with torch.no_grad():
        z = hf_model(input_ids=ids, attention_mask=mask).logits
    return [z[i, : d.numel()] for i, d in enumerate(docs)]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "masked"])
def test_open_hf_folder_equals_transformers_per_document(hf_folder, masked):
    folder, hf_model = hf_folder
    model, meta = open_hf_folder(folder)
    assert meta["max_length"] == 256 and model.meta is meta and model.cfg.token_dropout
    docs = documents(masked)
    assert max_diff(our_logits(model.eval(), docs), their_logits(hf_model, docs)) <= TOL


def test_open_model_reads_an_hf_esm_folder(hf_folder):
    from speedrun.models import open_model

    folder, hf_model = hf_folder
    model = open_model(folder)
    assert isinstance(model, ESM2) and not model.training and model.meta["format"] == "hf-esm"
    docs = documents(True)
    assert max_diff(our_logits(model, docs), their_logits(hf_model, docs)) <= TOL


def test_load_hf_weights_into_a_configured_model(hf_folder):
    folder, hf_model = hf_folder
    model = ESM2(tiny_cfg())
    load_hf_weights(model, folder)
    docs = documents(True)
    assert max_diff(our_logits(model.eval(), docs), their_logits(hf_model, docs)) <= TOL


def test_pytorch_model_bin_and_what_is_not_esm2(hf_folder, tmp_path):
    from safetensors.torch import load_file

    from speedrun.models.load import ModelLoadError

    folder, hf_model = hf_folder
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(load_file(str(folder / "model.safetensors")), tmp_path / "pytorch_model.bin")
    model, _ = open_hf_folder(tmp_path)  # read with torch.load(weights_only=True)
    docs = documents(True)
    assert max_diff(our_logits(model.eval(), docs), their_logits(hf_model, docs)) <= TOL
    (tmp_path / "config.json").write_text(json.dumps({**config, "position_embedding_type": "absolute"}))
    with pytest.raises(ModelLoadError, match="only ESM-2"):
        open_hf_folder(tmp_path)


def test_load_hf_weights_refuses_other_dims_naming_the_preset(tmp_path):
    config = {**hf_config(make("model", arch="esm2", dim=480, n_layers=12, n_heads=20))}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="model=esm2_35m") as err:
        load_hf_weights(ESM2(tiny_cfg()), tmp_path)
    assert len(str(err.value).splitlines()) == 1
    config.update(hidden_size=160, intermediate_size=640)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="model.dim=160 "):
        load_hf_weights(ESM2(tiny_cfg()), tmp_path)


def test_hf_state_dict_and_config_load_back_into_transformers(hf_folder, tmp_path):
    transformers = pytest.importorskip("transformers", reason=NEEDS_HF)
    from safetensors.torch import save_file

    folder, hf_model = hf_folder
    model, _ = open_hf_folder(folder)
    save_file(hf_state_dict(model), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model.cfg, max_length=256)))
    back, info = transformers.EsmForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    # what transformers initialises itself: the contact head (ESM2 has none) and, in 4.x, the absolute
    # position table that rotary models build but never use
    assert not info["unexpected_keys"] and set(info["missing_keys"]) <= {
        "esm.contact_head.regression.weight", "esm.contact_head.regression.bias",
        "esm.embeddings.position_embeddings.weight"}
    docs = documents(True)
    assert max_diff(their_logits(back.eval(), docs), their_logits(hf_model, docs)) == 0.0


# ---- without transformers -----------------------------------------------------------------------
def test_presets_match_the_yaml_files_and_count_like_transformers():
    from omegaconf import OmegaConf

    from speedrun.config import ESM2Config

    for name, dims in PRESETS.items():
        raw = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml"))
        cfg = ESM2Config(**{k: v for k, v in raw.items() if k != "defaults"})
        assert (cfg.dim, cfg.n_layers, cfg.n_heads) == dims, name
    # transformers' EsmForMaskedLM counts 6·20 + 1 more: its contact head, which ESM2 has not
    assert count_params(make("model", arch="esm2")) == 7_512_353
    assert count_params(make("model", arch="esm2", dim=1280, n_layers=33)) == 651_042_593


def test_positions_restart_in_every_document():
    doc_ids = torch.tensor([0, 0, 0, 1, 1, 2, -1, -1], dtype=torch.int32)
    seg, pos = segments(doc_ids)
    assert seg.tolist() == [0, 0, 0, 1, 1, 2, 3, 3]
    assert pos.tolist() == [0, 1, 2, 0, 1, 0, 0, 1]


def test_parameter_groups_and_a_training_step():
    from speedrun.config import MuonConfig
    from speedrun.optim import build_optimizers, param_groups

    torch.manual_seed(0)
    model = ESM2(tiny_cfg())
    groups = {k: [n for n, _ in v] for k, v in param_groups(model).items()}
    assert groups["embed"] == ["embed.weight"]  # the tied decoder trains with the embeddings
    assert all(n.startswith("lm_head.") for n in groups["head"]) and len(groups["head"]) == 5
    assert len(groups["hidden"]) == 2 * 6 and all(n.endswith(".weight") for n in groups["hidden"])
    assert model.embed.weight[PAD].abs().sum() == 0 and model.lm_head.decoder.weight is model.embed.weight
    ids, doc_ids = stream(documents(True))
    model.set_attention_backend(torch.device("cpu"))
    opts = build_optimizers(model, MuonConfig(), torch.device("cpu"))
    before = model.blocks[0].attn.q.weight.detach().clone()
    loss = torch.nn.functional.cross_entropy(model.logits(model(ids, doc_ids, 256)), ids)
    loss.backward()
    for opt in opts:
        opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.blocks[0].attn.q.weight)
    with torch.no_grad():
        h = model(ids, doc_ids, 256, dtype=torch.bfloat16)
    assert h.dtype == torch.bfloat16 and model.logits(h).dtype == torch.float32


def test_speedrun_embed_gives_transformers_hidden_states(hf_folder):
    """speedrun.embed on ESM2: layer 0 is the embedding output, layer k the k-th block's (transformers'
    hidden_states[k] below the last, which transformers gives after the final LayerNorm)."""
    from speedrun.embed import embed
    from speedrun.vocab import encode

    folder, hf_model = hf_folder
    model, _ = open_hf_folder(folder)
    seqs = ["MKTAYIAKQRQISFVKSHFSRQ", "MSDNE"]
    ours = embed(model, seqs, layer=[0, 1], pool="none", max_length=256)
    for i, seq in enumerate(seqs):
        with torch.no_grad():
            states = hf_model(torch.from_numpy(encode(seq)).long()[None], output_hidden_states=True).hidden_states
        for layer in (0, 1):
            assert (ours[layer][i] - states[layer][0, 1:-1]).abs().max().item() <= TOL


# ---- through the trainer: init_from, training, export back to EsmForMaskedLM (issue 19's bar) ----------
def _esm_run_cfg(folder, *extra):
    from conftest import typed

    return typed(["model=esm2_8m", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=128",
                  f"init_from={folder}", "hardware.micro_batch_tokens=1024", "data.max_length=256",
                  "train.window_start=256", "eval.every_steps=0", "eval.max_tokens=3000", *extra])


def test_init_from_an_esm_folder_trains_and_exports_a_native_esm(hf_folder, tmp_path):
    transformers = pytest.importorskip("transformers", reason=NEEDS_HF)
    from speedrun.export import export
    from speedrun.models import build_model
    from speedrun.models.load import init_from
    from speedrun.train import run

    folder, hf_model = hf_folder
    cfg = _esm_run_cfg(folder, "train.max_steps=3", "optimizer=adamw", "optimizer.lr=1e-4",
                       "eval.probe_every=3", f"eval.probe_tasks=[meltome@{CONF.parent / 'tests/fixtures/probes/meltome.csv'}]",
                       "eval.probe_max_sequences=20")  # the in-training probes read ESM-2's layer states too
    fresh = build_model(cfg.model)
    init_from(fresh, str(folder))  # before training: our forward is theirs
    docs = documents(masked=True)
    for ours, theirs in zip(our_logits(fresh.eval(), docs), their_logits(hf_model, docs)):
        assert (ours - theirs).abs().max() <= TOL
    summary = run(cfg, tmp_path / "run")
    assert summary["status"] == "done" and summary["n_params"] == fresh.num_params()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(math.isfinite(r.get("probe/score", math.nan)) for r in rows)
    out = export(tmp_path / "run", tmp_path / "export")
    assert not (out / "modeling_speedrun_plm.py").exists()  # native: no remote code
    card = (out / "README.md").read_text()
    assert "None" not in card and "trust_remote_code" not in card and "ESM-2" in card
    back = transformers.EsmForMaskedLM.from_pretrained(out).eval()
    import speedrun

    mine = speedrun.load(out)
    for ours, theirs in zip(our_logits(mine, docs), their_logits(back, docs)):
        assert (ours - theirs).abs().max() <= TOL
    trained = our_logits(mine, docs)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(trained, their_logits(hf_model, docs)))  # it trained


def test_init_from_a_folder_of_another_size_names_the_preset(hf_folder):
    from conftest import typed
    from speedrun.models import build_model
    from speedrun.models.load import init_from

    folder, _ = hf_folder
    model = build_model(typed(["model=esm2_8m"]).model)  # 320 wide: the folder is 64 wide
    with pytest.raises(ConfigError) as err:
        init_from(model, str(folder))
    assert "\n" not in str(err.value)
