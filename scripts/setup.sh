#!/usr/bin/env bash
# Install tokentune-peft with everything its tests and examples need, on CPU, into the active Python
# (run it inside a virtual environment to keep it apart).
set -euo pipefail
cd "$(dirname "$0")/.."
pip install --quiet "torch==2.13.0"               # CPU build; a plain `pip install torch` fetches CUDA builds
pip install --quiet -e ".[test,examples]"
pip install --quiet --no-deps -r requirements-offline.txt
