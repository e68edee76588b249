"""The one config schema: file, environment, secrets, every problem with key and line."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from edge_wbc.config import (
    SECTIONS,
    Config,
    ConfigError,
    key_lines,
    load_config,
    schema_doc,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "edge_wbc" / "config.example.toml"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def _problems(exc: pytest.ExceptionInfo[ConfigError]) -> dict[str, tuple[int | None, str]]:
    return {p.key: (p.line, p.message) for p in exc.value.problems}


def test_defaults_run_without_a_file() -> None:
    cfg = load_config(None, env={})
    assert cfg.camera.source == "samples"
    assert cfg.models.dir is None  # resolved by edge_wbc.bundled.locate_models
    assert cfg.models.accelerator == "cpu"
    assert cfg.session.target == 100
    assert cfg.station.host == "127.0.0.1" and cfg.station.token is None
    assert cfg.mqtt.host is None and cfg.mqtt.station_id  # host name fills the station id


def test_shipped_example_passes_and_documents_every_setting() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert cfg.camera.source == "picamera2"
    text = EXAMPLE.read_text()
    for sec, key, _default, doc in schema_doc():
        assert doc, f"{sec}.{key} has no description"
        if (sec, key) in (("station", "token"), ("mqtt", "password"), ("lis", "fhir_token")):
            continue  # secrets are documented at the top, never set in the file
        # present as a setting or as a commented-out example within its section
        section_text = text.split(f"[{sec}]", 1)[1].split("\n[", 1)[0]
        assert re.search(rf"^#? ?{key} = ", section_text, re.M), f"{sec}.{key} not in example"


def test_broken_file_reports_every_problem_with_key_and_line(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "# station config\n"  # 1
        "[camera]\n"  # 2
        'source = "webcam"\n'  # 3
        'width = "640"\n'  # 4
        "\n"  # 5
        "[models]\n"  # 6
        "threds = 2\n"  # 7
        'accelerator = "gpu"\n'  # 8
        "[mqtt]\n"  # 9
        "port = 99999\n"  # 10
        'password = "hunter2"\n'  # 11
        "[fooo]\n"  # 12
        "a = 1\n"  # 13
        "[postprocess]\n"  # 14
        "cell_diameter_px = -3\n",  # 15
    )
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={})
    probs = _problems(exc)
    assert probs["camera.source"][0] == 3
    assert probs["camera.width"][0] == 4 and "integer" in probs["camera.width"][1]
    assert probs["models.threds"][0] == 7 and "threads" in probs["models.threds"][1]
    assert probs["models.accelerator"][0] == 8
    assert probs["mqtt.port"][0] == 10 and "maximum" in probs["mqtt.port"][1]
    assert probs["mqtt.password"][0] == 11 and "EDGE_WBC_MQTT_PASSWORD" in probs["mqtt.password"][1]
    assert probs["fooo"][0] == 12 and "unknown section" in probs["fooo"][1]
    assert probs["postprocess.cell_diameter_px"][0] == 15
    assert len(exc.value.problems) == 8
    # the message a technician sees names file, line and key on one line each
    assert f"{p}:7: models.threds: unknown key 'threds'" in str(exc.value)


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    p = _write(tmp_path, "[camera]\nwidth = 640\nheight = = 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={})
    (prob,) = exc.value.problems
    assert prob.line == 3 and "TOML" in prob.message


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml", env={})


def test_key_lines_sections_dotted_keys_and_multiline_strings() -> None:
    text = (
        'title = """\n'
        "fake = 1\n"
        '"""\n'
        "mqtt.host = 'b'\n"
        "[ session ]  # comment\n"
        "target=200\n"
        '"data_dir" = "/d"\n'
    )
    lines = key_lines(text)
    assert "fake" not in lines
    assert lines["mqtt.host"] == 4
    assert lines["session"] == 5
    assert lines["session.target"] == 6
    assert lines["session.data_dir"] == 7


def test_environment_overrides_file(tmp_path: Path) -> None:
    p = _write(tmp_path, "[mqtt]\nhost = 'file-broker'\nport = 1883\n[models]\nthreads = 2\n")
    env = {
        "EDGE_WBC_MQTT_HOST": "env-broker",
        "EDGE_WBC_MQTT_TLS": "yes",
        "EDGE_WBC_MODELS_THREADS": "4",
        "EDGE_WBC_POSTPROCESS_CELL_DIAMETER_PX": "80.5",
        "EDGE_WBC_STATION_GPIO_PIN": "",  # empty clears an optional value
        "EDGE_WBC_SOME_TEST_HOOK": "1",  # not a section: ignored
    }
    cfg = load_config(p, env=env)
    assert cfg.mqtt.host == "env-broker" and cfg.mqtt.tls is True
    assert cfg.models.threads == 4
    assert cfg.postprocess.cell_diameter_px == 80.5
    assert cfg.station.gpio_pin is None


