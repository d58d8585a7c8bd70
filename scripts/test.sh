#!/usr/bin/env bash
# One command: install Keel, lint (ruff, import layers), run the whole suite on real servers.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
.venv/bin/ruff check .
.venv/bin/lint-imports
.venv/bin/pytest -q -p no:cacheprovider "$@"
