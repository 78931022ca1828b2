"""speedrun-plm: pretrain protein language models fast, and sweep the recipe.

Top-level helpers (imported lazily: `import speedrun` does not import torch):

    model = speedrun.load("RUN_DIR" | "EXPORT_DIR" | "owner/repo")   # a ProteinLM in eval mode
    X = speedrun.embed(model, sequences, layer=-1, pool="mean")      # == model.embed(sequences, ...)

`speedrun.embed` is the module `speedrun/embed.py`, which is callable as its `embed` function.
"""
from __future__ import annotations

__version__ = "0.1.0"


def load(source, *, device=None, revision=None):
    """Load a trained model: an export folder (`python -m speedrun.export`), a run directory (its newest
    complete checkpoint), a checkpoint folder, or a Hugging Face Hub repo id. See `speedrun.export.load`."""
    from .export import load as _load

    return _load(source, device=device, revision=revision)


def __getattr__(name: str):
    if name == "embed":
        import importlib

        return importlib.import_module(".embed", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["load", "embed", "__version__"]
