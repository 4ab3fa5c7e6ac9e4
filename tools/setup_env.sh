#!/usr/bin/env bash
# Creates (or reuses) .venv in the repository root and installs medjax with the extras named as
# arguments (default: test). torch is installed first and pinned: on these CPU machines only
# torch==2.13.0 resolves to a local CPU build; anything else pulls multi-GB CUDA wheels.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
extras=${1:-test,serve,tpu,data,rag}
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
py=.venv/bin/python
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q -c constraints.txt torch==2.13.0
"$py" -m pip install -q -c constraints.txt -e ".[cpu,$extras]"
# The PyPI torchvision/torchaudio do not import beside the CPU torch and break transformers.
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
echo "medjax environment ready: $root/.venv"
