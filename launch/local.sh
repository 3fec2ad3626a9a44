#!/usr/bin/env bash
# One host, all its local devices (CPU, one or more GPUs, or a single-host TPU VM).
#
#   launch/local.sh train --gin_file=experiments/demo/pretrain.gin --model_dir=runs/pretrain
#
# Arguments go to `t5lite` unchanged. Installs into .venv first if needed (same as `make`).
set -euo pipefail
cd "$(dirname "$0")/.."
make install >/dev/null
exec .venv/bin/t5lite "$@"
