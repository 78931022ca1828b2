"""The published packed shards on the Hugging Face hub (`Synthyra/<name>_packed`, RECIPE.md §2).

`python -m speedrun.data download data=omgprot50 data.num_chunks=10` fetches the valid and test shards
and the first `num_chunks` train shards into `data.path` (default `data/omg_prot50`, the folder the
reference trainer uses, so shards it already downloaded are reused as they are).

Why it works this way:

* **One file at a time with `huggingface_hub.hf_hub_download(local_dir=...)`**: it shows a progress
  bar, resumes a partial file (kept under `local_dir/.cache/huggingface/`) and moves the file into
  place only when complete, so an interrupted download never leaves a shard that looks whole.
* **Every file is verified** (magic, version, header length = file size) before it counts; a file
  already present and valid is not fetched again, so re-running the command only fills the gaps,
  without even asking the hub.
* **`download.json`** in the folder records the intended file list *before* fetching starts, so a run
  that starts after an interrupted download can say exactly which files are missing.
* **The token comes from `HF_TOKEN` only** (never a config, argument, file or log): passed to the hub
  client call, never printed; without it the download is anonymous (`token=False`, so a token cached
  by `hf auth login` is not picked up behind the user's back either).
* Unlike the reference (`range(num_chunks + 1)`), `num_chunks=N` means N train shards.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from ..errors import cli_main
from ..fsutil import write_json
from .shards import DataError, find_shards, read_header, shard_name

# config name -> (hub repo, shard file prefix, local folder name); the conf/data/*.yaml files say the same
HUB_DATASETS = {
    "omgprot50": ("Synthyra/omg_prot50_packed", "omg_prot50", "omg_prot50"),
    "uniref50": ("Synthyra/uniref50_packed", "uniref50", "uniref50"),
    "og_prot90": ("Synthyra/og_prot90_packed", "og_prot90", "og_prot90"),
}
MANIFEST = "download.json"


def expected_files(prefix: str, num_chunks: int, splits=("train", "valid", "test")) -> list[str]:
    """File names of a hub dataset: `{prefix}_{split}_{index:06d}.bin`; one valid and one test shard."""
    names = []
    for split in splits:
        count = num_chunks if split == "train" else 1
        names += [shard_name(prefix, split, i) for i in range(count)]
    return names


def _valid(path: Path) -> bool:
    try:
        read_header(path)
        return True
    except DataError:
        return False


def missing_files(folder: Path, names: list[str]) -> list[str]:
    """The names that are absent from `folder` or not valid shards (bad header or size)."""
    return [n for n in names if not _valid(folder / n)]


def compact(names: list[str]) -> str:
    """Names with runs of consecutive indices folded: 'x_train_000003.bin..x_train_000009.bin (7 files)'."""
    import re

    groups: list[list] = []  # [stem, first index, last index, first name, last name]
    for n in names:
        m = re.match(r"^(.*_)(\d{6})\.bin$", n)
        if m and groups and groups[-1][0] == m.group(1) and groups[-1][2] + 1 == int(m.group(2)):
            groups[-1][2] += 1
            groups[-1][4] = n
        elif m:
            groups.append([m.group(1), int(m.group(2)), int(m.group(2)), n, n])
        else:
            groups.append([None, 0, 0, n, n])
    return ", ".join(g[3] if g[1] == g[2] else f"{g[3]}..{g[4]} ({g[2] - g[1] + 1} files)" for g in groups)


def download_command(name: str, folder, num_chunks: Optional[int] = None) -> str:
    """The command that fetches data=`name` into `folder` (data.path only when not the default folder)."""
    cmd = f"python -m speedrun.data download data={name}"
    if num_chunks:
        cmd += f" data.num_chunks={num_chunks}"
    local = HUB_DATASETS.get(name, (None, None, None))[2]
    if local is None or Path(folder) != Path("data") / local:
        cmd += f" data.path={folder}"
    return cmd


def read_manifest(folder: Path) -> Optional[dict]:
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def check_folder(folder: Path, name: str, prefix: str, num_chunks: Optional[int],
                 splits=("train", "valid")) -> None:
    """Raise a one-line DataError naming every missing or broken file and the command that fetches them.

    `num_chunks=None` (the trainer passed only name and path): expect what `download.json` lists, or
    else at least the first train shard and the valid shard.
    """
    folder = Path(folder)
    if num_chunks is None or num_chunks <= 0:
        manifest = read_manifest(folder)
        if manifest and manifest.get("prefix") == prefix:
            names = [n for n in manifest.get("files", []) if any(f"_{s}_" in n for s in splits)]
            num_chunks = int(manifest.get("num_chunks", 0)) or None
        else:  # e.g. shards the reference trainer downloaded: what is there must be sound
            num_chunks = None
            names = expected_files(prefix, 1, splits)
            if folder.is_dir() and "train" in splits:
                names += [p.name for p in find_shards(folder, "train") if p.name not in names]
    else:
        names = expected_files(prefix, num_chunks, splits)
    missing = missing_files(folder, names)
    if missing:
        where = "does not exist" if not folder.is_dir() else f"lacks {len(missing)} of {len(names)} shard file(s)"
        raise DataError(f"data={name}: {folder} {where}: missing {compact(missing)}: fetch them with "
                        f"{download_command(name, folder, num_chunks)}")


# ============================================== downloading ===========================================
def _hf_download(repo: str, filename: str, folder: Path, revision: Optional[str], token) -> str:
    """One file from a hub dataset repo into `folder` (tests replace this function; no network in tests)."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=repo, repo_type="dataset", filename=filename, local_dir=str(folder),
                           revision=revision, token=token)


