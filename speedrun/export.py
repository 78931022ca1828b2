"""Export a trained run for the Hugging Face Hub, push it, and load it back.

    python -m speedrun.export RUN_DIR --out DIR [--overwrite]            # config.json, model.safetensors, README.md
    python -m speedrun.export RUN_DIR --out DIR --push owner/name         # ... and upload them (HF_TOKEN from the env)

    model = speedrun.load(DIR | RUN_DIR | CHECKPOINT_DIR | "owner/name")   # speedrun.models.open_model
    model.embed(["MKTAYIAK..."], layer=-1, pool="mean")                   # speedrun.embed.embed

The export folder is one that both speedrun and the Hugging Face world load (speedrun/hf/):

* `config.json` — the export record `{"format": "speedrun-plm", "format_version": 1, "model": <model
  config>, "vocab": [...], "max_length", "window", "n_params", "step", "tokens", "run": {...},
  "training": <RunConfig>, "metrics": {...}}` plus what transformers needs (`model_type`, `auto_map`,
  sizes, token ids). Only `model` is needed to rebuild the network; the rest is provenance.
* `model.safetensors` — the weights of the run's newest checkpoint that verifies.
* `configuration_speedrun_plm.py`, `modeling_speedrun_plm.py` — a self-contained torch implementation,
  so `AutoModelForMaskedLM.from_pretrained(DIR, trust_remote_code=True)` and `AutoModel` work; the
  tokenizer files make `AutoTokenizer.from_pretrained(DIR)` the ESM 33-token vocabulary.
* For an ESM-2 run (model=esm2_*): a native `EsmForMaskedLM` folder instead (no remote code), with the
  export record under `speedrun` in config.json.
* `README.md` — a model card: recipe, data, parameters, validation metrics and training time.

Loading with speedrun never executes code from the folder: `speedrun.load` reads JSON and safetensors
only (the .py files are for transformers' trust_remote_code, which is the user's choice). The
output folder must be empty or hold an earlier export of this tool: `--overwrite` replaces only the files
export wrote (speedrun.fsutil.claim_output), never a file you put there.

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

from .errors import SpeedrunError, cli_main
from .fsutil import atomic_write, claim_output, read_json

FORMAT = "speedrun-plm"
FORMAT_VERSION = 1
FILES = ("config.json", "model.safetensors", "README.md")
TOOL = "speedrun.export"
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


def _metrics(summary: dict) -> dict:
    return {k: v for k, v in summary.items()
            if (k.startswith(("val_", "test_")) or k in ("unigram_loss", "best_val_loss"))
            and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def export(run_dir: str | os.PathLike, out: str | os.PathLike, *, license: str = "mit",
           overwrite: bool = False) -> Path:
    """Write config.json, model.safetensors and README.md for the newest sound checkpoint of `run_dir`
    (or of a checkpoint folder) into `out`. Returns `out`."""
    from safetensors.torch import save_model

    from .models.load import ModelLoadError, open_model
    from .vocab import TOKENS

    try:
        model = open_model(run_dir)
    except ModelLoadError as exc:
        raise ExportError(str(exc)) from None
    src, out = model.meta, Path(out)
    ck = Path(src["checkpoint"])
    run_root = ck.parent.parent
    summary, env = read_json(run_root / "summary.json"), read_json(run_root / "env.json")
    cfg = src["training"]
    cls = type(model)
    arch_class = cls.__mro__[1].__name__ if cls.__name__.startswith("Pretrained") else cls.__name__
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": arch_class,
            "model": src["model"], "vocab": list(TOKENS), "max_length": src["max_length"], "window": src["window"],
            "n_params": model.num_params(), "step": src.get("step"), "tokens": src.get("tokens"),
            "run": {"name": cfg.get("name"), "checkpoint": ck.name, "status": summary.get("status"),
                    "git_commit": env.get("git_commit"), "git_dirty": env.get("git_dirty")},
            "training": cfg, "metrics": _metrics(summary)}
    from .hf import write_esm2_export, write_remote_code_export

    manifest = claim_output(out, TOOL, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    writer = write_esm2_export if model.cfg.arch == "esm2" else write_remote_code_export
    manifest.record(FILES)
    with torch.no_grad():
        files = writer(out, model, meta)  # config.json, model.safetensors and the Hugging Face files
    atomic_write(out / "README.md", model_card(meta, summary, license=license))
    manifest.record([*files, "README.md"])
    return out


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


def _architecture(m: dict) -> str:
    head = f"`{m.get('arch')}`: d={m.get('dim')}, {m.get('n_layers')} layers, {m.get('n_heads')} heads"
    if m.get("arch") == "esm2":
        ffn = m.get("ffn_dim") or 4 * int(m.get("dim") or 0)
        return (f"{head}, FFN {ffn}, LayerNorm eps {m.get('layer_norm_eps')}, token dropout "
                f"{m.get('token_dropout')} (ESM-2, as transformers' `EsmForMaskedLM`)")
    text = (f"{head}, MLP ×{m.get('mlp_ratio', 0):.3g}, head `{m.get('head')}`, tied embeddings "
            f"{m.get('tie_embeddings')}")
    return text + (f", value embeddings {m['value_embeddings']}" if "value_embeddings" in m else "")


def _transformers_usage(arch) -> list:
    native = arch == "esm2"
    remote = "" if native else ", trust_remote_code=True"
    return [
        "With `transformers` (" + ("a native `EsmForMaskedLM` folder: no remote code)" if native else
                                   "the modeling file in this folder is a self-contained torch implementation):"),
        "",
        "```python",
        "from transformers import AutoModelForMaskedLM, AutoTokenizer",
        "",
        f"tok = AutoTokenizer.from_pretrained(\"<this repo id or folder>\"{remote})",
        f"model = AutoModelForMaskedLM.from_pretrained(\"<this repo id or folder>\"{remote})",
        "logits = model(**tok([\"MKTAYIAKQRQISFVKSHFSRQ\"], return_tensors=\"pt\")).logits",
        "```",
        "",
    ]


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
        f"| architecture | {_architecture(m)} |",
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
        *_transformers_usage(m.get("arch")),
        "With the `speedrun-plm` package (no code from the folder is executed):",
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
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                                 allow_patterns=list(FILES) + list(extra_files(folder)),
                                 commit_message=commit_message or "Upload speedrun-plm export")
    except Exception as exc:  # noqa: BLE001 - offline, no permission, hub down: one line naming the repo
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(f"cannot push {folder} to {repo_id}: {type(exc).__name__}: {first} - check the network "
                          "and HF_TOKEN, then run the push again") from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")


def extra_files(folder: Path) -> list[str]:
    """The other files this tool wrote into an export folder (the Hugging Face files), from its manifest."""
    from .fsutil import Manifest

    return [f for f in Manifest(folder, TOOL).files() if f not in FILES]


# ------------------------------------------------------------------------------------------------
# load
def load(source: str | os.PathLike, *, device=None, revision: Optional[str] = None):
    """A trained model from an export folder, a run directory (newest sound checkpoint), a checkpoint
    folder, a Hugging Face ESM-2 folder, or a Hub repo id: `speedrun.models.open_model`."""
    from .models.load import ModelLoadError, open_model

    try:
        return open_model(source, device=device, revision=revision)
    except ModelLoadError as exc:
        raise ExportError(str(exc)) from None


# ------------------------------------------------------------------------------------------------
def _main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m speedrun.export",
        description="Export a run's newest sound checkpoint as config.json + model.safetensors + README.md, "
                    "optionally pushing it to the Hugging Face Hub (token from HF_TOKEN in the environment).")
    p.add_argument("run_dir", help="run directory (or a checkpoints/step-NNNNNN folder)")
    p.add_argument("--out", required=True, help="output folder (empty, or an earlier export of this tool)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out (only its files)")
    p.add_argument("--push", metavar="REPO_ID", help="also upload to this Hub model repo (owner/name)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--license", default="mit", help="license in the model card (default: mit)")
    args = p.parse_args(argv)
    out = export(args.run_dir, args.out, license=args.license, overwrite=args.overwrite)
    print(f"exported {args.run_dir} -> {out}")
    if args.push:
        url = push(out, args.push, private=args.private)
        print(f"pushed to {args.push}: {url}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return cli_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
