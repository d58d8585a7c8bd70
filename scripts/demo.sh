#!/usr/bin/env bash
# One command: install Keel, start the embedded stack, run the main job end to end.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
exec .venv/bin/keel demo "$@"