def _hf_list(repo: str, revision: Optional[str], token) -> list[str]:
    """Every file name in a hub dataset repo (used when num_chunks=0: fetch all train shards)."""
    from huggingface_hub import HfApi

    return HfApi().list_repo_files(repo, repo_type="dataset", revision=revision, token=token)


def _token():
    """HF_TOKEN from the environment, or False (anonymous; never a token cached on disk)."""
    return os.environ.get("HF_TOKEN") or False


def _explain(exc: BaseException, repo: str, filename: Optional[str], folder: Path) -> str:
    """A one-line, token-free description of a hub failure with the fix."""
    kinds = {c.__name__ for c in type(exc).__mro__}
    what = f"{repo}/{filename}" if filename else repo
    if "GatedRepoError" in kinds:
        msg = f"{repo}: gated dataset: accept its terms on huggingface.co and export HF_TOKEN"
    elif "RepositoryNotFoundError" in kinds:
        msg = f"{repo}: dataset repository not found or not accessible: check data.repo (and HF_TOKEN if private)"
    elif "RevisionNotFoundError" in kinds:
        msg = f"{repo}: revision not found: check data.revision"
    elif "RemoteEntryNotFoundError" in kinds or ("EntryNotFoundError" in kinds
                                                 and "LocalEntryNotFoundError" not in kinds):
        msg = (f"{what}: no such file on the hub (the dataset may hold fewer train shards): "
               "lower data.num_chunks or check data.file_prefix")
    elif "LocalEntryNotFoundError" in kinds or "ConnectionError" in kinds or "ConnectError" in kinds \
            or "Timeout" in " ".join(kinds) or "OfflineModeIsEnabled" in kinds:
        msg = (f"{what}: cannot reach the Hugging Face hub ({type(exc).__name__}): check the network "
               "(HF_ENDPOINT, HF_HUB_OFFLINE) and re-run; finished files are kept")
    elif "HfHubHTTPError" in kinds:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            msg = f"{what}: access denied (HTTP {status}): check HF_TOKEN"
        else:
            msg = f"{what}: hub error (HTTP {status}): re-run later; finished files are kept"
    elif isinstance(exc, OSError):
        msg = f"{folder}: cannot write ({exc.strerror or exc}): check the disk space and permissions of data.root"
    else:
        msg = f"{what}: download failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    token = os.environ.get("HF_TOKEN")
    if token:
        msg = msg.replace(token, "***")
    return msg


