"""What a run leaves in its directory (only rank 0 writes; every rank logs to its own file).

    summary.json     status (running|done|failed|preempted|interrupted|dry_run), final metrics, unigram
                     baseline, n_params, tokens, wall/train seconds, tokens/s, time to target loss
    metrics.jsonl    one JSON object per step that logged anything (step, tokens, train_loss, lr,
                     tokens_per_s, ..., val_* when evaluated at that step, probe/* when probed, test_*
                     in the final row with eval.test=true); never two rows with the same step
    env.json         git commit + dirty flag, package versions, hardware, SLURM ids, launch mode
    code.diff        `git diff HEAD` at start when the tree is dirty
    rank0.log ...    text logs
    checkpoints/     see checkpoint.py

Secrets (HF_TOKEN, WANDB_API_KEY, ...) are read from the environment by the code that needs them and
never written here: env.json records an allow-list of variables only.

A write that fails for lack of space or permission (ENOSPC, EACCES, EROFS, ...) raises `RunDirWriteError`:
one line naming the file and the fix, which launch.py (speedrun/task.py) prints instead of a traceback (a
`CheckpointError`, the error checkpoint writes already raise for the same causes).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import CheckpointError  # noqa: F401  (re-exported)
from . import fsutil
from .fsutil import WriteError, json_clean, read_json, write_failure  # noqa: F401  (write_failure: re-exported)

_ENV_ALLOW = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME", "SLURM_NNODES",
              "SLURM_NTASKS", "SLURM_JOB_PARTITION", "SLURM_RESTART_COUNT", "CUDA_VISIBLE_DEVICES",
              "OMP_NUM_THREADS", "WORLD_SIZE", "SUBMITIT_EXECUTOR")
_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")


_RUN_FIX = "choose another run directory (hydra.run.dir=...), then resume the run"


class RunDirWriteError(WriteError, CheckpointError):
    """A run-directory file (summary.json, metrics.jsonl, env.json, ...) could not be written: full disk or
    no permission. One line naming the file and the fix."""


def _write_error(path: Path, exc: OSError) -> RunDirWriteError:
    return fsutil.write_error(path, exc, _RUN_FIX, RunDirWriteError)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (fsutil.atomic_write). A full disk or an unwritable directory raises
    RunDirWriteError (one line) and leaves the previous file in place."""
    fsutil.write_json(path, obj, where=_RUN_FIX, error=RunDirWriteError)


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically; a full disk or an unwritable directory raises RunDirWriteError."""
    fsutil.atomic_write(path, text, where=_RUN_FIX, error=RunDirWriteError)


class MetricsLog:
    """metrics.jsonl with one row per step; a no-op on ranks other than 0.

    `write(row)` appends a row, or, when the last row on disk has the same step (the training metrics
    of a step, then its evaluation, probes or final test metrics), rewrites that last line as the
    union of both: each row is on disk as soon as it is written, and no step has two rows. A full disk
    or an unwritable directory raises RunDirWriteError."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled
        self._last: Optional[dict] = None  # the last row on disk, and the byte offset where its line starts
        self._last_at = 0
        if enabled:
            self._find_last()

    def _find_last(self) -> None:
        self._last, self._last_at = None, 0
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _write_error(self.path, exc) from exc
        end = len(data)
        if data and not data.endswith(b"\n"):  # a torn last line (a crash mid-write): drop it
            end = data.rfind(b"\n") + 1
            try:
                with open(self.path, "r+b") as f:
                    f.truncate(end)
            except OSError as exc:
                raise _write_error(self.path, exc) from exc
        start = data.rfind(b"\n", 0, max(end - 1, 0)) + 1 if end else 0
        try:
            row = json.loads(data[start:end])
        except ValueError:
            return
        if isinstance(row, dict):
            self._last, self._last_at = row, start

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
        try:
            tmp.write_text("".join(k + "\n" for k in keep))
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise _write_error(self.path, exc) from exc
        self._find_last()

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        merge = self._last is not None and row.get("step") is not None and self._last.get("step") == row["step"]
        out = {**self._last, **row} if merge else row
        line = (json.dumps(json_clean(out)) + "\n").encode()
        try:
            with open(self.path, "ab") as f:
                if merge:
                    f.truncate(self._last_at)
                start = f.seek(0, os.SEEK_END)
                f.write(line)
        except OSError as exc:
            raise _write_error(self.path, exc) from exc
        self._last, self._last_at = out, start


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


