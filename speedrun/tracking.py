"""Experiment tracking for one training job: Weights & Biases, the console progress display, and the
config tree printed at start.

    tracker = Tracker(cfg, run_dir, is_main=info.is_main)
    tracker.start(total_steps=cfg.train.max_steps, start_step=step, info=desc)
    try:
        ... each optimizer step:   tracker.progress(step)                       (advances the bar; no sync)
        ... each logged row:       tracker.log(row); tracker.progress(step, loss, tokens_per_s, extra)
        ... at the end:            tracker.summary(summary)
    finally:
        tracker.finish(status)

`Tracker` is also a context manager whose exit calls `finish()` (status "failed"/"interrupted" when an
exception escapes), so a job's W&B run is always finished — also on exceptions and in a multirun,
where every job is one W&B run.

Weights & Biases is on when `cfg.logger == "wandb"`, or `cfg.logger == "auto"` and `WANDB_API_KEY` is
set (never with `WANDB_MODE=disabled`); only the main rank talks to it. The standard W&B variables
apply: `WANDB_MODE=offline` logs with no network (then `wandb sync DIR/wandb/offline-run-*`),
`WANDB_DIR` moves the W&B files (default: the run directory, so they live at `run_dir/wandb/`). With `logger=wandb`, online mode and no key (neither
`WANDB_API_KEY` nor a `wandb login` entry in ~/.netrc) the run is logged offline with a warning instead
of prompting. The W&B run id is kept in `run_dir/wandb_run_id` and reused with `resume="allow"`, so a
resumed run continues the same W&B run. Logged: the config (`speedrun.config.to_dict(cfg)` plus
`run_dir` and the `info` passed to `start`), every metrics.jsonl row (numbers only; the x-axis is the
row's `step`, via `define_metric`, so rows re-logged after a resume are not dropped), and the final
summary with `status`. The API key is read by wandb itself from the environment; this module only
checks whether it is set and never writes it anywhere. A W&B failure is logged once as a warning and
turns W&B off; it never stops training.

Console (`cfg.log.progress`): `bar` shows a tqdm bar on stderr with loss, tokens/s and ETA, and the
`speedrun` logger's console lines are printed above it; `plain` prints one line on stdout per
`progress()` call that carries a loss (for SLURM logs): step, %, loss, tokens/s, `extra`, elapsed and
ETA; `auto` picks `bar` when stderr is a terminal. In both modes the progress lines also go to the
`speedrun` logger's files (rank0.log) but not to its console handler, so nothing is shown twice.
`print_config_tree()` prints the resolved config as a rich tree; `start()` calls it on the main rank
when `cfg.log.print_config` is true.

Nothing heavy is imported at module level (wandb only when it is on).
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO

from .config import RunConfig, to_dict

ID_FILE = "wandb_run_id"
LOGGER = "speedrun"
_NO_CONSOLE = "speedrun_no_console"


def wandb_wanted(cfg: RunConfig, environ=None) -> bool:
    """Whether this config asks for W&B: logger=wandb, or logger=auto with WANDB_API_KEY set
    (never with WANDB_MODE=disabled)."""
    environ = os.environ if environ is None else environ
    if (environ.get("WANDB_MODE") or "").lower() == "disabled":
        return False
    return cfg.logger == "wandb" or (cfg.logger == "auto" and bool(environ.get("WANDB_API_KEY")))


def read_or_create_run_id(run_dir: Path) -> str:
    """The W&B run id of this run directory: read from run_dir/wandb_run_id, or created and saved there."""
    path = Path(run_dir) / ID_FILE
    if path.exists():
        rid = path.read_text().strip()
        if rid:
            return rid
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    rid = "".join(secrets.choice(alphabet) for _ in range(8))
    tmp = path.with_name(f".{ID_FILE}.tmp-{os.getpid()}")
    tmp.write_text(rid + "\n")
    os.replace(tmp, path)
    return rid


def sweep_group(run_dir: Path) -> Optional[str]:
    """`<name>/<sweep time>` for a multirun job directory (outputs/sweeps/<name>/<time>/<job num>), else None."""
    parts = Path(run_dir).resolve().parts
    if len(parts) >= 4 and parts[-4] == "sweeps":
        return f"{parts[-3]}/{parts[-2]}"
    return None


def print_config_tree(cfg_dict: dict, *, file: Optional[TextIO] = None, title: str = "config") -> None:
    """Print a (nested) config dict as a rich tree: one branch per section, `key: value` leaves."""
    from rich.console import Console
    from rich.text import Text
    from rich.tree import Tree

    def add(node, d: dict) -> None:
        for key, value in d.items():
            if isinstance(value, dict):
                add(node.add(Text(str(key), style="bold cyan")), value)
            else:
                leaf = Text(f"{key}: ", style="bold")
                leaf.append(repr(value) if isinstance(value, str) else str(value))
                node.add(leaf)

    tree = Tree(Text(title, style="bold"), guide_style="dim")
    scalars = {k: v for k, v in cfg_dict.items() if not isinstance(v, dict)}
    add(tree, {k: v for k, v in cfg_dict.items() if isinstance(v, dict)})
    add(tree, scalars)
    Console(file=file or sys.stdout, highlight=False, soft_wrap=True).print(tree)


def _netrc_has_wandb() -> bool:
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _numeric(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, bool):
            out[k] = int(v)
        elif isinstance(v, (int, float)):
            out[k] = v
    return out


class _DropProgress(logging.Filter):
    """On console handlers while the tracker runs: the progress lines reach the console through the
    tracker itself (bar or plain line), so the logger only writes them to the rank log files."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, _NO_CONSOLE, False)


