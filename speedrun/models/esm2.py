"""ESM-2 (Lin et al. 2023) as a model of this trainer, and the bridge to Hugging Face's EsmForMaskedLM.

Why here: ESM-2 is the baseline every protein LM is compared with. As `model.arch=esm2` it trains with
our data, objectives and optimizers on packed streams, can start from the published weights
(`load_hf_weights`, for `init_from=facebook/esm2_t6_8M_UR50D`), and exports as a native EsmForMaskedLM
folder that transformers loads without remote code. The math is transformers' `modeling_esm.py`, term for term:

* word embeddings (`<pad>` row zero, padding_idx); token dropout as ESM does it: `<mask>` embeddings
  zeroed, then every embedding scaled by (1 - 0.15·0.8) / (1 - observed mask ratio), the ratio counted
  per *sequence* — here per document of the packed stream (doc_ids), padding being a segment of its own;
* pre-LayerNorm blocks: x += o(attn(LN(x))), x += fc2(GELU(fc1(LN(x)))), biases on q/k/v/o, fc1, fc2,
  exact (erf) GELU;
* rotary attention with ESM's rotate_half convention (dims [0, D/2) and [D/2, D) pair up,
  x·cos + rotate_half(x)·sin with rotate_half(x) = [-x2, x1]), inv_freq = 1 / base^(2i/D), positions
  restarting at 0 in every document (computed on the device from doc_ids, no host sync); ESM scales q
  by D^-0.5 before rotating, `attend` scales the scores by the same factor (rotation is linear: the
  same product up to rounding);
* `final_norm` (ESM's `emb_layer_norm_after`), then the LM head dense -> GELU -> LayerNorm -> decoder
  tied to the word embeddings + bias.

Attention goes through `speedrun.attention` (`make_context` / `attend`: document masks and the
trainer's sliding window; sdpa on CPU), so every back-end the trainer picks works. Parameter names put
the word embeddings in optim's "embed" group, the head in "lm_head", the block matrices in Muon and
biases / LayerNorm parameters with the scalars.

The bridge reads and writes plain files (config.json, model.safetensors or pytorch_model.bin through
weights-only loading) and never imports transformers: `open_hf_folder`, `load_hf_weights` (init_from),
`hf_state_dict` + `hf_config` (speedrun/hf writes them out).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import AttnContext, attend
from ..config import ConfigError, ESM2Config, make, mlp_hidden, to_dict
from ..vocab import MASK, PAD
from .load import ModelLoadError, _hub
from .unet import CastedLinear, ProteinLM

MASK_RATIO_TRAIN = 0.15 * 0.8  # hard-coded in every ESM training run (and in transformers)
#: conf/model/esm2_*.yaml: (dim, n_layers, n_heads); tests check the YAML files agree
PRESETS = {"esm2_8m": (320, 6, 20), "esm2_35m": (480, 12, 20), "esm2_150m": (640, 30, 20),
           "esm2_650m": (1280, 33, 20)}


class Linear(nn.Linear):
    """Linear layer with bias whose fp32 parameters are cast to the input's dtype at call time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose fp32 parameters are cast to the input's dtype at call time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def segments(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment index, position in its segment) of every token of a stream (T,): a segment is a run of
    equal doc ids (a document, or the padding). On the device, without a host sync."""
    d = doc_ids.reshape(-1)
    idx = torch.arange(d.numel(), device=d.device)
    start = torch.ones_like(d, dtype=torch.bool)
    start[1:] = d[1:] != d[:-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(0).values
    return start.long().cumsum(0) - 1, idx - first


def token_dropout(x: torch.Tensor, input_ids: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """ESM's token dropout: `<mask>` rows zeroed, each segment scaled by 0.88 / (1 - its mask ratio)."""
    is_mask = input_ids == MASK
    x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
    n = torch.zeros(seg.numel(), device=x.device).index_add_(0, seg, torch.ones_like(seg, dtype=torch.float32))
    masked = torch.zeros_like(n).index_add_(0, seg, is_mask.float())
    ratio = (masked / n.clamp(min=1.0))[seg]
    return x * (1 - MASK_RATIO_TRAIN) / (1 - ratio).clamp(min=1e-6).unsqueeze(-1)  # clamp: a doc of masks only


