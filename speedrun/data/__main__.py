"""`python -m speedrun.data COMMAND ...` — make, fetch and check datasets.

    python -m speedrun.data prepare INPUT... --out DIR [--dedup] [...]     # your sequences -> shards
    python -m speedrun.data download data=omgprot50 data.num_chunks=10     # published shards (huggingface_hub)
    python -m speedrun.data check data=swissprot2014                        # what a run would read, or what is missing

`download` and `check` take the same Hydra overrides as launch.py (composed with Hydra's compose API
on the same conf/ and typed schema), so `data=... data.root=...` mean exactly what they mean for a run.
Known problems end with one line on stderr and exit code 2.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from .shards import DataError

USAGE = __doc__.split("\n\n")[1]


def compose_config(overrides: list[str]):
    """The typed RunConfig that `python launch.py OVERRIDES` would run with (nothing is run)."""
    from ..compose import compose

    try:
        return compose(overrides)
    except ConfigError as exc:
        raise DataError(str(exc)) from None


def compose_data(overrides: list[str]):
    """The typed DataConfig of `overrides` (e.g. ['data=omgprot50', 'data.num_chunks=10'])."""
    return compose_config(overrides).data


def check(argv: list[str]) -> int:
    """Print what a run of this data config would read; exit 2 with one line if something is missing."""
    from . import data_files
    from .shards import read_header

    try:
        data = compose_data(argv)
        for split in ("train", "valid", "test"):
            try:
                files = data_files(data, split)
            except DataError as exc:
                if split == "test":
                    print(f"test: none ({exc})")
                    continue
                raise
            tokens = sum(read_header(f) for f in files)
            print(f"{split}: {len(files)} shard(s), {tokens:,} tokens in {files[0].parent}")
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "prepare":
        from .prepare import main as prepare_main
        return prepare_main(rest)
    if cmd == "download":
        from .hub import main as download_main
        return download_main(rest)
    if cmd == "check":
        return check(rest)
    print(f"error: unknown command '{cmd}': use prepare, download or check\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
