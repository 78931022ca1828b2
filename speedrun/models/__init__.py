"""The model protocol, the registry of architectures, and the one model loader.

Every architecture is an `nn.Module` with this interface (what the trainer, evaluation, embeddings,
generation and probes use):

    model.cfg                                   its config dataclass (speedrun.config)
    model.set_attention_backend(device, bound)  pick the attention kernel; returns its name
    model.make_context(doc_ids, window)         masks for one forward, built outside compiled code
    model(input_ids, doc_ids, window, dtype=..., ctx=None, return_layers=False) -> hidden (T, d)
    model.logits(hidden)                        -> (N, vocab) in fp32
    model.num_params()

`input_ids` / `doc_ids` are a packed stream (T,) — or (B, L) rows for a `rows` layout. A `Spec`
registers an architecture: how to build it, its batch layout, and the formulas the trainer reports
(parameter count, FLOPs per token, a memory estimate), any of which may be None.

`open_model(source)` (speedrun/models/load.py) loads a trained model from a run directory, a
checkpoint folder, an export folder, a Hugging Face ESM-2 folder or a hub id, reading only JSON and
safetensors (never a pickle).

To add an architecture: a module here, a config dataclass in speedrun/config.py, one `register()`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

#: how a batch is laid out: "flat" = one packed stream of T tokens, "rows" = (T // L, L) rows
LAYOUTS = ("flat", "rows")


@dataclass(frozen=True)
class Spec:
    build: Callable  # (model_cfg, max_length) -> nn.Module
    layout: str = "flat"
    count_params: Optional[Callable] = None  # (model_cfg) -> int
    flops_per_token: Optional[Callable] = None  # (model_cfg, mean_context) -> float
    memory_gib: Optional[Callable] = None  # (model_cfg, micro_batch_tokens, precision) -> GiB
    fp8: bool = False  # has an FP8 GEMM path (model.enable_fp8)
    layer_states: bool = False  # forward(return_layers=True) gives every block's output (probes, embed)


_REGISTRY: dict[str, Spec] = {}


def register(arch: str, spec: Spec) -> None:
    _REGISTRY[arch] = spec


def spec(arch: str) -> Spec:
    _builtins()
    if arch not in _REGISTRY:
        from ..errors import ConfigError

        raise ConfigError(f"model.arch={arch!r} has no model registered (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[arch]


def build_model(model_cfg, max_length: int = 1024):
    """A freshly initialised model of `model_cfg` (for rows layouts, rows of `max_length` tokens)."""
    return spec(model_cfg.arch).build(model_cfg, max_length)


def _lm(cfg, max_length):
    from .unet import ProteinLM

    return ProteinLM(cfg)


def _patch(cfg, max_length):
    from .patch_unet import PatchUNet

    return PatchUNet(cfg, max_length)


def _esm2(cfg, max_length):
    from .esm2 import ESM2

    return ESM2(cfg)


def _unet_formula(name):
    def call(*args):
        from . import unet

        return getattr(unet, name)(*args)
    return call


def _builtins() -> None:
    if _REGISTRY:
        return
    formulas = dict(count_params=_unet_formula("count_params_formula"),
                    flops_per_token=_unet_formula("flops_per_token"), memory_gib=_unet_formula("estimate_memory_gib"))
    for arch in ("unet", "transformer"):
        register(arch, Spec(_lm, "flat", fp8=True, layer_states=True, **formulas))
    register("patch_unet", Spec(_patch, "rows"))
    register("esm2", Spec(_esm2, "flat", layer_states=True))


def open_model(source, *, device=None, revision: Optional[str] = None, checkpoint: Optional[str] = None):
    """See speedrun/models/load.py."""
    from .load import open_model as _open

    return _open(source, device=device, revision=revision, checkpoint=checkpoint)


__all__ = ["LAYOUTS", "Spec", "build_model", "open_model", "register", "spec"]
