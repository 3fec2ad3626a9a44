# shellcheck shell=bash
# Sourced by the launch scripts (not run): dry-run, quoting, and shipping the working tree to hosts.
#
# DRY_RUN=1 makes every script print the commands it would run, one per line, each word quoted so
# that a line pasted into a shell gives the same words.

(( BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 404 )) ||
  { echo "$0 needs bash 4.4 or newer (macOS: brew install bash)" >&2; exit 2; }

# One word as a shell reads it back: bare when that is safe; in double quotes when it holds a ' and
# nothing double quotes would expand (--gin.NAME="'my task'", as one would type it); else in single quotes.
shell_quote() {
  local quote_in_quotes="'\"'\"'"  # ends the quotes, a ' in double quotes, reopens them
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 == *\'* && $1 != *[\"\$\`\\!]* ]]; then
    printf '"%s"' "$1"
  else
    printf "'%s'" "${1//\'/$quote_in_quotes}"
  fi
}

# A command line from its words: what `run_or_print` prints and what remote shells are given.
quote_words() {
  local words=() word
  for word in "$@"; do words+=("$(shell_quote "$word")"); done
  printf '%s\n' "${words[*]}"
}

# Runs a command, or under DRY_RUN=1 prints it instead.
run_or_print() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    quote_words "$@"
  else
    "$@"
  fi
}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# The jax version pyproject.toml pins, so jax[tpu] / jax[cuda12] get the same one. Call it as
# `version=$(pinned_jax_version)`, so that set -e stops the script when it fails.
pinned_jax_version() {
  local version
  version=$(sed -n 's/^[[:space:]]*"jax==\([^"]*\)".*/\1/p' pyproject.toml | head -n 1)
  [[ -n $version ]] || die "pyproject.toml pins no jax version (\"jax==X\" in dependencies)"
  printf '%s\n' "$version"
}

# A directory on the hosts (relative to the home directory, or absolute) that sync may replace.
check_remote_dir() {
  [[ $1 =~ ^/?[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$ && ! $1 =~ (^|/)\.{1,2}(/|$) ]] ||
    die "REMOTE_DIR=$1: use a plain directory like t5lite or /opt/t5lite (it is replaced on every sync)"
}

# The tarball each host receives (in its home directory) before it is unpacked.
REMOTE_TARBALL=t5lite-tree.tar.gz

# Packs this working tree (committed + uncommitted + untracked-not-ignored files, no .venv / runs /
# caches) with its provenance file into $PACKED_TREE, a temporary file removed when the script exits.
# Runs here, with any python3: no jax needed.
pack_tree() {
  PACKED_TREE="$(mktemp -d)/$REMOTE_TARBALL"
  trap 'rm -rf "$(dirname "$PACKED_TREE")"' EXIT
  run_or_print cd "$PWD"
  run_or_print "${PYTHON:-python3}" -m t5lite.provenance pack "$PACKED_TREE"
}

# The steps joined by " && ": one shell command that stops at the first failing step.
and_then() {
  local joined=$1 step
  shift
  for step in "$@"; do joined+=" && $step"; done
  printf '%s\n' "$joined"
}

# Shell command (for a host) that replaces the directory $1 by the unpacked tree, keeping its .venv,
# so files deleted here disappear there too and an install survives a sync. A directory that is not a
# t5lite tree (no pyproject.toml: a mistyped REMOTE_DIR) is left alone.
unpack_command() {
  local dir incoming tarball
  dir=$(shell_quote "$1") incoming=$(shell_quote "$1.incoming") tarball=$(shell_quote "$REMOTE_TARBALL")
  local refuse="{ echo \"\$(hostname):$dir is not a t5lite tree; not replacing it (set REMOTE_DIR)\" >&2; exit 2; }"
  and_then "{ [ ! -e $dir ] || [ -f $dir/pyproject.toml ] || $refuse; }" \
    "rm -rf $incoming" "mkdir -p $incoming" "tar -xzf $tarball -C $incoming" \
    "{ [ ! -d $dir/.venv ] || mv $dir/.venv $incoming/; }" "rm -rf $dir" "mv $incoming $dir" "rm -f $tarball" \
    "echo \"synced into \$(hostname):$dir\""
}

# Shell command (for a host) that installs the tree in $1 into $1/.venv together with requirement $2
# (jax[tpu]==<pinned version>, ...). uv brings the Python the pinned jax needs (PYTHON_VERSION), also
# where the image's python3 is older, and needs no python3-venv package.
install_command() {
  # shellcheck disable=SC2016  # $HOME expands on the host, not here
  local uv='"$HOME/.local/bin/uv"'
  and_then "cd $(shell_quote "$1")" \
    "{ [ -x $uv ] || PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --user uv; }" \
    "{ [ -x .venv/bin/python ] || $uv venv -q --python $(shell_quote "${PYTHON_VERSION:-3.11}") .venv; }" \
    "$uv pip install -q --python .venv/bin/python -e . $(shell_quote "$2")"
}

# Shell command (for a host) that runs t5lite from the tree in $1: `t5lite_command DIR NAME=VALUE... --
# ARGS...` sets the environment NAME=VALUE and passes ARGS to t5lite exactly as given.
t5lite_command() {
  local dir assignments=()
  dir=$(shell_quote "$1")
  shift
  while [[ $# -gt 0 && $1 != -- ]]; do
    assignments+=("${1%%=*}=$(shell_quote "${1#*=}")")
    shift
  done
  shift
  local missing
  missing="t5lite is not installed in $dir on \$(hostname): run launch/$(basename "$0") install"
  and_then "{ [ -x $dir/.venv/bin/t5lite ] || { echo \"$missing\" >&2; exit 2; }; }" "cd $dir" \
    "${assignments[*]} .venv/bin/t5lite $(quote_words "$@")"
}
