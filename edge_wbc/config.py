"""One validated configuration schema for the device: TOML file, environment, secrets.

Where values come from, later wins:

1. the defaults below (they run the demo station on the bundled sample fields);
2. the TOML file (``/etc/edge-wbc/config.toml`` on a Pi, ``--config FILE`` elsewhere);
3. environment variables ``EDGE_WBC_<SECTION>_<KEY>`` (e.g. ``EDGE_WBC_MQTT_HOST``);
4. command-line flags, applied by the command through :meth:`Config.replace`.

Secrets (the station token and the MQTT password) are never read from the file or the command
line, where other users could read them: only from the environment or from systemd credentials
(``LoadCredential=`` puts them in ``$CREDENTIALS_DIRECTORY``).

Every problem is collected and reported at once with its key and, for the file, its line, so a
technician fixing a config file on the Pi sees the whole list in one ``edge-wbc check-config``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import re
import socket
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_wbc import taxonomy
from edge_wbc.accelerators import ACCELERATORS, CPU, DELEGATES
from edge_wbc.inputs import MAX_TARGET, hidden_char

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

ENV_PREFIX = "EDGE_WBC_"
CONFIG_ENV = "EDGE_WBC_CONFIG"
DEFAULT_CONFIG_PATH = Path("/etc/edge-wbc/config.toml")
#: Names of systemd credentials (``LoadCredential=NAME:...``) the config reads.
CRED_TOKEN = "token"
CRED_MQTT_PASSWORD = "mqtt-password"
CRED_MQTT_TLS_KEY = "mqtt-tls-key"
CRED_LIS_FHIR_TOKEN = "lis-fhir-token"
#: Where install-pi.sh keeps them (the units' LoadCredential= read them from here): read
#: directly when not under systemd, so `sudo edge-wbc check-config` and doctor judge what the
#: service will (they said "set a token" for a station whose token was set).
INSTALLED_CREDENTIALS = Path("/etc/edge-wbc/credentials")
#: A station reachable from other machines needs a token at least this long.
MIN_TOKEN_CHARS = 12

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LIS_DELIVERIES = ("off", "folder", "mllp", "fhir")
LIS_FORMATS = ("hl7", "fhir")
HL7_PROCESSING_IDS = ("P", "T", "D")


#: The camera sources, as messages list them.
CAMERA_SOURCES = ("'picamera2' (or 'picamera2:N'), 'opencv:0' (or 'opencv:/dev/video0'), "
                  "'folder:DIR' or 'samples'")


def split_camera_source(spec: str) -> tuple[str, str] | None:
    """The one syntax of ``[camera] source``: 'folder:DIR' -> ('folder', 'DIR'), 'opencv:0' or
    'opencv:/dev/video0' -> ('opencv', ...), 'picamera2[:N]' -> ('picamera2', N or '0'),
    'samples' -> ('samples', ''); None for anything else. edge_wbc.camera opens what it names."""
    if spec == "samples":
        return "samples", ""
    kind, _, arg = spec.partition(":")
    if kind in ("folder", "opencv") and arg:
        return kind, arg
    if kind == "picamera2" and (not arg or (arg.isascii() and arg.isdigit())):
        return kind, arg or "0"
    return None


def _f(default: Any, doc: str, **meta: Any) -> Any:
    """A schema field: its default and the description that check-config and the docs show."""
    # Secrets stay out of repr(): a logged config must not leak the broker password.
    return field(default=default, repr=not meta.get("secret"), metadata={"doc": doc, **meta})


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class CameraConfig:
    source: str = _f(
        "samples",
        "Where fields come from: 'picamera2' (Pi camera), 'opencv:N' or 'opencv:/dev/videoN' "
        "(USB/UVC microscope camera), 'folder:DIR' (replays the images in DIR) or 'samples' (the "
        "sample fields inside the package; the demo).",
        check="source",
    )
    width: int = _f(
        640, "Width in pixels of the analysis frame the camera delivers.", min=64, max=8192
    )
    height: int = _f(480, "Height in pixels of the analysis frame.", min=64, max=8192)
    preview_fps: float = _f(
        5.0, "Frames per second of the live preview on the page (0 turns the preview off).",
        min=0.0, max=60.0,
    )


@dataclass(frozen=True)
class ModelsConfig:
    dir: str | None = _f(
        None, "Folder holding manifest.json and the .tflite files it lists (sha256-checked). "
        "Unset: $EDGE_WBC_MODELS, then /opt/edge-wbc/models (what install-pi.sh writes), then "
        "the models inside the installed package.", path=True,
    )
    threads: int = _f(2, "CPU threads for the interpreter.", min=1, max=64)
    accelerator: str = _f(
        CPU, "'cpu', or 'edgetpu' for a Coral Edge TPU (falls back to CPU when absent, unless "
        "require_accelerator is set).", choices=ACCELERATORS,
    )
    edgetpu_device: str = _f(
        "", "Edge TPU to use: '' (first found), 'usb', 'pci', 'usb:0', ':0'.", check="edgetpu"
    )
    require_accelerator: bool = _f(
        False,
        "Refuse to start when the accelerator cannot be opened instead of falling back to CPU.",
    )
    adaptation: str | None = _f(
        None, "This lab's adaptation folder (written by 'edge-wbc adapt fit'): a classifier head "
        "fitted on the lab's reviewed cells, with its own threshold. Unset: the shipped head. "
        "It must have been fitted on this classifier (sha256-checked at start).", path=True,
    )


@dataclass(frozen=True)
class PostprocessConfig:
    """The library's defaults too: :class:`edge_wbc.pipeline.postprocess.PostprocessParams` is
    this class with the derived sizes, so the station and ``FieldAnalyzer(models)`` agree."""

    # BCCD's 640x480 fields (the reference) have leukocytes of 110-280 px, median ~185 px (masks).
    cell_diameter_px: float = _f(
        170.0, "Expected leukocyte diameter in analysis-frame pixels (set it for your objective "
        "and camera); every size below scales with it.", min=4.0, max=2000.0,
    )
    open_frac: float = _f(
        0.05, "Opening kernel diameter as a fraction of cell_diameter_px (removes specks).",
        min=0.0, max=1.0,
    )
    close_frac: float = _f(
        0.05, "Closing kernel diameter as a fraction of cell_diameter_px (fills small holes).",
        min=0.0, max=1.0,
    )
    min_area_ratio: float = _f(
        0.25, "Regions smaller than this times the median region area are dropped.",
        min=0.0, max=1.0,
    )
    max_area_ratio: float = _f(
        4.0, "Regions larger than this times the median region area are dropped.",
        min=1.0, max=100.0,
    )
    watershed_h_frac: float = _f(
        0.06, "A watershed seed must rise this fraction of cell_diameter_px above the saddle "
        "joining it to another seed; shallower maxima are one cell's uneven outline.",
        min=0.0, max=1.0,
    )
    min_cell_area_frac: float = _f(
        0.1, "Regions smaller than this fraction of the expected cell area "
        "(pi/4 * cell_diameter_px^2) are noise, whatever the median says.", min=0.0, max=1.0,
    )
    # On grey fields the segmenters' vote on real leukocytes weakens, so a strict filter loses
    # them; 0.8 since the classifier learnt red cells and platelets as `other` and removes the
    # doubtful regions that then pass (val, mean over 13 casts: mosaic recall 0.938 -> 0.949,
    # monochrome 0.737 -> 0.800, BCCD precision 0.976 -> 0.977).
    min_region_score: float = _f(
        0.8, "A region whose ensemble probability stays below this in its most confident "
        "10 % is a doubtful vote (a tinted red cell), not a leukocyte; 0 disables the check.",
        min=0.0, max=1.0,
    )
    watershed_min_distance_frac: float = _f(
        0.35, "Minimum distance between watershed seeds as a fraction of cell_diameter_px "
        "(smaller splits touching cells more eagerly).", min=0.01, max=2.0,
    )
    border_margin_px: int = _f(
        0, "Cells whose box comes closer than this to the frame edge are not counted (0 counts "
        "cut cells too).", min=0, max=1000,
    )


@dataclass(frozen=True)
class SessionConfig:
    target: int = _f(
        100, "Leukocytes to count per slide (100 or 200 in most labs).", min=1, max=MAX_TARGET
    )
    data_dir: str = _f(
        "/var/lib/edge-wbc", "Where the SQLite database, cell crops and reports live. When "
        "this is not set: the unit's StateDirectory under systemd, /var/lib/edge-wbc when "
        "writable, else ~/.local/share/edge-wbc.", path=True,
    )
    duplicate_overlap: float = _f(
        0.5, "A field overlapping the previous one by more than this fraction is flagged as a "
        "duplicate and its already-counted cells are not counted again.", min=0.0, max=1.0,
    )
    backups_keep: int = _f(
        7, "Database backups kept in <data_dir>/backups (one is made at each finalised slide, "
        "the oldest dropped beyond this number); 0 makes none.", min=0, max=1000,
    )


@dataclass(frozen=True)
class StationConfig:
    host: str = _f(
        "127.0.0.1", "Address the station's web page and API listen on. Anything but loopback "
        "requires a token.",
    )
    port: int = _f(8080, "TCP port of the web page and API.", min=1, max=65535)
    token: str | None = _f(
        None, "Bearer token for the API when listening beyond loopback. Secret: only from "
        f"EDGE_WBC_TOKEN or the systemd credential '{CRED_TOKEN}', never from this file.",
        secret=True,
    )
    queue_max: int = _f(
        4, "Captures waiting for analysis before further captures are refused (visibly).",
        min=1, max=100,
    )
    gpio_pin: int | None = _f(
        None, "BCM pin of a capture button or foot pedal (needs the 'pi' extra); unset: none.",
        min=0, max=53,
    )
    stuck_after_s: float = _f(
        30.0, "Seconds one field's analysis may take before the station counts itself hung, "
        "stops its systemd watchdog pings and exits so systemd restarts it.", min=1.0, max=3600.0,
    )


@dataclass(frozen=True)
class MqttConfig:
    host: str | None = _f(None, "Broker host name; unset runs the station without MQTT.")
    port: int = _f(1883, "Broker port (8883 is usual with TLS).", min=1, max=65535)
    tls: bool = _f(False, "Use TLS with the system's CA certificates (implied by tls_ca).")
    tls_ca: str | None = _f(
        None, "CA certificate (PEM) that signed the broker's certificate.", path=True
    )
    tls_cert: str | None = _f(None, "Client certificate (PEM) for mutual TLS.", path=True)
    tls_key: str | None = _f(
        None, "Client key (PEM) for mutual TLS; under systemd the credential "
        f"'{CRED_MQTT_TLS_KEY}' is used when this is not set.", path=True,
    )
    username: str | None = _f(None, "Broker user name.")
    password: str | None = _f(
        None, "Broker password. Secret: only from EDGE_WBC_MQTT_PASSWORD or the systemd "
        f"credential '{CRED_MQTT_PASSWORD}', never from this file or the command line.",
        secret=True,
    )
    client_id: str | None = _f(None, "MQTT client id; unset: 'edge-wbc-<station_id>'.")
    prefix: str = _f("edge-wbc", "First level of every topic.", check="topic")
    station_id: str = _f(
        "", "This station's name in topics; unset: the host name.", check="topic"
    )
    keepalive: int = _f(30, "Seconds between keepalives; the broker marks the station offline "
                        "after 1.5x this without traffic.", min=5, max=3600)
    commands_enabled: bool = _f(False, "Accept capture/slide commands from the broker.")
    ha_discovery: bool = _f(False, "Publish Home Assistant discovery for the differential sensors.")
    outbox_max: int = _f(
        100000, "Events kept for the broker while it is unreachable. When full, the oldest "
        "field summary is dropped to make room, else the oldest cell event of a slide whose final "
        "report is queued; cell and slide events of open slides are never dropped (kept above "
        "the limit, a new field summary refused). A warning shows on the page and in stats; the "
        "database keeps everything.", min=100, max=10_000_000,
    )
    stats_interval_s: float = _f(60.0, "Seconds between health messages.", min=1.0, max=86400.0)

    @property
    def use_tls(self) -> bool:
        return bool(self.tls or self.tls_ca or self.tls_cert)

    @property
    def effective_client_id(self) -> str:
        return self.client_id or f"edge-wbc-{self.station_id}"

    def topic(self, *levels: str) -> str:
        """``<prefix>/<station_id>/<levels...>``: every topic this station uses."""
        return "/".join((self.prefix, self.station_id, *levels))


@dataclass(frozen=True)
class FormulaConfig:
    preset: str = _f(
        taxonomy.DEFAULT_PRESET, "The leukocyte formula to start from: 'five-part' (neutrophil, "
        "eosinophil, basophil, lymphocyte, monocyte) or 'ru' (basophils, eosinophils, "
        "myelocytes, metamyelocytes, band, segmented, lymphocytes, monocytes, plasma cells).",
        choices=tuple(taxonomy.PRESETS),
    )
    counted: tuple[str, ...] | None = _f(
        None, "Rows that count toward the target, in the order shown: classes or groups "
        "(a group row such as 'neutrophil' holds band and segmented too). Unset: the preset's. "
        "A leukocyte class no row lists still counts, in a row of its own.",
    )
    per_100_wbc: tuple[str, ...] | None = _f(
        None, "Rows reported per 100 counted leukocytes and not counted ('erythroblast' or "
        "'nrbc'). Unset: the preset's (an erythroblast then gets a row when one is seen).",
    )
    count_only: tuple[str, ...] | None = _f(
        None, "Rows reported as counts only: smudge cells, platelets, giant platelets, "
        "artefacts, other. Unset: the preset's (none: such cells are set aside as "
        "'not a leukocyte').",
    )
    flags: tuple[str, ...] | None = _f(
        None, "Alerts shown on the page, written in the report and sent over MQTT: "
        "'<class or group> > N' (cells) or '<class or group> > N%' (per 100 counted "
        "leukocytes), e.g. 'blast > 0', 'band_neutrophil > 6%', 'erythroblast > 1%'. "
        "Unset: the preset's ('blast > 0').",
    )

    def build(self) -> taxonomy.Formula:
        """The formula this section describes (validated when the config was loaded)."""
        return taxonomy.formula_or_raise(
            preset=self.preset, counted=self.counted, per_100_wbc=self.per_100_wbc,
            count_only=self.count_only, flags=self.flags,
        )


@dataclass(frozen=True)
class LisConfig:
    delivery: str = _f(
        "off", "How finalised slides reach the laboratory information system: 'off', 'folder' "
        "(one file per slide, written atomically), 'mllp' (HL7 v2 over TCP, waits for the "
        "ACK) or 'fhir' (POST of a FHIR R4 transaction Bundle).", choices=LIS_DELIVERIES,
    )
    folder: str | None = _f(
        None, "Folder the 'folder' delivery writes to (e.g. a share the LIS imports from).",
        path=True,
    )
    format: str = _f(
        "hl7", "File format of the 'folder' delivery: 'hl7' (ORU^R01) or 'fhir' (Bundle JSON).",
        choices=LIS_FORMATS,
    )
    host: str | None = _f(None, "MLLP: the LIS interface engine's host name or address.")
    port: int = _f(2575, "MLLP: its TCP port (2575 is HL7's registered port).", min=1,
                   max=65535)
    fhir_url: str | None = _f(
        None, "FHIR: the server's base URL (https://...); the Bundle is POSTed to it.",
        check="url",
    )
    fhir_token: str | None = _f(
        None, "FHIR: bearer token. Secret: only from EDGE_WBC_LIS_FHIR_TOKEN or the systemd "
        f"credential '{CRED_LIS_FHIR_TOKEN}', never from this file.", secret=True,
    )
    timeout_s: float = _f(
        10.0, "Seconds to wait for a connection and for the LIS's answer (ACK or HTTP status) "
        "before the attempt counts as failed and is retried.", min=0.1, max=600.0,
    )
    retry_s: float = _f(
        30.0, "Seconds before the first retry while the LIS is unreachable; doubles after "
        "each failure, up to 10 minutes (a longer retry_s stays as it is).", min=1.0,
        max=3600.0,
    )
    sending_application: str = _f("EDGE-WBC", "HL7 MSH-3: this station's application name.",
                                  check="hl7")
    sending_facility: str = _f(
        "", "HL7 MSH-4: the laboratory (unset: the station id).", check="hl7"
    )
    receiving_application: str = _f("", "HL7 MSH-5: the LIS application.", check="hl7")
    receiving_facility: str = _f("", "HL7 MSH-6: the LIS facility.", check="hl7")
    processing_id: str = _f(
        "P", "HL7 MSH-11: 'P' production, 'T' training, 'D' debugging.",
        choices=HL7_PROCESSING_IDS,
    )


@dataclass(frozen=True)
class ReportConfig:
    require_sample_id: bool = _f(
        True, "Refuse to finalise a slide that has no sample ID (started without one and never "
        "given one).",
    )
    require_operator: bool = _f(
        False, "Refuse to finalise a slide until a name or ID of who counted or who signs off "
        "is entered (at the start of the slide or at finalise).",
    )
    timezone: str = _f(
        "", "Time zone of the times in reports (IANA name, e.g. 'Europe/Berlin'); unset: the "
        "station's own local time zone. Times carry their UTC offset either way.",
        check="timezone",
    )


@dataclass(frozen=True)
class LoggingConfig:
    level: str = _f(
        "INFO", "Log level: DEBUG, INFO, WARNING, ERROR or CRITICAL.", choices=LOG_LEVELS
    )


SECTIONS: dict[str, type] = {
    "camera": CameraConfig,
    "models": ModelsConfig,
    "postprocess": PostprocessConfig,
    "session": SessionConfig,
    "station": StationConfig,
    "mqtt": MqttConfig,
    "formula": FormulaConfig,
    "lis": LisConfig,
    "report": ReportConfig,
    "logging": LoggingConfig,
}


@dataclass(frozen=True)
class Config:
    camera: CameraConfig = field(default_factory=CameraConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    station: StationConfig = field(default_factory=StationConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    formula: FormulaConfig = field(default_factory=FormulaConfig)
    lis: LisConfig = field(default_factory=LisConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    #: The file this came from (None: defaults and environment only).
    path: Path | None = field(default=None, compare=False)

    def replace(self, overrides: Mapping[str, Any] | None = None, /, **kw: Any) -> Config:
        """A copy with command-line values applied, validated like the file.

        Keys are ``"section.key"`` in ``overrides`` or ``section_key`` as keywords
        (``cfg.replace(station_port=9000, session_data_dir=d)``). ``None`` values are skipped so
        typer options that were not given can be passed straight through. Secrets cannot be set
        here. Raises :class:`ConfigError` listing every bad value.
        """
        items: dict[str, Any] = dict(overrides or {})
        for k, v in kw.items():
            sec, _, key = k.partition("_")
            items[f"{sec}.{key}"] = v
        values = _as_dict(self)
        problems: list[Problem] = []
        for dotted, value in items.items():
            if value is None:
                continue
            sec, _, key = dotted.partition(".")
            fdef = _field(sec, key)
            where = "command line"
            if fdef is None:
                problems.append(Problem(dotted, None, "no such setting", where))
                continue
            if fdef.metadata.get("secret"):
                problems.append(Problem(dotted, None, _secret_msg(sec, key), where))
                continue
            if isinstance(value, Path):
                value = str(value)
            ok, conv, msg = _coerce(fdef, value)
            if not ok:
                problems.append(Problem(dotted, None, msg, where))
                continue
            values[sec][key] = conv
        cfg, more = _build(values, lambda s, k: None, "command line", self.path)
        problems += more
        if problems:
            raise ConfigError(problems)
        return cfg

    def to_dict(self, redact: bool = True) -> dict[str, dict[str, Any]]:
        """Plain dict (for reports and ``check-config --show``); secrets are redacted."""
        d = _as_dict(self)
        if redact:
            for sec, cls in SECTIONS.items():
                for f in dataclasses.fields(cls):
                    if f.metadata.get("secret") and d[sec][f.name] is not None:
                        d[sec][f.name] = "***"
        return d


@dataclass(frozen=True)
class Problem:
    key: str  # "section.key" (or "section" / "" for whole-file problems)
    line: int | None  # 1-based line in the file, when the problem is in the file
    message: str
    source: str  # file path, "environment", "command line", "credentials"

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        key = f"{self.key}: " if self.key else ""
        return f"{where}: {key}{self.message}"


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` lists every reason, with key and line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} configuration problem{'s' if n != 1 else ''}:"
        super().__init__("\n".join([head, *(f"  {p}" for p in self.problems)]))


# --------------------------------------------------------------------------- loading


def load_config(
    path: str | Path | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Defaults ← TOML file ← environment ← secrets; raises :class:`ConfigError` with all problems.

    ``path`` None reads no file (``default_config_path`` picks the system file when it exists).
    """
    env = os.environ if env is None else env
    problems: list[Problem] = []
    values = _as_dict(Config())
    file_lines: dict[str, int] = {}
    text = ""
    src = "defaults"
    cfg_path = Path(path) if path is not None else None

    if cfg_path is not None:
        src = str(cfg_path)
        try:
            # utf-8-sig: a file saved by Windows Notepad starts with a byte-order mark, which
            # TOML does not allow but which says nothing about the settings.
            text = cfg_path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise ConfigError([Problem("", None, "file not found", src)]) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError([Problem("", None, f"cannot read: {e}", src)]) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            line = _toml_error_line(e)
            if line is None and "end of document" in str(e):
                line = max(1, len(text.splitlines()))
            raise ConfigError([Problem("", line, f"not valid TOML: {_toml_msg(e)}", src)]) from None
        file_lines = key_lines(text)
        problems += _apply_file(data, values, file_lines, src)

    problems += _apply_env(env, values)
    problems += _apply_secrets(env, values)

    # Systemd's StateDirectory= tells us where our state belongs when the file did not.
    if "session.data_dir" not in file_lines and "EDGE_WBC_SESSION_DATA_DIR" not in env:
        state = env.get("STATE_DIRECTORY", "")
        if state:
            values["session"]["data_dir"] = state.split(":")[0]
        elif not _can_create(Path(values["session"]["data_dir"])):
            # A user trying the station on a laptop: their own data folder, not a failure.
            values["session"]["data_dir"] = str(_user_data_dir(env))
    creds = credentials_dir(env)
    if values["mqtt"]["tls_key"] is None and creds is not None:
        key = creds / CRED_MQTT_TLS_KEY
        with contextlib.suppress(OSError):  # unreadable: the TLS check below says a key is needed
            if key.is_file() and key.stat().st_size > 0:
                values["mqtt"]["tls_key"] = str(key)
    if not values["mqtt"]["station_id"]:
        values["mqtt"]["station_id"] = _hostname()

    cfg, more = _build(values, lambda s, k: file_lines.get(f"{s}.{k}"), src, cfg_path,
                       lambda s, k, item, nth: _item_line(text, file_lines.get(f"{s}.{k}"),
                                                          item, nth),
                       _env_keys(env))
    problems += more
    if problems:
        # The file's problems in its line order, then the environment's and the rest.
        problems.sort(key=lambda p: (p.source != src, p.line if p.line is not None else 1 << 30))
        raise ConfigError(problems)
    return cfg


