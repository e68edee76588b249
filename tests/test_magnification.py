"""The station's "Measure magnification": measured on real BCCD fields (640x480, leukocytes
~170 px, red cells ~100 px), accepted for the next field, audited, kept over a restart, reset;
and its HTTP routes, which answer bad input with a 4xx and a reason."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from station_fakes import FakeAnalyzer, RunningStation
from test_station_api import capture, jreq

from edge_wbc.config import load_config
from edge_wbc.counting.reports import build_report, render_html
from edge_wbc.pipeline.imageio import read_image
from edge_wbc.pipeline.postprocess import PostprocessParams
from edge_wbc.pipeline.results import FieldResult
from edge_wbc.station.magnification import (
    FILE,
    BadDiameter,
    Magnification,
    MagnificationRefused,
    config_rule,
)

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "fields"
CONFIG_PX = 170.0


class DiameterAnalyzer(FakeAnalyzer):
    """The fake analyzer with the real one's settings: records the diameter each field used."""

    def __init__(self) -> None:
        super().__init__()
        self.params = PostprocessParams(cell_diameter_px=CONFIG_PX)
        self.used: list[float] = []

    def analyze(self, rgb: np.ndarray, path: str = "") -> FieldResult:
        params = self.params  # read once, as FieldAnalyzer.analyze does
        self.used.append(params.cell_diameter_px)
        return super().analyze(rgb, path)

    def describe(self) -> dict[str, Any]:
        return {"manifest": "test", "models": [], "cell_diameter_px": self.params.cell_diameter_px}


def _station(tmp_path: Path, source: str, name: str = "data") -> tuple[RunningStation,
                                                                        Magnification]:
    rs = RunningStation(tmp_path / name, source, target=100, analyzer=DiameterAnalyzer())
    mag = Magnification(rs.analyzer, rs.station, CONFIG_PX, rs.store.data_dir,
                        config_rule(load_config(None)))
    rs.server.magnification = mag
    return rs, mag


