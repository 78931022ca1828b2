"""Where each job of a sweep stands: `python -m speedrun.status SWEEP_DIR [--watch [SECONDS]]`.

A sweep submitted with `hydra.launcher.detach=true` returns at once, so something has to say later how
it is going without the launching process. Two sources, read side by side for every job:

  * SLURM: `squeue` for jobs still queued or running; `sacct` (needs accounting) or `scontrol` (keeps
    finished jobs for MinJobAge, 5 min by default) for those that left the queue; `unknown` when none
    of them knows the job any more;
  * the run itself: its summary.json (status), metrics.jsonl (step, val_loss, tokens/s) and run.json
    (max_steps), from which the ETA follows on the train clock: remaining steps x batch tokens / tokens/s.

The job ids come from SWEEP_DIR/jobs.json, which our SLURM launcher (hydra_plugins/speedrun_launcher)
writes at every submission (a re-issued sweep adds a submission; each job's latest one counts). Each job
notes its run directory in its submitit folder (`speedrun_run.json`, written by speedrun/task.py), since
a job whose numbered folder holds another run trains beside it. A sweep without jobs.json (a local one,
or the stock submitit launcher) still shows its run directories, with the SLURM ids their env.json holds.

--watch refreshes every SECONDS (default 30) until every job has ended, then exits 1 if any failed.
Never imports torch: it runs on a login node in a second.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .errors import SpeedrunError, cli_main
from .fsutil import read_json, write_json
from .rundir import read_metrics

JOBS_FILE = "jobs.json"
RUN_MARKER = "speedrun_run.json"
#: SLURM states of a job that will not run again by itself
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}
SLURM_FAILED = ENDED - {"COMPLETED"}
RUN_ENDED = {"done", "failed", "dry_run"}


# ------------------------------------------------------------------------------------- jobs.json ----
def record_submission(sweep_dir: Path, jobs: list[tuple[int, str, list[str]]], detached: bool) -> Path:
    """Append one submission ((job number, SLURM job id, overrides) per job) to SWEEP_DIR/jobs.json."""
    path = Path(sweep_dir) / JOBS_FILE
    data = read_json(path) or {"sweep_dir": str(Path(sweep_dir).resolve()), "submissions": []}
    data["submissions"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "detached": detached,
                                "command": sys.argv, "jobs": [{"num": n, "job_id": j, "overrides": o}
                                                              for n, j, o in jobs]})
    write_json(path, data, where="make the sweep directory writable")
    return path


def submitted_jobs(sweep_dir: Path) -> dict[int, dict]:
    """{job number: {"num", "job_id", "overrides"}} of each job's latest submission in jobs.json."""
    jobs: dict[int, dict] = {}
    for sub in read_json(Path(sweep_dir) / JOBS_FILE).get("submissions", []):
        for job in sub.get("jobs", []):
            jobs[int(job["num"])] = job
    return dict(sorted(jobs.items()))


def mark_run_dir(run_dir: Path) -> None:
    """Inside a submitit job: note the job's run directory in its submitit folder (best effort)."""
    try:
        import submitit

        folder = submitit.JobEnvironment().paths.folder
        write_json(folder / RUN_MARKER, {"run_dir": str(Path(run_dir).resolve())})
    except Exception:  # never fail a job over a note for the status table
        pass


def run_dir_of(sweep_dir: Path, num: int, job_id: Optional[str]) -> Optional[Path]:
    """The job's run directory: the one it noted, else its numbered folder, else None (not started)."""
    if job_id:
        noted = read_json(Path(sweep_dir) / ".submitit" / job_id / RUN_MARKER).get("run_dir")
        if noted and Path(noted).is_dir():
            return Path(noted)
    folder = Path(sweep_dir) / str(num)
    return folder if folder.is_dir() else None


