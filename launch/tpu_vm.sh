#!/usr/bin/env bash
# A Cloud TPU VM or pod slice: create it, install t5lite on every worker, run one command on all.
#
#   TPU_NAME=t5 ZONE=us-central2-b ACCELERATOR=v4-32 launch/tpu_vm.sh create
#   TPU_NAME=t5 ZONE=us-central2-b launch/tpu_vm.sh install
#   TPU_NAME=t5 ZONE=us-central2-b launch/tpu_vm.sh run train \
#       --gin_file=experiments/pretrain/t5_1_1_base_c4.gin --model_dir=gs://BUCKET/runs/base
#   TPU_NAME=t5 ZONE=us-central2-b launch/tpu_vm.sh delete
#
# Every worker runs the same command; T5LITE_DISTRIBUTED=1 makes t5lite call
# jax.distributed.initialize(), which reads the pod topology from the TPU metadata. Each
# worker reads only its own shard of the data. On a pod, model_dir and TFDS data_dir must be
# in a bucket (gs://...) that every worker can reach: local disks are per worker.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-8}
VERSION=${VERSION:-tpu-ubuntu2204-base}
REPO=${REPO:-https://github.com/t5lite/t5lite.git}

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR" \
      --version="$VERSION" ;;
  install)
    on_all_workers "set -e; [ -d t5lite ] || git clone $REPO t5lite; cd t5lite && git pull --ff-only \
      && python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]==0.10.2'" ;;
  run)
    shift
    printf -v args '%q ' "$@"
    on_all_workers "cd t5lite && T5LITE_DISTRIBUTED=1 .venv/bin/t5lite $args" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet ;;
  *)
    echo "usage: TPU_NAME=... ZONE=... $0 create|install|run <t5lite args>|delete" >&2
    exit 2 ;;
esac