def _folder(tmp_path: Path, name: str, half: bool, n: int = 8) -> Path:
    """BCCD fields, or (``half``) a microscope of half the magnification at the same 640x480
    frame: each field shrunk to 0.5x, tiled 2x2 (a camera frame is always the analysis size)."""
    d = tmp_path / name
    d.mkdir()
    for p in sorted(SAMPLES.glob("*.jpg"))[:n]:
        rgb = read_image(p)
        if half:
            h, w = rgb.shape[:2]
            small = cv2.resize(rgb, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
            rgb = np.tile(small, (2, 2, 1))
        cv2.imwrite(str(d / p.with_suffix(".png").name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return d


def test_measures_the_camera_before_any_field_and_half_size_fields_half(tmp_path: Path) -> None:
    full = _folder(tmp_path, "full", False)
    half = _folder(tmp_path, "half", True)
    rs, mag = _station(tmp_path, f"folder:{full}")
    try:
        m = mag.measure()
        assert m["source"].endswith("from the camera") and m["fields"] == 3
        # BCCD: red cells ~100 px, so leukocytes ~150-175 px (the default, 170, is BCCD's).
        assert 85 <= m["red_cell_px"] <= 115 and 135 <= m["leukocyte_px"] <= 185
        assert m["current_px"] == CONFIG_PX and m["config_px"] == CONFIG_PX
        assert rs.source.position == 0  # the replay was put back: those fields still count
        assert rs.analyzer.params.cell_diameter_px == CONFIG_PX  # measuring changes nothing
    finally:
        rs.close()
    rs, mag = _station(tmp_path, f"folder:{half}", "data-half")
    try:
        h = mag.measure()
        assert 0.42 <= h["leukocyte_px"] / m["leukocyte_px"] <= 0.58, (h, m)
    finally:
        rs.close()


def test_measures_the_open_slides_fields_then_earlier_slides(tmp_path: Path) -> None:
    rs, mag = _station(tmp_path, f"folder:{SAMPLES}")
    try:
        capture(rs, 4)
        m = mag.measure()
        assert m["source"] == "4 last field(s) of this slide" and m["fields"] == 4
        rs.session.new_slide("S2", None, abandon=True)
        m2 = mag.measure()
        assert m2["source"] == "4 last field(s) of earlier slides"
        assert m2["leukocyte_px"] == m["leukocyte_px"]
    finally:
        rs.close()


def test_refused_on_fields_without_red_cells(tmp_path: Path) -> None:
    d = tmp_path / "blank"
    d.mkdir()
    for i in range(3):
        cv2.imwrite(str(d / f"{i}.png"), np.full((480, 640, 3), 225, np.uint8))
    rs, mag = _station(tmp_path, f"folder:{d}")
    try:
        with pytest.raises(MagnificationRefused, match="too few red cells"):
            mag.measure()
        assert mag.last is None
    finally:
        rs.close()


def test_accept_counts_the_next_field_audits_and_survives_a_restart(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    half = _folder(tmp_path, "half", True)
    rs, mag = _station(tmp_path, f"folder:{half}")
    try:
        capture(rs, 1)
        m = mag.measure()
        px = round(m["leukocyte_px"])
        shown = mag.accept(px)
        assert shown["cell_diameter_px"] == px and shown["saved"]["measured"] == m
        capture(rs, 1)
        assert rs.analyzer.used == [CONFIG_PX, px]  # the next field is analysed with it
        f = rs.store.fields(rs.session.slide["id"])
        assert [x["models"]["cell_diameter_px"] for x in f] == [CONFIG_PX, px]
        # The open slide's state names what counts its next field, not its start's value.
        assert rs.session.state()["models"]["cell_diameter_px"] == px
        # The report names each diameter with its fields, as it does lab adaptations.
        rep = build_report(rs.session.slide, rs.session.state(), [], f, "2026-01-01T00:00:00Z")
        assert rep["cell_diameters"] == [{"cell_diameter_px": CONFIG_PX, "fields": 1},
                                         {"cell_diameter_px": px, "fields": 1}]
        html = render_html(rep, [], rs.store.data_dir)
        assert f"cell diameter {CONFIG_PX:g} px" in html and f"cell diameter {px:g} px" in html
        ev = [e for e in rs.store.events() if e["action"] == "magnification"]
        assert len(ev) == 1 and ev[0]["payload"]["cell_diameter_px"] == px
        assert ev[0]["payload"]["previous_px"] == CONFIG_PX
        assert ev[0]["payload"]["measured"]["red_cell_px"] == m["red_cell_px"]
        saved = json.loads((rs.store.data_dir / FILE).read_text())
        assert saved["cell_diameter_px"] == px
    finally:
        rs.close()
    # A restart: the config still says 170, the station's accepted value wins and the log says so.
    rs, mag = _station(tmp_path, f"folder:{half}")
    try:
        with caplog.at_level(logging.INFO, logger="edge_wbc.station.magnification"):
            assert mag.restore() is None
        assert rs.analyzer.params.cell_diameter_px == px
        assert rs.session.models["cell_diameter_px"] == px
        assert f"overrides the config's {CONFIG_PX:g} px" in caplog.text
        shown = mag.reset()
        assert shown["cell_diameter_px"] == CONFIG_PX and shown["saved"] is None
        assert not (rs.store.data_dir / FILE).exists()
        capture(rs, 1)
        assert rs.analyzer.used[-1] == CONFIG_PX
        ev = [e for e in rs.store.events() if e["action"] == "magnification"]
        assert ev[-1]["payload"]["cell_diameter_px"] == CONFIG_PX
        assert ev[-1]["payload"]["how"] == "reset to the config's value"
    finally:
        rs.close()


@pytest.mark.parametrize("value", [3, 1e9, "85", True, None, float("nan"), [85]])
def test_accept_refuses_what_the_config_would_refuse(tmp_path: Path, value: Any) -> None:
    rs, mag = _station(tmp_path, f"folder:{SAMPLES}")
    try:
        with pytest.raises(BadDiameter, match="cell_diameter_px"):
            mag.accept(value)
        assert rs.analyzer.params.cell_diameter_px == CONFIG_PX
        assert not (rs.store.data_dir / FILE).exists()
        assert not [e for e in rs.store.events() if e["action"] == "magnification"]
    finally:
        rs.close()


def test_unusable_saved_value_keeps_the_config(tmp_path: Path) -> None:
    rs, mag = _station(tmp_path, f"folder:{SAMPLES}")
    try:
        (rs.store.data_dir / FILE).write_text('{"cell_diameter_px": 1}')
        problem = mag.restore()
        assert problem and "minimum" in problem and "config's" in problem
        (rs.store.data_dir / FILE).write_text("{not json")
        assert "cannot be used" in (mag.restore() or "")
        assert rs.analyzer.params.cell_diameter_px == CONFIG_PX
    finally:
        rs.close()


def test_api(tmp_path: Path) -> None:
    rs = RunningStation(tmp_path / "plain", f"folder:{SAMPLES}")
    try:
        status, body = jreq(rs.url + "/api/magnification")
        assert status == 404 and "magnification" in body["error"]
        status, body = jreq(rs.url + "/api/magnification/measure", "POST")
        assert status == 404
    finally:
        rs.close()
    rs, _ = _station(tmp_path, f"folder:{SAMPLES}")
    try:
        status, s = jreq(rs.url + "/api/magnification")
        assert status == 200 and s["cell_diameter_px"] == CONFIG_PX and s["saved"] is None
        capture(rs, 2)
        status, m = jreq(rs.url + "/api/magnification/measure", "POST")
        assert status == 200 and m["fields"] == 2 and m["leukocyte_px"] > 100
        for bad in ({}, {"cell_diameter_px": "big"}, {"cell_diameter_px": -1},
                    {"cell_diameter_px": None}, {"cell_diameter_px": 5000}):
            status, body = jreq(rs.url + "/api/magnification/accept", "POST", bad)
            assert status == 400 and "cell_diameter_px" in body["error"], (bad, body)
        status, body = jreq(rs.url + "/api/magnification/accept", "POST",
                            {"cell_diameter_px": 120})
        assert status == 200 and body["cell_diameter_px"] == 120
        capture(rs, 1)
        status, f = jreq(rs.url + "/api/fields/last")
        assert f["models"]["cell_diameter_px"] == 120 and rs.analyzer.used[-1] == 120
        status, body = jreq(rs.url + "/api/magnification/reset", "POST")
        assert status == 200 and body["cell_diameter_px"] == CONFIG_PX
    finally:
        rs.close()
    d = tmp_path / "blank"
    d.mkdir()
    cv2.imwrite(str(d / "0.png"), np.full((480, 640, 3), 225, np.uint8))
    rs, _ = _station(tmp_path, f"folder:{d}", "blank-data")
    try:
        status, body = jreq(rs.url + "/api/magnification/measure", "POST")
        assert status == 409 and "too few red cells" in body["error"]
    finally:
        rs.close()


@pytest.fixture(scope="module")
def fuzz_station(tmp_path_factory: pytest.TempPathFactory):
    rs, _ = _station(tmp_path_factory.mktemp("fuzz-mag"), f"folder:{SAMPLES}")
    yield rs
    rs.close()


_values = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
           | st.lists(st.integers(), max_size=2))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(path=st.sampled_from(["/api/magnification/accept", "/api/magnification/reset"]),
       body=st.dictionaries(st.sampled_from(["cell_diameter_px", "x"]), _values, max_size=2)
       | _values)
def test_routes_answer_any_json_with_a_4xx_and_a_reason(fuzz_station: RunningStation,
                                                         path: str, body: Any) -> None:
    status, answer = jreq(fuzz_station.url + path, "POST", body)
    assert status in (200, 400), (status, answer)
    if status == 400:
        assert answer["error"] and answer["status"] == 400
    else:
        assert 4.0 <= answer["cell_diameter_px"] <= 2000.0
    px = fuzz_station.analyzer.params.cell_diameter_px
    assert 4.0 <= px <= 2000.0 and px == px  # never NaN, always within the config's range
