"""Files the package writes: one atomic-write helper, one folder lock, one rule for output folders.

* `atomic_write(path, data)` — write to a temporary file beside `path`, fsync, rename over it: a
  reader sees the old file or the new one, never half of one. A full disk, a read-only file system or
  a missing permission raises `WriteError`, one line naming the file and the fix; the old file stays.
* `FolderLock(folder)` — one process owns a folder (a run directory, a `prepare --out` folder) at a
  time: an exclusive `fcntl.flock` on `folder/.lock`, which the kernel releases when the process dies
  (no stale locks after a kill). A second process stops with one line naming the holder's pid and
  host. On local disks this is exact. On NFS, Linux emulates flock with POSIX byte-range locks, which
  holds across hosts when the NFS lock service runs; where a shared file system refuses locks
  (ENOLCK, EOPNOTSUPP: some Lustre or GPFS mounts), the lock is skipped with one warning and the
  guarantee does not hold.
* `claim_output(folder, tool, overwrite)` / `Manifest` — a tool writes only into an empty or missing
  folder, or into one it wrote before (`.speedrun-manifest.json` lists its files); `--overwrite`
  removes only the files that manifest lists, never a file the user put there.

Standard library only.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from .errors import FolderError, SpeedrunError

LOCK_NAME = ".lock"
MANIFEST_NAME = ".speedrun-manifest.json"
_UNSUPPORTED_LOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class WriteError(SpeedrunError):
    """A file could not be written (full disk, read-only, permission). One line naming file and fix."""


def write_failure(exc: OSError) -> tuple[str, str]:
    """(what went wrong, what to do) for an OSError of a write, in words."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full", "free space on that disk"
    if exc.errno == errno.EROFS:
        return "the file system is read-only", "make it writable"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied", "make the directory writable"
    text = exc.strerror or str(exc) or type(exc).__name__
    return text.splitlines()[0], "fix the disk or the directory"


def write_error(path: Path, exc: OSError, where: str = "choose another folder", error=None) -> WriteError:
    why, fix = write_failure(exc)
    return (error or WriteError)(f"could not write {path}: {why} - {fix}, or {where}")


def json_clean(obj: Any) -> Any:
    """JSON-safe values: NaN/inf become None (JSON has no NaN), tuples become lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    return obj


def atomic_write(path: os.PathLike | str, data: bytes | str, *, where: str = "choose another folder",
                 error: Optional[type] = None) -> None:
    """Replace `path` with `data` atomically (temporary file + fsync + rename). A failed write raises
    `error` (default WriteError) naming the file, the cause and `where` to go instead."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_error(path, exc, where, error) from exc
        raise


def write_json(path: os.PathLike | str, obj: Any, *, where: str = "choose another folder",
               error: Optional[type] = None) -> None:
    atomic_write(path, json.dumps(json_clean(obj), indent=2) + "\n", where=where, error=error)


def read_json(path: os.PathLike | str) -> dict:
    """The JSON object in `path`, or {} when it is missing or unreadable."""
    try:
        with open(path) as f:
            out = json.load(f)
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


# ---- one owner per folder -------------------------------------------------------------------------
class FolderLock:
    """Exclusive ownership of `folder` for this process (see the module docstring)."""

    def __init__(self, folder: os.PathLike | str, what: str = "folder"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None

    def holder(self) -> str:
        info = read_json(self.path)
        if not info:
            return "another process"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
        return f"pid {info.get('pid')} on host {info.get('host')} (since {since})"

    def acquire(self) -> "FolderLock":
        if self._fd is not None:
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(self.path, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderError(f"{self.folder} is in use by {self.holder()}: wait for that process to end "
                                  f"or use another {self.what}") from None
            if exc.errno in _UNSUPPORTED_LOCK:
                logging.getLogger("speedrun").warning(
                    f"{self.folder}: this file system does not support locks; one owner per {self.what} is "
                    "not enforced here")
                return self
            raise write_error(self.path, exc) from exc
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---- output folders: never overwrite what the user made --------------------------------------------
class Manifest:
    """The files a tool wrote into a folder (`.speedrun-manifest.json`); `previous` lists those of an
    earlier output that an --overwrite will replace (remove_previous)."""

    def __init__(self, folder: os.PathLike | str, tool: str):
        self.folder, self.tool = Path(folder), tool
        self.path = self.folder / MANIFEST_NAME
        self.previous: list[str] = []

    def remove_previous(self) -> None:
        """Remove the earlier output's files (only those its manifest lists), then the manifest."""
        for name in self.previous:
            with contextlib.suppress(FileNotFoundError):
                (self.folder / name).unlink()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.previous = []

    def files(self) -> list[str]:
        data = read_json(self.path)
        return [f for f in data.get("files", []) if isinstance(f, str)] if data.get("tool") == self.tool else []

    def record(self, names: Iterable[str]) -> None:
        names = sorted(set(self.files()) | {str(n) for n in names})
        write_json(self.path, {"tool": self.tool, "files": names, "time": time.time()})


def _user_files(folder: Path, ours: set[str]) -> list[str]:
    skip = ours | {MANIFEST_NAME, LOCK_NAME}
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() not in skip)


def claim_output(folder: os.PathLike | str, tool: str, overwrite: bool, flag: str = "--overwrite",
                 remove: bool = True) -> Manifest:
    """Make `folder` ready for `tool` to write into, never touching a file it did not write.

    A missing or empty folder is fine. A folder holding files: refused unless `overwrite`, and even
    then only the files of this tool's manifest are removed (now, or with remove=False when the caller's
    new output is complete: `manifest.remove_previous()`); any other file makes it refuse."""
    folder = Path(folder)
    manifest = Manifest(folder, tool)
    if folder.exists() and not folder.is_dir():
        raise FolderError(f"{folder} is a file, not a folder: choose a folder for the output")
    present = folder.is_dir() and any(p.name not in (LOCK_NAME,) for p in folder.iterdir())
    if not present:
        return manifest
    ours = set(manifest.files())
    foreign = _user_files(folder, ours)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise FolderError(f"{folder} holds files {tool} did not write ({shown}): choose an empty or new folder"
                          + ("" if overwrite else f" ({flag} replaces only what {tool} wrote there)"))
    if not overwrite:
        raise FolderError(f"{folder} already holds the output of an earlier {tool}: pass {flag} to replace it, "
                          "or choose another folder")
    manifest.previous = sorted(ours)
    if remove:
        manifest.remove_previous()
    return manifest


def claim_output_file(path: os.PathLike | str, overwrite: bool, inputs: Iterable[os.PathLike | str] = (),
                      flag: str = "overwrite=true") -> Path:
    """A single output file: refused when it is one of the inputs, or exists without `overwrite`."""
    path = Path(path)
    for inp in inputs:
        with contextlib.suppress(OSError):
            if path.exists() and Path(inp).exists() and os.path.samefile(path, inp):
                raise FolderError(f"{path} is also an input of this command: write the output to another file")
    if path.exists() and not overwrite:
        raise FolderError(f"{path} exists: choose another output file, or {flag} to replace it")
    if path.exists() and path.is_dir():
        raise FolderError(f"{path} is a folder: name an output file")
    return path
