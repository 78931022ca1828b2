"""What a run leaves in its directory (only rank 0 writes; every rank logs to its own file).

    summary.json     status (running|done|failed|preempted|interrupted|dry_run), final metrics, unigram
                     baseline, n_params, tokens, wall/train seconds, tokens/s, time to target loss
    metrics.jsonl    one JSON object per logged step (step, tokens, train_loss, lr, tokens_per_s, ...,
                     and val_* when evaluated)
    env.json         git commit + dirty flag, package versions, hardware, SLURM ids, launch mode
    code.diff        `git diff HEAD` at start when the tree is dirty
    rank0.log ...    text logs
    checkpoints/     see checkpoint.py

Secrets (HF_TOKEN, WANDB_API_KEY, ...) are read from the environment by the code that needs them and
never written here: env.json records an allow-list of variables only.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_ENV_ALLOW = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME", "SLURM_NNODES",
              "SLURM_NTASKS", "SLURM_JOB_PARTITION", "SLURM_RESTART_COUNT", "CUDA_VISIBLE_DEVICES",
              "OMP_NUM_THREADS", "WORLD_SIZE", "SUBMITIT_EXECUTOR")
_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")


def _clean(obj: Any) -> Any:
    """JSON-safe values: NaN/inf become None (JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_clean(obj), f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


class MetricsLog:
    """Append-only metrics.jsonl; a no-op on ranks other than 0."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint, so the file reads as one clean run."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except ValueError:
                continue
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(_clean(row)) + "\n")


def read_metrics(path: Path) -> list[dict]:
    rows = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def _git(args: list[str], cwd: Path) -> str:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(extra: dict | None = None) -> tuple[dict, str]:
    """(env.json contents, git diff text). Never includes secret-looking variables."""
    import torch

    repo = Path(__file__).resolve().parent.parent
    commit = _git(["rev-parse", "HEAD"], repo).strip()
    diff = _git(["diff", "HEAD"], repo) if commit else ""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("numpy", "hydra", "omegaconf", "submitit", "triton", "safetensors", "wandb", "huggingface_hub"):
        m = sys.modules.get(mod)
        if m is None:
            try:
                from importlib.metadata import version
                versions[mod] = version({"hydra": "hydra-core"}.get(mod, mod))
            except Exception:
                continue
        else:
            versions[mod] = getattr(m, "__version__", "?")
    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    env = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": commit or None,
        "git_dirty": bool(diff.strip()),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "gpus": gpus,
        "cuda": torch.version.cuda,
        "versions": versions,
        "command": sys.argv,
        "env": {k: os.environ[k] for k in _ENV_ALLOW
                if k in os.environ and not any(w in k for w in _SECRET_WORDS)},
    }
    env.update(extra or {})
    return env, diff


def setup_logging(run_dir: Path, rank: int) -> logging.Logger:
    """Logger 'speedrun' writing to run_dir/rank{r}.log (and the console on rank 0)."""
    log = logging.getLogger("speedrun")
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("[%(asctime)s][rank%(rank)s] %(message)s", "%H:%M:%S")
    fh = logging.FileHandler(Path(run_dir) / f"rank{rank}.log")
    fh.setFormatter(fmt)
    log.addHandler(fh)
    if rank == 0:
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(sh)
    old = logging.getLogRecordFactory()
    if not getattr(old, "_speedrun", False):
        def factory(*a, **k):
            rec = old(*a, **k)
            rec.rank = os.environ.get("RANK", "0")
            return rec
        factory._speedrun = True  # type: ignore[attr-defined]
        logging.setLogRecordFactory(factory)
    return log
