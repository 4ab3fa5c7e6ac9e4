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
# The RAG page test drives Debian's chromium headless (selenium, in the test extra). Installed only
# where this script may (root with apt-get); elsewhere that one test says it skipped and why.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; } \
      || echo "note: could not install chromium; the RAG page test will be skipped"
  fi
fi
echo "medjax environment ready: $root/.venv"
