"""The data side of the reliability/security issue, one test per item: each is a way a user's files or a
run went wrong silently (or with a traceback) before, and now stops with one line or does the right thing.

1 one owner per prepare folder · 2 never delete a user's file · 3 nonsense shards never train or evaluate ·
4 one line instead of a traceback · 5 workers die with prepare · 6 workers from the usable CPUs ·
7 no import cycle in speedrun/data · 8 one CLI error style.
"""
from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from speedrun.data import prepare as prep
from speedrun.data.loader import EvalSet, TrainStream
from speedrun.data.prepare import PrepareOptions, format_report, prepare
from speedrun.data.shards import HEADER_BYTES, DataError, find_shards, open_shard, shard_name, write_shard
from speedrun.errors import SpeedrunError
from speedrun.vocab import PAD, encode

ROOT = Path(__file__).resolve().parent.parent
QUIET = dict(log=lambda s: None)
AA = list("ACDEFGHIKLMNPQRSTVWY")


def _fasta(path: Path, n: int = 80, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f">s{i}\n{''.join(rng.choice(AA, rng.integers(5, 120)))}\n" for i in range(n)))
    return path


def _docs(n: int = 30, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([encode("".join(rng.choice(AA, rng.integers(5, 60)))) for _ in range(n)])


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg
    return msg


# ---- 1. one owner per folder -----------------------------------------------------------------------
def test_1_a_second_prepare_into_a_folder_in_use_stops_naming_the_holder(tmp_path):
    """Two concurrent prepares into one folder both exited 0 and one dataset silently replaced the other."""
    first, second, out = _fasta(tmp_path / "a.fasta"), _fasta(tmp_path / "b.fasta", seed=1), tmp_path / "out"
    seen: dict = {}

    def log(line):  # called while the first prepare is running: start the second one then
        if "second" not in seen:
            seen["second"] = subprocess.run(
                [sys.executable, "-m", "speedrun.data", "prepare", str(second), "--out", str(out), "--workers", "1"],
                capture_output=True, text=True, env=_env(), timeout=60)

    prepare([first], out, PrepareOptions(workers=1), log=log)
    r = seen["second"]
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "in use" in err[0] and f"pid {os.getpid()}" in err[0]
    assert json.loads((out / "prepare.json").read_text())["inputs"] == [str(first)]
    prepare([second], out, PrepareOptions(workers=1, overwrite=True), **QUIET)  # the lock went with the run


# ---- 2. never overwrite a user's file --------------------------------------------------------------
def test_2_overwrite_removes_only_what_prepare_wrote_and_never_an_input(tmp_path):
    """`--overwrite` deleted everything in --out, the input being read included."""
    inside = _fasta(tmp_path / "data" / "in.fasta")
    with pytest.raises(SpeedrunError) as err:
        prepare([inside], tmp_path / "data", PrepareOptions(workers=1, overwrite=True), **QUIET)
    assert "in.fasta" in _one_line(err.value) and inside.exists()

    out = tmp_path / "out"
    prepare([_fasta(tmp_path / "a.fasta")], out, PrepareOptions(workers=1, attribution="CC0"), **QUIET)
    manifest = json.loads((out / ".speedrun-manifest.json").read_text())
    written = {p.name for p in out.iterdir()} - {".lock", ".speedrun-manifest.json"}
    assert set(manifest["files"]) == written and {"prepare.json", "ATTRIBUTION.txt"} <= written
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SpeedrunError) as err:
        prepare([_fasta(tmp_path / "b.fasta", seed=2)], out, PrepareOptions(workers=1, overwrite=True), **QUIET)
    assert "notes.txt" in _one_line(err.value)
    assert (out / "notes.txt").read_text() == "mine" and find_shards(out, "train")  # nothing removed
    (out / "notes.txt").unlink()
    prepare([tmp_path / "b.fasta"], out, PrepareOptions(workers=1, overwrite=True), **QUIET)
    assert json.loads((out / "prepare.json").read_text())["inputs"] == [str(tmp_path / "b.fasta")]
    assert not (out / "ATTRIBUTION.txt").exists()  # the old run's file, removed by --overwrite


# ---- 3. nonsense never finishes as done ------------------------------------------------------------
def test_3_an_empty_valid_split_is_refused_instead_of_a_nan_loss(tmp_path):
    p = tmp_path / shard_name("x", "valid", 0)
    write_shard(p, np.zeros(0, np.uint8))
    with pytest.raises(DataError) as err:
        EvalSet.build([p], 512, 100)
    assert str(p) in _one_line(err.value) and "no documents" in str(err.value)


