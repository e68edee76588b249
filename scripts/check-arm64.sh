#!/usr/bin/env bash
# The Pi's software on the Pi's architecture: an arm64 Debian bookworm root (Raspberry Pi OS's
# base) run under qemu-user-static installs the wheel with Python 3.11 from PyPI's aarch64 wheels,
# and `edge-wbc analyze` there must give the same boxes and labels as on this machine for bundled
# fields; `install-pi.sh --dry-run` must run inside it. Emulated timings mean nothing for a Pi and
# are not printed.
#
# Needs root (debootstrap, chroot, binfmt_misc). The root is kept between runs in $ARM64_ROOT
# (default /var/tmp/edge-wbc-arm64/root); delete it to start over.
# Usage: sudo scripts/check-arm64.sh [--fields N]     (scripts/test.sh runs it in CI)
set -euo pipefail
cd "$(dirname "$0")/.."
src="$PWD"
fields=3
while [ $# -gt 0 ]; do
  case "$1" in
    --fields) fields="${2:?--fields needs a number}"; shift ;;
    *) echo "check-arm64.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || { echo "check-arm64.sh: needs root (debootstrap, chroot)" >&2; exit 2; }
root="${ARM64_ROOT:-/var/tmp/edge-wbc-arm64/root}"
py="${PYTHON:-$src/.venv/bin/python}"

need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing Debian packages: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The kernel runs arm64 binaries through qemu only once binfmt_misc knows the interpreter.
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 || {
  echo "check-arm64.sh: binfmt_misc has no enabled qemu-aarch64 handler" >&2; exit 1; }

if [ ! -x "$root/usr/bin/python3" ]; then
  echo "building an arm64 bookworm root in $root (debootstrap; a few minutes)"
  rm -rf "$root.partial"
  mkdir -p "$(dirname "$root")"
  # The mirror this machine's apt already uses, so the root comes from the same place.
  mirror="$(grep -rhoE '^URIs: *[^ ]+/debian/?$' /etc/apt/sources.list.d/ 2>/dev/null | head -1 | sed 's/^URIs: *//')"
  debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates,libgl1,libglib2.0-0 \
    bookworm "$root.partial" ${mirror:+"$mirror"} >/dev/null
  mv "$root.partial" "$root"
fi

# The host's CA bundle and resolver, so pip inside the root reaches PyPI as the host does.
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
# No /sys on purpose: with the host's sysfs, cpuinfo describes the x86 host and XNNPACK picks
# arm64 kernels that qemu crashes on (seen: SIGSEGV). Without it cpuinfo says so on stderr
# ("Error in cpuinfo", filtered below) and XNNPACK runs its baseline NEON kernels, so this checks
# the arm64 build and the code path, not the exact kernels a Pi 4/5 selects.
work="$root/tmp/edge-wbc-check"
cleanup() { umount "$root/proc" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
rm -rf "$work"
mkdir -p "$work/dist" "$work/elsewhere"

"$py" -m pip wheel -q --disable-pip-version-check --no-deps -w "$work/dist" "$src" >/dev/null
whl="$(basename "$(ls "$work"/dist/edge_wbc-*.whl)")"
in_root() { chroot "$root" /usr/bin/env -i HOME=/root PATH=/usr/bin:/bin LANG=C.UTF-8 \
  SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 "$@"; }
echo "arm64 root: $(in_root uname -m), $(in_root python3 --version)"
[ -x "$root/opt/venv/bin/python" ] || in_root python3 -m venv /opt/venv
in_root /opt/venv/bin/python -m pip install -q --upgrade "/tmp/edge-wbc-check/dist/$whl" >/dev/null
# The version number does not change between commits: force this wheel over a kept root's copy.
in_root /opt/venv/bin/python -m pip install -q --force-reinstall --no-deps \
  "/tmp/edge-wbc-check/dist/$whl" >/dev/null
in_root /opt/venv/bin/python -c 'import platform, numpy, cv2, ai_edge_litert; print("installed:", platform.machine(), "numpy", numpy.__version__, "opencv", cv2.__version__)'

# The same bundled fields on both sides, named by their place in the package.
names="$(in_root /opt/venv/bin/python -c "
from edge_wbc.bundled import packaged_samples
print(' '.join(sorted(p.name for p in packaged_samples().glob('*.jpg'))[:$fields]))")"
arm_fields=(); host_fields=()
host_samples="$("$py" -c 'from edge_wbc.bundled import packaged_samples as s; print(s())')"
arm_samples="$(in_root /opt/venv/bin/python -c 'from edge_wbc.bundled import packaged_samples as s; print(s())')"
for n in $names; do arm_fields+=("$arm_samples/$n"); host_fields+=("$host_samples/$n"); done
in_root /bin/sh -c "cd /tmp/edge-wbc-check/elsewhere && /opt/venv/bin/edge-wbc analyze ${arm_fields[*]} --json /tmp/edge-wbc-check/arm64.json" 2>&1 >/dev/null \
  | grep -v '^Error in cpuinfo' >&2 || true
[ -s "$work/arm64.json" ] || { echo "FAIL: edge-wbc analyze gave no JSON in the arm64 root" >&2; exit 1; }
PYTHONPATH="$src" "$py" -c 'from edge_wbc.cli import app; app()' analyze "${host_fields[@]}" \
  --json "$work/host.json" >/dev/null
"$py" - "$work/arm64.json" "$work/host.json" <<'PY'
# Same cells, same types; a box may differ by a few pixels: the int8 kernels requantise
# differently on NEON and x86 (XNNPACK), which moves a cell's edge, so its crop, so the
# probabilities of a cell between two types (bundled 00348: a neutrophil with 0.11 eosinophil
# on x86 at a box 3 px taller, 0.87 against 0.95 for the neutrophil on arm64, the threshold
# 0.938 between them). A cell named on one side and sent to review on the other is allowed when
# the unidentified side's likelier class is the name and the scores differ by <= 0.1; what
# would matter to a count (a cell found on one side only, another type) fails.
import json, platform, sys
arm, host = (json.load(open(p)) for p in sys.argv[1:3])
assert arm["models"]["models_source"] == "packaged", arm["models"].get("models_source")
assert all(im["error"] is None for im in arm["images"]), [im["error"] for im in arm["images"]]
def iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0])); iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    u = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / u if u else 1.0
def top(c):
    return max(c["probs"], key=c["probs"].get) if c.get("probs") else c["label"]
