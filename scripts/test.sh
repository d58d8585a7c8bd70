#!/usr/bin/env bash
# One command: install Keel, lint (ruff, import layers, mypy), run the whole suite on real servers
# (with coverage when run without arguments; arguments go to pytest).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
.venv/bin/ruff check .
.venv/bin/lint-imports
.venv/bin/mypy
if [ "$#" -eq 0 ]; then
  # The whole suite: also measure coverage of workflows/ and activities/, and hold it at 90%.
  set -- --cov --cov-fail-under=90
fi
.venv/bin/pytest -q -p no:cacheprovider "$@"