class Rotary(nn.Module):
    """cos / sin tables (T, 1, D/2) for per-document positions, transformers' inv_freq formula."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq
        return freqs.cos().unsqueeze(1).to(dtype), freqs.sin().unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """ESM's x·cos + rotate_half(x)·sin on (T, H, D), rotate_half(x) = [-x2, x1]."""
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.q, self.k, self.v, self.o = (Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, ctx: AttnContext, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        shape = (x.size(0), self.n_heads, self.head_dim)
        q, k, v = self.q(x).view(shape), self.k(x).view(shape), self.v(x).view(shape)
        y = attend(apply_rotary(q, rope), apply_rotary(k, rope), v, ctx)
        return self.o(y.reshape(x.size(0), -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = Linear(dim, hidden), Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ESM2Config):
        super().__init__()
        self.attn_norm = LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg.dim, cfg.n_heads)
        self.mlp_norm = LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.dim, mlp_hidden(cfg))

    def forward(self, x, ctx: AttnContext, rope) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), ctx, rope)
        return x + self.mlp(self.mlp_norm(x))


class LMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder (tied to the word embeddings by ESM2) + bias, fp32 logits."""

    def __init__(self, cfg: ESM2Config):
        super().__init__()
        self.dense = Linear(cfg.dim, cfg.dim)
        self.norm = LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.decoder = CastedLinear(cfg.dim, cfg.vocab_size)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(h)))).float() + self.bias


class ESM2(nn.Module):
    """`forward(input_ids, doc_ids, window)` -> final normed hidden states (T, d); `logits(h)` -> (N, V).
    The model protocol of speedrun/models/__init__.py, on a packed stream."""

    # the same attention back-end choice and masks as the reference family
    set_attention_backend = ProteinLM.set_attention_backend
    make_context = ProteinLM.make_context

    def __init__(self, cfg: ESM2Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=PAD)
        self.rotary = Rotary(cfg.dim // cfg.n_heads, cfg.rope_base)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.lm_head = LMHead(cfg)
        self.lm_head.decoder.weight = self.embed.weight
        self.attn_backend, self.max_segment_len = "sdpa", 0
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """transformers' initialisation: N(0, 0.02) matrices and embeddings (zero `<pad>` row), zero biases."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        self.embed.weight[PAD].zero_()  # after the tied decoder's (shared) initialisation

    def num_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def embed_tokens(self, input_ids: torch.Tensor, dtype: torch.dtype,
                     doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The embedding output (layer 0, what the first block receives). Without doc_ids the stream
        counts as one sequence for token dropout (without `<mask>` tokens the scale is 0.88 either way)."""
        seg = segments(doc_ids)[0] if doc_ids is not None else torch.zeros_like(input_ids)
        return self._embedding(input_ids, seg, dtype)

    def _embedding(self, input_ids: torch.Tensor, seg: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = self.embed(input_ids)
        if self.cfg.token_dropout:
            x = token_dropout(x, input_ids, seg)
        return x.to(dtype)

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor, window: int | torch.Tensor,
                dtype: torch.dtype = torch.float32, ctx: Optional[AttnContext] = None,
                return_layers: bool = False):
        """Hidden states for a packed stream (T,); with return_layers also every block's output."""
        if ctx is None:
            ctx = self.make_context(doc_ids, window)
        seg, positions = segments(doc_ids)
        x = self._embedding(input_ids, seg, dtype)
        rope = self.rotary(positions, dtype)
        layers = []
        for block in self.blocks:
            x = block(x, ctx, rope)
            if return_layers:
                layers.append(x)
        h = self.final_norm(x)
        return (h, layers) if return_layers else h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)


def count_params(cfg: ESM2Config) -> int:
    """Parameters of ESM2(cfg), counted on the meta device (no memory)."""
    with torch.device("meta"):
        return ESM2(cfg).num_params()


