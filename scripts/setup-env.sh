#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with everything the demo and
# the tests need. Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=.venv/.bsym-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints-cpu.txt -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade "pip>=25.1"
  .venv/bin/python -m pip install --quiet -c constraints-cpu.txt torch
  .venv/bin/python -m pip install --quiet -c constraints-cpu.txt -e ".[triton,coffea,dask,remote]" --group dev
  touch "$stamp"
fi
