#!/usr/bin/env bash
# The common body of launch/*.sbatch: environment, topology, one launch, and the requeue contract.
#
#   launch/slurm/run.sh JOB [beit-scale arguments]     (JOB: pretrain, train-tokenizer, finetune, linprobe, segment)
#
# BEIT_SCALE_LAUNCHER=srun (default): srun starts one task per GPU; each rank reads SLURM_PROCID and friends.
# BEIT_SCALE_LAUNCHER=torchrun: srun starts one torchrun per node, torchrun starts GPUS_PER_NODE ranks.
#
# Requeue contract: on the job's --signal the ranks checkpoint together and all exit 75. Then the job is
# requeued (scontrol requeue) while SLURM_RESTART_COUNT < BEIT_SCALE_MAX_REQUEUES (default 20) and this
# script exits 0; past the budget it exits 75. Any other failure is logged with every rank's last step and
# sign of life (`beit-scale heartbeat` on $BEIT_SCALE_RUN_DIR, else the recipe's run folder), and the script
# exits with srun's code.
set -euo pipefail

PREEMPTED=75

log() {
  echo "[$(date '+%F %T') beit-scale launch job ${SLURM_JOB_ID:-?}] $*"
}

die() {
  log "error: $*" >&2
  exit 2
}

[[ $# -ge 1 ]] || die "usage: launch/slurm/run.sh JOB [--config RECIPE] [section.key=value ...]"
JOB=$1
shift
: "${SLURM_JOB_ID:?launch/slurm/run.sh runs inside a Slurm job: submit it with sbatch launch/<job>.sbatch}"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
log "$JOB on $REPO, restart count ${SLURM_RESTART_COUNT:-0}"

VENV=${BEIT_SCALE_VENV:-$REPO/.venv}
if [[ -f "$VENV/bin/activate" ]]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi

# Site network settings (NCCL, InfiniBand, EFA): $BEIT_SCALE_SITE_ENV, else launch/site.env if present.
if [[ -n "${BEIT_SCALE_SITE_ENV:-}" ]]; then
  [[ -f "$BEIT_SCALE_SITE_ENV" ]] || die "BEIT_SCALE_SITE_ENV=$BEIT_SCALE_SITE_ENV does not exist"
  SITE_ENV=$BEIT_SCALE_SITE_ENV
else
  SITE_ENV=$REPO/launch/site.env
fi
if [[ -f "$SITE_ENV" ]]; then
  log "site environment: $SITE_ENV"
  set -a
  # shellcheck disable=SC1090
  source "$SITE_ENV"
  set +a
fi

# shellcheck source=launch/slurm/topology.sh
source "$REPO/launch/slurm/topology.sh"
log "nodes $NNODES ($SLURM_JOB_NODELIST), tasks/node $TASKS_PER_NODE, GPUs/node $GPUS_PER_NODE," \
  "master $MASTER_ADDR:$MASTER_PORT"

case "${BEIT_SCALE_LAUNCHER:-srun}" in
  srun)
    cmd=(srun --kill-on-bad-exit=1 python -m beit_scale.cli "$JOB" "$@")
    ;;
  torchrun)
    cpus=()
    if [[ -n "${SLURM_CPUS_ON_NODE:-}" ]]; then
      cpus=(--cpus-per-task="$SLURM_CPUS_ON_NODE")  # the node's CPUs for its torchrun and all its ranks
    fi
    # torchrun_exit.py is torchrun, passing USR1/USR2 on to its ranks and exiting with the first failed
    # rank's code (75 included).
    cmd=(srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 "${cpus[@]}"
      python "$REPO/launch/slurm/torchrun_exit.py" --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE"
      --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID"
      -m beit_scale.cli "$JOB" "$@")
    ;;
  *)
    die "BEIT_SCALE_LAUNCHER=${BEIT_SCALE_LAUNCHER} is not one of: srun, torchrun"
    ;;
esac

log "launching: ${cmd[*]}"
rc=0
"${cmd[@]}" || rc=$?

if [[ $rc -eq 0 ]]; then
  log "$JOB finished"
  exit 0
fi
if [[ $rc -eq $PREEMPTED ]]; then
  restarts=${SLURM_RESTART_COUNT:-0}
  budget=${BEIT_SCALE_MAX_REQUEUES:-20}
  if [[ $restarts -lt $budget ]]; then
    log "ranks checkpointed and exited $PREEMPTED: requeueing (restart $((restarts + 1)) of at most $budget)"
    # Under partition preemption with PreemptMode=REQUEUE Slurm requeues the job itself; then this fails.
    scontrol requeue "$SLURM_JOB_ID" || log "scontrol requeue failed (already requeued by Slurm?)"
    exit 0
  fi
  log "ranks exited $PREEMPTED but the requeue budget is spent ($restarts of BEIT_SCALE_MAX_REQUEUES=$budget)"
  exit "$PREEMPTED"
fi
log "srun exited $rc"
# Each rank's last finished step and sign of life, from the run folder (BEIT_SCALE_RUN_DIR, else the recipe's).
RUN_DIR=${BEIT_SCALE_RUN_DIR:-}
if [[ -z "$RUN_DIR" && $JOB != consolidate ]]; then
  RUN_DIR=$(python -m beit_scale.cli run-dir "$@" 2>/dev/null || true)
fi
if [[ -n "$RUN_DIR" ]] && python -m beit_scale.cli heartbeat --help >/dev/null 2>&1; then
  log "ranks' last heartbeats in $RUN_DIR:"
  python -m beit_scale.cli heartbeat "$RUN_DIR" || log "beit-scale heartbeat failed"
fi
exit "$rc"
