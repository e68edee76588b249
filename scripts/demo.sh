#!/usr/bin/env bash
# The README's run command: the station on the bundled sample fields (folder source), no broker.
# Open the URL it prints and press Capture (or the space bar).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e . >/dev/null
exec .venv/bin/edge-wbc station --source folder:samples/fields --data-dir ./var/demo "$@"
