#!/usr/bin/env bash
# Set up, then run the main job on the embedded defaults (bundled sample data, SQLite, packaged models).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/doppel" demo "$@"
