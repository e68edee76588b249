#!/usr/bin/env bash
# Install or upgrade the edge-wbc station on Raspberry Pi OS Bookworm (64-bit).
#
#   git clone <repo> edge-wbc && cd edge-wbc
#   sudo scripts/install-pi.sh [--edgetpu] [--kiosk]     # install, or upgrade after `git pull`
#   scripts/install-pi.sh --dry-run                       # show every step, change nothing
#
# Idempotent: every step first looks at what is there and acts only on a difference, so a
# second run changes nothing (and does not restart the station). Your /etc/edge-wbc/config.toml
# and credentials are created once and never overwritten.
#
# Options:
#   --dry-run          print each step and the commands it would run; change nothing
#   --edgetpu          also install the Coral Edge TPU runtime (libedgetpu1-std, Coral's apt repo)
#   --kiosk            also install Chromium and the kiosk unit (station page full-screen)
#   --kiosk-user USER  desktop user logged in on the display (default: $SUDO_USER, else pi)
#   --prefix DIR       install directory (default /opt/edge-wbc)
#   --no-start         enable the units but do not (re)start the station
#   --root DIR         install into DIR as if it were / (tests, image building). Package
#                      manager, pip and service-manager commands are recorded in
#                      DIR/.install-commands instead of run; their effect on DIR's package,
#                      user and venv records is emulated so a second run sees it.
set -euo pipefail

PREFIX=/opt/edge-wbc
ROOT=""
DRY=0
EDGETPU=0
KIOSK=0
KIOSK_USER="${SUDO_USER:-pi}"
START=1
SERVICE_USER=edge-wbc
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --edgetpu) EDGETPU=1 ;;
    --kiosk) KIOSK=1 ;;
    --kiosk-user) KIOSK_USER="${2:?--kiosk-user needs a user name}"; shift ;;
    --prefix) PREFIX="${2:?--prefix needs a directory}"; shift ;;
    --root) ROOT="${2:?--root needs a directory}"; shift ;;
    --no-start) START=0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install-pi.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

