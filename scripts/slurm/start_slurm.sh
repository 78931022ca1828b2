#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine, as root, without systemd -- for tests/test_slurm.py and
# CI (.ci/run starts it before the tests and stops it with scripts/slurm/stop_slurm.sh on EXIT). Partitions:
# `debug` (default) and `high`, whose jobs preempt `debug` jobs (USR2 first: preempt_send_user_signal).
# Copied from the team's shared tools (tools/slurm/start_slurm.sh); see SLURM.md there for the facts.
#
#   munged [+ mariadbd + slurmdbd] + slurmctld + slurmd, all on 127.0.0.1, PID files under /run.
# Debian 12 (bookworm) packages -> Slurm 22.05.8, MUNGE 0.5.15, MariaDB 10.11.
#   SLURM_WITH_DBD=1    also start MariaDB + slurmdbd so `sacct` works (submitit polls sacct for job state;
#                       without it everything still works but each poll logs "Bypassing sacct error")
#   SLURM_CRED_EXPIRE   AuthInfo cred_expire (s); also how long a requeued job waits before restarting
#                       (Slurm default 120; 10 here)
#   SLURM_VIRTUAL_NODES number of extra nodes in partition `multi` (default 2; 0: none), each its own slurmd
#                       on this host (`slurmd -N vnodeK`, port 6830+K, 1 CPU): multi-node jobs (--nodes=2)
#                       run for real -- one task per node, MASTER_ADDR = the first node -- on one machine
# Re-running it restarts slurmctld/slurmd with the new slurm.conf (they kill the PID in their PID file).
set -euo pipefail
now() { date +%s.%N; }
T0=$(now)
export DEBIAN_FRONTEND=noninteractive
WITH_DBD=${SLURM_WITH_DBD:-0}
PKGS="slurmctld slurmd slurm-client munge"
[ "$WITH_DBD" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server"
need=0; for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || need=1; done
if [ $need = 1 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $PKGS >/dev/null
fi
T1=$(now)

HOST=$(hostname -s)
VNODES=${SLURM_VIRTUAL_NODES:-2}
VNAMES=""; for k in $(seq 1 "$VNODES"); do VNAMES="$VNAMES vnode$k"; done
# node names must resolve: slurmd/srun use them, and submitit's TorchDistributedEnvironment sets MASTER_ADDR to one
for n in "$HOST" $VNAMES; do getent hosts "$n" >/dev/null || echo "127.0.0.1 $n" >> /etc/hosts; done
CPUS=$(nproc)
MEM=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
MEM=$(( MEM > 1024 ? MEM - 512 : MEM ))   # head-room: a node that reports less than configured is DRAINED

# ---- munge (the Debian postinst already made /etc/munge/munge.key; make one if it is missing) ----
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge /var/log/munge; chmod 0400 /etc/munge/munge.key; chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged          # daemonizes; PID in /run/munge/munged.pid
fi
for i in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null
T2=$(now)

# ---- slurm.conf (written before slurmdbd/sacctmgr: without it they try a DNS SRV lookup and fail) ----
mkdir -p /etc/slurm /var/spool/slurmctld /var/log/slurm
for n in "$HOST" $VNAMES; do mkdir -p "/var/spool/slurmd/$n"; done
VNODE_CONF=""; VNODE_PART=""
if [ "$VNODES" -gt 0 ]; then
  for k in $(seq 1 "$VNODES"); do
    VNODE_CONF="${VNODE_CONF}NodeName=vnode$k NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=$((6829 + k)) CPUs=1 RealMemory=2048 State=UNKNOWN
"
  done
  VNODE_PART="PartitionName=multi Nodes=$(echo $VNAMES | tr ' ' ',') Default=NO MaxTime=INFINITE State=UP"
fi
if [ "$WITH_DBD" = 1 ]; then
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux"
else
  ACCT="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=localcluster
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=${SLURM_CRED_EXPIRE:-10}
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
${ACCT}
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
JobRequeue=1
# preemption: a job in 'high' requeues jobs in 'debug'; they get their --signal (submitit: USR2) first
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN
${VNODE_CONF}PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=high  Nodes=${HOST} Default=NO  MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
${VNODE_PART}
CONF

# ---- optional accounting: MariaDB + slurmdbd ----
if [ "$WITH_DBD" = 1 ]; then
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  if ! mariadb-admin ping >/dev/null 2>&1; then
    nohup /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid --bind-address=127.0.0.1 \
      >/var/log/slurm/mariadb.log 2>&1 &
    for i in $(seq 100); do mariadb-admin ping >/dev/null 2>&1 && break; sleep 0.2; done
  fi
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
              CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmdbpass';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=slurm
StoragePass=slurmdbpass
StorageLoc=slurm_acct_db
CONF
  chmod 600 /etc/slurm/slurmdbd.conf          # slurmdbd refuses a conf readable by others
  { [ -s /run/slurmdbd.pid ] && kill -0 "$(cat /run/slurmdbd.pid)" 2>/dev/null; } || slurmdbd   # daemonizes
  for i in $(seq 100); do sacctmgr -n -P show cluster >/dev/null 2>&1 && break; sleep 0.2; done
  # no 'sacctmgr add cluster' needed: slurmctld registers ClusterName itself on first contact
fi
T3=$(now)

# ---- slurmctld + slurmd ----
# a slurmd of an earlier version of this script (one PID file for one node) would hold port 6818
if [ -s /run/slurmd.pid ] && [ "$(cat /proc/$(cat /run/slurmd.pid)/comm 2>/dev/null)" = slurmd ]; then
  kill "$(cat /run/slurmd.pid)"; sleep 1
fi
rm -f /run/slurmd.pid
slurmctld -c        # -c: start with a clean job queue; daemonizes; PID in /run/slurmctld.pid
for n in "$HOST" $VNAMES; do slurmd -N "$n"; done   # each daemonizes; PID in /run/slurmd-<node>.pid
st=
for i in $(seq 120); do
  st=$(sinfo -h -p debug -o %T 2>/dev/null | head -1 || true)
  vst=$( [ "$VNODES" -gt 0 ] && sinfo -h -p multi -o %T 2>/dev/null | sort -u | tr '\n' ' ' || echo "idle ")
  [ "$st" = "idle" ] && [ "$vst" = "idle " ] && break
  sleep 0.25
done
T4=$(now)
sinfo
awk -v a=$T0 -v b=$T1 -v c=$T2 -v d=$T3 -v e=$T4 'BEGIN{printf "slurm start-up: apt %.1fs, munge %.1fs, dbd %.1fs, ctld+slurmd %.1fs, total %.1fs\n", b-a, c-b, d-c, e-d, e-a}'
[ "$st" = "idle" ] || { echo "node not idle: $st" >&2; tail -20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd-*.log >&2; exit 1; }
