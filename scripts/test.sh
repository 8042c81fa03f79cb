#!/usr/bin/env bash
# Set up, then run the whole test suite. PostgreSQL tests use DOPPEL_TEST_POSTGRES_URL
# (default postgresql+psycopg://postgres@127.0.0.1:5432/test) and skip with a reason if none answers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" -m pytest "$@"
