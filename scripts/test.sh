#!/usr/bin/env bash
# One command: install Keel, lint (ruff, import layers, mypy), run the whole suite on real servers.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
.venv/bin/ruff check .
.venv/bin/lint-imports
.venv/bin/mypy
.venv/bin/pytest -q -p no:cacheprovider "$@"
