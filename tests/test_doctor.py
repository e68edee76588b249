"""edge-wbc doctor and check-config: each check can pass and fail, and the CLI says so."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_wbc.cli import app, doctor
from edge_wbc.config import load_config
from edge_wbc.pipeline.manifest import label_binding

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _cfg(tmp_path: Path, text: str = "", **env: str):  # type: ignore[no-untyped-def]
    p = tmp_path / "config.toml"
    p.write_text(text)
    return load_config(p, env=env)


def _manifest(models: Path, files: dict[str, bytes], tamper: str | None = None) -> None:
    models.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (name, data) in enumerate(files.items()):
        (models / name).write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        if name == tamper:
            digest = "0" * 64
        seg = i < len(files) - 1
        entries.append({
            "name": name.split(".")[0], "file": name, "sha256": digest,
            "task": "segmentation" if seg else "classification",
            "input": {"shape": [1, 192, 256, 3] if seg else [1, 96, 96, 3], "dtype": "int8"},
            **({} if seg else {"classes": ["neutrophil", "eosinophil", "basophil",
                                           "lymphocyte", "monocyte"]}),
        })
    for e in entries:
        e["label_binding"] = label_binding(e)
    (models / "manifest.json").write_text(json.dumps(
        {"schema": "edge-wbc/manifest/1", "models": entries, "ensemble": {"threshold": 0.5}}))


@pytest.fixture
def listener() -> Iterator[int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    yield s.getsockname()[1]
    s.close()


def test_folder_camera(tmp_path: Path) -> None:
    fields = tmp_path / "fields"
    cfg = _cfg(tmp_path, f"[camera]\nsource = 'folder:{fields}'\n")
    assert doctor.check_camera(cfg).status == doctor.FAIL  # missing
    fields.mkdir()
    (fields / "notes.txt").write_text("x")
    row = doctor.check_camera(cfg)
    assert row.status == doctor.FAIL and "no images" in row.detail
    (fields / "a.png").write_bytes(b"\x89PNG")  # truncated: opens, first frame unusable
    row = doctor.check_camera(cfg)
    assert row.status == doctor.WARN and "a.png" in row.detail
    shutil.copy(next((ROOT / "samples" / "fields").glob("*.jpg")), fields / "b.jpg")
    (fields / "a.png").unlink()
    row = doctor.check_camera(cfg)
    assert row.status == doctor.OK and "640x480" in row.detail, row.detail


def test_opencv_camera_that_is_absent_fails(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "[camera]\nsource = 'opencv:/dev/video-none'\n")
    row = doctor.check_camera(cfg)
    assert row.status == doctor.FAIL and "cannot open" in row.detail


def test_models_sha256_and_interpreter(tmp_path: Path) -> None:
    models = tmp_path / "models"
    cfg = _cfg(tmp_path, f"[models]\ndir = '{models}'\n")
    row = doctor.check_models(cfg)
    assert row.status == doctor.FAIL and "manifest.json" in row.detail

    junk = {"seg.tflite": b"not a model", "cls.tflite": b"nor this"}
    _manifest(models, junk, tamper="seg.tflite")
    row = doctor.check_models(cfg)
    assert row.status == doctor.FAIL and "does not match" in row.detail

    _manifest(models, junk)
    assert doctor.check_models(cfg).status == doctor.OK
    # hashes match but the bytes are not a TFLite flatbuffer: the interpreter check catches it
    row = doctor.check_interpreter(cfg)
    assert row.status == doctor.FAIL and "seg.tflite" in row.detail


def test_fixture_models_pass_models_and_interpreter(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, f"[models]\ndir = '{ROOT / 'tests' / 'fixtures' / 'models'}'\n")
    row = doctor.check_models(cfg)
    assert row.status == doctor.OK and "sha256 verified" in row.detail
    row = doctor.check_interpreter(cfg)
    assert row.status == doctor.OK and "models load on the CPU" in row.detail, row.detail


def test_shipped_models_pass(tmp_path: Path) -> None:
    models = ROOT / "models"
    if not (models / "manifest.json").is_file():
        pytest.skip("models/ not built yet")
    cfg = _cfg(tmp_path, f"[models]\ndir = '{models}'\n")
    row = doctor.check_models(cfg)
    assert row.status == doctor.OK and "adaptation anchors verified" in row.detail, row.detail
    row = doctor.check_interpreter(cfg)
    assert row.status == doctor.OK, row.detail


def test_damaged_adaptation_anchors_warn_and_name_the_file(tmp_path: Path) -> None:
    """The station still counts without its anchors (WARN, not FAIL); the fit would refuse."""
    import shutil

    models = tmp_path / "models"
    shutil.copytree(ROOT / "models", models, ignore=shutil.ignore_patterns("*.keras", "*.png"))
    cfg = _cfg(tmp_path, f"[models]\ndir = '{models}'\n")
    (models / "classifier_anchors.npz").write_bytes(b"truncated")
    row = doctor.check_models(cfg)
    assert row.status == doctor.WARN and "classifier_anchors.npz do not match" in row.detail
    (models / "classifier_anchors.npz").unlink()
    row = doctor.check_models(cfg)
    assert row.status == doctor.WARN and "classifier_anchors.npz are missing" in row.detail
    assert "lab adaptation will refuse to fit" in row.detail


def test_edgetpu_absent_warns_or_fails_when_required(tmp_path: Path) -> None:
    if doctor._coral_present():
        pytest.skip("an Edge TPU is plugged into this machine")
    cfg = _cfg(tmp_path, "[models]\naccelerator = 'edgetpu'\n")
    assert doctor.check_accelerator(cfg).status == doctor.WARN
    cfg = _cfg(tmp_path, "[models]\naccelerator = 'edgetpu'\nrequire_accelerator = true\n")
    row = doctor.check_accelerator(cfg)
    assert row.status == doctor.FAIL and "Edge TPU" in row.detail
    assert doctor.check_accelerator(_cfg(tmp_path)).status == doctor.OK  # cpu


def test_disk(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, f"[session]\ndata_dir = '{tmp_path / 'state' / 'sub'}'\n")
    row = doctor.check_disk(cfg, min_free=1, warn_free=2)
    assert row.status == doctor.OK and "not created yet" in row.detail
    row = doctor.check_disk(cfg, min_free=1 << 62)
    assert row.status == doctor.FAIL and "at least" in row.detail


def test_a_read_only_data_dir_fails_and_an_unreadable_one_is_said(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A data_dir on a read-only file system (ProtectSystem=strict outside /var/lib) was
    'OK … READY' while the station refused to start; an unreadable one was a traceback."""
    import os
    import types

    data = tmp_path / "data"
    data.mkdir()
    cfg = _cfg(tmp_path, f"[session]\ndata_dir = '{data}'\n"
               "[lis]\ndelivery = 'mllp'\nhost = '127.0.0.1'\nport = 9\n")
    real = os.statvfs


    def read_only(p: object) -> types.SimpleNamespace:
        st = real(p)  # type: ignore[arg-type]
        fields = {k: getattr(st, k) for k in dir(st) if k.startswith("f_")}
        return types.SimpleNamespace(**{**fields, "f_flag": st.f_flag | os.ST_RDONLY})

    monkeypatch.setattr(os, "statvfs", read_only)
    row = doctor.check_disk(cfg, min_free=1, warn_free=2)
    assert row.status == doctor.FAIL and "read-only file system" in row.detail
    assert "ReadWritePaths=" in row.detail
    monkeypatch.undo()
    real_is_file = Path.is_file

    def denied(self: Path) -> bool:
        if self.parent == data:
            raise PermissionError(13, "Permission denied")
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", denied)
    row = doctor.check_lis(cfg, timeout=0.5)
    assert row.status == doctor.WARN and "sudo -u edge-wbc" in row.detail
    r = CliRunner().invoke(app, ["lis", "status", "--data-dir", str(data)])
    assert r.exit_code == 1 and "cannot read" in r.output and "sudo -u edge-wbc" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_broker_reachable_and_not(tmp_path: Path, listener: int) -> None:
    assert doctor.check_broker(_cfg(tmp_path)).status == doctor.SKIP
    cfg = _cfg(tmp_path, f"[mqtt]\nhost = '127.0.0.1'\nport = {listener}\n")
    assert doctor.check_broker(cfg).status == doctor.OK
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    free_port = s.getsockname()[1]
    s.close()  # nothing listens there now
    cfg = _cfg(tmp_path, f"[mqtt]\nhost = '127.0.0.1'\nport = {free_port}\n")
    row = doctor.check_broker(cfg, timeout=1)
    assert row.status == doctor.WARN and "unreachable" in row.detail


