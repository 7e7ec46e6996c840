#!/usr/bin/env bash
# A local Slurm cluster for the launcher tests and for trying the sbatch scripts without a real
# cluster. Root only (Debian's slurm-wlm + munge; installed if missing).
#   One node (default): slurmd on localhost.
#   Two nodes (REVISUAL_SLURM_NODES=2): slurmctld on the host at 10.77.0.1 and one slurmd per
#   network namespace (rvn1, rvn2: nodes rvnode1 / rvnode2 at 10.77.0.11 / .12 on the bridge
#   rvbr0, their own hostname through a UTS namespace, and /etc/netns/<ns>/hosts naming every
#   node bound over /etc/hosts in a mount namespace of their own). Debian's Slurm is built without
#   multiple-slurmd, so each slurmd needs a network stack of its own; files and CPUs stay shared,
#   like a cluster's shared file system. A node's job steps run inside its namespace, so a job's
#   ranks on different nodes talk over the bridge as over a cluster's network.
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
#   REVISUAL_SLURM_NODES      1 (or 2: the namespaces above)
#   REVISUAL_SLURM_DIR        /tmp/revisual-slurm (two nodes: /tmp/revisual-slurm2)
#   REVISUAL_SLURM_CPUS       all CPUs of the machine (never more)
#   REVISUAL_SLURM_MEM_MB     the machine's memory minus 1 GiB (never more than the machine's)
#   REVISUAL_SLURM_CTLD_PORT  6817 (two nodes: 6827)   REVISUAL_SLURM_D_PORT 6818
#   REVISUAL_SLURM_OVERSUBSCRIBE  4     jobs that may share one CPU (the node is shared)
#   REVISUAL_SLURM_START_TIMEOUT  60    seconds to wait for the node to become idle
#
# The config is the minimal one that runs without systemd or cgroups (../shared/design.md):
# proctrack/linuxproc, task/none, select/cons_tres with CR_CPU (memory is not a consumable, so
# jobs need no --mem), no accounting, ReturnToService=2.
set -euo pipefail

nnodes="${REVISUAL_SLURM_NODES:-1}"
case "$nnodes" in
  1) dir="${REVISUAL_SLURM_DIR:-/tmp/revisual-slurm}"; ctld_port="${REVISUAL_SLURM_CTLD_PORT:-6817}"
     nodes=(localhost); addrs=(127.0.0.1); ctld_host=localhost; ctld_addr=127.0.0.1 ;;
  2) dir="${REVISUAL_SLURM_DIR:-/tmp/revisual-slurm2}"; ctld_port="${REVISUAL_SLURM_CTLD_PORT:-6827}"
     nodes=(rvnode1 rvnode2); addrs=(10.77.0.11 10.77.0.12); ctld_host="$(hostname -s)"; ctld_addr=10.77.0.1 ;;
  *) echo "local_cluster.sh: REVISUAL_SLURM_NODES=$nnodes: 1 or 2 nodes" >&2; exit 1 ;;
esac
conf="$dir/slurm.conf"
socket="$dir/munge/munge.socket"
d_port="${REVISUAL_SLURM_D_PORT:-6818}"
start_timeout="${REVISUAL_SLURM_START_TIMEOUT:-60}"
bridge=rvbr0

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
  mkdir -p "$dir"/{state/ctld,log,run,munge}
  local node
  for node in "${nodes[@]}"; do mkdir -p "$dir/state/d-$node"; done
  chmod 700 "$dir/munge"
  cat >"$conf" <<EOF
# Written by slurm/local_cluster.sh: a ${nnodes}-node cluster on this machine (root, no systemd/cgroups).
ClusterName=revisual-local$nnodes
SlurmctldHost=$ctld_host($ctld_addr)
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
SlurmdSpoolDir=$dir/state/d-%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
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
EOF
  local i
  for i in "${!nodes[@]}"; do
    echo "NodeName=${nodes[$i]} NodeAddr=${addrs[$i]} NodeHostname=${nodes[$i]} CPUs=$cpus RealMemory=$mem State=UNKNOWN" >>"$conf"
  done
  local IFS=,
  echo "PartitionName=local Nodes=${nodes[*]} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:${REVISUAL_SLURM_OVERSUBSCRIBE:-4}" >>"$conf"
}

# Two nodes: a bridge on the host and, per node, a network namespace joined to it by a veth pair.
netns_of() { echo "rvn$(( $1 + 1 ))"; }

