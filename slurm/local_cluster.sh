#!/usr/bin/env bash
# A single-node Slurm cluster on localhost, for the launcher tests and for trying the sbatch
# scripts without a real cluster. Root only (Debian's slurm-wlm + munge; installed if missing).
#
#   bash slurm/local_cluster.sh start     # install if needed, write config, start, wait until idle
#   bash slurm/local_cluster.sh status    # exit 0 when the node is up (idle/mixed/allocated)
#   bash slurm/local_cluster.sh stop      # stop the daemons this script started
#   eval "$(bash slurm/local_cluster.sh env)"   # point sbatch/squeue/scontrol at it
#
# Everything lives in one directory of its own (REVISUAL_SLURM_DIR, default /tmp/revisual-slurm):
# slurm.conf, its own munge key and socket, daemon state, logs and pid files. The system's
# /etc/slurm and /etc/munge are never touched, so clients need SLURM_CONF=<dir>/slurm.conf
# (`env` prints it; jobs inherit it from the submitting shell).
#
# Settings (environment, with defaults):
#   REVISUAL_SLURM_DIR        /tmp/revisual-slurm
#   REVISUAL_SLURM_CPUS       all CPUs of the machine (never more)
#   REVISUAL_SLURM_MEM_MB     the machine's memory minus 1 GiB (never more than the machine's)
#   REVISUAL_SLURM_CTLD_PORT  6817      REVISUAL_SLURM_D_PORT 6818
#   REVISUAL_SLURM_OVERSUBSCRIBE  4     jobs that may share one CPU (the node is shared)
#   REVISUAL_SLURM_START_TIMEOUT  60    seconds to wait for the node to become idle
#
# The config is the minimal one that runs without systemd or cgroups (../shared/design.md):
# proctrack/linuxproc, task/none, select/cons_tres with CR_CPU (memory is not a consumable, so
# jobs need no --mem), no accounting, ReturnToService=2.
set -euo pipefail

dir="${REVISUAL_SLURM_DIR:-/tmp/revisual-slurm}"
conf="$dir/slurm.conf"
socket="$dir/munge/munge.socket"
ctld_port="${REVISUAL_SLURM_CTLD_PORT:-6817}"
d_port="${REVISUAL_SLURM_D_PORT:-6818}"
start_timeout="${REVISUAL_SLURM_START_TIMEOUT:-60}"
node=localhost

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

install_if_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    && command -v sbatch >/dev/null; then
    return
  fi
  [ "$(id -u)" -eq 0 ] || die "slurm-wlm/munge are not installed and installing them needs root"
  command -v apt-get >/dev/null || die "slurm-wlm/munge are not installed and there is no apt-get"
  echo "local_cluster.sh: installing slurm-wlm and munge with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  # Skip `apt-get update` when the package lists already know slurm-wlm (saves ~10 s).
  apt-cache show slurm-wlm >/dev/null 2>&1 || apt-get update -qq >&2 || die "apt-get update failed"
  apt-get install -y -qq slurm-wlm munge >&2 || die "apt-get install -y slurm-wlm munge failed"
}

machine_cpus() { nproc --all; }
machine_mem_mb() { awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo; }