def _env_job_id(run_dir: Path) -> Optional[str]:
    env = read_json(run_dir / "env.json").get("env", {})
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID") is not None:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def sweep_jobs(sweep_dir: Path) -> list[dict]:
    """[{"num", "job_id", "run_dir"}] for every job of the sweep, from jobs.json or its run directories."""
    sweep_dir = Path(sweep_dir)
    jobs = submitted_jobs(sweep_dir)
    if jobs:
        return [{"num": n, "job_id": j["job_id"], "run_dir": run_dir_of(sweep_dir, n, j["job_id"])}
                for n, j in jobs.items()]
    dirs = sorted((d for d in sweep_dir.iterdir() if d.is_dir() and d.name.split("-")[0].isdigit()),
                  key=lambda d: (int(d.name.split("-")[0]), d.name))
    return [{"num": d.name, "job_id": _env_job_id(d), "run_dir": d} for d in dirs]


# ------------------------------------------------------------------------------------------ SLURM ----
def _cmd(args: list[str]) -> tuple[Optional[int], str, str]:
    if shutil.which(args[0]) is None:
        return None, "", ""
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, "", str(exc)
    return r.returncode, r.stdout, r.stderr


def _scontrol_states(bases: list[str]) -> dict[str, str]:
    states = {}
    for base in bases:
        rc, out, _ = _cmd(["scontrol", "show", "job", "-o", base])
        for line in (out if rc == 0 else "").splitlines():
            f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            key = f"{f['ArrayJobId']}_{f['ArrayTaskId']}" if f.get("ArrayTaskId", "").isdigit() else f.get("JobId")
            if key and "JobState" in f:
                states[key] = f["JobState"]
    return states


def slurm_states(job_ids: Sequence[str]) -> tuple[dict[str, str], bool]:
    """({job id: SLURM state}, whether squeue answered). Queued/running jobs from squeue; the others
    from sacct, else scontrol; a job none of them knows is left out (its state is unknown)."""
    ids = [j for j in job_ids if j]
    if not ids:
        return {}, False
    bases = sorted({j.split("_")[0] for j in ids})
    rc, out, err = _cmd(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(bases)])
    queue_known = rc == 0 or (rc is not None and "Invalid job id" in err)
    states = {}
    for line in (out if rc == 0 else "").splitlines():
        jid, _, state = line.strip().partition("|")
        states[jid] = state
    gone = [j for j in ids if j not in states]
    if gone:
        rc, out, _ = _cmd(["sacct", "-n", "-P", "-X", "-j", ",".join(bases), "-o", "JobID,State"])
        found = {}
        for line in (out if rc == 0 else "").splitlines():
            jid, _, state = line.strip().partition("|")
            found[jid] = state.split()[0] if state else state
        if not found:
            found = _scontrol_states(bases)
        states.update({j: found[j] for j in gone if j in found})
    return {j: states[j] for j in ids if j in states}, queue_known


# ------------------------------------------------------------------------------------- the table ----
def _max_steps(run_dir: Path, summary: dict) -> Optional[int]:
    if summary.get("max_steps") is not None:
        return summary["max_steps"]
    cfg = read_json(run_dir / "run.json").get("config") or {}
    steps = (cfg.get("train") or {}).get("max_steps")
    if steps is None and (run_dir / "reproduce.yaml").exists():
        import yaml

        try:
            steps = ((yaml.safe_load((run_dir / "reproduce.yaml").read_text()) or {}).get("train") or {}).get("max_steps")
        except yaml.YAMLError:
            steps = None
    return steps


def progress(run_dir: Optional[Path]) -> dict:
    """What the run's own files say: status, step, max_steps, val_loss, tokens/s, ETA (train clock)."""
    if run_dir is None:
        return {"status": "not started"}
    summary = read_json(run_dir / "summary.json")
    rows = read_metrics(run_dir / "metrics.jsonl")
    status = summary.get("status") or ("starting" if not rows else "running")
    train = [r for r in rows if r.get("train_loss") is not None]
    vals = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    step = summary.get("step") if status in RUN_ENDED else None
    step = step if step is not None else max((r.get("step", 0) for r in rows), default=summary.get("step"))
    max_steps = _max_steps(run_dir, summary)
    val = summary.get("val_loss") if summary.get("val_loss") is not None else (vals[-1] if vals else None)
    tps = summary.get("tokens_per_s") if status in RUN_ENDED else (train[-1].get("tokens_per_s") if train else None)
    eta = None
    if status == "running" and step is not None and max_steps is not None and train:
        batch = (summary.get("batch") or {}).get("batch_tokens")
        remaining = max(max_steps - step, 0)
        last = train[-1]
        if tps and batch:
            eta = remaining * batch / tps
        elif last.get("train_seconds") and last.get("step"):
            eta = remaining * last["train_seconds"] / last["step"]
    return {"status": status, "step": step, "max_steps": max_steps, "val_loss": val, "tokens_per_s": tps,
            "eta_s": eta}


