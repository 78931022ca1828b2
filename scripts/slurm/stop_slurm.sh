#!/usr/bin/env bash
# Counterpart of scripts/slurm/start_slurm.sh (copied from the shared tools/slurm/stop_slurm.sh).
# Stop what start_slurm.sh started, by PID file (never by process name); a PID file whose process
# is not the expected daemon (stale file, PID reused) is ignored.
if command -v squeue >/dev/null && squeue -h >/dev/null 2>&1; then
  jobs=$(squeue -h -o %i); [ -n "$jobs" ] && scancel $jobs && sleep 2
fi
for pair in $(for f in /run/slurmd-*.pid; do [ -e "$f" ] && echo "$f:slurmd"; done) \
            /run/slurmd.pid:slurmd /run/slurmctld.pid:slurmctld /run/slurmdbd.pid:slurmdbd \
            /run/mysqld/mysqld.pid:mariadbd /run/munge/munged.pid:munged; do
  f=${pair%%:*}; name=${pair##*:}
  [ -s "$f" ] || continue
  pid=$(cat "$f")
  if [ "$(cat /proc/$pid/comm 2>/dev/null)" = "$name" ]; then
    kill "$pid"
    for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$f"
done
true
