#!/usr/bin/env bash
# Creates (or reuses) .venv-tunix in the repository root: google-tunix, the peer tools/bench_aot.py
# compiles beside medjax, with the same jax, libtpu and flax as medjax's .venv, and medjax itself
# (no extras) so one process can lay both programs out on the same compile-only slice.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [ ! -x .venv-tunix/bin/python ]; then
  python3 -m venv .venv-tunix
fi
py=.venv-tunix/bin/python
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q -c constraints.txt "google-tunix==0.1.7" "jax[tpu]==0.10.2" "flax==0.12.8"
"$py" -m pip install -q -c constraints.txt --no-deps -e .
echo "tunix environment ready: $root/.venv-tunix"