# ================================ Hugging Face EsmForMaskedLM files ================================
_LAYER_KEYS = {"attn_norm": "attention.LayerNorm", "attn.q": "attention.self.query", "attn.k": "attention.self.key",
               "attn.v": "attention.self.value", "attn.o": "attention.output.dense", "mlp_norm": "LayerNorm",
               "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
_TOP_KEYS = {"embed.weight": "esm.embeddings.word_embeddings.weight",
             "final_norm.weight": "esm.encoder.emb_layer_norm_after.weight",
             "final_norm.bias": "esm.encoder.emb_layer_norm_after.bias",
             "lm_head.dense.weight": "lm_head.dense.weight", "lm_head.dense.bias": "lm_head.dense.bias",
             "lm_head.norm.weight": "lm_head.layer_norm.weight", "lm_head.norm.bias": "lm_head.layer_norm.bias",
             "lm_head.bias": "lm_head.bias"}
# in a folder but not in our model: rotary tables (recomputed), the absolute position table transformers 4.x
# builds (and ESM-2 checkpoints carry) but rotary models never use, the contact head, the decoder (tied)
_IGNORED = re.compile(r"inv_freq$|position_ids$|^esm\.embeddings\.position_embeddings\.weight$|^esm\.contact_head\."
                      r"|^esm\.pooler\.|^lm_head\.decoder\.weight$")


def key_map(n_layers: int) -> dict[str, str]:
    """Our parameter name -> transformers' EsmForMaskedLM name."""
    out = dict(_TOP_KEYS)
    for i in range(n_layers):
        for ours, theirs in _LAYER_KEYS.items():
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{kind}"] = f"esm.encoder.layer.{i}.{theirs}.{kind}"
    return out


def config_from_hf(config: dict, where: str = "config.json") -> ESM2Config:
    """The ESM2Config of an EsmForMaskedLM config.json; ModelLoadError (one line) for what ESM2 is not."""
    if config.get("model_type") != "esm":
        raise ModelLoadError(f"{where} is not an ESM config (model_type {config.get('model_type')!r})")
    refuse = [(config.get("position_embedding_type", "absolute") != "rotary", "absolute position embeddings (ESM-1)"),
              (bool(config.get("emb_layer_norm_before")), "emb_layer_norm_before (ESM-1b)"),
              (bool(config.get("is_folding_model")), "a folding model (ESMFold)"),
              (config.get("hidden_act", "gelu") != "gelu", f"hidden_act={config.get('hidden_act')}"),
              (config.get("tie_word_embeddings", True) is False, "an untied decoder"),
              (config.get("mask_token_id", MASK) != MASK or config.get("pad_token_id", PAD) != PAD,
               "another vocabulary (mask/pad ids differ from ESM-2's)")]
    for bad, what in refuse:
        if bad:
            raise ModelLoadError(f"{where} describes {what}: only ESM-2 models (model_type esm, rotary) load as "
                                 "model.arch=esm2")
    dim, ffn = int(config["hidden_size"]), int(config.get("intermediate_size", 4 * int(config["hidden_size"])))
    try:
        cfg = make("model", arch="esm2", dim=dim, n_layers=int(config["num_hidden_layers"]),
                   n_heads=int(config["num_attention_heads"]), ffn_dim=0 if ffn == 4 * dim else ffn,
                   vocab_size=int(config.get("vocab_size", 33)), token_dropout=bool(config.get("token_dropout")),
                   layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
                   rope_base=float(config.get("rope_theta", 10000.0)))
        cfg.check()
    except ConfigError as exc:
        raise ModelLoadError(f"{where}: {exc}") from None
    return cfg


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an HF folder: model.safetensors, else pytorch_model.bin (weights-only loading).
    Legacy LayerNorm names (gamma / beta) come back as weight / bias."""
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file

        sd = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").exists():
        sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ModelLoadError(f"{path} holds no model.safetensors or pytorch_model.bin")
    return {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)): v
            for k, v in sd.items()}


def _load_hf_state(model: ESM2, sd: dict[str, torch.Tensor], where: str) -> None:
    """Copy an EsmForMaskedLM state dict into `model` (every tensor, shapes checked)."""
    mapping = key_map(model.cfg.n_layers)
    missing = [theirs for theirs in mapping.values() if theirs not in sd]
    unknown = sorted(k for k in set(sd) - set(mapping.values()) if not _IGNORED.search(k))
    if missing or unknown:
        what, more = ("missing", missing) if missing else ("unexpected", unknown), len(missing) + len(unknown) - 1
        raise ModelLoadError(f"{where} is not an EsmForMaskedLM of this shape: {what[0]} {what[1][0]}"
                             f"{f' (+{more} more)' if more else ''}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for ours, theirs in mapping.items():
            if params[ours].shape != sd[theirs].shape:
                raise ModelLoadError(f"{where}: {theirs} has shape {tuple(sd[theirs].shape)}, the model expects "
                                     f"{tuple(params[ours].shape)}")
            params[ours].copy_(sd[theirs])
        decoder = sd.get("lm_head.decoder.weight")
        if decoder is not None and not torch.equal(decoder.to(model.embed.weight.dtype), model.embed.weight):
            raise ModelLoadError(f"{where}: lm_head.decoder.weight differs from the word embeddings (an untied "
                                 "head): ESM2 ties them")


def _read_config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {type(exc).__name__}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path / 'config.json'} is not a JSON object")
    return config


def open_hf_folder(path) -> tuple[ESM2, dict]:
    """An EsmForMaskedLM folder (config.json + model.safetensors or pytorch_model.bin) as ESM2 with
    `.meta`; for speedrun.models.open_model. Never imports transformers, never unpickles."""
    path = Path(path)
    config = _read_config(path)
    cfg = config_from_hf(config, str(path / "config.json"))
    model = ESM2(cfg)
    _load_hf_state(model, read_hf_weights(path), str(path))
    max_length = max(int(config.get("max_position_embeddings", 1026)) - 2, 3)  # <cls> + 1022 residues + <eos>
    meta = {"max_length": max_length, "window": max_length, "step": None, "tokens": None}
    provenance = config.get("speedrun") if isinstance(config.get("speedrun"), dict) else {}
    meta.update(provenance)  # an export of ours keeps its training provenance under "speedrun"
    meta.update({"format": "hf-esm", "model": to_dict(cfg), "source": str(path)})
    model.meta, model.max_length = meta, int(meta["max_length"])
    return model, meta


def preset_for(dim: int, n_layers: int, n_heads: int) -> Optional[str]:
    """The conf/model preset (model=esm2_xxx) of these dims, or None."""
    return next((name for name, dims in PRESETS.items() if dims == (dim, n_layers, n_heads)), None)


def load_hf_weights(model: ESM2, source, revision: Optional[str] = None) -> dict:
    """`init_from` for ESM2: copy the weights of an EsmForMaskedLM folder or hub id into `model`. A
    folder whose dims differ from the model's raises ConfigError naming the preset that fits. Returns
    the source's config.json."""
    path = Path(source)
    if not path.exists():
        path = _hub(str(source), revision)
    if getattr(model.cfg, "arch", None) != "esm2":
        raise ConfigError(f"init_from={source} is an ESM-2 folder: it needs model.arch=esm2 (e.g. model=esm2_8m)")
    config = _read_config(path)
    theirs, ours = config_from_hf(config, f"init_from={source}"), model.cfg
    dims = ("dim", "n_layers", "n_heads", "vocab_size")
    if any(getattr(theirs, k) != getattr(ours, k) for k in dims) or mlp_hidden(theirs) != mlp_hidden(ours):
        preset = preset_for(theirs.dim, theirs.n_layers, theirs.n_heads)
        fix = (f"use model={preset}" if preset and mlp_hidden(theirs) == 4 * theirs.dim and theirs.vocab_size == 33
               else f"set model.dim={theirs.dim} model.n_layers={theirs.n_layers} model.n_heads={theirs.n_heads} "
                    f"model.ffn_dim={mlp_hidden(theirs)} model.vocab_size={theirs.vocab_size}")
        raise ConfigError(f"init_from={source} has dim={theirs.dim}, n_layers={theirs.n_layers}, n_heads="
                          f"{theirs.n_heads}, ffn_dim={mlp_hidden(theirs)} but the model has dim={ours.dim}, "
                          f"n_layers={ours.n_layers}, n_heads={ours.n_heads}, ffn_dim={mlp_hidden(ours)}: {fix}")
    _load_hf_state(model, read_hf_weights(path), f"init_from={source}")
    return config


def hf_state_dict(model: ESM2) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' EsmForMaskedLM names (CPU, contiguous). The decoder is
    tied (transformers re-ties it); each layer's rotary inv_freq is included as ESM-2's published
    checkpoints have it (transformers 4.x reads it per layer, 5.x folds it into one table); the contact
    head, which this model has not got, is left out, as is the absolute position table transformers 4.x
    builds for rotary models too and never uses (transformers initialises both and says so)."""
    params = dict(model.named_parameters())
    out = {theirs: params[ours].detach().float().cpu().contiguous()
           for ours, theirs in key_map(model.cfg.n_layers).items()}
    inv_freq = model.rotary.inv_freq.detach().float().cpu()
    for i in range(model.cfg.n_layers):
        out[f"esm.encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq"] = inv_freq.clone()
    return out


def hf_config(cfg: ESM2Config, max_length: int = 1024) -> dict:
    """EsmConfig fields (config.json) of an EsmForMaskedLM equal to ESM2(cfg)."""
    return {"architectures": ["EsmForMaskedLM"], "model_type": "esm", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "intermediate_size": mlp_hidden(cfg), "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, "max_position_embeddings": max_length + 2,
            "initializer_range": 0.02, "layer_norm_eps": cfg.layer_norm_eps, "position_embedding_type": "rotary",
            "rope_theta": cfg.rope_base, "emb_layer_norm_before": False, "token_dropout": cfg.token_dropout,
            "mask_token_id": MASK, "pad_token_id": PAD, "eos_token_id": 2, "is_folding_model": False,
            "esmfold_config": None, "vocab_list": None, "tie_word_embeddings": True, "use_cache": True,
            "classifier_dropout": None, "torch_dtype": "float32"}


__all__ = ["ESM2", "PRESETS", "config_from_hf", "count_params", "hf_config", "hf_state_dict", "key_map",
           "load_hf_weights", "open_hf_folder", "preset_for", "read_hf_weights"]
