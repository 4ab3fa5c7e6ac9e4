#!/usr/bin/env bash
# Creates (or reuses) .venv in the repository root and installs medjax with the extras named as
# arguments (default: test). torch is installed first and pinned: on these CPU machines only
# torch==2.13.0 resolves to a local CPU build; anything else pulls multi-GB CUDA wheels.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
extras=${1:-test,serve,tpu,data,rag,tf,real}
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
py=.venv/bin/python
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q -c constraints.txt torch==2.13.0
"$py" -m pip install -q -c constraints.txt -e ".[cpu,$extras]"
# The PyPI torchvision/torchaudio do not import beside the CPU torch and break transformers.
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# Debian packages, installed only where this script may (root with apt-get); elsewhere what needs
# them says so: chromium + chromium-driver for the RAG page test (selenium, in the test extra; that
# one test skips without them), and a CJK font so charts draw Chinese subjects and levels (without
# it medjax.charts writes them in English or as code points).
packages=()
{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } || packages+=(chromium chromium-driver)
[ -f /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ] || packages+=(fonts-wqy-microhei)
if [ ${#packages[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null; } \
    || echo "note: could not install ${packages[*]}; the RAG page test will be skipped and charts write Chinese as text"
fi
echo "medjax environment ready: $root/.venv"
