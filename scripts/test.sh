#!/usr/bin/env bash
# One command: install Keel, lint (ruff, import layers, mypy), run the whole suite on real servers
# (with coverage when run without arguments; arguments go to pytest).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
# The Temporal UI test renders pages in headless Chromium. Install Debian's package when this
# shell may (root with apt-get); otherwise that one test is skipped and says so.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
    >/tmp/keel-chromium-install.log 2>&1; then
    echo "could not install chromium (see /tmp/keel-chromium-install.log); the UI test will skip" >&2
  fi
fi
.venv/bin/ruff check .
.venv/bin/lint-imports
.venv/bin/mypy
if [ "$#" -eq 0 ]; then
  # The whole suite: also measure coverage of workflows/ and activities/, and hold it at 90%.
  set -- --cov --cov-fail-under=90 --durations=15
fi
.venv/bin/pytest -q -p no:cacheprovider "$@"
