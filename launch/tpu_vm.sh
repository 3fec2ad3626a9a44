#!/usr/bin/env bash
# A Cloud TPU VM or pod slice: create it, ship this working tree to every worker, run one command on all.
#
#   export TPU_NAME=t5 ZONE=us-central2-b ACCELERATOR=v4-32
#   launch/tpu_vm.sh create
#   launch/tpu_vm.sh install            # sync, then a venv with `pip install -e .` and jax[tpu]==<pyproject's pin>
#   launch/tpu_vm.sh run train --gin_file=experiments/pretrain/t5_1_1_base_c4.gin \
#       --model_dir=gs://BUCKET/runs/base --gin.MIXTURE_OR_TASK_NAME="'my task'"
#   # edit a module here, then ship the edit (the venv stays; install again only when dependencies change):
#   launch/tpu_vm.sh sync
#   launch/tpu_vm.sh delete
#
# sync packs this checkout as it is on disk: committed and uncommitted changes and untracked files
# git does not ignore, never .venv/, runs/ or caches. Each worker gets it in ~/$REMOTE_DIR (replaced
# whole, its .venv kept) with .t5lite_tree.json: commit, dirty flag, diff sha256, packing time.
# `t5lite train` copies that into MODEL_DIR/provenance.json, so a result names the code that made it.
#
# run passes its arguments to t5lite on every worker exactly as given (quoted for the remote shell);
# a leading `t5lite` is dropped, so a line of `t5lite sweep --print_commands` launches as it is:
#   t5lite sweep run ... --print_commands | while IFS= read -r line; do
#     eval "launch/tpu_vm.sh run $line" </dev/null; done
# T5LITE_DISTRIBUTED=1 makes t5lite call jax.distributed.initialize(), which reads the pod topology
# from the TPU metadata; each worker reads only its own shard of the data. On a pod, model_dir and
# TFDS data_dir must be in a bucket (gs://...) every worker can reach: local disks are per worker.
#
# Settings (environment): TPU_NAME, ZONE (required); PROJECT (default: gcloud's); ACCELERATOR
# (create, default v4-8); VERSION (create: TPU software version, default tpu-ubuntu2204-base; e.g.
# v2-alpha-tpuv5-lite for v5e); SPOT=1 (create a Spot TPU); REMOTE_DIR (default t5lite);
# PYTHON_VERSION (install, default 3.11); DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/common.sh
source launch/common.sh

usage="usage: TPU_NAME=... ZONE=... $0 create | sync | install | run [t5lite] <t5lite args> | delete"
[[ -n ${TPU_NAME:-} && -n ${ZONE:-} ]] || die "set TPU_NAME and ZONE; $usage"
REMOTE_DIR=${REMOTE_DIR:-t5lite}
check_remote_dir "$REMOTE_DIR"
where=(--zone="$ZONE")
[[ -z ${PROJECT:-} ]] || where+=(--project="$PROJECT")

on_all_workers() {
  run_or_print gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"
}

# Packs the tree here, copies it to every worker and unpacks it there; then runs $1 there, if given.
sync_tree() {
  pack_tree
  run_or_print gcloud compute tpus tpu-vm scp "$PACKED_TREE" "$TPU_NAME:$REMOTE_TARBALL" "${where[@]}" --worker=all
  on_all_workers "$(and_then "$(unpack_command "$REMOTE_DIR")" "$@")"
}

case "${1:-}" in
  create)
    spot=()
    [[ ${SPOT:-0} != 1 ]] || spot=(--spot)
    run_or_print gcloud compute tpus tpu-vm create "$TPU_NAME" "${where[@]}" \
      --accelerator-type="${ACCELERATOR:-v4-8}" --version="${VERSION:-tpu-ubuntu2204-base}" "${spot[@]}" ;;
  sync)
    sync_tree ;;
  install)
    jax_version=$(pinned_jax_version)
    sync_tree "$(install_command "$REMOTE_DIR" "jax[tpu]==$jax_version")" ;;
  run)
    shift
    [[ ${1:-} != t5lite ]] || shift
    [[ $# -gt 0 ]] || die "run needs t5lite arguments, e.g. run train --gin_file=... --model_dir=gs://..."
    on_all_workers "$(t5lite_command "$REMOTE_DIR" T5LITE_DISTRIBUTED=1 -- "$@")" ;;
  delete)
    run_or_print gcloud compute tpus tpu-vm delete "$TPU_NAME" "${where[@]}" --quiet ;;
  *)
    die "$usage" ;;
esac
