#!/usr/bin/env bash
# Several GPU hosts, one t5lite process per host driving all of that host's GPUs, started over ssh.
#
# Hosts with their own disks (the default): ship this working tree to every host.
#   export HOSTS="gpu0 gpu1"             # ssh names (user@host works); process 0 runs on the first
#   launch/gpu_multihost.sh install      # sync, then a venv with `pip install -e .` and jax[cuda12]==<pin>
#   launch/gpu_multihost.sh run train --gin_file=experiments/pretrain/t5_1_1_base_c4.gin \
#       --model_dir=/nfs/runs/base
#   launch/gpu_multihost.sh sync         # after an edit here (the venv stays)
# sync packs this checkout as it is on disk (committed and uncommitted changes, untracked files git
# does not ignore; never .venv/, runs/, caches), copies it to each host over ssh and unpacks it into
# ~/$REMOTE_DIR (replaced whole, its .venv kept) with .t5lite_tree.json: commit, dirty flag, diff
# sha256, packing time. `t5lite train` copies that into MODEL_DIR/provenance.json.
#
# Hosts sharing a filesystem (NFS, Lustre) that holds this checkout at the same path: SHARED_FS=1.
# Nothing is copied; every host runs this directory in place, so the code is exactly what is on disk
# here, and t5lite train records its git commit and diff hash itself. `install` builds ./.venv once,
# on the first host; `sync` is refused. The venv's Python must be at the same path on every host
# (a shared home directory, or identical images).
#
# run starts `t5lite ARGS` on every host at once with JAX_COORDINATOR_ADDRESS (the first host),
# JAX_NUM_PROCESSES (the number of hosts) and JAX_PROCESS_ID (the position in HOSTS), waits for all
# and fails if any fails; Ctrl-C here hangs up the ssh sessions (-tt), which stops the remote processes.
# Arguments reach t5lite exactly as given; a leading `t5lite` is dropped, so a line printed by
# `t5lite sweep --print_commands` launches with `eval "launch/gpu_multihost.sh run $line"`.
# model_dir and the TFDS data_dir must be on storage every host reaches.
# Under SLURM no script is needed: `srun launch/local.sh train ...` (jax reads SLURM's variables);
# under any other scheduler, on each host: JAX_COORDINATOR_ADDRESS=host0:8476 JAX_NUM_PROCESSES=N
# JAX_PROCESS_ID=i launch/local.sh train ...
#
# Settings (environment): HOSTS (required); SHARED_FS=1; COORDINATOR (host:port every host reaches;
# default the first host, port PORT=8476); REMOTE_DIR (default t5lite); JAX_EXTRA (default cuda12:
# installs jax[cuda12]); PYTHON_VERSION (install, default 3.11); DRY_RUN=1 prints the commands instead.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/common.sh
source launch/common.sh

usage="usage: HOSTS=\"host0 host1 ...\" [SHARED_FS=1] $0 sync | install | run [t5lite] <t5lite args>"
read -r -a hosts <<<"${HOSTS:-}"
[[ ${#hosts[@]} -gt 0 ]] || die "set HOSTS to the ssh names of the hosts; $usage"
if [[ ${SHARED_FS:-0} == 1 ]]; then
  tree=$PWD
else
  tree=${REMOTE_DIR:-t5lite}
  check_remote_dir "$tree"
fi
first=${hosts[0]}
coordinator=${COORDINATOR:-${first#*@}:${PORT:-8476}}

# Runs `$1 HOST INDEX` for every host at once (one after the other, printing, under DRY_RUN=1) and
# fails naming the hosts where it failed.
on_every_host() {
  local step=$1 what=$2 i pids=() failed=()
  for i in "${!hosts[@]}"; do
    if [[ ${DRY_RUN:-0} == 1 ]]; then
      "$step" "${hosts[i]}" "$i"
    else
      "$step" "${hosts[i]}" "$i" </dev/null &
      pids[i]=$!
    fi
  done
  for i in "${!pids[@]}"; do
    wait "${pids[i]}" || failed+=("${hosts[i]}")
  done
  [[ ${#failed[@]} -eq 0 ]] || die "$what failed on ${failed[*]}"
}

# Copies the packed tree to host $1 and unpacks it there, then runs $then_install there, if set.
ship_to() {
  run_or_print scp -q "$PACKED_TREE" "$1:$REMOTE_TARBALL" &&
    run_or_print ssh "$1" "$(and_then "$(unpack_command "$tree")" "${then_install[@]}")"
}

# Starts process $2 of the run on host $1. -tt: when this script stops, the hung-up remote shell
# stops its t5lite too.
start_on() {
  run_or_print ssh -tt "$1" "$(t5lite_command "$tree" JAX_COORDINATOR_ADDRESS="$coordinator" \
    JAX_NUM_PROCESSES="${#hosts[@]}" JAX_PROCESS_ID="$2" T5LITE_HOSTS="${hosts[*]}" -- "${t5lite_args[@]}")"
}

case "${1:-}" in
  sync | install)
    [[ ${SHARED_FS:-0} != 1 || $1 == install ]] || die "SHARED_FS=1: the hosts run $PWD in place; nothing to sync"
    then_install=()
    if [[ $1 == install ]]; then
      jax_version=$(pinned_jax_version)
      then_install=("$(install_command "$tree" "jax[${JAX_EXTRA:-cuda12}]==$jax_version")")
    fi
    if [[ ${SHARED_FS:-0} == 1 ]]; then
      run_or_print ssh "$first" "${then_install[0]}"
      exit 0
    fi
    pack_tree
    on_every_host ship_to "$1" ;;
  run)
    shift
    [[ ${1:-} != t5lite ]] || shift
    [[ $# -gt 0 ]] || die "run needs t5lite arguments, e.g. run train --gin_file=... --model_dir=/nfs/runs/x"
    t5lite_args=("$@")
    on_every_host start_on t5lite ;;
  *)
    die "$usage" ;;
esac
