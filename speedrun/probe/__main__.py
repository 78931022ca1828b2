"""The command line, `python -m speedrun.probe RUN_DIR [key=value ...]` (options: the package docstring):
load a run's model, probe it, and leave probe.json, probe.png and the merged summary.json behind.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional, Union

import torch

from ..errors import cli_main
from . import __doc__ as GUIDE
from .features import parse_layers
from .fitting import BASELINES, probe_model
from .report import format_table, merge_summary, plot, write_probe_json
from .tasks import DEFAULT_TASKS, ProbeError, task_name

CLI_DEFAULTS = {
    "tasks": list(DEFAULT_TASKS), "layers": "all", "baselines": list(BASELINES), "max_sequences": 0,
    "max_residues": 50000, "seed": 0, "device": "auto", "dtype": "fp32", "batch_tokens": 16384,
    "max_length": None, "data_dir": None, "out": None, "checkpoint": None, "update_summary": True, "plot": True,
}
USAGE = ("usage: python -m speedrun.probe RUN_DIR [tasks=[ss3,meltome,solubility]] [layers=all|last|[0,3]] "
         "[baselines=[onehot,random_init]] [max_sequences=N] [max_residues=N] [device=auto|cpu|cuda] "
         "[dtype=fp32|bf16] [out=DIR] [--data-dir DIR]")


def _parse_cli(argv: List[str]) -> tuple:
    from omegaconf import OmegaConf

    run_dir, dotlist, data_dir = None, [], None
    it = iter(argv)
    for a in it:
        if a in ("-h", "--help"):
            print(USAGE + "\n\n" + (GUIDE or ""))
            sys.exit(0)
        if a == "--data-dir":
            data_dir = next(it, None)
            if data_dir is None:
                raise ProbeError("--data-dir needs a folder")
        elif a.startswith("--data-dir="):
            data_dir = a.split("=", 1)[1]
        elif "=" in a and not a.startswith("-"):
            dotlist.append(a)
        elif run_dir is None and not a.startswith("-"):
            run_dir = a
        else:
            raise ProbeError(f"unexpected argument {a!r}; {USAGE}")
    if run_dir is None:
        raise ProbeError(f"name a run directory; {USAGE}")
    try:
        given = OmegaConf.to_container(OmegaConf.from_dotlist(dotlist), resolve=True)
    except Exception as exc:  # noqa: BLE001
        raise ProbeError(f"cannot parse {' '.join(dotlist)}: {str(exc).splitlines()[0]}") from None
    unknown = sorted(set(given) - set(CLI_DEFAULTS))
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], list(CLI_DEFAULTS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ProbeError(f"unknown option {unknown[0]!r}{hint}: options are {', '.join(CLI_DEFAULTS)}")
    opts = {**CLI_DEFAULTS, **given}
    if data_dir:
        opts["data_dir"] = data_dir
    for key in ("tasks", "baselines"):
        v = opts[key]
        opts[key] = [] if v is None else ([v] if isinstance(v, (str, dict)) else list(v))
    for b in opts["baselines"]:
        if b not in BASELINES:
            raise ProbeError(f"unknown baseline {b!r}: choose from {', '.join(BASELINES)}")
    if not opts["tasks"]:
        raise ProbeError("tasks=[] names no task")
    if opts["dtype"] not in ("fp32", "bf16"):
        raise ProbeError(f"dtype={opts['dtype']!r} must be fp32 or bf16")
    for key in ("max_sequences", "max_residues", "seed", "batch_tokens"):
        if not isinstance(opts[key], int) or isinstance(opts[key], bool) or opts[key] < 0:
            raise ProbeError(f"{key}={opts[key]!r} must be a non-negative integer")
    return Path(run_dir), opts


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; a known failure (bad option, missing data, unreadable run) is one line on
    stderr, `error: ...`, and exit code 2 (errors.cli_main)."""
    return cli_main(_probe_run, sys.argv[1:] if argv is None else argv)


def _probe_run(argv: List[str]) -> int:
    run_dir, opts = _parse_cli(argv)
    if opts["device"] == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(opts["device"])
    model, info = load_run_model(run_dir, device, opts["checkpoint"])
    run_root = Path(info["checkpoint"]).parent.parent if (run_dir / "COMPLETE").exists() else run_dir
    max_length = opts["max_length"] or min(1024, int(info.get("max_length") or 1024))
    ks = parse_layers(opts["layers"], len(model.blocks))
    dtype = torch.bfloat16 if opts["dtype"] == "bf16" else torch.float32
    print(f"probing {info['checkpoint']} (step {info.get('step')}, {len(model.blocks)} blocks, d={model.cfg.dim}) "
          f"on {', '.join(task_name(t) for t in opts['tasks'])}; layers {ks[0]}..{ks[-1]} ({len(ks)}); "
          f"baselines {', '.join(opts['baselines']) or 'none'}; device {device}", flush=True)
    t0 = time.time()
    results = probe_model(model, opts["tasks"], ks, device, baselines=opts["baselines"],
                          max_sequences=opts["max_sequences"], max_residues=opts["max_residues"], seed=opts["seed"],
                          data_dir=opts["data_dir"], batch_tokens=opts["batch_tokens"], max_length=max_length,
                          dtype=dtype, log=lambda s: print(s, flush=True))
    out_dir = Path(opts["out"]) if opts["out"] else run_root
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = ({k: v for k, v in opts.items() if k not in ("out", "update_summary", "plot")}
                | {"layers": ks, "max_length": max_length, "device": str(device)})
    write_probe_json(out_dir / "probe.json", results, run_dir=run_root, checkpoint=info["checkpoint"],
                     step=info.get("step"), seconds=round(time.time() - t0, 1), settings=settings)
    print(format_table(results))
    print(f"wrote {out_dir / 'probe.json'}", end="")
    if opts["plot"]:
        plot(results, out_dir / "probe.png", title=f"{run_root} step {info.get('step')}")
        print(f", {out_dir / 'probe.png'}", end="")
    summary_path = run_root / "summary.json"
    if opts["update_summary"] and summary_path.exists():
        merge_summary(summary_path, results, info.get("step"))
        print(f"; probe metrics merged into {summary_path}", end="")
    print()
    return 0


# ---------------------------------------------------------------------------------------- run directories

def load_run_model(path: Union[str, Path], device=None, checkpoint: Optional[str] = None):
    """(model, info) from a run directory (newest sound checkpoint), a checkpoint folder or an export
    folder, through speedrun.models.open_model. info: checkpoint, step, config (RunConfig dict), max_length."""
    from ..models.load import ModelLoadError, open_model

    path = Path(path)
    if not path.exists():
        raise ProbeError(f"{path}: no such run directory")
    try:
        model = open_model(path, device=device or "cpu", checkpoint=checkpoint)
    except ModelLoadError as exc:
        raise ProbeError(f"cannot load a model from {path}: {exc}") from None
    if model.cfg.arch not in ("unet", "transformer", "esm2"):
        raise ProbeError(f"model.arch={model.cfg.arch} is not supported by speedrun.embed yet")
    meta = model.meta
    return model.eval(), {"checkpoint": meta.get("checkpoint") or str(path), "step": meta.get("step"),
                          "config": meta.get("training"), "max_length": meta.get("max_length")}


if __name__ == "__main__":
    sys.exit(main())
