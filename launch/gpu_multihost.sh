#!/usr/bin/env bash
# Several GPU hosts: run this on every host with the same coordinator and its own process id.
#
#   # host 0 (the coordinator), host 1, ...:
#   COORDINATOR=10.0.0.1:8476 NUM_PROCESSES=2 PROCESS_ID=0 launch/gpu_multihost.sh train \
#       --gin_file=experiments/pretrain/t5_1_1_base_c4.gin --model_dir=/shared/runs/base
#
# One process per host drives all of that host's GPUs. jax.distributed.initialize() reads
# JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID. model_dir and the TFDS data_dir
# must be on storage every host can reach (NFS, a bucket). Under SLURM, jax detects all of
# this by itself: `srun launch/local.sh train ...` is enough.
set -euo pipefail
: "${COORDINATOR:?set COORDINATOR=host:port of process 0}" "${NUM_PROCESSES:?set NUM_PROCESSES}" \
  "${PROCESS_ID:?set PROCESS_ID (0..NUM_PROCESSES-1)}"
cd "$(dirname "$0")/.."
make install >/dev/null
export JAX_COORDINATOR_ADDRESS=$COORDINATOR JAX_NUM_PROCESSES=$NUM_PROCESSES JAX_PROCESS_ID=$PROCESS_ID
exec .venv/bin/t5lite "$@"
