# shellcheck shell=bash
# Sourced by launch/slurm/run.sh inside a Slurm job: where the ranks go, never hyperparameters.
# Exports NNODES, TASKS_PER_NODE, GPUS_PER_NODE, MASTER_ADDR and MASTER_PORT.
: "${SLURM_JOB_ID:?launch/slurm/topology.sh must run inside a Slurm job}"

NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
# SLURM_TASKS_PER_NODE looks like "8(x4)" or "8,4"; the batch node's count is the first number.
TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}
TASKS_PER_NODE=${TASKS_PER_NODE%%[(,]*}

if [[ "${SLURM_GPUS_ON_NODE:-0}" =~ ^[1-9][0-9]*$ ]]; then
  GPUS_PER_NODE=$SLURM_GPUS_ON_NODE
elif command -v nvidia-smi >/dev/null 2>&1 && [[ "$(nvidia-smi --list-gpus 2>/dev/null | wc -l)" -gt 0 ]]; then
  GPUS_PER_NODE=$(nvidia-smi --list-gpus | wc -l)
else
  GPUS_PER_NODE=$TASKS_PER_NODE  # a CPU run: one rank per task
fi

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# Same formula as beit_scale.engine.dist.slurm_rendezvous, so srun tasks agree without being told.
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

export NNODES TASKS_PER_NODE GPUS_PER_NODE MASTER_ADDR MASTER_PORT
