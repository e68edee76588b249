"""A blast assigned in review, in headless Chromium: the lab's flag shows on the page, is written
in the report and reaches central monitoring over MQTT (a real Mosquitto).

Needs Chromium, the playwright package and Mosquitto; skipped without them unless
EDGE_WBC_REQUIRE_BROWSER=1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mqtt_support import Collector, Mosquitto, settings, wait_for
from station_fakes import RunningStation
from test_station_browser import CHROMIUM, CHROMIUM_ARGS, SAMPLES, _require_browser, _shot

from edge_wbc import taxonomy
from edge_wbc.comms.mqtt import MqttPublisher

pytestmark = [pytest.mark.browser, pytest.mark.broker, pytest.mark.timeout(180)]
T = "edge-wbc/bench-7"


def test_blast_in_review_flags_page_report_and_mqtt(broker: Mosquitto, tmp_path: Path) -> None:
    _require_browser()
    from playwright.sync_api import expect, sync_playwright

    formula = taxonomy.formula_or_raise(preset="ru", flags=["blast > 0", "eosinophil > 50%"])
    data = tmp_path / "data"
    col = Collector(broker.port, f"{T}/#").wait_subscribed()
    rs: RunningStation | None = None
    pub: MqttPublisher | None = None
    try:
        # Wired as `edge-wbc station` wires it: the store writes the outbox in each count's
        # transaction, the publisher drains it and listens to the session's events.
        rs = RunningStation(data, f"folder:{SAMPLES}", target=4, formula=formula, mqtt=True)
        pub = MqttPublisher(settings(broker.port, "bench-7"), rs.store.db_path,
                            state_provider=rs.session.state).start()
        rs.fanout.subscribe(pub.publish)
        wait_for(lambda: pub.connected, 10, "station connected to the broker")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            pg = browser.new_page(viewport={"width": 1280, "height": 800})
            errors: list[str] = []
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.goto(rs.url + "/", wait_until="domcontentloaded")
            pg.wait_for_function("() => window.__counted === 0")
            expect(pg.locator("#formula-name")).to_have_text("ru")
            expect(pg.locator("#flags")).to_be_hidden()
            for _ in range(12):
                if rs.session.state()["complete"]:
                    break
                before = int(pg.locator("#counted").inner_text())
                pg.click("#capture")
                pg.wait_for_function(f"() => window.__counted > {before}", timeout=10000)
            assert rs.session.state()["complete"]

            # Review: the first cell becomes a blast through the "Other class…" list (a class
            # only a technician assigns); unidentified cells become lymphocytes with key 7
            # (ru's seventh row).
            pg.click("#tab-review")
            pg.wait_for_selector(".cell.sel")
            # ru has nine rows: keys 1-9 (then Confirm C, Reject X, Undo U and In field F).
            assert pg.locator("#insp-actions button kbd").count() == 9 + 4
            cid = pg.locator(".cell.sel").get_attribute("data-id")
            pg.select_option("#insp-more", "blast")
            pg.wait_for_function("() => window.__reviewsPending === 0", timeout=10000)
            assert rs.session.cells[cid]["reviewed_label"] == "blast"
            while rs.session.state()["unidentified"]:
                pg.click(".filters button[data-filter=unidentified]")
                pg.wait_for_selector(".cell.sel")
                pg.keyboard.press("7")
                pg.wait_for_function("() => window.__reviewsPending === 0", timeout=10000)
            pg.keyboard.press("Escape")

            # The page: the flag, and the blast's own row in the formula.
            expect(pg.locator("#flags")).to_be_visible()
            expect(pg.locator("#flags [data-flag=blast]")).to_have_text("⚑ Blast: 1 (blast > 0)")
            expect(pg.locator("#formula-body tr[data-label=blast] td.n").first).to_have_text("1")
            _shot(pg, "formula-blast-flag")

            # MQTT: the retained differential carries the formula and the flag.
            def blast_flagged() -> bool:
                m = col.last(f"{T}/differential")
                return m is not None and [f["rule"] for f in m.json().get("flags", [])] == [
                    "blast > 0"]

            wait_for(blast_flagged, 10, "the blast flag in the MQTT differential")
            diff = col.last(f"{T}/differential").json()
            assert diff["schema"] == "edge-wbc/mqtt/2" and diff["formula"]["name"] == "ru"
            cell_msgs = [m.json() for m in col.on(f"{T}/cell")]
            assert any(m["cell_id"] == cid and m["reviewed_label"] == "blast"
                       and m["group"] == "abnormal_wbc" for m in cell_msgs)

            # The report: finalise on the page, then read what it wrote.
            pg.wait_for_selector("#banner-finalise:not([disabled])")
            pg.click("#banner-finalise")
            pg.wait_for_selector("#banner.final")
            page = pg.request.get(rs.url + "/api/slide/report.html")
            assert page.ok and "Blast: 1 (blast &gt; 0)" in page.text()
            rep = json.loads(pg.request.get(rs.url + "/api/slide/report.json").text())
            assert [f["rule"] for f in rep["flags"]] == ["blast > 0"]
            assert {r["label"]: r["count"] for r in rep["differential"]}["blast"] == 1
            wait_for(lambda: any(m.json().get("action") == "finalised"
                                 and m.json()["report"]["flags"][0]["rule"] == "blast > 0"
                                 for m in col.on(f"{T}/slide")), 10, "finalised slide event")
            browser.close()
            assert not errors, errors
    finally:
        if pub is not None:
            pub.stop()
        col.close()
        if rs is not None:
            rs.close()