def test_3_an_all_pad_train_shard_is_refused(tmp_path):
    p = tmp_path / shard_name("x", "train", 0)
    write_shard(p, np.full(5000, PAD, np.uint8))
    with pytest.raises(DataError) as err:
        TrainStream([p], 512, 100).next_batch()
    assert str(p) in _one_line(err.value) and "residue" in str(err.value)


def test_3_token_ids_outside_the_vocabulary_name_the_file_and_the_offset(tmp_path):
    toks = _docs(80)
    toks[1234] = 40
    p = tmp_path / shard_name("x", "train", 0)
    write_shard(p, toks)
    with pytest.raises(DataError) as err:
        TrainStream([p], 512, 100).next_batch()
    msg = _one_line(err.value)
    assert str(p) in msg and "40" in msg and "1234" in msg and str(HEADER_BYTES + 1234) in msg
    with pytest.raises(DataError, match="1234"):
        open_shard(p)


def test_3_resuming_onto_re_prepared_data_is_refused(tmp_path):
    files = []
    for i in range(2):
        files.append(tmp_path / shard_name("x", "train", i))
        write_shard(files[-1], _docs(seed=i))
    a = TrainStream(files, 512, 100)
    a.next_batch()
    state = a.state_dict()
    TrainStream(files, 512, 100).load_state_dict(state)  # the same data resumes
    write_shard(files[1], _docs(40, seed=7))  # re-prepared: same names, other content
    with pytest.raises(DataError) as err:
        TrainStream(files, 512, 100).load_state_dict(state)
    assert "changed" in _one_line(err.value) and "new run" in str(err.value)
    with pytest.raises(DataError, match="2 shard"):
        TrainStream(files[:1], 512, 100).load_state_dict(state)


def test_3_check_reports_every_problem(tmp_path, capsys):
    from speedrun.data.__main__ import main

    d = tmp_path / "d"
    d.mkdir()
    write_shard(d / shard_name("x", "train", 0), _docs())
    write_shard(d / shard_name("x", "train", 1), np.full(3000, PAD, np.uint8))
    bad = _docs(seed=3)
    bad[77] = 99
    write_shard(d / shard_name("x", "train", 2), bad)
    write_shard(d / shard_name("x", "valid", 0), np.zeros(0, np.uint8))
    assert main(["check", "data=local", f"data.path={d}"]) == 2
    cap = capsys.readouterr()
    out = cap.out
    assert "x_train_000001.bin" in out and "residue" in out
    assert "x_train_000002.bin" in out and "99" in out and "77" in out
    assert "x_valid_000000.bin" in out and "no documents" in out
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "3 problem" in err[0]