network_up() {
  [ "$nnodes" -gt 1 ] || return 0
  command -v ip >/dev/null || die "two nodes need iproute2's ip"
  if ! ip link show "$bridge" >/dev/null 2>&1; then
    ip link add "$bridge" type bridge || die "cannot create the bridge $bridge (needs CAP_NET_ADMIN)"
    ip addr add "$ctld_addr/24" dev "$bridge"
  fi
  ip link set "$bridge" up
  local i ns hosts
  hosts="127.0.0.1 localhost"$'\n'"$ctld_addr $ctld_host"
  for i in "${!nodes[@]}"; do hosts+=$'\n'"${addrs[$i]} ${nodes[$i]}"; done
  for i in "${!nodes[@]}"; do
    ns="$(netns_of "$i")"
    if ! ip netns list | grep -qw "$ns"; then
      ip netns add "$ns" || die "cannot create the network namespace $ns"
      ip link add "rvh$((i + 1))" type veth peer name rvnet0 netns "$ns"
      ip link set "rvh$((i + 1))" master "$bridge"
      ip link set "rvh$((i + 1))" up
      ip -n "$ns" addr add "${addrs[$i]}/24" dev rvnet0
      ip -n "$ns" link set rvnet0 up
      ip -n "$ns" link set lo up
    fi
    mkdir -p "/etc/netns/$ns"
    printf '%s\n' "$hosts" >"/etc/netns/$ns/hosts"
  done
}

network_down() {
  [ "$nnodes" -gt 1 ] || return 0
  local i ns
  for i in "${!nodes[@]}"; do
    ns="$(netns_of "$i")"
    ip netns del "$ns" 2>/dev/null || true  # takes its veth pair with it
    rm -rf "/etc/netns/$ns"
  done
  ip link del "$bridge" 2>/dev/null || true
}

start_slurmd() {  # node index
  local node="${nodes[$1]}"
  if [ "$nnodes" -eq 1 ]; then
    slurmd -f "$conf" -N "$node" || die "slurmd failed to start; see $dir/log/slurmd-$node.log"
  else
    # The node's own network, hostname and /etc/hosts (network, UTS and mount namespaces);
    # slurmd daemonizes inside. Not `ip netns exec`: it mounts a fresh /sys without the cgroup
    # file system slurmd's start needs.
    local ns; ns="$(netns_of "$1")"
    nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private sh -c \
      "mount --bind /etc/netns/$ns/hosts /etc/hosts && hostname $node && exec slurmd -f '$conf' -N $node" \
      || die "slurmd of $node failed to start; see $dir/log/slurmd-$node.log"
  fi
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

node_states() { local IFS=,; SLURM_CONF="$conf" sinfo -h -N -n "${nodes[*]}" -o "%N %T" 2>/dev/null; }
nodes_up() {  # every node idle, mixed or allocated
  local n
  n="$(node_states | grep -cE ' (idle|mixed|allocated)$')" || true
  [ "$n" -eq "${#nodes[@]}" ]
}
slurmds_alive() {
  local node
  for node in "${nodes[@]}"; do pid_alive "$dir/run/slurmd-$node.pid" || return 1; done
}

cmd_start() {
  install_if_missing
  if [ -f "$conf" ] && pid_alive "$dir/run/slurmctld.pid" && slurmds_alive; then
    echo "local_cluster.sh: already running ($conf)" >&2
  else
    cmd_stop >/dev/null 2>&1 || true
    write_config
    network_up
    start_munge
    # -c: start from a clean state (no jobs from an earlier run of this script).
    slurmctld -c -f "$conf" || die "slurmctld failed to start; see $dir/log/slurmctld.log"
    local i
    for i in "${!nodes[@]}"; do start_slurmd "$i"; done
  fi
  local waited=0
  while [ "$waited" -lt "$start_timeout" ]; do
    if nodes_up; then
      echo "local_cluster.sh: node(s) ${nodes[*]} up (SLURM_CONF=$conf)" >&2
      return 0
    fi
    sleep 1
    waited=$((waited + 1))
  done
  echo "local_cluster.sh: node(s) ${nodes[*]} not all up after ${start_timeout}s: $(node_states | tr '\n' ' ')" >&2
  tail -n 20 "$dir/log/slurmctld.log" "$dir"/log/slurmd-*.log "$dir/log/munged.log" >&2 2>/dev/null || true
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
  local node
  for node in "${nodes[@]}"; do stop_daemon "$dir/run/slurmd-$node.pid" "slurmd of $node"; done
  stop_daemon "$dir/run/slurmctld.pid" slurmctld
  stop_daemon "$dir/run/munged.pid" munged
  network_down
  echo "local_cluster.sh: stopped" >&2
}

cmd_status() {
  [ -f "$conf" ] || { echo "local_cluster.sh: not configured ($conf missing)" >&2; return 1; }
  node_states | sed 's/^/node /' || true
  echo "(SLURM_CONF=$conf)"
  nodes_up
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$conf" ;;
  *) die "usage: $0 start|stop|status|env" ;;
esac
