"""Export a trained run for the Hugging Face Hub, push it, and load it back with this package.

    python -m speedrun.export RUN_DIR --out DIR                       # config.json, model.safetensors, README.md
    python -m speedrun.export RUN_DIR --out DIR --push owner/name     # ... and upload them (HF_TOKEN from the env)

    model = speedrun.load(DIR | RUN_DIR | CHECKPOINT_DIR | "owner/name")
    model.embed(["MKTAYIAK..."], layer=-1, pool="mean")              # speedrun.embed.embed

The export folder holds three files and no code:

* `config.json` — `{"format": "speedrun-plm", "format_version": 1, "model": <ModelConfig>, "vocab": [...],
  "max_length", "window", "n_params", "step", "tokens", "run": {...}, "training": <RunConfig>,
  "metrics": {...}}`. Only `model` is needed to rebuild the network; the rest is provenance.
* `model.safetensors` — the weights of the run's newest complete checkpoint, written with
  `safetensors.torch.save_model` (which handles tied embeddings).
* `README.md` — a model card: recipe, data, parameters, validation metrics and training time from
  the run's `summary.json`, and how to load it.

Loading never executes remote code: `load()` rebuilds `speedrun.model.ProteinLM` from `config.json` and
reads the weights with `safetensors.torch.load_model` (strict). A Hub repo id is fetched with
`huggingface_hub.snapshot_download` (only `config.json` and `model.safetensors`). The returned model
is a `PretrainedProteinLM` — a `ProteinLM` with the same parameters and state-dict keys, in eval mode,
whose `.embed` also accepts sequences: `model.embed(sequences, **kw)` runs `speedrun.embed.embed`, while
`model.embed(token_ids)` is still the token-embedding lookup and `model.embed.weight` its matrix.

Secrets: the Hub token is read from the environment (`HF_TOKEN`, or huggingface_hub's own login) by
`push()` only; it is never a command-line argument and never written to the export folder.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .config import ModelConfig
from .errors import SpeedrunError
from .model import ProteinLM

FORMAT = "speedrun-plm"
FORMAT_VERSION = 1
FILES = ("config.json", "model.safetensors", "README.md")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_CARD_METRICS = (
    ("val_loss", "validation loss (masked-token cross-entropy, nats)"),
    ("val_ppl", "validation perplexity"),
    ("val_accuracy", "validation accuracy"),
    ("val_f1", "validation F1 (weighted)"),
    ("val_mcc", "validation MCC"),
    ("unigram_loss", "unigram baseline loss (same masked tokens)"),
    ("best_val_loss", "best validation loss during training"),
    ("test_loss", "test loss"),
    ("test_ppl", "test perplexity"),
    ("test_accuracy", "test accuracy"),
)


class ExportError(SpeedrunError):
    """A run or folder that cannot be exported or loaded. One line, naming the path and the fix."""


# ------------------------------------------------------------------------------------------------
# reading a run
def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _checkpoint_of(run_dir: Path) -> Path:
    from .checkpoint import MARKER, latest

    run_dir = Path(run_dir)
    if (run_dir / MARKER).exists():  # a checkpoint folder itself
        return run_dir
    found = latest(run_dir / "checkpoints")
    if found is None:
        raise ExportError(f"{run_dir} holds no complete checkpoint (checkpoints/step-*/COMPLETE): "
                          "train the run (checkpoint.final=true) or resume it to the end first")
    return found


def _run_config(checkpoint: Path) -> dict:
    """The RunConfig dict saved in the checkpoint's state.pt (memory-mapped: optimizer states stay on disk)."""
    path = Path(checkpoint) / "state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable state file gets the same one-line message
        raise ExportError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    cfg = state.get("config") if isinstance(state, dict) else None
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise ExportError(f"{path} holds no run config: it was not written by speedrun's trainer")
    return {"config": cfg, "step": state.get("step"), "tokens": state.get("tokens"),
            "train_seconds": state.get("train_seconds")}


SUPPORTED_ARCHS = ("unet", "transformer")  # the ProteinLM architectures


def _model_config(d: dict):
    from dataclasses import fields

    from .config import ConfigError, make, option_class

    try:
        known = {f.name for f in fields(option_class("model", d.get("arch", "unet")))}
        unknown = sorted(set(d) - known - {"value_embeddings", "n_extra_layers"})  # 0.1 kept every key
        if unknown:
            raise ExportError(f"model config has keys this version of speedrun does not know: {', '.join(unknown)}; "
                              "upgrade speedrun-plm")
        cfg = make("model", **{k: v for k, v in d.items() if k in known})
    except ConfigError as exc:
        raise ExportError(str(exc)) from None
    if cfg.arch not in SUPPORTED_ARCHS:
        raise ExportError(f"model.arch={cfg.arch} is not supported by export/load yet "
                          f"(supported: {', '.join(SUPPORTED_ARCHS)})")
    return cfg