def same_type(a, b):
    if a["label"] == b["label"]:
        return True
    if "unidentified" not in (a["label"], b["label"]):
        return False
    u, named = (a, b) if a["label"] == "unidentified" else (b, a)
    return top(u) == named["label"] and abs(a["score"] - b["score"]) <= 0.1
n = shift = 0; worst = 1.0; dp = 0.0; edge = []
for ia, ib in zip(arm["images"], host["images"], strict=True):
    la = [c["label"] for c in ia["cells"]]; lb = [c["label"] for c in ib["cells"]]
    assert len(la) == len(lb) and all(
        same_type(a, b) for a, b in zip(ia["cells"], ib["cells"])
    ), f"{ia['path']}: arm64 {la} != {platform.machine()} {lb}"
    for a, b in zip(ia["cells"], ib["cells"]):
        if a["label"] != b["label"]:
            edge.append(f"{ia['path'].rsplit('/', 1)[-1]}: {a['label']} {a['score']:.3f} / "
                        f"{b['label']} {b['score']:.3f}")
        n += 1
        worst = min(worst, iou(a["bbox"], b["bbox"]))
        shift = max(shift, *(abs(x - y) for x, y in zip(a["bbox"], b["bbox"])))
        dp = max(dp, abs(a["score"] - b["score"]))
assert worst >= 0.9, f"a box moved too far between arm64 and {platform.machine()}: IoU {worst:.3f}"
print(f"arm64 analysis OK: {len(arm['images'])} fields, {n} cells, same types as "
      f"{platform.machine()}; boxes IoU >= {worst:.3f} (largest edge shift {shift} px), "
      f"largest score difference {dp:.4f}"
      + (f"; at the threshold (arm64 / {platform.machine()}): {'; '.join(edge)}" if edge else ""))
PY

# The installer's plan, read on the Pi's architecture (changes nothing).
rm -rf "$work/src"
mkdir -p "$work/src"
git -C "$src" ls-files -z | (cd "$src" && xargs -0 cp -P --parents -t "$work/src")
in_root /bin/bash /tmp/edge-wbc-check/src/scripts/install-pi.sh --dry-run >"$work/dry-run.log" 2>&1 \
  || { cat "$work/dry-run.log"; echo "FAIL: install-pi.sh --dry-run in the arm64 root"; exit 1; }
echo "install-pi.sh --dry-run in the arm64 root: $(wc -l < "$work/dry-run.log") lines, exit 0"
echo "arm64 OK"