class _TqdmHandler(logging.Handler):
    """Stands in for a console handler while the bar is shown: writes above the bar, and drops the
    progress lines (they are on the bar already)."""

    def __init__(self, original: logging.StreamHandler):
        super().__init__(original.level)
        self.original = original
        self.setFormatter(original.formatter)
        for f in original.filters:
            self.addFilter(f)

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, _NO_CONSOLE, False):
            return
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.original.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class Tracker:
    """W&B + console progress for one job. Every method is a no-op on non-main ranks; `finish()` is
    idempotent. See the module docstring for when to call what."""

    def __init__(self, cfg: RunConfig, run_dir: str | os.PathLike, is_main: bool = True, *,
                 group: Optional[str] = None, stream: Optional[TextIO] = None):
        self.cfg, self.run_dir, self.is_main = cfg, Path(run_dir), is_main
        self.group = group or cfg.log.wandb_group or sweep_group(self.run_dir)
        self.stream = stream  # None: stderr for the bar, stdout for plain lines
        self.use_wandb = is_main and wandb_wanted(cfg)
        self.run = None  # the wandb Run while active
        self.run_id: Optional[str] = None
        self.mode = "off"  # the console mode: bar | plain | off
        self.status: Optional[str] = None
        self._bar = None
        self._swapped: list[tuple[logging.StreamHandler, _TqdmHandler]] = []
        self._filtered: list[logging.Handler] = []
        self._drop = _DropProgress()
        self._t0 = self._start_step = self._total = None
        self._started = self._finished = False
        self._log = logging.getLogger(LOGGER)

    # ---------------------------------------------------------------------------------------- start
    def start(self, total_steps: int, start_step: int = 0, info: Optional[dict] = None) -> None:
        """Call once before the loop (after resuming, so `start_step` is the resumed step): prints the
        config tree, starts the W&B run, opens the progress display. `info` joins the W&B config."""
        if not self.is_main or self._started:
            return
        self._started = True
        self._total, self._start_step, self._t0 = int(total_steps), int(start_step), time.time()
        if self.cfg.log.print_config:
            try:
                print_config_tree(to_dict(self.cfg), file=sys.stdout)
            except Exception as exc:  # noqa: BLE001 - cosmetics never stop a run
                self._log.warning(f"could not print the config tree: {exc}")
        if self.use_wandb:
            self._start_wandb(info or {})
        self._open_console()

    def _start_wandb(self, info: dict) -> None:
        try:
            import wandb

            self.run_id = read_or_create_run_id(self.run_dir)
            mode = None
            wanted = (os.environ.get("WANDB_MODE") or "online").lower()
            if wanted in ("online", "run") and not os.environ.get("WANDB_API_KEY") and not _netrc_has_wandb():
                mode = "offline"
                self._log.warning("logger=wandb but no WANDB_API_KEY: logging W&B offline "
                                  "(wandb sync <dir>/wandb/offline-run-* later)")
            config = {**to_dict(self.cfg), "run_dir": str(self.run_dir), "run": info}
            kwargs: dict[str, Any] = dict(
                project=self.cfg.log.wandb_project, entity=self.cfg.log.wandb_entity, group=self.group,
                name=f"{self.cfg.name}-{self.run_dir.name}", job_type="train",
                tags=[self.cfg.model.arch, self.cfg.optimizer.name, self.cfg.objective.name],
                dir=os.environ.get("WANDB_DIR") or str(self.run_dir), id=self.run_id, resume="allow",
                config=config, allow_val_change=True, mode=mode,
                settings=wandb.Settings(console="off"))
            if _wandb_version(wandb) >= (0, 19):
                kwargs["reinit"] = "finish_previous"
            else:  # pragma: no cover - older wandb
                kwargs["reinit"] = True
            self.run = wandb.init(**kwargs)
            self.run.define_metric("step")
            self.run.define_metric("*", step_metric="step")
            where = getattr(self.run, "dir", None)
            self._log.info(f"W&B run {self.run_id} ({getattr(self.run.settings, 'mode', mode) or 'online'})"
                           + (f": {Path(where).parent}" if where else ""))
        except Exception as exc:  # noqa: BLE001
            self._wandb_failed("start", exc)

    def _wandb_failed(self, what: str, exc: BaseException) -> None:
        self._log.warning(f"W&B {what} failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                          "continuing without W&B")
        run, self.run, self.use_wandb = self.run, None, False
        if run is not None and what != "finish":
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass

    def _open_console(self) -> None:
        mode = self.cfg.log.progress
        if mode == "auto":
            probe = self.stream if self.stream is not None else sys.stderr
            tty = hasattr(probe, "isatty") and probe.isatty() and os.environ.get("TERM") != "dumb"
            mode = "bar" if tty else "plain"
        self.mode = mode
        if self.stream is None:
            self.stream = sys.stderr if mode == "bar" else sys.stdout
        handlers = self._log.handlers
        for i, h in enumerate(handlers):
            if type(h) is not logging.StreamHandler:  # only console handlers (FileHandler is a subclass)
                continue
            if mode == "bar":
                handlers[i] = _TqdmHandler(h)  # in place: the handler order is kept
                self._swapped.append((h, handlers[i]))
            else:
                h.addFilter(self._drop)
                self._filtered.append(h)
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=self._total, initial=self._start_step, unit="step", file=self.stream,
                             dynamic_ncols=True, desc=self.cfg.name, leave=True)

    # ----------------------------------------------------------------------------------- each step
    def log(self, row: dict) -> None:
        """A metrics.jsonl row (step, tokens, train_loss, tokens_per_s, val_*...): sent to W&B (numbers only)."""
        if self.run is None:
            return
        try:
            data = _numeric(row)
            if data:
                self.run.log(data)
        except Exception as exc:  # noqa: BLE001
            self._wandb_failed("log", exc)

    def progress(self, step: int, loss: Optional[float] = None, tokens_per_s: Optional[float] = None,
                 extra: str = "") -> None:
        """Console progress. Call with only `step` as often as you like (advances the bar); call with the
        logged mean `loss` and `tokens_per_s` at log steps (bar postfix; in plain mode one line, also
        written to the rank log)."""
        if not self.is_main or not self._started or self._finished:
            return
        if self._bar is not None:
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
            if loss is not None:
                post = {"loss": f"{loss:.4f}"}
                if tokens_per_s is not None:
                    post["tok/s"] = f"{tokens_per_s / 1e3:.1f}k"
                self._bar.set_postfix(post, refresh=True)
        if loss is None:
            return
        line = self._line(step, loss, tokens_per_s, extra)
        if self.mode == "plain":
            print(line, file=self.stream, flush=True)
        self._log.info(line, extra={_NO_CONSOLE: True})  # the rank log files; the console has it already

    def _line(self, step: int, loss: float, tps: Optional[float], extra: str) -> str:
        total = max(self._total or 0, 1)
        elapsed = time.time() - (self._t0 or time.time())
        done = step - (self._start_step or 0)
        eta = elapsed / done * (total - step) if done > 0 else float("nan")
        parts = [f"step {step}/{self._total} ({100 * step / total:.0f}%)", f"loss {loss:.4f}"]
        if tps is not None:
            parts.append(f"{tps / 1e3:.1f}k tok/s")
        if extra:
            parts.append(extra)
        parts.append(f"elapsed {_hms(elapsed)} | ETA {_hms(eta)}")
        return " | ".join(parts)

    # ---------------------------------------------------------------------------------------- end
    def summary(self, summary: dict) -> None:
        """The final summary.json contents: stored as the W&B run summary (None values dropped)."""
        if not self.is_main:
            return
        if summary.get("status"):
            self.status = summary["status"]
        if self.run is None:
            return
        try:
            self.run.summary.update({k: v for k, v in summary.items() if v is not None})
        except Exception as exc:  # noqa: BLE001
            self._wandb_failed("summary", exc)

    def finish(self, status: Optional[str] = None) -> None:
        """Close the bar, restore the console handlers and finish the W&B run (exit code 0 for done,
        1 otherwise; `mark_preempting` first for preempted). Always call it; safe to call twice."""
        if self._finished:
            return
        self._finished = True
        status = status or self.status or "done"
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        handlers = self._log.handlers
        for original, repl in self._swapped:
            if repl in handlers:
                handlers[handlers.index(repl)] = original
        self._swapped = []
        for h in self._filtered:
            h.removeFilter(self._drop)
        self._filtered = []
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.summary["status"] = status
            if status == "preempted":
                run.mark_preempting()
            run.finish(exit_code=0 if status in ("done", "dry_run") else 1)
        except Exception as exc:  # noqa: BLE001
            self._wandb_failed("finish", exc)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish(self.status if self.status in ("interrupted", "preempted") else "interrupted")
        elif issubclass(exc_type, SystemExit):  # the trainer exits this way after interrupted/preempted
            ok = getattr(exc, "code", 1) in (0, None)
            self.finish(self.status if self.status not in (None, "running") else ("done" if ok else "failed"))
        else:
            self.finish(self.status if self.status not in (None, "running", "done") else "failed")


def _wandb_version(wandb) -> tuple[int, int]:
    try:
        major, minor = str(wandb.__version__).split(".")[:2]
        return int(major), int(minor)
    except ValueError:  # pragma: no cover
        return (0, 0)


__all__ = ["Tracker", "print_config_tree", "read_or_create_run_id", "sweep_group", "wandb_wanted", "ID_FILE"]