def test_bad_environment_values_are_collected() -> None:
    env = {"EDGE_WBC_MQTT_PORT": "abc", "EDGE_WBC_MQTT_HSOT": "x", "EDGE_WBC_LOGGING_LEVEL": "loud"}
    with pytest.raises(ConfigError) as exc:
        load_config(None, env=env)
    probs = _problems(exc)
    assert set(probs) == {"mqtt.port", "mqtt.hsot", "logging.level"}
    assert "EDGE_WBC_MQTT_HSOT" in probs["mqtt.hsot"][1] and "host" in probs["mqtt.hsot"][1]
    assert all(p.source == "environment" for p in exc.value.problems)


def test_a_misspelt_environment_section_is_named_not_ignored() -> None:
    env = {"EDGE_WBC_MQQT_HOST": "broker", "EDGE_WBC_STATOIN_PORT": "9000",
           "EDGE_WBC_TOKN": "abc", "EDGE_WBC_SOME_TEST_HOOK": "1", "EDGE_WBC_KIOSK_URL": "x"}
    with pytest.raises(ConfigError) as exc:
        load_config(None, env=env)
    got = sorted(p.message for p in exc.value.problems)
    assert got == [
        "EDGE_WBC_MQQT_HOST: no section 'mqqt' (did you mean EDGE_WBC_MQTT_HOST?)",
        "EDGE_WBC_STATOIN_PORT: no section 'statoin' (did you mean EDGE_WBC_STATION_PORT?)",
        "EDGE_WBC_TOKN: not a setting (did you mean EDGE_WBC_TOKEN?)",
    ]
    assert all(p.source == "environment" for p in exc.value.problems)


