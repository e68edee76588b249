"""The station page's "Measure magnification", by keyboard, over the real FieldAnalyzer and the
shipped models: a microscope of half BCCD's magnification (fields shrunk to 0.5x, tiled to the
640x480 frame) is measured, the diameter accepted, and the next field is analysed with it;
then reset to the config's. A screenshot goes to artefacts/.

Needs Chromium and the playwright package; skipped without them unless
EDGE_WBC_REQUIRE_BROWSER=1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from station_fakes import RunningStation
from test_station_browser import CHROMIUM, CHROMIUM_ARGS, SAMPLES, _require_browser, _shot

from edge_wbc.config import load_config
from edge_wbc.pipeline.imageio import read_image

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]


def _half_folder(d: Path, n: int = 6) -> Path:
    d.mkdir()
    for p in sorted(SAMPLES.glob("*.jpg"))[:n]:
        rgb = read_image(p)
        h, w = rgb.shape[:2]
        small = cv2.resize(rgb, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(d / p.with_suffix(".png").name),
                    cv2.cvtColor(np.tile(small, (2, 2, 1)), cv2.COLOR_RGB2BGR))
    return d


def test_measure_accept_and_reset_by_keyboard(tmp_path: Path) -> None:
    _require_browser()
    from playwright.sync_api import sync_playwright

    from edge_wbc.pipeline.analysis import FieldAnalyzer
    from edge_wbc.station.magnification import FILE, Magnification, config_rule

    cfg = load_config(None)
    analyzer = FieldAnalyzer(threads=1)
    config_px = cfg.postprocess.cell_diameter_px
    assert analyzer.params.cell_diameter_px == config_px
    rs = RunningStation(tmp_path / "data", f"folder:{_half_folder(tmp_path / 'half')}",
                        target=100, analyzer=analyzer)
    rs.server.magnification = Magnification(analyzer, rs.station, config_px,
                                            rs.store.data_dir, config_rule(cfg))
    rs.station.info["measurable"] = True
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            pg = browser.new_page(viewport={"width": 800, "height": 480})
            errors: list[str] = []
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            pg.goto(rs.url + "/", wait_until="domcontentloaded")
            pg.wait_for_function("() => window.__counted === 0")
            pg.wait_for_selector("#tab-lab:not([hidden])")
            for n in (1, 2):
                pg.keyboard.press("Space")
                pg.wait_for_function("() => document.getElementById('field-no').textContent"
                                     f".startsWith('#{n} ')", timeout=30000)
                rs.wait_idle(30)
            pg.keyboard.press("m")
            pg.wait_for_selector("#dlg-lab[open] #mag:not([hidden])")
            pg.wait_for_function("() => document.getElementById('mag-current').textContent"
                                 f".includes('{round(config_px)} px')")
            assert pg.evaluate("document.activeElement.id") == "mag-measure"
            pg.keyboard.press("Enter")
            pg.wait_for_selector("#mag-accept", timeout=60000)
            shown = pg.locator("#mag-result").inner_text()
            assert "Red cells" in shown and "2 of the 2 last field(s) of this slide" in shown
            m = rs.server.magnification.last
            px = round(m["leukocyte_px"])
            # Half the magnification: about half the config's BCCD diameter.
            assert 0.35 * config_px <= px <= 0.6 * config_px, m
            assert pg.evaluate("document.activeElement.id") == "mag-accept"
            _shot(pg, "magnification")
            pg.keyboard.press("Enter")
            pg.wait_for_function("() => document.getElementById('mag-px').textContent"
                                 f" === '{px} px'")
            assert analyzer.params.cell_diameter_px == px
            assert (rs.store.data_dir / FILE).is_file()
            pg.keyboard.press("Escape")
            pg.wait_for_selector("#dlg-lab", state="hidden")
            pg.keyboard.press("Space")
            pg.wait_for_function("() => document.getElementById('field-no').textContent"
                                 ".startsWith('#3 ')", timeout=30000)
            rs.wait_idle(30)
            last = pg.evaluate("fetch('/api/fields/last').then((r) => r.json())")
            assert last["models"]["cell_diameter_px"] == px
            assert [e["payload"]["cell_diameter_px"] for e in rs.store.events()
                    if e["action"] == "magnification"] == [px]
            pg.keyboard.press("m")
            pg.wait_for_selector("#mag-reset:not([disabled])")
            pg.click("#mag-reset")
            pg.wait_for_function("() => document.getElementById('mag-px').textContent"
                                 f" === '{round(config_px)} px'")
            assert analyzer.params.cell_diameter_px == config_px
            assert not (rs.store.data_dir / FILE).exists()
            browser.close()
            assert not errors, errors
    finally:
        rs.close()
