#!/usr/bin/env bash
# mypy --strict over the whole `bsym` package. pyproject maps bsym.training to training/ (and
# so on), which mypy cannot follow, so check a tree of symbolic links laid out as installed.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=.mypy_tree
rm -rf "$tree" && mkdir -p "$tree/bsym"
for entry in bsym/*; do ln -s "../../$entry" "$tree/bsym/$(basename "$entry")"; done
for package in training export serving; do ln -s "../../$package" "$tree/bsym/$package"; done
cd "$tree"
../.venv/bin/mypy --config-file ../pyproject.toml -p bsym "$@"