def _final_window(cfg: dict) -> int:
    train, data = cfg.get("train", {}), cfg.get("data", {})
    end = train.get("window_end")
    return int(end if end is not None else data.get("max_length", 1024))


# ------------------------------------------------------------------------------------------------
# the model that load() returns
class _EmbedAccessor:
    """What `PretrainedProteinLM.embed` returns: the token-embedding module for tensors and attributes,
    `speedrun.embed.embed(model, ...)` for sequences."""

    __slots__ = ("_model",)

    def __init__(self, model: "PretrainedProteinLM"):
        object.__setattr__(self, "_model", model)

    def __call__(self, x, *args, **kwargs):
        if isinstance(x, torch.Tensor):
            return self._model._modules["embed"](x, *args, **kwargs)
        from .embed import embed

        kwargs.setdefault("max_length", self._model.max_length)
        return embed(self._model, x, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model._modules["embed"], name)

    def __setattr__(self, name, value):
        setattr(self._model._modules["embed"], name, value)

    def __repr__(self) -> str:
        return repr(self._model._modules["embed"])


class PretrainedProteinLM(ProteinLM):
    """A `ProteinLM` from `speedrun.load()`: same parameters, state-dict keys, forward and logits;
    `.embed(sequences, layer=..., pool=...)` computes embeddings (`speedrun.embed.embed`, with
    `max_length` defaulting to the training crop), `.embed(token_ids)` is the token-embedding lookup;
    `.meta` is the export's config.json."""

    def __init__(self, cfg: ModelConfig, meta: Optional[dict] = None):
        super().__init__(cfg)
        self.meta = dict(meta or {})
        self.max_length = int(self.meta.get("max_length") or 1024)

    @property
    def embed(self) -> _EmbedAccessor:  # the nn.Embedding itself stays in _modules["embed"], as in ProteinLM
        return _EmbedAccessor(self)

    @embed.setter
    def embed(self, value) -> None:
        nn.Module.__setattr__(self, "embed", value)


