#!/usr/bin/env bash
# The README's run command: the station on the bundled sample fields (no camera, no broker).
# Open the URL it prints and press Capture (or the space bar).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# Install once (editable: code changes need no reinstall); again only when pyproject.toml changes,
# so a start takes seconds, not the ~20 s of a pip run.
stamp=.venv/.edge-wbc-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -x .venv/bin/edge-wbc ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing edge-wbc into .venv (once)..."
  # pip's build chatter goes to a log; it is shown only when the install fails.
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e . >.venv/install.log 2>&1; then
    cat .venv/install.log >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
exec .venv/bin/edge-wbc station --source samples --data-dir ./var/demo "$@"
