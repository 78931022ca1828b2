"""The one exception base, and the one way an entry point reports it.

Every error this package expects to meet (a bad config, missing data, an unreadable checkpoint, a
folder that is not ours, a busy run directory...) is a `SpeedrunError` whose message is one line that
names the fix. Entry points (`launch.py`, `python -m speedrun.<tool>`) print it as `error: <message>`
on stderr and exit with code 2 (`cli_main`); anything else is a bug and keeps its traceback.

Standard library only: the config schema and `launch.py --help` import this without torch.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

EXIT_ERROR = 2


class SpeedrunError(Exception):
    """A known failure; str() is one line naming what to do."""


class ConfigError(SpeedrunError, ValueError):
    """A configuration that cannot run."""


class DataError(SpeedrunError):
    """A dataset or shard that cannot be read or is not what it claims."""


class CheckpointError(SpeedrunError):
    """A checkpoint (or another run-directory file) that cannot be written or read."""


class FolderError(SpeedrunError):
    """A target folder or file that a tool must not touch (not empty, not ours, in use)."""


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message` (for errors that are not ours)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def report(exc: BaseException, file=None) -> int:
    """Print a known error the one way (`error: ...`); returns the exit code."""
    print(f"error: {' '.join(str(exc).split())}", file=file or sys.stderr, flush=True)
    return EXIT_ERROR


def cli_main(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run a tool's `main(argv)`: a SpeedrunError becomes one line and exit code 2, Ctrl-C exit 130."""
    try:
        return int(main(argv) or 0)
    except SpeedrunError as exc:
        return report(exc)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