# ------------------------------------------------------------------------------------------------
# export
def export(run_dir: str | os.PathLike, out: str | os.PathLike, *, license: str = "mit") -> Path:
    """Write config.json, model.safetensors and README.md for the newest complete checkpoint of
    `run_dir` (or of a checkpoint folder) into `out`. Returns `out`."""
    from safetensors.torch import load_model, save_model

    from .vocab import TOKENS

    run_dir, out = Path(run_dir), Path(out)
    checkpoint = _checkpoint_of(run_dir)
    if (run_dir / "COMPLETE").exists():  # a checkpoint folder: its run directory is two levels up
        run_dir = checkpoint.parent.parent
    saved = _run_config(checkpoint)
    cfg = saved["config"]
    mcfg = _model_config(cfg["model"])
    model = ProteinLM(mcfg)
    try:
        load_model(model, str(checkpoint / "model.safetensors"), strict=True)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"cannot load {checkpoint / 'model.safetensors'}: {str(exc).splitlines()[0]}") from exc
    summary = _read_json(run_dir / "summary.json")
    env = _read_json(run_dir / "env.json")
    n_params = model.num_params()
    metrics = {k: v for k, v in summary.items()
               if (k.startswith(("val_", "test_")) or k in ("unigram_loss", "best_val_loss"))
               and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": "ProteinLM",
        "model": cfg["model"],
        "vocab": list(TOKENS),
        "max_length": int(cfg.get("data", {}).get("max_length", 1024)),
        "window": _final_window(cfg),
        "n_params": n_params,
        "step": saved["step"],
        "tokens": saved["tokens"],
        "run": {"name": cfg.get("name"), "checkpoint": checkpoint.name, "status": summary.get("status"),
                "git_commit": env.get("git_commit"), "git_dirty": env.get("git_dirty")},
        "training": cfg,
        "metrics": metrics,
    }
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        _atomic(out / "model.safetensors", lambda p: save_model(model, str(p), metadata={"format": "pt"}))
    _atomic(out / "config.json", lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    card = model_card(meta, summary, license=license)
    _atomic(out / "README.md", lambda p: p.write_text(card))
    return out


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    return f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def model_card(meta: dict, summary: dict, *, license: str = "mit") -> str:
    """The README.md of an export: YAML front matter for the Hub, then recipe, data, metrics, usage."""
    cfg = meta["training"]
    m, opt, obj = cfg.get("model", {}), cfg.get("optimizer", {}), cfg.get("objective", {})
    data, train, hw = cfg.get("data", {}), cfg.get("train", {}), cfg.get("hardware", {})
    name = meta["run"].get("name") or "speedrun-plm"
    if data.get("name") == "sample":
        data_line = ("the embedded sample of 18,505 proteins from UniProtKB/Swiss-Prot release 2014_01 "
                     "(The UniProt Consortium, CC BY 4.0)")
    else:
        data_line = f"shards `{Path(str(data.get('path') or '?')).name}` (data=`{data.get('name')}`)"
    batch = summary.get("batch", {}) if isinstance(summary.get("batch"), dict) else {}
    lines = [
        "---",
        f"license: {license}",
        "library_name: speedrun-plm",
        "pipeline_tag: fill-mask",
        "tags:",
        "- protein-language-model",
        "- masked-language-model",
        "- protein",
        "- speedrun-plm",
        "---",
        "",
        f"# {name}",
        "",
        f"A {m.get('arch', '?')} protein masked language model ({meta['n_params']:,} parameters) trained with "
        "speedrun-plm — an ESM-2-class MLM on the 33-token ESM vocabulary.",
        "",
        "## Recipe",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | `{m.get('arch')}`: d={m.get('dim')}, {m.get('n_layers')} layers, {m.get('n_heads')} heads, "
        f"MLP ×{m.get('mlp_ratio', 0):.3g}, head `{m.get('head')}`, tied embeddings {m.get('tie_embeddings')}, "
        f"value embeddings {m.get('value_embeddings')} |",
        f"| parameters | {meta['n_params']:,} |",
        f"| objective | `{obj.get('name')}`, mask rate {obj.get('mask_rate')}"
        f"{' (80/10/10)' if obj.get('replace') else ' (`<mask>` only)'} |",
        f"| optimizer | `{opt.get('name')}`, schedule `{opt.get('schedule')}`, warm-up {opt.get('lr_warmup_steps', opt.get('warmup_steps'))} steps |",
        f"| steps | {_fmt(meta.get('step'))} of {_fmt(train.get('max_steps'))}; "
        f"{_fmt(batch.get('batch_tokens', train.get('batch_tokens')))} tokens per step |",
        f"| tokens seen | {_fmt(meta.get('tokens'))} |",
        f"| context | {meta['max_length']} tokens (crop), attention window {meta['window']} |",
        f"| hardware | {summary.get('device', hw.get('device'))} × {batch.get('world_size', hw.get('gpus'))}, "
        f"precision {hw.get('precision')} |",
        f"| checkpoint | `{meta['run'].get('checkpoint')}` (run status: {meta['run'].get('status') or 'unknown'}) |",
        f"| code | git commit `{meta['run'].get('git_commit') or 'unknown'}`"
        f"{' (with local changes)' if meta['run'].get('git_dirty') else ''} |",
        "",
        "## Data",
        "",
        f"Trained on {data_line}; train/validation/test decided by a hash of each sequence.",
        "",
        "## Results",
        "",
    ]
    rows = [(label, meta["metrics"][k]) for k, label in _CARD_METRICS if k in meta["metrics"]]
    if rows:
        lines += ["Evaluation protocol: the fixed validation split, `<mask>`-only masking at "
                  f"{cfg.get('eval', {}).get('mask_rate', 0.15)} from a fixed seed, token-weighted cross-entropy.", "",
                  "| metric | value |", "|---|---|", *[f"| {label} | {_fmt(v)} |" for label, v in rows], ""]
    else:
        lines += ["No validation metrics were recorded (summary.json missing or incomplete).", ""]
    lines += [
        "| training time | |",
        "|---|---|",
        f"| train time (optimizer steps) | {_duration(summary.get('train_seconds'))} |",
        f"| wall time | {_duration(summary.get('wall_seconds'))} |",
        f"| throughput | {_fmt(summary.get('tokens_per_s')) if summary.get('tokens_per_s') else 'n/a'} tokens/s |",
        "",
        "## Usage",
        "",
        "Loading needs the `speedrun-plm` package (no remote code is executed):",
        "",
        "```python",
        "import speedrun",
        "",
        "model = speedrun.load(\"<this repo id or a local folder>\")",
        "emb = model.embed([\"MKTAYIAKQRQISFVKSHFSRQ\"], layer=-1, pool=\"mean\")   # (1, d) float32",
        "```",
        "",
        "`config.json` holds the model config (`model`) and the full training config (`training`); "
        "`model.safetensors` the weights.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# push
def push(folder: str | os.PathLike, repo_id: str, *, private: bool = False,
         commit_message: Optional[str] = None) -> str:
    """Upload an export folder (its three files only) to the Hub model repo `repo_id`, creating it if
    needed. The token comes from the environment (`HF_TOKEN`) or huggingface_hub's saved login."""
    import huggingface_hub

    folder = Path(folder)
    missing = [f for f in FILES if not (folder / f).exists()]
    if missing:
        raise ExportError(f"{folder} is not an export folder (missing {', '.join(missing)}): run "
                          "python -m speedrun.export RUN_DIR --out DIR first")
    token = os.environ.get("HF_TOKEN") or None
    if token is None:
        get_token = getattr(huggingface_hub, "get_token", None)
        if get_token is None or get_token() is None:
            raise ExportError("no Hugging Face token: set HF_TOKEN in the environment (never on the command line)")
    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                             allow_patterns=list(FILES),
                             commit_message=commit_message or "Upload speedrun-plm export")
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")


# ------------------------------------------------------------------------------------------------
# load
def load(source: str | os.PathLike, *, device=None, revision: Optional[str] = None):
    """A trained model from an export folder, a run directory (newest complete checkpoint), a checkpoint
    folder, or a Hub repo id (`owner/name`, via snapshot_download). Returns a `PretrainedProteinLM` in
    eval mode on `device` (default CPU) that gives the same logits as the trained model."""
    from safetensors.torch import load_model

    path = Path(source)
    if path.exists():
        if (path / "config.json").exists() and (path / "model.safetensors").exists():
            meta = _read_json(path / "config.json")
            weights = path / "model.safetensors"
        elif path.is_dir() and ((path / "checkpoints").is_dir() or (path / "COMPLETE").exists()):
            checkpoint = _checkpoint_of(path)
            cfg = _run_config(checkpoint)["config"]
            meta = {"format": FORMAT, "model": cfg["model"], "max_length": cfg.get("data", {}).get("max_length", 1024),
                    "window": _final_window(cfg), "training": cfg, "run": {"checkpoint": checkpoint.name}}
            weights = checkpoint / "model.safetensors"
        else:
            raise ExportError(f"{path} is neither an export folder (config.json + model.safetensors), a run "
                              "directory nor a checkpoint folder")
    elif isinstance(source, str) and _REPO_ID.match(source) and not source.startswith((".", "/", "~")):
        import huggingface_hub

        try:
            local = huggingface_hub.snapshot_download(repo_id=source, repo_type="model", revision=revision,
                                                      allow_patterns=["config.json", "model.safetensors"])
        except Exception as exc:  # noqa: BLE001 - not found, gated, offline...: one line naming the repo
            raise ExportError(f"cannot download {source} from the Hugging Face Hub: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        return load(local, device=device)
    else:
        raise ExportError(f"{source}: no such folder, and not a Hub repo id (owner/name)")
    if meta.get("format") != FORMAT or "model" not in meta:
        raise ExportError(f"{path / 'config.json'} is not a speedrun-plm export (format {meta.get('format')!r})")
    mcfg = _model_config(meta["model"])
    mcfg.attention = "auto"  # both back-ends compute the same mask; pick what the device supports
    device = torch.device(device) if device is not None else torch.device("cpu")
    model = PretrainedProteinLM(mcfg, meta)
    try:
        load_model(model, str(weights), strict=True)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"cannot load {weights}: {str(exc).splitlines()[0]}") from exc
    model.to(device)
    model.set_attention_backend(device)
    return model.eval()


# ------------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m speedrun.export",
        description="Export a run's newest complete checkpoint as config.json + model.safetensors + README.md, "
                    "optionally pushing it to the Hugging Face Hub (token from HF_TOKEN in the environment).")
    p.add_argument("run_dir", help="run directory (or a checkpoints/step-NNNNNN folder)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--push", metavar="REPO_ID", help="also upload to this Hub model repo (owner/name)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--license", default="mit", help="license in the model card (default: mit)")
    args = p.parse_args(argv)
    try:
        out = export(args.run_dir, args.out, license=args.license)
        print(f"exported {args.run_dir} -> {out}")
        if args.push:
            url = push(out, args.push, private=args.private)
            print(f"pushed to {args.push}: {url}")
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