case "$PREFIX" in /*) ;; *) echo "install-pi.sh: --prefix must be absolute" >&2; exit 2 ;; esac
if [ -n "$ROOT" ]; then
  mkdir -p "$ROOT"
  ROOT="$(cd "$ROOT" && pwd)"
  [ "$ROOT" != "/" ] || ROOT=""
fi
FAKE=0
[ -n "$ROOT" ] && FAKE=1

if [ "$DRY" = 0 ] && [ "$FAKE" = 0 ] && [ "$(id -u)" != 0 ]; then
  echo "install-pi.sh: run it with sudo (it installs packages and a system service)," \
       "or with --dry-run to see what it would do" >&2
  exit 1
fi

CHANGED=0        # anything the running station depends on changed: restart it
STEP=0
CMDLOG="$ROOT/.install-commands"
DPKG_ADMIN="$ROOT/var/lib/dpkg"
VENV="$PREFIX/venv"

step() { STEP=$((STEP + 1)); printf '\n[%d] %s\n' "$STEP" "$*"; }
ok() { printf '    ok: %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
q() { printf '%q ' "$@"; }

# A command that changes the system. Dry run: print it. Fake root: print and record it.
run() {
  printf '    + %s\n' "$(q "$@")"
  if [ "$DRY" = 1 ]; then return 0; fi
  if [ "$FAKE" = 1 ]; then
    q "$@" >> "$CMDLOG"; echo >> "$CMDLOG"
    emulate "$@"
    return 0
  fi
  "$@"
}

# What a recorded command would have left behind, so the next run's checks see it.
emulate() {
  if [ "$1" = env ]; then  # env VAR=value cmd ...: look at the command
    shift
    while [ $# -gt 0 ] && [[ "$1" == *=* ]]; do shift; done
  fi
  case "$1 ${2:-}" in
    "apt-get install")
      local p
      mkdir -p "$DPKG_ADMIN"
      for p in "$@"; do
        case "$p" in apt-get|install|-y|--no-install-recommends|-o*|*=*) continue ;; esac
        printf 'Package: %s\nStatus: install ok installed\nVersion: 0\nArchitecture: all\nMaintainer: emulated <root@localhost>\nDescription: emulated by install-pi.sh --root\n\n' \
          "$p" >> "$DPKG_ADMIN/status"
      done ;;
    "useradd "*|useradd*)
      mkdir -p "$ROOT/etc"
      echo "$SERVICE_USER:x:999:999::/var/lib/$SERVICE_USER:/usr/sbin/nologin" >> "$ROOT/etc/passwd"
      echo "$SERVICE_USER:x:999:" >> "$ROOT/etc/group" ;;
    "groupadd "*|groupadd*)
      mkdir -p "$ROOT/etc"
      echo "${*: -1}:x:998:" >> "$ROOT/etc/group" ;;
    "python3 -m")
      mkdir -p "$ROOT$VENV/bin" && : > "$ROOT$VENV/bin/python" ;;
    "sh -c")
      case "$3" in *gpg*--dearmor*)
        mkdir -p "$ROOT/usr/share/keyrings" && : > "$ROOT/usr/share/keyrings/coral-edgetpu-archive-keyring.gpg" ;;
      esac ;;
  esac
}

pkg_installed() {
  [ -f "$DPKG_ADMIN/status" ] || return 1
  dpkg-query --admindir="$DPKG_ADMIN" -W -f='${Status}' "$1" 2>/dev/null \
    | grep -q 'install ok installed'
}

has_user() {
  if [ "$FAKE" = 1 ]; then grep -q "^$1:" "$ROOT/etc/passwd" 2>/dev/null; else getent passwd "$1" >/dev/null; fi
}

has_group() {
  if [ "$FAKE" = 1 ]; then grep -q "^$1:" "$ROOT/etc/group" 2>/dev/null; else getent group "$1" >/dev/null; fi
}

systemctl_q() {  # read-only systemctl queries work offline against a root with --root
  if [ "$FAKE" = 1 ]; then systemctl --root="$ROOT" "$@"; else systemctl "$@"; fi
}

# Install one file if absent or different. $3: mode. Sets CHANGED=1 when it writes.
put_file() {
  local src="$1" dst="$ROOT$2" mode="$3"
  if [ -f "$dst" ] && cmp -s "$src" "$dst"; then
    ok "$2 up to date"
    return 1
  fi
  printf '    %s %s\n' "$([ -f "$dst" ] && echo update || echo install)" "$2"
  if [ "$DRY" = 0 ]; then install -D -m "$mode" "$src" "$dst"; fi
  CHANGED=1
  return 0
}

# Write content (stdin) to a file if absent or different.
put_text() {
  local tmp; tmp="$(mktemp)"
  cat > "$tmp"
  local rc=0
  put_file "$tmp" "$1" "$2" || rc=$?
  rm -f "$tmp"
  return $rc
}

# Make DST an exact copy of the files in SRC (one level deep, as models/ and samples are).
mirror_dir() {
  local src="$1" dst="$2" f name same=0
  [ -d "$src" ] || { note "no $src in this checkout: skipped"; return 0; }
  for f in "$src"/*; do
    [ -f "$f" ] || continue
    if [ -f "$ROOT$dst/$(basename "$f")" ] && cmp -s "$f" "$ROOT$dst/$(basename "$f")"; then
      same=$((same + 1))
    else
      put_file "$f" "$dst/$(basename "$f")" 0644 || true
    fi
  done
  [ "$same" = 0 ] || ok "$dst: $same file(s) up to date"
  if [ -d "$ROOT$dst" ]; then
    for f in "$ROOT$dst"/*; do
      [ -f "$f" ] || continue
      name="$(basename "$f")"
      if [ ! -f "$src/$name" ]; then
        note "remove $dst/$name (no longer shipped)"
        if [ "$DRY" = 0 ]; then rm -f "$f"; fi
        CHANGED=1
      fi
    done
  fi
}

# Content hash of what pip would install: a changed checkout means pip must run again.
source_stamp() {
  (cd "$SRC" && find pyproject.toml edge_wbc -type f ! -path '*/__pycache__/*' ! -name '*.pyc' \
     -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}

echo "edge-wbc installer: source $SRC -> prefix $PREFIX${ROOT:+ (root $ROOT)}$([ $DRY = 1 ] && echo ' [dry run: nothing is changed]')"

# --------------------------------------------------------------------------------------------
step "Check the system"
if [ -r "$ROOT/etc/os-release" ]; then
  # shellcheck source=/dev/null
  . "$ROOT/etc/os-release"
  if [ "${VERSION_CODENAME:-}" = bookworm ]; then ok "${PRETTY_NAME:-Debian bookworm}"
  else note "warning: ${PRETTY_NAME:-unknown OS}: tested on Raspberry Pi OS Bookworm (64-bit) only"; fi
else
  note "warning: no /etc/os-release; tested on Raspberry Pi OS Bookworm (64-bit) only"
fi
ARCH="$(uname -m)"
[ "$ARCH" = aarch64 ] || [ "$FAKE" = 1 ] || note "warning: $ARCH: the LiteRT wheels need 64-bit (aarch64) Raspberry Pi OS"
if [ ! -f "$SRC/pyproject.toml" ] || [ ! -d "$SRC/edge_wbc" ]; then
  echo "install-pi.sh: $SRC is not an edge-wbc checkout" >&2; exit 1
fi
ok "edge-wbc checkout at $SRC"

# --------------------------------------------------------------------------------------------
step "System packages (apt)"
# python3-picamera2 (with libcamera's bindings) exists only as a Raspberry Pi OS package: the
# venv sees it through --system-site-packages. python3-lgpio drives GPIO buttons on a Pi 5.
PKGS=(python3 python3-venv python3-pip python3-picamera2 python3-lgpio sqlite3 ca-certificates)
if [ "$KIOSK" = 1 ]; then PKGS+=(chromium-browser); fi
if [ "$EDGETPU" = 1 ]; then PKGS+=(libedgetpu1-std); fi

if [ "$EDGETPU" = 1 ]; then
  # Coral's apt repository, signed by its key; written once.
  KEYRING=/usr/share/keyrings/coral-edgetpu-archive-keyring.gpg
  LIST=/etc/apt/sources.list.d/coral-edgetpu.list
  if [ -f "$ROOT$KEYRING" ]; then ok "Coral apt key present"
  else
    run sh -c "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | gpg --dearmor -o $ROOT$KEYRING"
  fi
  put_text "$LIST" 0644 < <(echo "deb [signed-by=$KEYRING] https://packages.cloud.google.com/apt coral-edgetpu-stable main") || true
fi

MISSING=()
for p in "${PKGS[@]}"; do
  if pkg_installed "$p"; then ok "$p installed"; else MISSING+=("$p"); fi
done
if [ "${#MISSING[@]}" -gt 0 ]; then
  run apt-get update
  run env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${MISSING[@]}"
  CHANGED=1
fi

# --------------------------------------------------------------------------------------------
step "Service user '$SERVICE_USER' and device groups"
for g in video gpio plugdev; do
  # gpio and plugdev exist on Raspberry Pi OS; created here so the unit's SupplementaryGroups
  # never fails on a plain Debian system.
  if has_group "$g"; then ok "group $g"; else run groupadd --system "$g"; fi
done
if has_user "$SERVICE_USER"; then ok "user $SERVICE_USER"
else
  run useradd --system --user-group --home-dir "/var/lib/$SERVICE_USER" --no-create-home \
      --shell /usr/sbin/nologin --comment "edge-wbc station" "$SERVICE_USER"
fi

# --------------------------------------------------------------------------------------------
step "Python environment $VENV (with system site packages, for picamera2)"
if [ -e "$ROOT$VENV/bin/python" ]; then ok "venv exists"
else run python3 -m venv --system-site-packages "$ROOT$VENV"; CHANGED=1; fi

STAMP_FILE="$PREFIX/.installed-source"
STAMP="$(source_stamp)"
if [ -f "$ROOT$STAMP_FILE" ] && [ "$(cat "$ROOT$STAMP_FILE")" = "$STAMP" ]; then
  ok "edge-wbc from this checkout already installed (${STAMP:0:12})"
else
  # numpy<2: picamera2's compiled helpers (python3-simplejpeg, -pidng, -av) come from Raspberry
  # Pi OS built against its numpy 1.x and fail to import under a numpy 2 in the venv.
  run "$ROOT$VENV/bin/python" -m pip install --upgrade --no-warn-script-location \
      "${SRC}[pi]" "numpy<2"
  if [ "$DRY" = 0 ]; then mkdir -p "$ROOT$PREFIX" && echo "$STAMP" > "$ROOT$STAMP_FILE"; fi
  CHANGED=1
fi

# --------------------------------------------------------------------------------------------
step "Models, sample fields and this guide under $PREFIX"
mirror_dir "$SRC/models" "$PREFIX/models"
mirror_dir "$SRC/samples/fields" "$PREFIX/samples/fields"
if [ -f "$SRC/docs/pi.md" ]; then put_file "$SRC/docs/pi.md" "$PREFIX/docs/pi.md" 0644 || true; fi

# --------------------------------------------------------------------------------------------
step "Configuration /etc/edge-wbc (created once, never overwritten)"
CONF=/etc/edge-wbc/config.toml
if [ -f "$ROOT$CONF" ]; then ok "$CONF exists (kept as you left it)"
else
  # The example points at /opt/edge-wbc; follow --prefix.
  put_text "$CONF" 0644 < <(sed "s#/opt/edge-wbc#$PREFIX#g" "$SRC/edge_wbc/config.example.toml") || true
fi
CRED_DIR=/etc/edge-wbc/credentials
if [ -d "$ROOT$CRED_DIR" ]; then ok "$CRED_DIR exists"
else
  note "create $CRED_DIR (root only)"
  [ "$DRY" = 1 ] || install -d -m 0700 "$ROOT$CRED_DIR"
fi
for c in mqtt-password mqtt-tls-key token lis-fhir-token; do
  # Empty means "not set"; LoadCredential= needs the file to exist.
  if [ -f "$ROOT$CRED_DIR/$c" ]; then ok "credential $c present"
  else
    note "create empty credential $c"
    [ "$DRY" = 1 ] || install -m 0600 /dev/null "$ROOT$CRED_DIR/$c"
  fi
done

# --------------------------------------------------------------------------------------------
step "systemd units"
UNITS_CHANGED=0    # a unit file changed: systemd must re-read them
STATION_UNIT_CHANGED=0
KIOSK_CHANGED=0
# put_file/put_text set CHANGED (restart the station); the kiosk's files must not, so it is
# saved and restored around them.
if put_text /etc/systemd/system/edge-wbc.service 0644 \
     < <(sed "s#/opt/edge-wbc#$PREFIX#g" "$SRC/systemd/edge-wbc.service"); then
  UNITS_CHANGED=1
  STATION_UNIT_CHANGED=1
fi
if [ "$KIOSK" = 1 ]; then
  SAVED_CHANGED=$CHANGED
  if put_text /etc/systemd/system/edge-wbc-kiosk.service 0644 \
       < <(sed "s#/opt/edge-wbc#$PREFIX#g" "$SRC/systemd/edge-wbc-kiosk.service"); then
    UNITS_CHANGED=1
    KIOSK_CHANGED=1
  fi
  if put_file "$SRC/systemd/edge-wbc-kiosk" "$PREFIX/bin/edge-wbc-kiosk" 0755; then
    KIOSK_CHANGED=1
  fi
  KUID="$(id -u "$KIOSK_USER" 2>/dev/null || echo 1000)"
  kiosk_dropin() {
    echo "# Written by install-pi.sh: the desktop user logged in on the display."
    echo "[Service]"
    echo "User=$KIOSK_USER"
    echo "Environment=XDG_RUNTIME_DIR=/run/user/$KUID"
  }
  if put_text /etc/systemd/system/edge-wbc-kiosk.service.d/10-user.conf 0644 < <(kiosk_dropin)
  then
    UNITS_CHANGED=1
    KIOSK_CHANGED=1
  fi
  CHANGED=$SAVED_CHANGED
fi
if [ "$UNITS_CHANGED" = 1 ]; then run systemctl daemon-reload; fi

ENABLE=(edge-wbc.service)
[ "$KIOSK" = 1 ] && ENABLE+=(edge-wbc-kiosk.service)
for u in "${ENABLE[@]}"; do
  if systemctl_q is-enabled --quiet "$u" 2>/dev/null; then ok "$u enabled"
  elif [ "$FAKE" = 1 ] && [ "$DRY" = 0 ]; then
    # Offline enable inside the root: real symlinks a second run can see.
    printf '    + %s\n' "$(q systemctl --root="$ROOT" enable "$u")"
    q systemctl enable "$u" >> "$CMDLOG"; echo >> "$CMDLOG"
    systemctl --root="$ROOT" enable "$u" 2>/dev/null
  else
    run systemctl enable "$u"
  fi
done

# --------------------------------------------------------------------------------------------
step "Check and start"
if [ "$DRY" = 1 ] || [ "$FAKE" = 1 ]; then
  note "would run: sudo -u $SERVICE_USER $VENV/bin/edge-wbc doctor --config $CONF"
else
  # Read-only; as the service's user so permissions are judged as the station will see them.
  DOCTOR=("$VENV/bin/edge-wbc" doctor --config "$CONF")
  if systemctl is-active --quiet edge-wbc.service; then
    # The running station holds the camera; opening it again would report it busy.
    note "camera not checked: the running station holds it"
    for c in system models interpreter accelerator disk broker; do DOCTOR+=(--only "$c"); done
  fi
  runuser -u "$SERVICE_USER" -- "${DOCTOR[@]}" \
    || note "doctor found problems (above): fix them, then: sudo systemctl restart edge-wbc"
fi
if [ "$START" = 0 ]; then
  note "--no-start: start it with: sudo systemctl start edge-wbc"
elif [ "$CHANGED" = 1 ] || [ "$STATION_UNIT_CHANGED" = 1 ]; then
  run systemctl restart edge-wbc.service
elif [ "$FAKE" = 0 ] && [ "$DRY" = 0 ] && ! systemctl is-active --quiet edge-wbc.service; then
  run systemctl start edge-wbc.service
else
  ok "nothing changed: edge-wbc left running as it was"
fi
# A running kiosk picks up its new files; one not running (no display yet) starts at login.
if [ "$KIOSK_CHANGED" = 1 ] && [ "$START" = 1 ]; then run systemctl try-restart edge-wbc-kiosk.service; fi

echo
echo "Done. Station page: http://127.0.0.1:8080/ on this Pi.  Logs: journalctl -u edge-wbc -f"
echo "Config: $CONF (check it with: $VENV/bin/edge-wbc check-config)"
