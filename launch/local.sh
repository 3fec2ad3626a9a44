#!/usr/bin/env bash
# One host, all its local devices (CPU, one or more GPUs, or a single-host TPU VM).
#
#   launch/local.sh train --gin_file=experiments/demo/pretrain.gin --model_dir=runs/pretrain
#
# Arguments go to `t5lite` unchanged. Installs into .venv first if needed (same as `make`).
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/common.sh
source launch/common.sh
if [[ ${DRY_RUN:-0} == 1 ]]; then
  quote_words cd "$PWD"
  quote_words make install
  quote_words .venv/bin/t5lite "$@"
  exit 0
fi
make install >/dev/null
exec .venv/bin/t5lite "$@"
