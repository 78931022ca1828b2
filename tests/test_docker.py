"""The Dockerfile cannot be built here (no Docker engine), so it is parsed: a pinned base image, a
non-root user, the README's install command, `python launch.py` as the entry point, no baked-in secrets,
and a .dockerignore that keeps results, history and site settings out of the build context."""
from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECRET_NAMES = ("HF_TOKEN", "WANDB_API_KEY", "HUGGING_FACE_HUB_TOKEN")


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    if current.strip():
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def readme_install_command() -> str:
    """The install command of the README's quick-start code block (the `pip install ...` part)."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Quick start' section"
    block = re.search(r"```(?:bash|sh|console)?\n(.*?)```", section.group(1), re.S)
    assert block, "the quick start has no code block"
    for line in block.group(1).splitlines():
        for part in line.split("&&"):
            if re.match(r"\s*(python -m )?pip install\b", part):
                return " ".join(part.split())
    raise AssertionError("no pip install command in the quick-start block")


@pytest.fixture(scope="module")
def instructions():
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


def _norm(s: str) -> str:
    return " ".join(s.split())


def test_parser_handles_continuations_and_comments():
    got = parse_dockerfile("# c\nFROM a:1\nRUN x \\\n  # inner\n  && y\nUSER u\n")
    assert [(kw, _norm(args)) for kw, args in got] == [("FROM", "a:1"), ("RUN", "x && y"), ("USER", "u")]


def test_base_image_is_a_pinned_cuda_pytorch(instructions):
    froms = [args for kw, args in instructions if kw == "FROM"]
    assert froms, "no FROM"
    for args in froms:
        image = [w for w in args.split() if not w.startswith("--")][0]
        assert "@sha256:" in image or ":" in image.rsplit("/", 1)[-1], f"{image}: no tag"
        tag = image.split("@")[0].rsplit(":", 1)[-1]
        assert tag != "latest" and re.match(r"\d+\.\d+\.\d+", tag), f"{image}: tag is not a pinned version"
    assert froms[0].startswith("pytorch/pytorch:") and "cuda" in froms[0]


def test_runs_the_readme_install_command(instructions):
    cmd = readme_install_command()
    assert cmd.startswith("pip install") and "-e" in cmd.split()  # today: pip install -e ".[dev]"
    runs = [_norm(args) for kw, args in instructions if kw == "RUN"]
    assert any(cmd in r for r in runs), f"no RUN executes {cmd!r}: {runs}"


def test_runs_as_a_non_root_user(instructions):
    users = [(i, args) for i, (kw, args) in enumerate(instructions) if kw == "USER"]
    assert users, "no USER: the container would run as root"
    idx, user = users[-1]
    name = user.split(":")[0]
    assert name not in ("root", "0"), user
    entry = [i for i, (kw, _) in enumerate(instructions) if kw == "ENTRYPOINT"]
    assert entry and entry[-1] > idx, "ENTRYPOINT must come after the last USER"


def test_entrypoint_is_launch_py_in_exec_form(instructions):
    entries = [args for kw, args in instructions if kw == "ENTRYPOINT"]
    assert entries and json.loads(entries[-1]) == ["python", "launch.py"]


def test_environment_and_no_baked_secrets(instructions):
    env = {}
    for kw, args in instructions:
        if kw == "ENV":
            for tok in shlex.split(args):
                k, _, v = tok.partition("=")
                env[k] = v
    assert env.get("PYTHONUNBUFFERED") == "1"
    for kw, args in instructions:
        if kw in ("ENV", "ARG", "LABEL", "RUN"):
            for name in SECRET_NAMES:
                assert name not in args, f"{kw} {args!r} mentions {name}"
    text = (ROOT / "Dockerfile").read_text()
    assert "-e HF_TOKEN" in text and "-e WANDB_API_KEY" in text  # documented: passed at run time, by name


def test_dockerignore_keeps_results_history_and_secrets_out():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.strip().startswith("#")]

    def ignored(path: str) -> bool:
        hit = False
        for p in patterns:
            neg = p.startswith("!")
            pat = p[1:] if neg else p
            parts = path.split("/")
            prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
            if any(fnmatch.fnmatch(pre, pat) or fnmatch.fnmatch(pre, pat.replace("**/", "")) for pre in prefixes):
                hit = not neg
        return hit

    for path in (".git/config", "outputs/runs/x/summary.json", "wandb/run-1/x", "conf/local/default.yaml",
                 ".env", "speedrun/__pycache__/x.pyc"):
        assert ignored(path), path
    for path in ("README.md", "pyproject.toml", "launch.py", "speedrun/train.py", "speedrun/data/loader.py",
                 "speedrun/assets/swissprot2014_sample.fasta.gz", "conf/config.yaml", "tests/test_train.py"):
        assert not ignored(path), path
