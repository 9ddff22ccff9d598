#!/usr/bin/env bash
# The test command: set up .venv, then lint, type-check and run the test suite.
# Extra arguments go to pytest (e.g. `scripts/test.sh -m slow` for the long studies).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-env.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
scripts/typecheck.sh
.venv/bin/python -m pytest "$@"
