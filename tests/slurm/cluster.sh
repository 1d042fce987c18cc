#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for tests: emulated nodes n1 and n2 (multiple-slurmd),
# a private munged, no cgroups, no accounting. Everything lives under DIR; nothing under /etc but one
# /etc/hosts line (n1 and n2 -> 127.0.0.1).
#
#   tests/slurm/cluster.sh start DIR   # writes DIR/slurm.conf and DIR/env, starts the daemons, waits for idle
#   . DIR/env                          # export SLURM_CONF=DIR/slurm.conf for sinfo/sbatch/srun
#   tests/slurm/cluster.sh stop DIR    # cancels the cluster's jobs, stops only the daemons started here
#
# Ports: slurmctld on $BEIT_SCALE_SLURM_PORT (default 17000), the nodes on the next two.
set -euo pipefail

NODES=(n1 n2)
WAIT_S=30

die() {
  echo "cluster.sh: $*" >&2
  exit 1
}

# True if the PID in file $1 is a live process (an exited daemon left as a zombie counts as stopped).
alive() {
  local pid state
  [[ -s "$1" ]] || return 1
  pid=$(<"$1")
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ -r "/proc/$pid/stat" ]] || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ -n "$state" && "$state" != "Z" && "$state" != "X" ]]
}

port_in_use() {
  ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
}

show_logs() {
  local f
  for f in "$DIR"/log/*.log "$DIR"/munge/munged.log; do
    [[ -f "$f" ]] || continue
    echo "----- $f (last 30 lines)" >&2
    tail -n 30 "$f" >&2
  done
}

pid_files() {
  local n
  for n in "${NODES[@]}"; do
    echo "$DIR/run/slurmd-$n.pid"
  done
  echo "$DIR/run/slurmctld.pid"
  echo "$DIR/munge/munged.pid"
}

write_conf() {
  local host=$1 port=$2
  cat >"$DIR/slurm.conf" <<EOF
# Written by tests/slurm/cluster.sh: two emulated nodes on $host.
ClusterName=beittest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MailProg=/bin/true
KillWait=5
InactiveLimit=0
MinJobAge=300
NodeName=${NODES[0]},${NODES[1]} NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + 1))-$((port + 2)) CPUs=2 RealMemory=1000 State=UNKNOWN
# Jobs in "urgent" preempt those in "debug": USR2 (the job's --signal) at once, SIGTERM after GraceTime,
# then Slurm requeues the preempted job.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
PartitionName=debug Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=10
PartitionName=urgent Nodes=${NODES[0]},${NODES[1]} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
}

start_munge() {
  local m=$DIR/munge
  mkdir -p "$m"
  if [[ ! -s "$m/munge.key" ]]; then
    dd if=/dev/urandom of="$m/munge.key" bs=1024 count=1 status=none
  fi
  chown -R munge:munge "$m"
  chmod 0755 "$m"  # munged wants the socket folder reachable by every client
  chmod 0400 "$m/munge.key"
  runuser -u munge -- munged --key-file="$m/munge.key" --socket="$m/munge.socket" \
    --pid-file="$m/munged.pid" --log-file="$m/munged.log" --seed-file="$m/munged.seed" \
    || { show_logs; die "munged did not start"; }
}

wait_idle() {
  local i states
  for ((i = 0; i < WAIT_S * 2; i++)); do
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u | tr '\n' ' ')
    if [[ "$states" == "n1 idle n2 idle " ]]; then
      return 0
    fi
    sleep 0.5
  done
  echo "cluster.sh: nodes not idle after ${WAIT_S}s (sinfo: ${states:-nothing})" >&2
  show_logs
  return 1
}

start() {
  local host port f
  command -v slurmctld >/dev/null || die "slurmctld not found: run 'make setup' (apt-get install slurmctld slurmd slurm-client munge)"
  for f in $(pid_files); do
    if alive "$f"; then
      die "a cluster is already running in $DIR ($(basename "$f" .pid) pid $(<"$f")); run '$0 stop $DIR' first"
    fi
  done
  port=${BEIT_SCALE_SLURM_PORT:-17000}
  for f in "$port" $((port + 1)) $((port + 2)); do
    if port_in_use "$f"; then
      die "port $f is in use (another cluster?); stop it or set BEIT_SCALE_SLURM_PORT to a free base port"
    fi
  done
  host=$(hostname -s)
  if ! grep -Eq '^[^#]*[[:space:]]n1([[:space:]]|$)' /etc/hosts; then
    echo "127.0.0.1 ${NODES[*]}" >>/etc/hosts
  fi

  mkdir -p "$DIR"/{state,run,log} "$DIR/spool/${NODES[0]}" "$DIR/spool/${NODES[1]}"
  chmod 0755 "$DIR"  # munged runs as the munge user and must reach DIR/munge
  write_conf "$host" "$port"
  printf 'export SLURM_CONF=%q\n' "$DIR/slurm.conf" >"$DIR/env"
  export SLURM_CONF=$DIR/slurm.conf

  start_munge
  slurmctld -c -f "$SLURM_CONF" || { show_logs; die "slurmctld did not start"; }
  for f in "${NODES[@]}"; do
    slurmd -f "$SLURM_CONF" -N "$f" || { show_logs; die "slurmd -N $f did not start"; }
  done
  wait_idle || die "cluster in $DIR did not come up; '$0 stop $DIR' cleans up"
  echo "cluster up: ${NODES[*]} idle; use it with:"
  cat "$DIR/env"
}

stop() {
  local f pid i
  [[ -f "$DIR/slurm.conf" ]] || die "no slurm.conf in $DIR: nothing to stop"
  export SLURM_CONF=$DIR/slurm.conf
  if alive "$DIR/run/slurmctld.pid"; then
    # Stopping slurmd does not kill running jobs: cancel them and wait (bounded) until they are gone.
    scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do
      [[ -z "$(squeue -h -t running,completing,pending -o %i 2>/dev/null)" ]] && break
      sleep 0.5
    done
  fi
  for f in $(pid_files); do
    alive "$f" || continue
    pid=$(<"$f")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 20; i++)); do
      alive "$f" || break
      sleep 0.5
    done
    if alive "$f"; then
      echo "cluster.sh: $(basename "$f" .pid) (pid $pid) ignored SIGTERM; sending SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  echo "cluster in $DIR stopped"
}

[[ $# -eq 2 ]] || die "usage: $0 start|stop DIR"
[[ "$(id -u)" -eq 0 ]] || die "must run as root (it starts slurmd and munged)"
mkdir -p "$2"
DIR=$(cd "$2" && pwd)
case "$1" in
  start) start ;;
  stop) stop ;;
  *) die "usage: $0 start|stop DIR" ;;
esac