def test_secrets_from_environment_or_credentials(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("s3cret\n")
    (creds / "token").write_text("tok")
    (creds / "mqtt-tls-key").write_text("KEY")
    env = {"CREDENTIALS_DIRECTORY": str(creds), "EDGE_WBC_MQTT_USERNAME": "u",
           "EDGE_WBC_MQTT_TLS_CERT": str(tmp_path / "c.pem")}
    cfg = load_config(None, env=env)
    assert cfg.mqtt.password == "s3cret"  # the trailing newline is not part of it
    assert cfg.station.token == "tok"
    assert cfg.mqtt.tls_key == str(creds / "mqtt-tls-key")
    assert cfg.to_dict()["mqtt"]["password"] == "***"
    assert "s3cret" not in repr(cfg.to_dict()) and "s3cret" not in repr(cfg)
    assert "tok" not in repr(cfg.station)
    # the environment wins over the credential file
    cfg = load_config(None, env={**env, "EDGE_WBC_MQTT_PASSWORD": "fromenv"})
    assert cfg.mqtt.password == "fromenv"
    # empty credential files (as the installer creates them) mean "not set"
    for name in ("mqtt-password", "token", "mqtt-tls-key"):
        (creds / name).write_text("")
    cfg = load_config(None, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert cfg.mqtt.password is None and cfg.station.token is None and cfg.mqtt.tls_key is None


def test_non_loopback_listen_needs_a_token(tmp_path: Path) -> None:
    p = _write(tmp_path, "[station]\nhost = '0.0.0.0'\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={})
    assert _problems(exc)["station.host"][0] == 2
    token = "0123456789ab"
    assert load_config(p, env={"EDGE_WBC_TOKEN": token}).station.host == "0.0.0.0"
    # whitespace is no token; a short one guards nothing on a network
    for weak, why in (("   ", "set a token"), ("t", "the token is 1 characters")):
        with pytest.raises(ConfigError) as exc:
            load_config(p, env={"EDGE_WBC_TOKEN": weak})
        assert why in _problems(exc)["station.host"][1]
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "token").write_text(" \n")
    with pytest.raises(ConfigError, match="set a token"):
        load_config(p, env={"CREDENTIALS_DIRECTORY": str(creds)})


def test_outside_systemd_the_installed_credentials_are_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sudo edge-wbc check-config` on a station: it said "set a token" for a token set in
    /etc/edge-wbc/credentials, which only the service's $CREDENTIALS_DIRECTORY showed."""
    from edge_wbc import config

    installed = tmp_path / "etc-creds"
    installed.mkdir()
    (installed / "token").write_text("0123456789abcdef\n")
    monkeypatch.setattr(config, "INSTALLED_CREDENTIALS", installed)
    p = _write(tmp_path, "[station]\nhost = '0.0.0.0'\n")
    assert load_config(p, env={}).station.token == "0123456789abcdef"
    # under systemd its own folder wins, even empty
    with pytest.raises(ConfigError, match="set a token"):
        load_config(p, env={"CREDENTIALS_DIRECTORY": ""})
    # not root: said so, not "set a token"
    real = Path.read_text

    def denied(self: Path, *a: object, **k: object) -> str:
        if self.parent == installed:
            raise PermissionError(13, "Permission denied")
        return real(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={})
    assert "readable by root only: run this with sudo" in str(exc.value)


def test_unwritable_default_data_dir_falls_back_to_the_users(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge_wbc import config

    writable = {"/var/lib/edge-wbc": True}
    monkeypatch.setattr(config, "_can_create", lambda d: writable[str(d)])
    env = {"XDG_DATA_HOME": str(tmp_path / "xdg")}
    assert load_config(None, env=env).session.data_dir == "/var/lib/edge-wbc"
    writable["/var/lib/edge-wbc"] = False  # an ordinary user trying the station
    assert load_config(None, env=env).session.data_dir == str(tmp_path / "xdg" / "edge-wbc")
    assert load_config(None, env={"HOME": "/home/tech"}).session.data_dir == (
        "/home/tech/.local/share/edge-wbc"
    )
    # an explicit setting is never second-guessed
    p = _write(tmp_path, "[session]\ndata_dir = '/nonexistent/x'\n")
    assert load_config(p, env={}).session.data_dir == "/nonexistent/x"


def test_state_directory_from_systemd(tmp_path: Path) -> None:
    assert load_config(None, env={"STATE_DIRECTORY": "/var/lib/edge-wbc2"}).session.data_dir == (
        "/var/lib/edge-wbc2"
    )
    p = _write(tmp_path, "[session]\ndata_dir = '/srv/wbc'\n")
    assert load_config(p, env={"STATE_DIRECTORY": "/x"}).session.data_dir == "/srv/wbc"


def test_replace_validates_command_line_values() -> None:
    cfg = load_config(None, env={})
    new = cfg.replace(station_port=9000, session_data_dir=Path("/tmp/x"), camera_source=None)
    assert new.station.port == 9000 and new.session.data_dir == "/tmp/x"
    assert new.camera.source == cfg.camera.source  # None = flag not given
    assert cfg.station.port == 8080  # frozen original untouched
    with pytest.raises(ConfigError) as exc:
        cfg.replace({"station.port": 0, "camera.source": "webcam", "mqtt.password": "x"})
    assert set(_problems(exc)) == {"station.port", "camera.source", "mqtt.password"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.station.port = 1  # type: ignore[misc]


def test_every_field_has_a_description() -> None:
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("doc", "")) > 10, f"{cls.__name__}.{f.name}"
    assert isinstance(Config(), Config)


def test_example_and_docs_say_what_the_outbox_drops() -> None:
    """#15.21: the example, the schema's description and docs/mqtt.md give one policy (the one
    edge_wbc.counting.outbox implements): field summaries first, never open slides' cells."""
    doc = next(d for sec, key, _v, d in schema_doc() if (sec, key) == ("mqtt", "outbox_max"))
    lines = EXAMPLE.read_text().split("\n[mqtt]", 1)[1].split("\noutbox_max =", 1)[0]
    comment = []
    for line in reversed(lines.splitlines()):
        if not line.startswith("# "):
            break
        comment.insert(0, line[2:])
    assert " ".join(comment) == doc
    mqtt_md = (EXAMPLE.parents[1] / "docs" / "mqtt.md").read_text()
    for text in (doc, mqtt_md):
        flat = " ".join(text.split())
        assert "oldest field summary" in flat or "oldest queued **field** summary" in flat
        assert "never dropped" in flat or "**never dropped**" in flat
        assert "oldest are dropped" not in flat


def test_a_key_above_every_section_header_is_said_to_be_one(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('preset = "ru"\nport = 9000\n[formula]\ncounted = ["monocyte", 1]\n')
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={})
    got = [(pr.line, pr.message) for pr in exc.value.problems]
    assert got[0] == (1, "'preset' is outside any section; it belongs under [formula]")
    assert got[1][0] == 2 and "outside any section" in got[1][1] and "[station]" in got[1][1]
    assert got[2] == (4, "must be an array of strings; it holds integer 1")


def test_a_byte_order_mark_is_not_a_syntax_error(tmp_path: Path) -> None:
    # Windows Notepad writes one; the settings after it are what matter.
    p = tmp_path / "c.toml"
    p.write_bytes(b"\xef\xbb\xbf[formula]\npreset = 'ru'\n")
    assert load_config(p, env={}).formula.preset == "ru"


def test_a_syntax_error_at_the_end_of_the_file_has_a_line(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[formula]\nflags = ["blast > 0"\n')
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={})
    (pr,) = exc.value.problems
    assert pr.line == 2 and "not valid TOML" in pr.message
