"""`python -m speedrun.data COMMAND ...` — make, fetch and check datasets.

    python -m speedrun.data prepare INPUT... --out DIR [--dedup] [...]     # your sequences -> shards
    python -m speedrun.data download data=omgprot50 data.num_chunks=10     # published shards (huggingface_hub)
    python -m speedrun.data check data=swissprot2014                        # what a run would read, or what is wrong

`download` and `check` take the same Hydra overrides as launch.py (composed with Hydra's compose API
on the same conf/ and typed schema, `compose.py`), so `data=... data.root=...` mean exactly what they
mean for a run. Known problems end with one line on stderr and exit code 2 (`speedrun.errors.cli_main`).
"""
from __future__ import annotations

import sys
from typing import Optional

from ..compose import compose
from ..errors import SpeedrunError, cli_main
from .shards import SPLITS, DataError

USAGE = __doc__.split("\n\n")[1]


def check(argv: list[str]) -> int:
    """Print what a run of this data config would read, and every problem in it: missing files, a shard
    with token ids outside the vocabulary or without residues, a split without documents. A problem
    raises one DataError (after all of them are listed)."""
    from . import data_files
    from .shards import empty_split_error, fingerprint, open_shard, read_header

    data = compose(argv).data
    problems: list[str] = []
    for split in SPLITS:
        try:
            files = data_files(data, split)
        except DataError as exc:
            if split == "test":
                print(f"test: none ({exc})")
                continue
            raise
        tokens, bad = 0, []
        for f in files:
            try:
                tokens += read_header(f)
                open_shard(f)  # the content check a run makes when it opens the shard
            except DataError as exc:
                bad.append(str(exc))
        if not bad and tokens == 0:
            bad.append(str(empty_split_error(files, split)))
        extra = f", fingerprint {fingerprint(files)}" if split == "train" else ""
        print(f"{split}: {len(files)} shard(s), {tokens:,} tokens in {files[0].parent}{extra}")
        for b in bad:
            print(f"  problem: {b}")
        problems += bad
    if problems:
        raise DataError(f"data={data.name}: {len(problems)} problem(s) in the shards (each listed above); the "
                        f"first: {problems[0]}")
    return 0


def _main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "prepare":
        from .prepare import run as prepare_run
        return prepare_run(rest)
    if cmd == "download":
        from .hub import run as download_run
        return download_run(rest)
    if cmd == "check":
        return check(rest)
    raise SpeedrunError(f"unknown command '{cmd}': use prepare, download or check (python -m speedrun.data --help)")


def main(argv: Optional[list] = None) -> int:
    """The CLI; a known failure is one line `error: ...` and exit code 2."""
    return cli_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