def download(name: str, repo: Optional[str], prefix: Optional[str], folder, num_chunks: int,
             revision: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """Fetch and verify the valid, test and first `num_chunks` train shards (0 = every train shard).

    Returns {"folder", "fetched", "present", "tokens"}; raises DataError (one line) on any failure.
    """
    if not repo or not prefix:
        raise DataError(f"data={name} is not a hub dataset (no data.repo / data.file_prefix): make its shards with "
                        f"python -m speedrun.data prepare FILES --out {folder}")
    folder = Path(folder).expanduser()
    token = _token()
    if num_chunks < 0:
        raise DataError(f"data.num_chunks={num_chunks} must be >= 0 (0 = every train shard on the hub)")
    if num_chunks == 0:
        try:
            remote = _hf_list(repo, revision, token)
        except Exception as exc:
            raise DataError(_explain(exc, repo, None, folder)) from None
        train = sorted(n for n in remote if n.startswith(f"{prefix}_train_") and n.endswith(".bin"))
        if not train:
            raise DataError(f"{repo}: no {prefix}_train_NNNNNN.bin files on the hub: check data.file_prefix")
        num_chunks = len(train)
    names = expected_files(prefix, num_chunks, ("valid", "test", "train"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{folder}: cannot create ({exc.strerror}): check data.root / data.path") from None
    manifest = {"repo": repo, "revision": revision, "prefix": prefix, "num_chunks": num_chunks,
                "files": names, "complete": False}
    write_json(folder / MANIFEST, manifest, where="set data.root / data.path to a writable folder")
    fetched, present, tokens = [], [], 0
    t0 = time.time()
    for i, fname in enumerate(names, 1):
        path = folder / fname
        if _valid(path):
            present.append(fname)
            tokens += read_header(path)
            continue
        log(f"[{i}/{len(names)}] {repo}/{fname}")
        try:
            got = Path(_hf_download(repo, fname, folder, revision, token))
        except Exception as exc:
            raise DataError(_explain(exc, repo, fname, folder)) from None
        if got.resolve() != path.resolve():  # hf_hub_download keeps the repo layout under local_dir
            os.replace(got, path)
        try:
            tokens += read_header(path)
        except DataError as exc:
            path.unlink(missing_ok=True)
            raise DataError(f"{exc} (deleted; re-run the download to fetch it again)") from None
        fetched.append(fname)
    manifest["complete"] = True
    write_json(folder / MANIFEST, manifest, where="set data.root / data.path to a writable folder")
    log(f"{name}: {len(names)} shard(s) verified in {folder} ({len(fetched)} fetched, {len(present)} already "
        f"there), {tokens:,} tokens, {time.time() - t0:.0f} s")
    return {"folder": str(folder), "fetched": fetched, "present": present, "tokens": tokens}


def run(argv: Optional[list] = None) -> int:
    """`python -m speedrun.data download data=NAME [data.num_chunks=N] [data.root=DIR] ...` (Hydra overrides).

    A known failure raises (one line); `main` prints it the CLI way."""
    from ..compose import compose

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print("usage: python -m speedrun.data download data=omgprot50|uniref50|og_prot90 [data.num_chunks=N] "
              "[data.root=DIR | data.path=DIR] [data.revision=REV]\n"
              "Fetches the valid and test shards and N train shards (0 = all) with huggingface_hub; "
              "the token is read from HF_TOKEN only.")
        return 0
    try:
        data = compose(argv).data
        download(data.name, data.repo, data.file_prefix, data.path, data.num_chunks, data.revision)
    except KeyboardInterrupt:
        print("interrupted: finished files are kept; re-run the same command to resume", file=sys.stderr, flush=True)
        return 130
    return 0


def main(argv: Optional[list] = None) -> int:
    return cli_main(run, argv)
