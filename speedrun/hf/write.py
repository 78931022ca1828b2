"""The two Hugging Face export folders, written file by file with fsutil.atomic_write.

`write_remote_code_export(out, model, meta)` (unet, transformer, patch_unet) and
`write_esm2_export(out, model, meta)` (esm2) write every file of the folder but the model card, and
return their names; speedrun/export.py calls one of them and adds README.md. `meta` is the export
record of speedrun/export.py (format, model, max_length, window, step, tokens, run, training,
metrics, ...).

Remote code: config.json is the export record as it is (speedrun.load reads `format` and `model`)
plus what transformers needs (`model_type`, `architectures`, `auto_map`, sizes, token ids,
`tie_word_embeddings`); model.safetensors keeps speedrun's parameter names (tied tensors once, under
the name safetensors.torch.save_model keeps, so both loaders find them). ESM-2: config.json is an
EsmConfig with the export record under `speedrun` (not `format`: speedrun.load must take the folder
for what it is, an HF ESM folder), model.safetensors has transformers' names.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
import torch.nn as nn

from ..config import to_dict
from ..errors import SpeedrunError
from ..fsutil import atomic_write, json_clean
from ..vocab import EOS, MASK, PAD
from .tokenizer import tokenizer_files

REMOTE_CODE_ARCHS = ("unet", "transformer", "patch_unet")
TEMPLATE_FILES = ("configuration_speedrun_plm.py", "modeling_speedrun_plm.py")
AUTO_MAP = {"AutoConfig": "configuration_speedrun_plm.SpeedrunPLMConfig",
            "AutoModel": "modeling_speedrun_plm.SpeedrunPLMModel",
            "AutoModelForMaskedLM": "modeling_speedrun_plm.SpeedrunPLMForMaskedLM"}


class HFExportError(SpeedrunError):
    """A model that this kind of Hugging Face folder cannot hold. One line naming the other kind."""


def template(name: str) -> str:
    """A file of the modeling template shipped in speedrun/hf/template/."""
    return resources.files(__package__).joinpath("template", name).read_text()


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once (a tied decoder), under the sorted-first of its names:
    the one safetensors.torch.save_model keeps, which safetensors.torch.load_model (speedrun.load) and
    transformers' tying expect."""
    state = model.state_dict()
    names: dict[tuple, list[str]] = {}
    for name, t in state.items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else (name,)
        names.setdefault(key, []).append(name)
    return {sorted(group)[0]: state[sorted(group)[0]] for group in names.values()}


def safetensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata={"format": "pt"})


def _max_length(model: nn.Module, meta: dict) -> int:
    return int(meta.get("max_length") or getattr(model, "max_length", 1024))


def _write(out: Path, files: dict[str, bytes | str]) -> list[str]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():  # config.json last: a folder with it is complete
        atomic_write(out / name, data)
    return list(files)


def remote_code_config(model: nn.Module, meta: dict) -> dict:
    """The export record plus transformers' keys, for AutoConfig / AutoModel* with trust_remote_code."""
    cfg = model.cfg
    max_length = _max_length(model, meta)
    return {**meta, "model": {**meta.get("model", {}), **to_dict(cfg)}, "max_length": max_length,
            "window": int(meta.get("window") or max_length), "model_type": "speedrun_plm",
            "architectures": ["SpeedrunPLMForMaskedLM"], "auto_map": AUTO_MAP, "hidden_size": cfg.dim,
            "num_hidden_layers": len(model.blocks), "num_attention_heads": cfg.n_heads, "vocab_size": cfg.vocab_size,
            "pad_token_id": PAD, "mask_token_id": MASK, "eos_token_id": EOS,
            "tie_word_embeddings": bool(cfg.tie_embeddings), "torch_dtype": "float32"}


def write_remote_code_export(out: Path, model: nn.Module, meta: dict) -> list[str]:
    """config.json, model.safetensors, the modeling template and the tokenizer files of a unet,
    transformer or patch_unet model into `out`; returns the file names written."""
    if model.cfg.arch not in REMOTE_CODE_ARCHS:
        raise HFExportError(f"model.arch={model.cfg.arch} has no remote-code export (it has: "
                            f"{', '.join(REMOTE_CODE_ARCHS)}); esm2 exports as a native EsmForMaskedLM folder "
                            "(write_esm2_export)")
    config = remote_code_config(model, meta)
    files = {"model.safetensors": safetensors_bytes(unique_state_dict(model)),
             **{name: template(name) for name in TEMPLATE_FILES}, **tokenizer_files(config["max_length"]),
             "config.json": json.dumps(json_clean(config), indent=2) + "\n"}
    return _write(out, files)


def write_esm2_export(out: Path, model: nn.Module, meta: dict) -> list[str]:
    """config.json (EsmConfig), model.safetensors (transformers' names) and the tokenizer files of an
    esm2 model into `out`, a folder EsmForMaskedLM loads without remote code; returns the file names."""
    from ..models.esm2 import hf_config, hf_state_dict

    if model.cfg.arch != "esm2":
        raise HFExportError(f"model.arch={model.cfg.arch} is not ESM-2: write its folder with "
                            "write_remote_code_export")
    max_length = _max_length(model, meta)
    config = {**hf_config(model.cfg, max_length), "speedrun": {k: v for k, v in meta.items() if k != "format"}}
    files = {"model.safetensors": safetensors_bytes(hf_state_dict(model)), **tokenizer_files(max_length),
             "config.json": json.dumps(json_clean(config), indent=2) + "\n"}
    return _write(out, files)


__all__ = ["AUTO_MAP", "HFExportError", "REMOTE_CODE_ARCHS", "TEMPLATE_FILES", "remote_code_config",
           "safetensors_bytes", "template", "unique_state_dict", "write_esm2_export", "write_remote_code_export"]