def default_config_path(env: Mapping[str, str] | None = None) -> Path | None:
    """``$EDGE_WBC_CONFIG``, else ``$CONFIGURATION_DIRECTORY/config.toml`` (systemd), else
    ``/etc/edge-wbc/config.toml`` when it exists, else None (defaults)."""
    env = os.environ if env is None else env
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    conf_dir = env.get("CONFIGURATION_DIRECTORY", "")
    if conf_dir:
        p = Path(conf_dir.split(":")[0]) / "config.toml"
        if p.is_file():
            return p
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


def _can_create(d: Path) -> bool:
    """Can this process use (or make) directory ``d``?"""
    probe = d
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def _user_data_dir(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_DATA_HOME") or str(Path(env.get("HOME") or Path.home()) / ".local/share")
    return Path(base) / "edge-wbc"


def _hostname() -> str:
    name = socket.gethostname().split(".")[0] or "station"
    # Topic levels must not contain MQTT wildcards or separators.
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


def _apply_file(
    data: dict[str, Any], values: dict[str, dict[str, Any]], lines: dict[str, int], src: str
) -> list[Problem]:
    problems: list[Problem] = []
    for sec, table in data.items():
        if sec not in SECTIONS:
            home = [s for s, cls in SECTIONS.items()
                    if sec in {f.name for f in dataclasses.fields(cls)}]  # fmt: skip
            if not isinstance(table, dict):
                # a key written above every [section] header
                where = (f"; it belongs under [{home[0]}]" if len(home) == 1 else
                         f"; put it under its section ({', '.join(f'[{h}]' for h in home)})"
                         if home else "")  # fmt: skip
                problems.append(Problem(sec, lines.get(sec), f"'{sec}' is outside any section"
                                        f"{where}", src))  # fmt: skip
                continue
            problems.append(Problem(sec, lines.get(sec), f"unknown section [{sec}] (known: "
                                    f"{', '.join(SECTIONS)})", src))
            continue
        if not isinstance(table, dict):
            problems.append(Problem(sec, lines.get(sec), f"'{sec}' must be a [{sec}] table", src))
            continue
        for key, value in table.items():
            dotted = f"{sec}.{key}"
            line = lines.get(dotted, lines.get(sec))
            fdef = _field(sec, key)
            if fdef is None:
                problems.append(Problem(dotted, line, _unknown_msg(sec, key), src))
                continue
            if fdef.metadata.get("secret"):
                problems.append(Problem(dotted, line, _secret_msg(sec, key), src))
                continue
            ok, conv, msg = _coerce(fdef, value)
            if ok:
                values[sec][key] = conv
            else:
                problems.append(Problem(dotted, line, msg, src))
    return problems


def _env_setting(name: str) -> tuple[str, str] | None:
    """(section, key) an ``EDGE_WBC_<SECTION>_<KEY>`` variable names (the key may not exist),
    or None for a variable outside the sections (EDGE_WBC_CONFIG, EDGE_WBC_TOKEN, test hooks)."""
    if not name.startswith(ENV_PREFIX):
        return None
    rest = name[len(ENV_PREFIX):].lower()
    sec = next((s for s in SECTIONS if rest.startswith(s + "_")), None)
    return None if sec is None else (sec, rest[len(sec) + 1:])


def _env_keys(env: Mapping[str, str]) -> dict[str, str]:
    """"section.key" -> the environment variable that sets it (the environment wins over the
    file, so a problem with such a key is the variable's, not the file's)."""
    out: dict[str, str] = {}
    for name in env:
        setting = _env_setting(name)
        if setting is not None and _field(*setting) is not None:
            out[".".join(setting)] = name
    return out


def _env_near_miss(name: str) -> str | None:
    """A problem for an EDGE_WBC_ variable that is no setting but nearly names a section or one
    of the variables read outside them (EDGE_WBC_MQQT_HOST, EDGE_WBC_TOKN), else None: such a
    typo would do nothing, silently. Other EDGE_WBC_ names (a test hook, the kiosk's) are left
    alone."""
    from edge_wbc.bundled import MODELS_ENV

    if not name.startswith(ENV_PREFIX):
        return None
    others = [CONFIG_ENV, MODELS_ENV, *(n for names, _ in SECRETS.values() for n in names)]
    if name in others:
        return None
    rest = name[len(ENV_PREFIX):].lower()
    head = rest.split("_")[0]
    for sec in SECTIONS:
        if _similar(head, sec):
            return (f"{name}: no section '{head}' (did you mean "
                    f"{ENV_PREFIX}{sec.upper()}{name[len(ENV_PREFIX) + len(head):]}?)")
    close = [n for n in others if _similar(rest, n[len(ENV_PREFIX):].lower())]
    return f"{name}: not a setting (did you mean {close[0]}?)" if close else None


def _apply_env(env: Mapping[str, str], values: dict[str, dict[str, Any]]) -> list[Problem]:
    problems: list[Problem] = []
    for name, raw in env.items():
        setting = _env_setting(name)
        if setting is None:
            miss = _env_near_miss(name)
            if miss is not None:
                problems.append(Problem("", None, miss, "environment"))
            continue
        sec, key = setting
        dotted = f"{sec}.{key}"
        fdef = _field(sec, key)
        if fdef is None:
            problems.append(Problem(dotted, None, f"{name}: {_unknown_msg(sec, key)}",
                                    "environment"))
            continue
        ok, conv, msg = _coerce(fdef, _parse_env(fdef, raw))
        if ok:
            values[sec][key] = conv
        else:
            problems.append(Problem(dotted, None, f"{name}={raw!r}: {msg}", "environment"))
    return problems


#: Where each secret comes from: environment variables (first set wins), then the systemd
#: credential of that name in $CREDENTIALS_DIRECTORY.
SECRETS: dict[str, tuple[tuple[str, ...], str]] = {
    "station.token": (("EDGE_WBC_TOKEN", "EDGE_WBC_STATION_TOKEN"), CRED_TOKEN),
    "mqtt.password": (("EDGE_WBC_MQTT_PASSWORD",), CRED_MQTT_PASSWORD),
    "lis.fhir_token": (("EDGE_WBC_LIS_FHIR_TOKEN",), CRED_LIS_FHIR_TOKEN),
}


def credentials_dir(env: Mapping[str, str]) -> Path | None:
    """systemd's $CREDENTIALS_DIRECTORY; outside systemd the installer's folder, if any."""
    if "CREDENTIALS_DIRECTORY" in env:
        return Path(env["CREDENTIALS_DIRECTORY"]) if env["CREDENTIALS_DIRECTORY"] else None
    return INSTALLED_CREDENTIALS if INSTALLED_CREDENTIALS.is_dir() else None


def read_secret(dotted: str, env: Mapping[str, str] | None = None) -> str | None:
    """The secret ``dotted`` (a key of SECRETS) or None; OSError/UnicodeDecodeError when its
    credential file exists but cannot be read. Also for commands without a config (monitor).
    Whitespace alone is no secret (a token of ' ' guarded a station on 0.0.0.0)."""
    env = os.environ if env is None else env
    env_names, cred = SECRETS[dotted]
    for n in env_names:
        if env.get(n, "").strip():
            return env[n]
    creds = credentials_dir(env)
    if creds is None:
        return None
    p = creds / cred
    try:
        if not p.is_file():
            return None
        # A trailing newline from `echo secret > file` is not part of the secret. The installer
        # creates empty credential files so LoadCredential= never fails: empty means "not set".
        text = p.read_text(encoding="utf-8").rstrip("\r\n")
    except PermissionError as e:
        if creds == INSTALLED_CREDENTIALS:
            raise PermissionError(e.errno, f"{p} is readable by root only: run this with sudo "
                                  "to check what the service reads") from None
        raise
    return text if text.strip() else None


def _apply_secrets(env: Mapping[str, str], values: dict[str, dict[str, Any]]) -> list[Problem]:
    problems: list[Problem] = []
    for dotted in SECRETS:
        sec, key = dotted.split(".")
        try:
            values[sec][key] = read_secret(dotted, env)
        except (OSError, UnicodeDecodeError) as e:
            problems.append(Problem(dotted, None, f"cannot read credential "
                                    f"'{SECRETS[dotted][1]}': {e}", "credentials"))
            values[sec][key] = None
    return problems


def _build(
    values: dict[str, dict[str, Any]],
    line_of: typing.Callable[[str, str], int | None],
    src: str,
    path: Path | None,
    item_line: typing.Callable[[str, str, str, int], int | None] | None = None,
    from_env: Mapping[str, str] | None = None,
) -> tuple[Config, list[Problem]]:
    """Construct the tree and run the checks that involve more than one key. ``from_env``:
    the keys the environment set ("section.key" -> variable), whose problems are its own."""
    cfg = Config(**{s: cls(**values[s]) for s, cls in SECTIONS.items()}, path=path)
    problems: list[Problem] = []
    env_set = from_env or {}

    def problem(sec: str, key: str, line: int | None, msg: str) -> Problem:
        var = env_set.get(f"{sec}.{key}")
        if var is not None:
            return Problem(f"{sec}.{key}", None, f"{var}: {msg}", "environment")
        return Problem(f"{sec}.{key}", line, msg, src)

    def bad(sec: str, key: str, msg: str) -> None:
        problems.append(problem(sec, key, line_of(sec, key), msg))

    if (not is_loopback(cfg.station.host) and cfg.station.token
            and len(cfg.station.token) < MIN_TOKEN_CHARS):
        bad("station", "host", f"'{cfg.station.host}' is reachable from other machines and the "
            f"token is {len(cfg.station.token)} characters: use at least {MIN_TOKEN_CHARS} "
            "(e.g. `openssl rand -hex 16`)")
    if not is_loopback(cfg.station.host) and not cfg.station.token:
        bad("station", "host", f"'{cfg.station.host}' is reachable from other machines: set a "
            f"token (EDGE_WBC_TOKEN or the systemd credential '{CRED_TOKEN}') or listen on "
            "127.0.0.1")
    m = cfg.mqtt
    if m.tls_cert and not m.tls_key:
        bad("mqtt", "tls_cert", "a client certificate needs tls_key (or the systemd credential "
            f"'{CRED_MQTT_TLS_KEY}')")
    if m.tls_key and not m.tls_cert:
        bad("mqtt", "tls_key", "a client key needs tls_cert")
    if m.password and not m.username:
        bad("mqtt", "username", "a password is set but no username")
    if not m.prefix:
        bad("mqtt", "prefix", "must not be empty (it is the first level of every topic)")
    if m.host:
        for key in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(m, key)
            if path and not os.access(path, os.R_OK):
                bad("mqtt", key, f"cannot read {path}")
    fc = cfg.formula
    _, fproblems = taxonomy.build_formula(fc.preset, fc.counted, fc.per_100_wbc, fc.count_only,
                                          fc.flags)
    for fp in fproblems:
        line = None
        if fp.item is not None and item_line is not None:
            line = item_line("formula", fp.key, fp.item, fp.nth)
        problems.append(problem("formula", fp.key, line or line_of("formula", fp.key),
                                fp.message))
    lis = cfg.lis
    needs = {"folder": ("folder", "a folder to write to"), "mllp": ("host", "the LIS host"),
             "fhir": ("fhir_url", "the FHIR server's base URL")}.get(lis.delivery)
    if needs and not getattr(lis, needs[0]):
        bad("lis", needs[0], f"delivery = '{lis.delivery}' needs {needs[1]} ({needs[0]})")
    if lis.fhir_url and "@" in _url_netloc(lis.fhir_url):
        # urllib would not send it, and the URL is shown in logs, `lis status` and doctor.
        bad("lis", "fhir_url", "must not hold a user name or password (user:password@): give "
            "the server's bearer token as lis.fhir_token instead (EDGE_WBC_LIS_FHIR_TOKEN or "
            f"the systemd credential '{CRED_LIS_FHIR_TOKEN}')")
    if lis.fhir_token and lis.fhir_url and lis.fhir_url.startswith("http://") \
            and not is_loopback(_url_host(lis.fhir_url)):
        bad("lis", "fhir_url", "a bearer token would cross the network in clear text: use "
            "https:// (plain http only to this machine)")
    return cfg, problems


def _url_problem(url: str) -> str:
    """Why ``url`` cannot be an http(s) address to connect to; '' when it can. A password in
    it is never echoed."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    shown = url.replace(u.netloc, "***@" + u.netloc.rsplit("@", 1)[1], 1) if "@" in u.netloc \
        else url
    if not re.match(r"^https?://[^/\s]+(/\S*)?$", url):
        return f"{shown!r} is not an http:// or https:// URL"
    try:
        port = u.port
    except ValueError:  # urlsplit's own words ("Port out of range 1-65535") name no key
        port = 0
    if port == 0:
        return f"{shown!r}: the port must be a number from 1 to 65535"
    return ""


def _url_netloc(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc


def _url_host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or ""


def is_loopback(host: str) -> bool:
    """Only this machine can reach ``host``. "" is the wildcard address (every interface) to
    ``bind``, so it is not loopback; "localhost" is."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- values


def _field(sec: str, key: str) -> dataclasses.Field[Any] | None:
    cls = SECTIONS.get(sec)
    if cls is None:
        return None
    for f in dataclasses.fields(cls):
        if f.name == key:
            return f
    return None


def _unknown_msg(sec: str, key: str) -> str:
    known = [f.name for f in dataclasses.fields(SECTIONS[sec])]
    close = [k for k in known if _similar(k, key)]
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"
    return f"unknown key '{key}' in [{sec}]{hint}"


def _similar(a: str, b: str) -> bool:
    import difflib

    return difflib.SequenceMatcher(None, a, b).ratio() >= 0.75


def _secret_msg(sec: str, key: str) -> str:
    if key == "token":
        return (f"secrets are not read from here: set EDGE_WBC_TOKEN or the systemd credential "
                f"'{CRED_TOKEN}'")
    if sec == "lis":
        return ("secrets are not read from here: set EDGE_WBC_LIS_FHIR_TOKEN or the systemd "
                f"credential '{CRED_LIS_FHIR_TOKEN}'")
    return ("secrets are not read from here: set EDGE_WBC_MQTT_PASSWORD or the systemd "
            f"credential '{CRED_MQTT_PASSWORD}'")


_HINTS: dict[str, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls.__name__ not in _HINTS:
        _HINTS[cls.__name__] = typing.get_type_hints(cls)
    return _HINTS[cls.__name__]


def _field_type(fdef: dataclasses.Field[Any]) -> tuple[type, bool]:
    """(base type, optional) for a schema field."""
    for cls in SECTIONS.values():
        hints = _hints(cls)
        if fdef.name in hints and any(f is fdef for f in dataclasses.fields(cls)):
            t = hints[fdef.name]
            break
    else:  # pragma: no cover - every schema field belongs to a section
        raise KeyError(fdef.name)
    args = typing.get_args(t)
    if typing.get_origin(t) in (typing.Union, types.UnionType) and type(None) in args:
        base = next(a for a in args if a is not type(None))
        return base, True
    return t, False


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _describe(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)
    return f"{kind} {value!r}" if kind not in ("array", "table") else kind


def _coerce(fdef: dataclasses.Field[Any], value: Any) -> tuple[bool, Any, str]:
    base, optional = _field_type(fdef)
    meta = fdef.metadata
    if value is None:
        return (True, None, "") if optional else (False, None, f"must be {_TYPE_WORDS[base]}")
    if base is bool:
        if not isinstance(value, bool):
            return False, None, f"must be true or false, got {_describe(value)}"
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return False, None, f"must be an integer, got {_describe(value)}"
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, None, f"must be a number, got {_describe(value)}"
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            return False, None, "must be a finite number"
    elif typing.get_origin(base) is tuple:
        if not isinstance(value, (list, tuple)):
            return False, None, f"must be an array of strings, got {_describe(value)}"
        odd = [v for v in value if not isinstance(v, str)]
        if odd:
            return False, None, f"must be an array of strings; it holds {_describe(odd[0])}"
        value = tuple(v.strip() for v in value)
    elif base is str:
        if not isinstance(value, str):
            return False, None, f"must be a string, got {_describe(value)}"
        bad = hidden_char(value)
        if bad is not None:
            # A station id or path that displays as something else misleads whoever reads it.
            return False, None, f"must not contain {bad}"
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        return False, None, f"{value!r} is below the minimum {lo!r}"
    if hi is not None and value > hi:
        return False, None, f"{value!r} is above the maximum {hi!r}"
    choices = meta.get("choices")
    if choices:
        v = value.upper() if all(c.isupper() for c in choices) else value.lower()
        if v not in choices:
            return False, None, f"{value!r} is not one of {', '.join(choices)}"
        value = v
    if meta.get("path") and isinstance(value, str):
        if not value.strip():
            return False, None, "must not be empty"
        value = os.path.expanduser(value)
    check = meta.get("check")
    if check == "source" and split_camera_source(value) is None:
        return False, None, f"{value!r} is not a camera source: use {CAMERA_SOURCES}"
    tpu = DELEGATES["edgetpu"]
    if check == "edgetpu" and value and not tpu.device_ok(value):
        spellings = ", ".join(repr(s) for s in tpu.device_spellings)
        return False, None, f"{value!r} is not an {tpu.label} device ({spellings})"
    if check == "url" and value:
        why = _url_problem(value)
        if why:
            return False, None, why
    if check == "hl7" and re.search(r"[|^~\\&\r\n]", value):
        return False, None, (f"{value!r} must not contain the HL7 delimiters | ^ ~ \\ & "
                             "(it goes into one MSH field)")
    if check == "timezone" and value:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            return False, None, (f"{value!r} is not a time zone this system knows (an IANA "
                                 "name such as 'Europe/Berlin'; unset: the station's own)")
    if check == "topic" and value and (re.search(r"[#+/\s\x00]", value)):
        return False, None, (f"{value!r} must not contain '/', '+', '#' or spaces "
                             "(it is a topic level)")
    return True, value, ""


def _parse_env(fdef: dataclasses.Field[Any], raw: str) -> Any:
    """Environment values are strings; read them as the field's type so errors read the same."""
    base, optional = _field_type(fdef)
    s = raw.strip()
    if optional and s == "":
        return None
    if base is bool:
        low = s.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        return raw
    if base is int:
        try:
            return int(s)
        except ValueError:
            return raw
    if base is float:
        try:
            return float(s)
        except ValueError:
            return raw
    if typing.get_origin(base) is tuple:
        # A list in one variable: EDGE_WBC_FORMULA_FLAGS="blast > 0, eosinophil > 5%".
        return [p.strip() for p in s.split(",") if p.strip()]
    return raw


def _as_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return {s: dataclasses.asdict(getattr(cfg, s)) for s in SECTIONS}


# --------------------------------------------------------------------------- TOML positions


_HEADER_RE = re.compile(r"^\s*\[\[?\s*(?P<name>[^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_RE = re.compile(r"""^\s*(?P<key>(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
                     r"""(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")


def _split_dotted(s: str) -> list[str]:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", s)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


def key_lines(text: str) -> dict[str, int]:
    """Map dotted key -> 1-based line where it is defined (tomllib gives no positions).

    Tables map to their header line. Lines inside multi-line strings are skipped so a value
    that happens to look like ``key = ...`` is not taken for a key.
    """
    out: dict[str, int] = {}
    table: list[str] = []
    in_ml: str | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if in_ml is not None:
            if in_ml in line:
                in_ml = None
            continue
        m = _HEADER_RE.match(line)
        if m and not _KEY_RE.match(line):
            table = _split_dotted(m.group("name"))
            for i in range(1, len(table) + 1):
                out.setdefault(".".join(table[:i]), n)
            continue
        m = _KEY_RE.match(line)
        if not m:
            continue
        parts = table + _split_dotted(m.group("key"))
        for i in range(1, len(parts)):
            out.setdefault(".".join(parts[:i]), n)
        out[".".join(parts)] = n
        rest = line[m.end():]
        for q in ('"""', "'''"):
            if rest.count(q) == 1:
                in_ml = q
    return out


def _item_line(text: str, key_line: int | None, item: str, nth: int = 0) -> int | None:
    """The line of the ``nth`` occurrence of one string inside an array that starts at
    ``key_line`` (an array written over several lines puts each problem on its own line);
    comments are not searched."""
    if key_line is None:
        return None
    lines = text.splitlines()
    seen = 0
    for n in range(key_line, len(lines) + 1):
        code = _code_part(lines[n - 1])
        for q in ('"', "'"):
            found = code.count(f"{q}{item}{q}")
            if seen + found > nth:
                return n
            seen += found
        if n > key_line and ("]" in code or _KEY_RE.match(code)):
            break
    return key_line


def _code_part(line: str) -> str:
    """A TOML line without its comment (a # inside a string is kept)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[:i]
    return line


def _toml_error_line(e: Exception) -> int | None:
    n = getattr(e, "lineno", None)
    if isinstance(n, int):
        return n
    m = re.search(r"at line (\d+)", str(e))
    return int(m.group(1)) if m else None


def _toml_msg(e: Exception) -> str:
    msg = getattr(e, "msg", None) or str(e)
    return re.sub(r"\s*\(at line \d+, column \d+\)", "", str(msg))


# --------------------------------------------------------------------------- documentation


def schema_doc() -> list[tuple[str, str, Any, str]]:
    """(section, key, default, description) for every setting: docs and the example's test."""
    rows = []
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            rows.append((sec, f.name, f.default, f.metadata["doc"]))
    return rows
