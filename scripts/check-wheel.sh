#!/usr/bin/env bash
# An installed wheel works outside the checkout: build it, install it into a fresh venv, and from
# a directory that is not the checkout run `edge-wbc analyze` on the bundled fields, `doctor` on
# the models, and compare the cells with the checkout's own analysis (same boxes and labels).
# Usage: scripts/check-wheel.sh [PYTHON]   (CI runs it from scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
# Absolute, so it still names the same interpreter after the cd below.
py="$(realpath -s "$(command -v "${1:-python3}")")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$py" -m pip wheel -q --disable-pip-version-check --no-deps -w "$work/dist" . >/dev/null
whl="$(ls "$work"/dist/edge_wbc-*.whl)"
echo "wheel: $(basename "$whl") ($(du -k "$whl" | cut -f1) KB)"
# The float weights (models/*.keras) stay in the repository: a device never loads them.
"$py" - "$whl" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
keras = [n for n in names if n.endswith(".keras")]
assert not keras, f"the wheel carries float weights: {keras}"
assert any(n.endswith("models/manifest.json") for n in names), "the wheel has no models"
PY
"$py" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check "$whl" >/dev/null

mkdir -p "$work/elsewhere"
cd "$work/elsewhere"
# No config, no models folder, no samples here: everything must come from the package.
unset EDGE_WBC_MODELS EDGE_WBC_CONFIG
fields="$("$work/venv/bin/python" -c 'from edge_wbc.bundled import packaged_samples as s; print(s())')"
case "$fields" in "$root"*) echo "FAIL: the installed package reads the checkout ($fields)"; exit 1;; esac
pick=("$fields"/001_*.jpg "$fields"/002_*.jpg "$fields"/003_*.jpg)
"$work/venv/bin/edge-wbc" doctor --only models
"$work/venv/bin/edge-wbc" analyze "${pick[@]}" --json "$work/wheel.json" >/dev/null
PYTHONPATH="$root" "$root/.venv/bin/edge-wbc" analyze "${pick[@]}" --json "$work/checkout.json" >/dev/null
"$py" - "$work/wheel.json" "$work/checkout.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
src = a["models"].get("models_source")
assert src == "packaged", f"the wheel used models from {src!r}, not the packaged ones"
cells = lambda d: [[(c["bbox"], c["label"]) for c in im["cells"]] for im in d["images"]]
assert all(im["error"] is None for im in a["images"]), [im["error"] for im in a["images"]]
assert cells(a) == cells(b), "the wheel's cells differ from the checkout's"
n = sum(len(im["cells"]) for im in a["images"])
assert n > 0, "no cells found on the bundled fields"
print(f"wheel OK: {len(a['images'])} bundled fields, {n} cells, same boxes and labels as the checkout")
PY
