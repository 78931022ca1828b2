"""`open_model(source)`: the one model loader (export, probe, generate, embed, speedrun.load).

A source is a run directory (its newest checkpoint that verifies), a checkpoint folder, an export
folder (`python -m speedrun.export`), a Hugging Face ESM-2 folder (EsmForMaskedLM: config.json with
model_type esm), or a hub repo id (`owner/name`, fetched with huggingface_hub). Only JSON and
safetensors are read (a 0.1 checkpoint's config comes from its state.pt through weights_only loading,
see speedrun/checkpoint.py): loading a model never runs code from a file.

The model comes back in eval mode on `device` (default CPU), with the attention back-end picked for
that device and `model.meta` describing where it came from: the model config, the training config,
max_length and the final window, step and tokens.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..errors import SpeedrunError
from . import build_model
from .unet import ProteinLM

EXPORT_FORMAT = "speedrun-plm"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ModelLoadError(SpeedrunError):
    """A source that holds no loadable model. One line naming the path and the fix."""


def _json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def final_window(run_cfg: dict) -> int:
    """The sliding window at the end of training (train.window_end, default data.max_length)."""
    train, data = run_cfg.get("train", {}) or {}, run_cfg.get("data", {}) or {}
    end = train.get("window_end")
    return int(end if end is not None else data.get("max_length", 1024))


def model_config(d: dict):
    """The model dataclass of a saved model config (either version); one line when it does not fit."""
    from dataclasses import fields

    from ..config import ConfigError, make, migrate_legacy, option_class

    try:
        d = migrate_legacy({"model": dict(d)})["model"]
        known = {f.name for f in fields(option_class("model", d.get("arch", "unet")))}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelLoadError(f"the model config has keys this version of speedrun does not know "
                                 f"({', '.join(unknown)}): upgrade speedrun-plm")
        cfg = make("model", **d)
        cfg.check()
    except ConfigError as exc:
        raise ModelLoadError(str(exc)) from None
    cfg.attention = "auto"  # every back-end computes the same mask: pick what the device has
    return cfg


def checkpoint_of(path: Path, checkpoint: Optional[str] = None) -> Path:
    """The checkpoint folder a run directory or checkpoint folder stands for (verified)."""
    from .. import checkpoint as ckpt

    if checkpoint:
        ck = Path(checkpoint)
        ck = ck if ck.is_absolute() or ck.exists() else path / "checkpoints" / checkpoint
    elif (path / ckpt.MARKER).exists():
        ck = path
    else:
        ck = ckpt.find(path / "checkpoints")
        if ck is None:
            raise ModelLoadError(f"{path} holds no complete checkpoint (checkpoints/step-*/COMPLETE): let the run "
                                 "finish (checkpoint.final=true) or resume it first")
    try:
        ckpt.verify(ck)
    except ckpt.CheckpointError as exc:
        raise ModelLoadError(str(exc)) from None
    return ck


def load_weights(model: nn.Module, weights: Path) -> None:
    from safetensors.torch import load_model

    try:
        load_model(model, str(weights), strict=True)
    except Exception as exc:  # noqa: BLE001 - a wrong shape, a missing key, a damaged file: one line
        raise ModelLoadError(f"cannot load {weights}: {str(exc).strip().splitlines()[0]}") from None


def _from_checkpoint(path: Path, checkpoint: Optional[str]):
    from .. import checkpoint as ckpt

    ck = checkpoint_of(path, checkpoint)
    try:
        saved = ckpt.read(ck)
    except ckpt.CheckpointError as exc:
        raise ModelLoadError(str(exc)) from None
    run_cfg = saved.config
    if "model" not in run_cfg:
        raise ModelLoadError(f"{ck} holds no run config: it was not written by speedrun's trainer")
    meta = {"format": EXPORT_FORMAT, "model": run_cfg["model"], "training": run_cfg,
            "max_length": int(run_cfg.get("data", {}).get("max_length", 1024)), "window": final_window(run_cfg),
            "step": saved.trainer_state.get("step"), "tokens": saved.trainer_state.get("tokens"),
            "checkpoint": str(ck), "run": {"checkpoint": ck.name}}
    return meta, saved.weights


def _describe(path: Path):
    """(meta, weights) for a local folder, or None when it is an HF ESM folder."""
    config = _json(path / "config.json")
    if config.get("format") == EXPORT_FORMAT and (path / "model.safetensors").exists():
        return config, path / "model.safetensors"
    if config.get("model_type") == "esm":
        return None
    if path.is_dir() and ((path / "COMPLETE").exists() or (path / "checkpoints").is_dir() or not config):
        return "checkpoint"  # a checkpoint folder or a run directory (its checkpoints say the rest)
    raise ModelLoadError(f"{path} is neither a run directory, a checkpoint folder, an export folder "
                         "(config.json + model.safetensors) nor a Hugging Face ESM-2 folder")


def _hub(source: str, revision: Optional[str]) -> Path:
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(
            repo_id=source, repo_type="model", revision=revision,
            allow_patterns=["config.json", "model.safetensors", "*.txt", "*.json"]))
    except Exception as exc:  # noqa: BLE001 - not found, gated, offline...: one line naming the repo
        raise ModelLoadError(f"cannot download {source} from the Hugging Face Hub: {type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None


def _target_device(device) -> torch.device:
    """The device to load onto, checked before any weights are read (one line when it is not there)."""
    if device is None:
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"device={device!r} is not a torch device: use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError("device='cuda' but no CUDA GPU is visible: load with device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device={str(device)!r} but {torch.cuda.device_count()} GPU(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("device='mps' but MPS is not available: load with device='cpu'")
    return device


def open_model(source, *, device=None, revision: Optional[str] = None, checkpoint: Optional[str] = None):
    """A trained model in eval mode on `device`, with `.meta`; see the module docstring."""
    device = _target_device(device)
    path = Path(source)
    if not path.exists():
        if isinstance(source, str) and _REPO_ID.match(source) and not source.startswith((".", "/", "~")):
            return open_model(_hub(source, revision), device=device, checkpoint=checkpoint)
        raise ModelLoadError(f"{source}: no such folder, and not a Hub repo id (owner/name)")
    found = _describe(path) if not checkpoint else "checkpoint"
    if found is None:
        from .esm2 import open_hf_folder

        model, meta = open_hf_folder(path)
    else:
        meta, weights = _from_checkpoint(path, checkpoint) if found == "checkpoint" else found
        cfg = model_config(meta["model"])
        model = pretrained(cfg, meta)
        load_weights(model, weights)
    model.to(device)
    model.set_attention_backend(device)
    return model.eval()


# ---- what speedrun.load() gives for the ProteinLM family: .embed(sequences) -------------------------
class _EmbedAccessor:
    """`model.embed`: the token-embedding module for tensors and attributes, `speedrun.embed.embed(model,
    ...)` for sequences."""

    __slots__ = ("_model",)

    def __init__(self, model):
        object.__setattr__(self, "_model", model)

    def __call__(self, x, *args, **kwargs):
        if isinstance(x, torch.Tensor):
            return self._model._modules["embed"](x, *args, **kwargs)
        from ..embed import embed

        kwargs.setdefault("max_length", self._model.max_length)
        return embed(self._model, x, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model._modules["embed"], name)

    def __setattr__(self, name, value):
        setattr(self._model._modules["embed"], name, value)

    def __repr__(self) -> str:
        return repr(self._model._modules["embed"])


class PretrainedProteinLM(ProteinLM):
    """A ProteinLM from speedrun.load(): same parameters, state-dict keys, forward and logits;
    `.embed(sequences, layer=..., pool=...)` computes embeddings (speedrun.embed, `max_length` defaulting
    to the training crop), `.embed(token_ids)` is the token-embedding lookup; `.meta` says where it came
    from."""

    @property
    def embed(self) -> _EmbedAccessor:  # the nn.Embedding itself stays in _modules["embed"], as in ProteinLM
        return _EmbedAccessor(self)

    @embed.setter
    def embed(self, value) -> None:
        nn.Module.__setattr__(self, "embed", value)


def pretrained(cfg, meta: Optional[dict] = None) -> nn.Module:
    """A freshly built model of `cfg` carrying `meta` (PretrainedProteinLM for the ProteinLM family)."""
    meta = dict(meta or {})
    max_length = int(meta.get("max_length") or 1024)
    model = PretrainedProteinLM(cfg) if cfg.arch in ("unet", "transformer") else build_model(cfg, max_length)
    model.meta, model.max_length = meta, max_length
    return model


def init_from(model: nn.Module, source: str) -> str:
    """Copy the weights of `source` (anything open_model reads; for ESM-2 also an EsmForMaskedLM folder or
    hub id) into the freshly built `model`, which must have the same architecture; returns what was
    loaded, for the log."""
    from ..config import ConfigError

    if model.cfg.arch == "esm2":
        path = Path(source)
        if not path.exists() or _json(path / "config.json").get("model_type") == "esm":
            from .esm2 import load_hf_weights

            return load_hf_weights(model, source)
    src = open_model(source)
    theirs, ours = src.state_dict(), model.state_dict()
    misfit = [k for k in ours if k not in theirs or theirs[k].shape != ours[k].shape]
    if misfit or set(theirs) - set(ours):
        raise ConfigError(f"init_from={source}: its weights do not fit this model ({len(misfit)} tensors differ, "
                          f"e.g. {(misfit or sorted(set(theirs) - set(ours)))[0]}): use the model config it was "
                          "trained with")
    model.load_state_dict(theirs, strict=True)
    return f"{len(theirs)} tensors ({src.num_params():,} parameters) from {source}"