def collect(sweep_dir: Path) -> list[dict]:
    """One row per job: number, run dir, SLURM id and state, and the run's progress."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SpeedrunError(f"{sweep_dir} is not a directory: pass a sweep directory (outputs/sweeps/NAME/TIME)")
    jobs = sweep_jobs(sweep_dir)
    states, queue_known = slurm_states([j["job_id"] for j in jobs if j["job_id"]])
    rows = []
    for job in jobs:
        jid, run_dir = job["job_id"], job["run_dir"]
        slurm = states.get(jid, "unknown") if jid else "—"
        prog = progress(run_dir)
        if jid and slurm != "unknown":
            ended = slurm in ENDED
        elif jid and queue_known:  # not in the queue any more
            ended = True
        else:
            ended = prog["status"] in RUN_ENDED
        failed = slurm in SLURM_FAILED or prog["status"] == "failed"
        rel = str(run_dir.relative_to(sweep_dir)) if run_dir is not None and run_dir.is_relative_to(sweep_dir) \
            else (str(run_dir) if run_dir is not None else "—")
        rows.append({"job": job["num"], "run_dir": rel, "job_id": jid or "—", "slurm": slurm, **prog,
                     "ended": ended, "failed": failed})
    return rows


def _duration(s: Optional[float]) -> str:
    if s is None:
        return "—"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def table(rows: list[dict], sweep_dir: Path) -> str:
    head = ["job", "run dir", "SLURM job", "SLURM state", "run status", "step", "val_loss", "tokens/s", "ETA"]
    body = [[str(r["job"]), r["run_dir"], r["job_id"], r["slurm"], r["status"],
             f"{r['step'] if r.get('step') is not None else '—'} / {r.get('max_steps') or '—'}",
             f"{r['val_loss']:.4f}" if r.get("val_loss") is not None else "—",
             f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "—", _duration(r.get("eta_s"))]
            for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    counts: dict[str, int] = {}
    for r in rows:  # SLURM's word where it has one, else the run's
        state = r["slurm"] if r["slurm"] not in ("—", "unknown") else r["status"]
        counts[state] = counts.get(state, 0) + 1
    ended = sum(r["ended"] for r in rows)
    title = (f"{sweep_dir}: {len(rows)} job(s), {ended} ended ("
             + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f") at {time.strftime('%H:%M:%S')}")
    return "\n".join([title, line(head), *(line(b) for b in body)])


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m speedrun.status", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", type=Path, help="a sweep directory (outputs/sweeps/NAME/TIME)")
    ap.add_argument("--watch", nargs="?", type=float, const=30.0, default=None, metavar="SECONDS",
                    help="refresh every SECONDS (default 30) until every job has ended; exit 1 if any failed")
    args = ap.parse_args(argv)
    if args.watch is not None and not args.watch > 0:
        raise SpeedrunError(f"--watch {args.watch:g}: give a refresh interval in seconds > 0")
    clear = sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
    while True:
        rows = collect(args.sweep_dir)
        text = table(rows, args.sweep_dir)
        print(("\033[H\033[J" if clear and args.watch else "") + text + ("" if clear else "\n"), flush=True)
        if args.watch is None:
            return 0
        if all(r["ended"] for r in rows):
            return 1 if any(r["failed"] for r in rows) else 0
        time.sleep(args.watch)


if __name__ == "__main__":
    sys.exit(cli_main(main))
