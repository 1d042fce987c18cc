#!/usr/bin/env bash
# Run a beit-scale job on every GPU of this machine (or NPROC CPU ranks) with torchrun.
# Topology only: hyperparameters live in the recipe. Slurm scripts are separate.
#
#   launch/local.sh pretrain --config pretrain_base_in1k train.global_batch=256
#   NPROC=2 launch/local.sh train-tokenizer --config quickstart_tokenizer data.root=...
set -euo pipefail

if [[ -z "${NPROC:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    NPROC=$(nvidia-smi --list-gpus | wc -l)
  else
    NPROC=1
  fi
fi
MASTER_PORT=${MASTER_PORT:-29500}

exec torchrun --standalone --nproc_per_node="$NPROC" --master_port="$MASTER_PORT" -m beit_scale.cli "$@"
