#!/usr/bin/env bash
# The README's test command: installs what the tests need (Debian packages, a venv with the
# project and its converter/dev extras), then runs ruff, mypy (edge_wbc/) and the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k mqtt).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
if [ "${#need[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing Debian packages: ${need[*]}"
  # Packages must not start system services (a Mosquitto on :1883): the tests start their own.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod +x /usr/sbin/policy-rc.d
    trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev]' -e ./convert

.venv/bin/ruff check .
.venv/bin/mypy
# The browser test must fail, not skip, when Chromium is missing.
export EDGE_WBC_REQUIRE_BROWSER=1
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
# An installed wheel (not the checkout) must analyse on its own: models and samples packaged.
[ "$#" -gt 0 ] || bash scripts/check-wheel.sh .venv/bin/python
# The Pi's architecture: the wheel in an arm64 bookworm root under qemu (needs root; the root is
# kept in /var/tmp between runs). EDGE_WBC_SKIP_ARM64=1 skips it on a machine without root.
if [ "$#" -eq 0 ] && [ "${EDGE_WBC_SKIP_ARM64:-0}" != 1 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo env PYTHON="$PWD/.venv/bin/python" bash scripts/check-arm64.sh --fields 6
fi
