#!/usr/bin/env bash
# Creates ./.venv with flame and its dependencies. torch is installed first and pinned so that
# the resolver never swaps it; set TORCH_SPEC to choose another build (e.g. "torch==2.11.0").
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
