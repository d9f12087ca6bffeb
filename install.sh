#!/usr/bin/env bash
# Set up everything cmgems needs in ./.venv. With --test, also the Debian packages the tests use
# (Slurm and munge for the multi-node tests). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
with_test=0
[ "${1:-}" = "--test" ] && with_test=1

if [ "$with_test" = 1 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip
# A CPU-only machine takes the CPU wheel of torch; with a GPU, pip's default CUDA build.
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  $py -m pip install -q torch
else
  $py -m pip install -q torch==2.13.0
fi
# Installed as a user's pip would (package data, console scripts: cmgems, cmgems-pretrain, ...). The
# checkout's own commands (python launchers/pretrain.py, python -m preprocessing, the tests) run
# the checkout's code, whatever is installed; after changing it, run this again for the console
# scripts.
$py -m pip install -q -c constraints.txt ".[test]"
# DeepSpeed compiles its shared-memory op for several CPU ranks on first use; built here, once,
# no run waits for it (into TORCH_EXTENSIONS_DIR where set, else torch's cache).
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "building DeepSpeed's CPU communication op (once, about 1-2 min)"
  $py -m cmgems.pretrain.deepspeed_env \
    || echo "note: not built now; the first run with several CPU ranks builds it"
fi
echo "cmgems installed in $(pwd)/.venv"
