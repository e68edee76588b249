#!/usr/bin/env bash
# Install or upgrade the edge-wbc station on Raspberry Pi OS Bookworm (64-bit).
#
#   git clone <repo> edge-wbc && cd edge-wbc
#   sudo scripts/install-pi.sh [--edgetpu] [--kiosk]     # install, or upgrade after `git pull`
#   scripts/install-pi.sh --dry-run                       # show every step, change nothing
#
# Idempotent: every step first looks at what is there and acts only on a difference, so a
# second run changes nothing (and does not restart the station). Your /etc/edge-wbc/config.toml
# and credentials are created once and never overwritten. Every file is written whole or not at
# all; a failed write stops the run naming the file, and the next run finishes what it left.
#
# Options:
#   --dry-run          print each step and the commands it would run; change nothing
#   --edgetpu          also install the Coral Edge TPU runtime (libedgetpu1-std, Coral's apt repo)
#   --kiosk            also install Chromium and the kiosk unit (station page full-screen)
#   --kiosk-user USER  desktop user logged in on the display (default: $SUDO_USER, else the
#                      user running a dry run, else pi); must exist, and not be root
#   --prefix DIR       install directory (default /opt/edge-wbc); letters, digits, . _ - / only
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
# The desktop user: who ran sudo, or who runs a --dry-run from the desktop; pi as a last guess
# (Bookworm has no default pi user any more, which is why a missing user stops the install).
KIOSK_USER="${SUDO_USER:-}"
if [ -z "$KIOSK_USER" ] && [ "$(id -u)" != 0 ]; then KIOSK_USER="$(id -un)"; fi
KIOSK_USER="${KIOSK_USER:-pi}"
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

die() { echo "install-pi.sh: $*" >&2; exit 1; }