write_config() {
  local cpus mem max_cpus max_mem
  max_cpus="$(machine_cpus)"
  max_mem="$(machine_mem_mb)"
  cpus="${REVISUAL_SLURM_CPUS:-$max_cpus}"
  mem="${REVISUAL_SLURM_MEM_MB:-$((max_mem > 2048 ? max_mem - 1024 : max_mem))}"
  # slurmd drains a node that claims more than it has; refuse early with the numbers instead.
  [ "$cpus" -le "$max_cpus" ] || die "REVISUAL_SLURM_CPUS=$cpus exceeds this machine's $max_cpus CPUs"
  [ "$mem" -le "$max_mem" ] || die "REVISUAL_SLURM_MEM_MB=$mem exceeds this machine's $max_mem MB"
  mkdir -p "$dir"/{state/ctld,state/d,log,run,munge}
  chmod 700 "$dir/munge"
  cat >"$conf" <<EOF
# Written by slurm/local_cluster.sh: a single-node cluster on localhost (root, no systemd/cgroups).
ClusterName=revisual-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also bounds how long a requeued job waits before it may start again (Slurm's
# default 120 s); short here so preemption tests resume quickly.
AuthInfo=socket=$socket,cred_expire=${REVISUAL_SLURM_REQUEUE_WAIT:-10}
CredType=cred/munge
StateSaveLocation=$dir/state/ctld
SlurmdSpoolDir=$dir/state/d
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Schedule every few seconds rather than every 30-60 s: tests wait on job starts.
SchedulerParameters=bf_interval=2,sched_interval=2
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# Keep finished jobs visible to scontrol for a while (tests read their exit codes).
MinJobAge=600
KillWait=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$node CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:${REVISUAL_SLURM_OVERSUBSCRIBE:-4}
EOF
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
  pid_alive "$dir/run/munged.pid" && return
  if [ ! -s "$dir/munge/munge.key" ]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 400 "$dir/munge/munge.key"
  rm -f "$socket" "$socket.lock"
  # --force: munged refuses to run as root without it.
  munged --force --socket="$socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" \
    --seed-file="$dir/munge/munged.seed" \
    || die "munged failed to start; see $dir/log/munged.log"
}

node_state() { SLURM_CONF="$conf" sinfo -h -n "$node" -o %T 2>/dev/null | head -n1; }

cmd_start() {
  install_if_missing
  if [ -f "$conf" ] && pid_alive "$dir/run/slurmctld.pid" && pid_alive "$dir/run/slurmd.pid"; then
    echo "local_cluster.sh: already running ($conf)" >&2
  else
    cmd_stop >/dev/null 2>&1 || true
    write_config
    start_munge
    # -c: start from a clean state (no jobs from an earlier run of this script).
    slurmctld -c -f "$conf" || die "slurmctld failed to start; see $dir/log/slurmctld.log"
    slurmd -f "$conf" -N "$node" || die "slurmd failed to start; see $dir/log/slurmd.log"
  fi
  local state="" waited=0
  while [ "$waited" -lt "$start_timeout" ]; do
    state="$(node_state)"
    case "$state" in
      idle*|mixed*|allocated*) echo "local_cluster.sh: node $node is $state (SLURM_CONF=$conf)" >&2; return 0 ;;
    esac
    sleep 1
    waited=$((waited + 1))
  done
  echo "local_cluster.sh: node $node not idle after ${start_timeout}s (state '${state:-unknown}')" >&2
  tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" "$dir/log/munged.log" >&2 2>/dev/null || true
  exit 1
}

stop_daemon() {  # pid file, name
  local pidfile="$1" name="$2" pid
  [ -f "$pidfile" ] || return 0
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "local_cluster.sh: $name ($pid) did not stop in 10 s; killing it" >&2
      kill -9 "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$pidfile"
}

cmd_stop() {
  # slurmd first, so that it stops its job steps while slurmctld can still hear about it.
  stop_daemon "$dir/run/slurmd.pid" slurmd
  stop_daemon "$dir/run/slurmctld.pid" slurmctld
  stop_daemon "$dir/run/munged.pid" munged
  echo "local_cluster.sh: stopped" >&2
}

cmd_status() {
  local state
  [ -f "$conf" ] || { echo "local_cluster.sh: not configured ($conf missing)" >&2; return 1; }
  state="$(node_state)"
  echo "node $node: ${state:-unreachable} (SLURM_CONF=$conf)"
  case "$state" in idle*|mixed*|allocated*) return 0 ;; *) return 1 ;; esac
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$conf" ;;
  *) die "usage: $0 start|stop|status|env" ;;
esac