def test_doctor_cli_table_json_and_exit_status(tmp_path: Path, listener: int) -> None:
    fields = tmp_path / "fields"
    fields.mkdir()
    shutil.copy(next((ROOT / "samples" / "fields").glob("*.jpg")), fields / "a.jpg")
    conf = tmp_path / "c.toml"
    conf.write_text(f"[camera]\nsource = 'folder:{fields}'\n[models]\ndir = '{tmp_path / 'none'}'\n"
                    f"[session]\ndata_dir = '{tmp_path}'\n"
                    f"[mqtt]\nhost = '127.0.0.1'\nport = {listener}\n")
    res = runner.invoke(app, ["doctor", "--config", str(conf)])
    assert res.exit_code == 1  # no models: the station cannot run
    rows = re.findall(r"^(\w+) +(OK|WARN|FAIL|SKIP) ", res.output, re.M)
    lines = {k: v for k, v in rows if k in ("config", "camera", "models", "disk", "broker")}
    assert lines == {"config": "OK", "camera": "OK", "models": "FAIL", "disk": "OK", "broker": "OK"}
    assert "NOT READY: models" in res.output

    res = runner.invoke(app, ["doctor", "--config", str(conf), "--only", "camera", "--only",
                              "broker", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["ok"] and [c["name"] for c in data["checks"]] == ["config", "camera", "broker"]

    res = runner.invoke(app, ["doctor", "--config", str(conf), "--only", "kamera"])
    assert res.exit_code == 2


def test_doctor_with_broken_config_exits_nonzero(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("[camera]\nwidht = 3\n")
    res = runner.invoke(app, ["doctor", "--config", str(conf)])
    assert res.exit_code == 1
    assert f"{conf}:2: camera.widht" in res.output


def test_check_config_cli(tmp_path: Path) -> None:
    res = runner.invoke(app, ["check-config", str(ROOT / "edge_wbc" / "config.example.toml")])
    assert res.exit_code == 0 and res.output.strip().endswith(": OK")
    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt]\nport = 'x'\nkeepalive = 1\n[station]\nqueue_max = 0\n")
    res = runner.invoke(app, ["check-config", str(bad)])
    assert res.exit_code == 1
    for ln in (f"{bad}:2: mqtt.port", f"{bad}:3: mqtt.keepalive", f"{bad}:5: station.queue_max"):
        assert ln in res.output
    res = runner.invoke(app, ["check-config", str(ROOT / "edge_wbc" / "config.example.toml"),
                              "--show"], env={"EDGE_WBC_MQTT_PASSWORD": "pw",
                                              "EDGE_WBC_MQTT_USERNAME": "u"})
    assert res.exit_code == 0 and 'password = "***"' in res.output and "pw\"" not in res.output


def test_a_configured_adaptation_the_station_cannot_load_fails_the_models_check(
    tmp_path: Path,
) -> None:
    """The station refuses to start with it (exit 2): doctor must not say READY."""
    import numpy as np

    from edge_wbc.pipeline import adaptation as A

    models = ROOT / "models"
    man = json.loads((models / "manifest.json").read_text())
    ce = next(m for m in man["models"] if m["name"] == "classifier")
    K = len(ce["classes"])
    base = A.BaseHead(tuple(ce["classes"]), np.zeros((K, 1280)), np.zeros(K), 1.0, 0.9, 0.9,
                      ce["sha256"])  # fmt: skip
    fit = A.FitResult(
        accepted=True, reason="test", method="pull 1", W=base.W, b=base.b, temperature=1.0,
        confidence_threshold=0.9, other_threshold=0.9, cells={}, too_few={}, validation={},
        seconds=0.0,
    )  # fmt: skip
    ad = A.write_adaptation(tmp_path / "lab", fit, base)
    cfg = _cfg(tmp_path, f"[models]\ndir = '{models}'\nadaptation = '{ad.path}'\n")
    row = doctor.check_models(cfg)
    assert row.status == doctor.OK and f"lab adaptation {ad.id} verified" in row.detail, row.detail
    with (ad.path / "head.npz").open("ab") as f:
        f.write(b"x")
    row = doctor.check_models(cfg)
    assert row.status == doctor.FAIL and "head.npz" in row.detail, row.detail
    assert "[models] adaptation" in row.detail and "will not start" in row.detail
    cfg = _cfg(tmp_path, f"[models]\ndir = '{models}'\nadaptation = '{tmp_path / 'none'}'\n")
    assert doctor.check_models(cfg).status == doctor.FAIL
    other = A.BaseHead(base.classes, base.W, base.b, 1.0, 0.9, 0.9, "e" * 64)
    ad2 = A.write_adaptation(tmp_path / "lab2", fit, other)
    cfg = _cfg(tmp_path, f"[models]\ndir = '{models}'\nadaptation = '{ad2.path}'\n")
    row = doctor.check_models(cfg)
    assert row.status == doctor.FAIL and "made for classifier" in row.detail, row.detail