def environment(extra: dict | None = None, repo: Path | None = None) -> tuple[dict, str]:
    """(env.json contents, git diff text of the code against its commit, new untracked files included).
    Never includes secret-looking variables."""
    import torch

    repo = repo or Path(__file__).resolve().parent.parent
    commit = _git(["rev-parse", "HEAD"], repo).strip()
    diff = _git(["diff", "HEAD"], repo) if commit else ""
    if commit:  # new files that are not committed yet belong to the code that ran too
        for name in _git(["ls-files", "--others", "--exclude-standard"], repo).splitlines():
            f = repo / name
            if f.is_file() and f.stat().st_size <= 1_000_000:
                diff += _git(["diff", "--no-index", "--", "/dev/null", name], repo)
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


def setup_logging(run_dir: Optional[Path], rank: int) -> logging.Logger:
    """Logger 'speedrun' writing to run_dir/rank{r}.log (and the console on rank 0); console only when
    run_dir is None (a dry run of an existing run writes nothing into it)."""
    log = logging.getLogger("speedrun")
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("[%(asctime)s][rank%(rank)s] %(message)s", "%H:%M:%S")
    if run_dir is not None:
        try:
            fh = logging.FileHandler(Path(run_dir) / f"rank{rank}.log")
        except OSError as exc:
            raise _write_error(Path(run_dir) / f"rank{rank}.log", exc) from exc
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


# ---- claiming a run directory: new, ours to resume, finished, or someone else's --------------------
@dataclass
class Claim:
    """What this process may do with a run directory.

    kind: new (empty or fresh) | resume (our run, from `checkpoint`) | restart (our run, stopped before
    its first checkpoint) | done (our run, finished: `summary`) | readonly (a dry run into a directory
    that holds a run: it writes nothing there)."""
    kind: str
    checkpoint: Optional[Path] = None
    summary: dict = field(default_factory=dict)
    changed: list = field(default_factory=list)  # keys that differ from the run's identity (resume=must)

    @property
    def writes(self) -> bool:
        return self.kind != "readonly"


def holds_a_run(run_dir: Path) -> bool:
    from .checkpoint import latest

    return any((run_dir / n).exists() for n in ("summary.json", "metrics.jsonl", "run.json")) or \
        latest(run_dir / "checkpoints") is not None


def _identity(run_dir: Path, cfg) -> tuple[dict, bool, list]:
    from .config import diff_keys, semantic_dict, signature

    ident = read_json(run_dir / "run.json")
    stored = ident.get("config")
    if not isinstance(stored, dict):
        return ident, False, []
    same = signature(stored) == signature(cfg)
    return ident, same, ([] if same else diff_keys(semantic_dict(stored), semantic_dict(cfg)))


def claim(run_dir: Path, cfg, *, is_main: bool) -> Claim:
    """Decide what this run may do in `run_dir` (see Claim). A directory holding another run's results
    is refused with one line; the caller holds the directory's lock (speedrun.fsutil.FolderLock)."""
    from . import checkpoint as ckpt
    from .errors import CheckpointError, FolderError

    run_dir = Path(run_dir)
    if cfg.dry_run:
        return Claim("readonly" if holds_a_run(run_dir) else "new")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirWriteError(f"cannot create the run directory {run_dir}: {exc.strerror or exc} - choose another "
                               "run directory (hydra.run.dir=...)") from exc
    previous = read_json(run_dir / "summary.json")
    ident, same, changed = _identity(run_dir, cfg)
    what = ", ".join(changed[:6])
    if previous.get("status") == "done":
        if ident and not same:
            raise FolderError(f"{run_dir} holds a finished run with a different config ({what}): start in a new "
                              "directory (drop hydra.run.dir / hydra.sweep.dir)")
        return Claim("done", summary=previous)
    found = ckpt.find(run_dir / "checkpoints") if cfg.resume != "never" else None
    if cfg.resume == "must" and found is None:
        raise CheckpointError(f"resume=must but {run_dir / 'checkpoints'} holds no complete checkpoint")
    if ckpt.latest(run_dir / "checkpoints") is not None or (run_dir / "metrics.jsonl").exists():
        if cfg.resume == "never" or (cfg.resume != "must" and not same):
            why = f"a run with a different config ({what})" if changed else "another run's results"
            raise FolderError(f"{run_dir} already holds {why}; start in a new directory (drop hydra.run.dir), "
                              "or resume=must to continue it anyway")
        if found is None:  # our own run, stopped before its first (sound) checkpoint: start it over
            if is_main:
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            return Claim("restart", changed=changed)
        return Claim("resume", checkpoint=found, changed=changed)
    return Claim("new")


def write_identity(run_dir: Path, cfg, changed: list) -> None:
    """run.json: the run's identity, written once — or again after resume=must continued it with another
    config, keeping the earlier identities under "history"."""
    from .config import semantic_dict, signature

    path = Path(run_dir) / "run.json"
    old = read_json(path)
    if old and not changed:
        return
    new = {"signature": signature(cfg), "config": semantic_dict(cfg)}
    if old:
        new["history"] = old.get("history", []) + [{k: old[k] for k in ("signature", "config") if k in old}]
    write_json(path, new)