# ---- 4. one line instead of a traceback ------------------------------------------------------------
def test_4_an_unwritable_cache_is_one_line(tmp_path, monkeypatch):
    from speedrun.data import sample_dir

    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("SPEEDRUN_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(SpeedrunError) as err:
        sample_dir()
    assert "SPEEDRUN_CACHE" in _one_line(err.value) and str(tmp_path / "file") in str(err.value)


def test_4_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    from speedrun.data.__main__ import main

    import tempfile

    def full_disk(prefix="", suffix="", dir=None):  # every file written lands on a full disk
        return os.open("/dev/full", os.O_WRONLY), str(Path(dir) / f"{prefix}full{suffix}")

    monkeypatch.setattr(tempfile, "mkstemp", full_disk)
    src = _fasta(tmp_path / "in.fasta")
    assert main(["prepare", str(src), "--out", str(tmp_path / "out"), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not write") and "disk is full" in err[0]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("tail", ['c,AAAA\nd,"CCCC\ne,MKKK\n', "c,AAAA\nd,CCCC\ne,MKKK\n"])
def test_4_a_csv_with_an_unterminated_quote_is_refused_naming_the_line(tmp_path, tail):
    """The quote opened on line 3 swallowed the rows after it into one chimeric sequence."""
    p = tmp_path / "t.csv"
    p.write_text('id,sequence\na,MKVLA\nb,"MKVL\n' + tail)
    with pytest.raises(DataError) as err:
        prepare([p], tmp_path / "out", PrepareOptions(workers=1), **QUIET)
    msg = _one_line(err.value)
    assert str(p) in msg and "line 3" in msg and "quote" in msg
    assert not (tmp_path / "out").exists()


def test_4_a_fasta_with_a_byte_order_mark_is_accepted(tmp_path):
    plain = _fasta(tmp_path / "plain.fasta")
    for name in ("bom.fasta", "bom_noext"):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
        rep = prepare([tmp_path / name], tmp_path / f"out_{name}", PrepareOptions(workers=1), **QUIET)
        assert rep["sequences_read"] == 80 and rep["formats"] == ["fasta"]
    ref = prepare([plain], tmp_path / "out_plain", PrepareOptions(workers=1), **QUIET)
    assert rep["tokens"] == ref["tokens"]


# ---- 5. a killed prepare leaves no worker behind ---------------------------------------------------
def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_5_workers_die_with_a_killed_prepare(tmp_path):
    src = _fasta(tmp_path / "in.fasta")
    script = (  # the real prepare CLI with 2 workers, on an input that never ends after 8 blocks
        "import sys, time\n"
        "from speedrun.data import prepare as prep\n"
        "real = prep._tasks\n"
        "def slow(*a):\n"
        "    first = next(iter(real(*a)))\n"
        "    for _ in range(8):\n"
        "        yield first\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
        "prep._tasks = slow\n"
        f"sys.exit(prep.main([{str(src)!r}, '--out', {str(tmp_path / 'out')!r}, '--workers', '2']))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=_env())
    timer = threading.Timer(30, proc.kill)
    timer.start()
    workers: list[int] = []
    try:
        while (line := proc.stdout.readline()) and line.strip() != "ready":
            pass
        assert line.strip() == "ready", "prepare ended before its workers started"
        workers = _children(proc.pid)  # the pool's workers (and multiprocessing's resource tracker)
        assert any("spawn_main" in Path(f"/proc/{p}/cmdline").read_text() for p in workers)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 5
        while any(_alive(p) for p in workers) and time.time() < deadline:
            time.sleep(0.05)
        assert not [p for p in workers if _alive(p)], "workers outlived the killed prepare"
    finally:
        timer.cancel()
        proc.kill()
        for p in workers:  # only the processes this test started
            if _alive(p):
                os.kill(p, signal.SIGKILL)


# ---- 6. worker count from the CPUs the process may use ---------------------------------------------
def test_6_workers_follow_the_cpus_the_process_may_use(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    rep = prepare([_fasta(tmp_path / "in.fasta")], tmp_path / "out", PrepareOptions(), **QUIET)
    assert rep["workers"] == 1 and "1 worker" in format_report(rep)


# ---- 7. no import cycle ----------------------------------------------------------------------------
def _sibling_imports(path: Path, modules: set[str]) -> set[str]:
    """The modules of speedrun/data that `path` imports (at any level of the file)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if node.level == 1:
                rel = parts if node.module else []
            elif node.level == 0 and parts[:2] == ["speedrun", "data"]:
                rel = parts[2:]
            else:
                continue
            if rel:
                out.add(rel[0])
            else:
                out |= {a.name for a in node.names if a.name in modules} or {"__init__"}
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[:2] == ["speedrun", "data"]:
                    out.add(parts[2] if len(parts) > 2 else "__init__")
    return out & modules


def test_7_no_module_of_speedrun_data_imports_one_that_imports_it_back():
    folder = ROOT / "speedrun" / "data"
    modules = {p.stem for p in folder.glob("*.py")}
    graph = {m: _sibling_imports(folder / f"{m}.py", modules) - {m} for m in modules}

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, seen + (n,))) for n in graph[a])

    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if reaches(b, a))
    assert not cycles


# ---- 8. one CLI error style ------------------------------------------------------------------------
def test_8_the_data_cli_reports_errors_the_one_way(tmp_path):
    def run(*args):
        r = subprocess.run([sys.executable, "-m", "speedrun.data", *args], capture_output=True, text=True,
                           env=_env(), cwd=tmp_path, timeout=60)
        return r.returncode, r.stderr.strip().splitlines()

    code, err = run("frobnicate")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: unknown command 'frobnicate'")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("x")
    code, err = run("prepare", str(_fasta(tmp_path / "in.fasta")), "--out", str(tmp_path / "out"))
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "mine.txt" in err[0]