case "$PREFIX" in /*) ;; *) echo "install-pi.sh: --prefix must be absolute" >&2; exit 2 ;; esac
# The prefix is written into unit lines (ExecStart=, WorkingDirectory=), where systemd splits
# on spaces and expands % and \, and into a sed replacement, where & and # are special. Quoting
# all of that safely is fragile; a plain path is always possible, so anything else is refused.
case "$PREFIX" in
  *[!A-Za-z0-9._/-]*)
    echo "install-pi.sh: --prefix '$PREFIX': use only letters, digits and . _ - / (a space," \
         "& # % \\ or quote would break the systemd units the installer writes)" >&2
    exit 2 ;;
esac
while [ "${PREFIX%/}" != "$PREFIX" ] && [ "$PREFIX" != / ]; do PREFIX="${PREFIX%/}"; done
if [ "$PREFIX" = / ]; then echo "install-pi.sh: --prefix / is not a directory of its own" >&2; exit 2; fi
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

STEP=0
CMDLOG="$ROOT/.install-commands"
DPKG_ADMIN="$ROOT/var/lib/dpkg"
VENV="$PREFIX/venv"
# Generated content (config, units) is staged here, outside the installed tree, even in a dry run.
WORK="$(mktemp -d)" || die "cannot create a temporary directory (is /tmp full?)"
CUR_TMP=""         # a temporary next to a file being replaced; removed if the run stops
trap 'rm -rf "$WORK"; [ -z "$CUR_TMP" ] || rm -f "$CUR_TMP"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# What this run must do at the end, each also recorded in a file under the prefix *before* the
# change that needs it and removed only after it was done: a run interrupted between the two
# (Ctrl-C, a failed write, a power cut) leaves the file, and the next run finishes the job
# instead of saying "nothing changed" to a station still running the old code.
CHANGED=0          # the station depends on what changed: restart it     ($PREFIX/.restart-pending)
UNITS_CHANGED=0    # a unit file changed: systemctl daemon-reload          ($PREFIX/.reload-pending)
KIOSK_CHANGED=0    # a kiosk file changed: restart the kiosk if it runs    ($PREFIX/.kiosk-restart-pending)
RESTART_MARK="$PREFIX/.restart-pending"
RELOAD_MARK="$PREFIX/.reload-pending"
KIOSK_MARK="$PREFIX/.kiosk-restart-pending"

step() { STEP=$((STEP + 1)); printf '\n[%d] %s\n' "$STEP" "$*"; }
ok() { printf '    ok: %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
q() { printf '%q ' "$@"; }

# A command that changes the system. Dry run: print it. Fake root: print and record it.
run() {
  printf '    + %s\n' "$(q "$@")"
  if [ "$DRY" = 1 ]; then return 0; fi
  if [ "$FAKE" = 1 ]; then
    { q "$@"; echo; } >> "$CMDLOG" || die "cannot record a command in $CMDLOG"
    emulate "$@" || die "failed: $(q "$@")"
    return 0
  fi
  "$@" || die "failed (exit $?): $(q "$@")"
}

# What a recorded command would have left behind, so the next run's checks see it. Each
# emulation fails where the real command would, so a fake root cannot hide a real failure.
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
    "useradd "*|useradd*) emulate_useradd "$@" ;;
    "groupadd "*|groupadd*)
      mkdir -p "$ROOT/etc"
      echo "${*: -1}:x:$(next_id "$ROOT/etc/group"):" >> "$ROOT/etc/group" ;;
    "python3 -m")
      mkdir -p "$ROOT$VENV/bin" && : > "$ROOT$VENV/bin/python" ;;
    "sh -c")
      case "$3" in *gpg*--dearmor*)
        # The keyring path is the script's last argument.
        mkdir -p "$(dirname "${*: -1}")" && echo "emulated keyring" > "${*: -1}" ;;
      esac ;;
  esac
}

next_id() {  # a free system id in a passwd/group file of the fake root
  local id=999
  while [ -f "$1" ] && cut -d: -f3 "$1" | grep -qx "$id"; do id=$((id - 1)); done
  echo "$id"
}

# useradd as shadow-utils behaves: --user-group refuses an existing group of the same name
# ("use -g"); -g needs the group to exist.
emulate_useradd() {
  local name="${*: -1}" group="" usergroup=0 gid
  while [ $# -gt 1 ]; do
    case "$1" in
      --user-group|-U) usergroup=1 ;;
      -g|--gid) group="$2"; shift ;;
    esac
    shift
  done
  mkdir -p "$ROOT/etc"
  if [ "$usergroup" = 1 ]; then
    if has_group "$name"; then
      echo "useradd: group $name exists - if you want to add this user to that group, use -g." >&2
      return 9
    fi
    gid="$(next_id "$ROOT/etc/group")"
    echo "$name:x:$gid:" >> "$ROOT/etc/group"
  else
    has_group "$group" || { echo "useradd: group '$group' does not exist" >&2; return 6; }
    gid="$(grep "^$group:" "$ROOT/etc/group" | head -n1 | cut -d: -f3)"
  fi
  echo "$name:x:$(next_id "$ROOT/etc/passwd"):$gid::/var/lib/$name:/usr/sbin/nologin" >> "$ROOT/etc/passwd"
}

pkg_installed() {
  [ -f "$DPKG_ADMIN/status" ] || return 1
  dpkg-query --admindir="$DPKG_ADMIN" -W -f='${Status}' "$1" 2>/dev/null \
    | grep -q 'install ok installed'
}

passwd_entry() {  # the user's passwd line, from the fake root's file or the system's; "" if none
  if [ "$FAKE" = 1 ]; then { grep "^$1:" "$ROOT/etc/passwd" 2>/dev/null || true; } | head -n1
  else getent passwd "$1" || true; fi
}

has_user() { [ -n "$(passwd_entry "$1")" ]; }

has_group() {
  if [ "$FAKE" = 1 ]; then grep -q "^$1:" "$ROOT/etc/group" 2>/dev/null; else getent group "$1" >/dev/null; fi
}

systemctl_q() {  # read-only systemctl queries work offline against a root with --root
  if [ "$FAKE" = 1 ]; then systemctl --root="$ROOT" "$@"; else systemctl "$@"; fi
}

# Write CONTENT to the installer's own state file REL (a stamp, a marker, the list of installed
# files), atomically: a temporary next to it, then a rename.
save_state() {
  local rel="$1" dst="$ROOT$1" err
  [ "$DRY" = 0 ] || return 0
  err="$(mkdir -p -- "$(dirname "$dst")" 2>&1)" || die "cannot write $rel: $err"
  CUR_TMP="$(mktemp "$(dirname "$dst")/.$(basename "$dst").XXXXXX" 2>&1)" \
    || { CUR_TMP=""; die "cannot write $rel: cannot create a temporary file next to it"; }
  err="$({ printf '%s' "$2" > "$CUR_TMP" && chmod 0644 "$CUR_TMP" && sync -- "$CUR_TMP" \
           && mv -fT -- "$CUR_TMP" "$dst"; } 2>&1)" \
    || { rm -f "$CUR_TMP"; CUR_TMP=""; die "cannot write $rel${err:+: $err} (is the disk full?)"; }
  CUR_TMP=""
}

drop_state() {  # remove the installer's state file REL (a done marker)
  [ "$DRY" = 0 ] || return 0
  local err
  err="$(rm -f -- "$ROOT$1" 2>&1)" || die "cannot remove $1: $err"
}

# Record what the change about to be made will need (restart, reload, kiosk) before making it.
pending() {
  local what mark
  for what in "$@"; do
    case "$what" in
      restart) CHANGED=1; mark="$RESTART_MARK" ;;
      reload) UNITS_CHANGED=1; mark="$RELOAD_MARK" ;;
      kiosk) KIOSK_CHANGED=1; mark="$KIOSK_MARK" ;;
      *) die "internal: pending $what" ;;
    esac
    [ "$DRY" = 1 ] || [ -e "$ROOT$mark" ] \
      || save_state "$mark" "install-pi.sh $(date -u +%FT%TZ): $what still to do"$'\n'
  done
}

# Install file SRC as DST with MODE if absent or different, atomically (a temporary in DST's
# directory, synced, then renamed over it): a failed write (full disk, a path that is not a
# directory) stops the installer naming the file and leaves the old file, never a truncated one.
# Never call it under `if` or `||`: bash turns off `set -e` there. The rest of the arguments say
# what the change needs (see pending).
put_file() {
  local src="$1" rel="$2" dst="$ROOT$2" mode="$3" dir err
  shift 3
  [ ! -d "$dst" ] || die "cannot write $rel: it is a directory"
  if [ -f "$dst" ] && cmp -s "$src" "$dst"; then
    ok "$rel up to date"
    return 0
  fi
  printf '    %s %s\n' "$([ -e "$dst" ] && echo update || echo install)" "$rel"
  pending "$@"
  [ "$DRY" = 0 ] || return 0
  dir="$(dirname "$dst")"
  err="$(mkdir -p -- "$dir" 2>&1)" || die "cannot write $rel: $err"
  CUR_TMP="$(mktemp "$dir/.$(basename "$dst").XXXXXX" 2>&1)" \
    || { CUR_TMP=""; die "cannot write $rel: cannot create a temporary file in $(dirname "$rel") (is the disk full?)"; }
  err="$({ cp -- "$src" "$CUR_TMP" && chmod "$mode" "$CUR_TMP" && sync -- "$CUR_TMP" \
           && mv -fT -- "$CUR_TMP" "$dst"; } 2>&1)" \
    || { rm -f "$CUR_TMP"; CUR_TMP=""
         die "cannot write $rel${err:+: $err} (is the disk full?); the file there, if any, is unchanged"; }
  CUR_TMP=""
}

# Install the output of a command (the rest of the arguments after DST MODE NEEDS) as DST.
# NEEDS: a space-separated list for pending ("" for none).
put_output() {
  local rel="$1" mode="$2" needs="$3" staged
  shift 3
  staged="$WORK/$(basename "$rel")"
  "$@" > "$staged" || die "cannot prepare $rel (is /tmp full?)"
  # shellcheck disable=SC2086  # NEEDS is a list of words
  put_file "$staged" "$rel" "$mode" $needs
  rm -f "$staged"
}

# Which files of a checkout folder an installed package carries: the package-data rule for
# package $1 in pyproject.toml, the one list the wheel is built from too (scripts/check-wheel.sh),
# so the Pi gets exactly what a wheel would: no float weights (*.keras), figures or evaluation
# JSON. Prints "+pattern" (include) and "-pattern" (exclude) lines.
shipped_patterns() {
  python3 - "$SRC/pyproject.toml" "$1" <<'PY'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    st = tomllib.load(f).get("tool", {}).get("setuptools", {})
inc = st.get("package-data", {}).get(sys.argv[2], [])
if not inc:
    sys.exit(f"pyproject.toml: no [tool.setuptools.package-data] entry for {sys.argv[2]}")
for p in inc:
    print("+" + p)
for p in st.get("exclude-package-data", {}).get(sys.argv[2], []):
    print("-" + p)
PY
}

# The list of files the installer put under the prefix (relative paths, one a line). Only these
# are ever removed when a release stops shipping them; anything else there (a lab's own
# *_edgetpu.tflite, notes) is someone else's and stays.
INSTALLED_LIST="$PREFIX/.installed-files"
INSTALLED_NOW=()

# Make $PREFIX/REL hold the shipped files of SRC (one level deep, as models/ and the sample
# fields are); remove what the installer put there before and no longer ships.
mirror_dir() {
  local src="$1" rel="$2" pkg="$3" dst="$ROOT$PREFIX/$2" f name pats pat inc same=0 kept=()
  local -A ships=()
  [ -d "$src" ] || { note "no $src in this checkout: skipped"; return 0; }
  pats="$(shipped_patterns "$pkg")" \
    || die "cannot read which files $pkg ships from $SRC/pyproject.toml (needs Python 3.11 or newer, as on Bookworm)"
  for f in "$src"/*; do
    [ -f "$f" ] || continue
    name="$(basename "$f")"
    inc=0
    while IFS= read -r pat; do
      # shellcheck disable=SC2053  # the pattern is a glob on purpose
      case "$pat" in +*) [[ "$name" == ${pat#+} ]] && inc=1 ;; -*) [[ "$name" == ${pat#-} ]] && inc=0 ;; esac
    done <<< "$pats"
    [ "$inc" = 1 ] || continue
    ships[$name]=1
    INSTALLED_NOW+=("$rel/$name")
    if [ -f "$dst/$name" ] && cmp -s "$f" "$dst/$name"; then
      same=$((same + 1))
    else
      put_file "$f" "$PREFIX/$rel/$name" 0644 restart
    fi
  done
  [ "$same" = 0 ] || ok "$PREFIX/$rel: $same file(s) up to date"
  [ -d "$dst" ] || return 0

  # What the installer put here before: its list; without one (installed by an older
  # installer, which copied the whole checkout folder) the files named as in the checkout.
  local before=()
  if [ -f "$ROOT$INSTALLED_LIST" ]; then
    while IFS= read -r f; do
      case "$f" in "$rel/"*) before+=("${f#"$rel/"}") ;; esac
    done < "$ROOT$INSTALLED_LIST"
  else
    for f in "$src"/*; do [ -f "$f" ] && before+=("$(basename "$f")"); done
  fi
  for name in "${before[@]}"; do
    if [ -n "${ships[$name]:-}" ] || [ ! -f "$dst/$name" ]; then continue; fi
    note "remove $PREFIX/$rel/$name (installed by edge-wbc, no longer shipped)"
    pending restart
    [ "$DRY" = 1 ] || rm -f -- "$dst/$name" || die "cannot remove $PREFIX/$rel/$name"
  done
  for f in "$dst"/*; do
    name="$(basename "$f")"
    if [ ! -f "$f" ] || [ -n "${ships[$name]:-}" ]; then continue; fi
    [[ " ${before[*]} " == *" $name "* ]] && [ "$DRY" = 1 ] && continue  # shown as removed above
    kept+=("$name")
  done
  [ "${#kept[@]}" = 0 ] || ok "$PREFIX/$rel: kept ${kept[*]} (not installed by edge-wbc: left as they are)"
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
if [ "$KIOSK" = 1 ]; then
  # The kiosk runs as this user in its desktop session: a name that is not a user here would
  # give a unit that never starts (and /run/user/1000 is only the first desktop user's).
  KENTRY="$(passwd_entry "$KIOSK_USER")"
  if [ -z "$KENTRY" ]; then
    echo "install-pi.sh: --kiosk: there is no user '$KIOSK_USER' on this system; name the user" \
         "logged in on the display with --kiosk-user USER (nothing was changed)" >&2
    exit 1
  fi
  KUID="$(printf '%s\n' "$KENTRY" | cut -d: -f3)"
  if [ "$KUID" = 0 ]; then
    # Chromium refuses to run as root, and a root browser on the bench is not wanted anyway.
    echo "install-pi.sh: --kiosk: the kiosk runs as the desktop user, not as '$KIOSK_USER' (uid 0);" \
         "name that user with --kiosk-user USER (nothing was changed)" >&2
    exit 1
  fi
  ok "kiosk user $KIOSK_USER (uid $KUID)"
fi
# Left by a run that stopped before finishing (see pending).
for m in "$RESTART_MARK:restart:a restart of the station" "$RELOAD_MARK:reload:a systemctl daemon-reload" \
         "$KIOSK_MARK:kiosk:a restart of the kiosk"; do
  if [ -e "$ROOT${m%%:*}" ]; then
    rest="${m#*:}"
    note "an earlier run stopped before ${rest#*:}: this run does it"
    pending "${rest%%:*}"
  fi
done

# --------------------------------------------------------------------------------------------
step "System packages (apt)"
# python3-picamera2 (with libcamera's bindings) exists only as a Raspberry Pi OS package: the
# venv sees it through --system-site-packages. python3-lgpio drives GPIO buttons on a Pi 5.
PKGS=(python3 python3-venv python3-pip python3-picamera2 python3-lgpio sqlite3 ca-certificates)
if [ "$KIOSK" = 1 ]; then PKGS+=(chromium-browser); fi
if [ "$EDGETPU" = 1 ]; then PKGS+=(libedgetpu1-std); fi

if [ "$EDGETPU" = 1 ]; then
  # Coral's apt repository, signed by its key; written once. The key goes to a temporary and is
  # renamed only when complete (an empty keyring would be "present" forever), and its path is
  # an argument of the script, not part of its text, so no path can split or inject.
  KEYRING=/usr/share/keyrings/coral-edgetpu-archive-keyring.gpg
  LIST=/etc/apt/sources.list.d/coral-edgetpu.list
  if [ -s "$ROOT$KEYRING" ]; then ok "Coral apt key present"
  else
    pending restart
    # shellcheck disable=SC2016  # $1 and $2 are the inner script's arguments
    run sh -c 'set -e; curl -fsSL "$1" -o "$2.asc"; gpg --batch --yes --dearmor -o "$2.tmp" "$2.asc"; rm -f "$2.asc"; mv -f "$2.tmp" "$2"' \
        sh https://packages.cloud.google.com/apt/doc/apt-key.gpg "$ROOT$KEYRING"
  fi
  put_output "$LIST" 0644 restart \
    echo "deb [signed-by=$KEYRING] https://packages.cloud.google.com/apt coral-edgetpu-stable main"
fi

MISSING=()
for p in "${PKGS[@]}"; do
  if pkg_installed "$p"; then ok "$p installed"; else MISSING+=("$p"); fi
done
if [ "${#MISSING[@]}" -gt 0 ]; then
  pending restart
  run apt-get update
  run env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${MISSING[@]}"
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
  # useradd --user-group refuses a group that already exists (left by an earlier removal of
  # the user, or made by hand): then the user joins that group.
  if has_group "$SERVICE_USER"; then GROUP_OPT=(-g "$SERVICE_USER"); else GROUP_OPT=(--user-group); fi
  run useradd --system "${GROUP_OPT[@]}" --home-dir "/var/lib/$SERVICE_USER" --no-create-home \
      --shell /usr/sbin/nologin --comment "edge-wbc station" "$SERVICE_USER"
fi

# --------------------------------------------------------------------------------------------
step "Python environment $VENV (with system site packages, for picamera2)"
if [ -e "$ROOT$VENV/bin/python" ]; then ok "venv exists"
else pending restart; run python3 -m venv --system-site-packages "$ROOT$VENV"; fi

# Inside the venv, so a venv deleted or recreated by hand takes the stamp with it and the
# package is installed into the new one.
STAMP_FILE="$VENV/.edge-wbc-source"
STAMP="$(source_stamp)"
if [ -f "$ROOT$STAMP_FILE" ] && [ "$(cat "$ROOT$STAMP_FILE")" = "$STAMP" ]; then
  ok "edge-wbc from this checkout already installed (${STAMP:0:12})"
else
  pending restart
  # numpy<2: picamera2's compiled helpers (python3-simplejpeg, -pidng, -av) come from Raspberry
  # Pi OS built against its numpy 1.x and fail to import under a numpy 2 in the venv.
  run "$ROOT$VENV/bin/python" -m pip install --upgrade --no-warn-script-location \
      "${SRC}[pi]" "numpy<2"
  save_state "$STAMP_FILE" "$STAMP"$'\n'
fi
# Where installers before session 13 kept the stamp (it outlived the venv).
if [ -e "$ROOT$PREFIX/.installed-source" ]; then drop_state "$PREFIX/.installed-source"; fi

# --------------------------------------------------------------------------------------------
step "Models, sample fields and this guide under $PREFIX"
mirror_dir "$SRC/models" models edge_wbc.models
mirror_dir "$SRC/samples/fields" samples/fields edge_wbc.samples
if [ -f "$SRC/docs/pi.md" ]; then
  put_file "$SRC/docs/pi.md" "$PREFIX/docs/pi.md" 0644
  INSTALLED_NOW+=(docs/pi.md)
fi
# Written after the removals above, so a run stopped before them still knows what to remove.
LIST_TEXT="# Files install-pi.sh put under $PREFIX; only these are removed when no longer shipped."$'\n'
LIST_TEXT+="$(printf '%s\n' "${INSTALLED_NOW[@]}")"$'\n'
if [ ! -f "$ROOT$INSTALLED_LIST" ] || [ "$(cat "$ROOT$INSTALLED_LIST")"$'\n' != "$LIST_TEXT" ]; then
  save_state "$INSTALLED_LIST" "$LIST_TEXT"
fi

# --------------------------------------------------------------------------------------------
step "Configuration /etc/edge-wbc (created once, never overwritten)"
CONF=/etc/edge-wbc/config.toml
if [ -s "$ROOT$CONF" ]; then ok "$CONF exists (kept as you left it)"
else
  # An empty file is what an older installer left on a full disk: no one's settings are in it.
  if [ -e "$ROOT$CONF" ]; then note "warning: $CONF is empty (an interrupted install?): writing the example"; fi
  # The example points at /opt/edge-wbc; follow --prefix.
  put_output "$CONF" 0644 restart sed "s#/opt/edge-wbc#$PREFIX#g" "$SRC/edge_wbc/config.example.toml"
fi
CRED_DIR=/etc/edge-wbc/credentials
if [ -d "$ROOT$CRED_DIR" ]; then ok "$CRED_DIR exists"
else
  note "create $CRED_DIR (root only)"
  [ "$DRY" = 1 ] || install -d -m 0700 "$ROOT$CRED_DIR" || die "cannot create $CRED_DIR"
fi
for c in mqtt-password mqtt-tls-key token lis-fhir-token; do
  # Empty means "not set"; LoadCredential= needs the file to exist.
  if [ -d "$ROOT$CRED_DIR" ] && { [ ! -r "$ROOT$CRED_DIR" ] || [ ! -x "$ROOT$CRED_DIR" ]; }; then
    # Root only (0700): a dry run by another user cannot look inside.
    note "credential $c: cannot check (root only; run with sudo to see)"
  elif [ -f "$ROOT$CRED_DIR/$c" ]; then ok "credential $c present"
  else
    note "create empty credential $c"
    [ "$DRY" = 1 ] || install -m 0600 /dev/null "$ROOT$CRED_DIR/$c" || die "cannot create $CRED_DIR/$c"
  fi
done

# --------------------------------------------------------------------------------------------
step "systemd units"
put_output /etc/systemd/system/edge-wbc.service 0644 "reload restart" \
  sed "s#/opt/edge-wbc#$PREFIX#g" "$SRC/systemd/edge-wbc.service"
if [ "$KIOSK" = 1 ]; then
  # The kiosk's files restart the kiosk, not the station.
  put_output /etc/systemd/system/edge-wbc-kiosk.service 0644 "reload kiosk" \
    sed "s#/opt/edge-wbc#$PREFIX#g" "$SRC/systemd/edge-wbc-kiosk.service"
  put_file "$SRC/systemd/edge-wbc-kiosk" "$PREFIX/bin/edge-wbc-kiosk" 0755 kiosk
  kiosk_dropin() {
    echo "# Written by install-pi.sh: the desktop user logged in on the display."
    echo "[Service]"
    echo "User=$KIOSK_USER"
    echo "Environment=XDG_RUNTIME_DIR=/run/user/$KUID"
  }
  put_output /etc/systemd/system/edge-wbc-kiosk.service.d/10-user.conf 0644 "reload kiosk" kiosk_dropin
fi
if [ "$UNITS_CHANGED" = 1 ]; then run systemctl daemon-reload; drop_state "$RELOAD_MARK"; fi

ENABLE=(edge-wbc.service)
[ "$KIOSK" = 1 ] && ENABLE+=(edge-wbc-kiosk.service)
for u in "${ENABLE[@]}"; do
  if systemctl_q is-enabled --quiet "$u" 2>/dev/null; then ok "$u enabled"
  elif [ "$FAKE" = 1 ] && [ "$DRY" = 0 ]; then
    # Offline enable inside the root: real symlinks a second run can see.
    printf '    + %s\n' "$(q systemctl --root="$ROOT" enable "$u")"
    { q systemctl enable "$u"; echo; } >> "$CMDLOG" || die "cannot record a command in $CMDLOG"
    systemctl --root="$ROOT" enable "$u" 2>/dev/null || die "failed: systemctl --root=$ROOT enable $u"
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
  # The markers stay: the next run without --no-start restarts what this one changed.
  [ "$CHANGED" = 0 ] || note "the station runs the old version until: sudo systemctl restart edge-wbc"
elif [ "$CHANGED" = 1 ]; then
  run systemctl restart edge-wbc.service
  drop_state "$RESTART_MARK"
elif [ "$FAKE" = 0 ] && [ "$DRY" = 0 ] && ! systemctl is-active --quiet edge-wbc.service; then
  run systemctl start edge-wbc.service
else
  ok "nothing changed: edge-wbc left running as it was"
fi
# A running kiosk picks up its new files; one not running (no display yet) starts at login.
if [ "$KIOSK_CHANGED" = 1 ] && [ "$START" = 1 ]; then
  run systemctl try-restart edge-wbc-kiosk.service
  drop_state "$KIOSK_MARK"
fi

echo
echo "Done. Station page: http://127.0.0.1:8080/ on this Pi.  Logs: journalctl -u edge-wbc -f"
echo "Config: $CONF (check it with: $VENV/bin/edge-wbc check-config)"
