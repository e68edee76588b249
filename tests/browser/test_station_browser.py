"""The station page in headless Chromium, driven like a technician would: capture until the
target, reclassify one cell, reject one, resolve the unidentified, finalise, download the report.
A screenshot of each stage is kept under artefacts/ for CI.

Needs Chromium (Debian package, /usr/bin/chromium) and the playwright Python package; skipped
without them unless EDGE_WBC_REQUIRE_BROWSER=1 (CI sets it, so a missing browser fails there).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from station_fakes import RunningStation

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "fields"
ARTEFACTS = ROOT / "artefacts"
CHROMIUM = os.environ.get("EDGE_WBC_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.browser


def _require_browser() -> None:
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install playwright)")
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    if missing:
        msg = "browser test needs " + " and ".join(missing)
        if os.environ.get("EDGE_WBC_REQUIRE_BROWSER") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture()
def page(tmp_path: Path):
    _require_browser()
    from playwright.sync_api import sync_playwright

    rs = RunningStation(tmp_path / "data", f"folder:{SAMPLES}", target=20)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        ctx = browser.new_context(viewport={"width": 800, "height": 480}, accept_downloads=True)
        pg = ctx.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        # The server's Content-Security-Policy must allow everything the page does.
        pg.on("console", lambda m: errors.append(m.text)
              if "Content Security Policy" in m.text else None)
        pg.goto(rs.url + "/", wait_until="domcontentloaded")
        pg.rs = rs  # type: ignore[attr-defined]
        pg.errors = errors  # type: ignore[attr-defined]
        try:
            yield pg
        finally:
            browser.close()
            rs.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _shot(pg, name: str) -> None:
    ARTEFACTS.mkdir(exist_ok=True)
    pg.screenshot(path=str(ARTEFACTS / f"station-{name}.png"))


def _counted(pg) -> int:
    return int(pg.locator("#counted").inner_text())


def test_technician_flow(page) -> None:
    pg, rs = page, page.rs
    pg.wait_for_function("() => window.__counted === 0")
    assert pg.locator("#capture").is_enabled()
    # The inputs' bounds are the station's rules, not copies in the HTML.
    from edge_wbc.inputs import MAX_SAMPLE_ID_CHARS, MAX_TARGET

    assert pg.eval_on_selector("#target-custom", "e => e.max") == str(MAX_TARGET)
    for sel in ("#new-sample", "#sample-input"):
        assert pg.eval_on_selector(sel, "e => e.maxLength") == MAX_SAMPLE_ID_CHARS

    # Capture with the on-screen button and the space bar until the target is reached.
    n = 0
    while not pg.locator("#banner:not([hidden])").is_visible():
        before = _counted(pg)
        if n % 2:
            pg.keyboard.press("Space")
        else:
            pg.click("#capture")
        pg.wait_for_function(f"() => window.__counted > {before}", timeout=10000)
        n += 1
        assert n < 40, "target never reached"
    pg.wait_for_selector("#field-svg rect")
    assert "Target reached" in pg.locator("#banner-title").inner_text()
    assert pg.locator("#capture").is_disabled()
    state = rs.session.state()
    assert _counted(pg) == state["counted"] >= 20
    # The formula on the page is the session's formula.
    for row in state["classes"]:
        tr = pg.locator(f"#formula-body tr[data-label={row['label']}]")
        assert tr.locator("td.n").first.inner_text() == str(row["count"])
    _shot(pg, "target-reached")

    # Review: the unidentified cells come first; resolve them with the keyboard.
    pg.click("#tab-review")
    pg.wait_for_selector(".cell")
    for _ in range(state["unidentified"]):
        pg.click(".filters button[data-filter=unidentified]")
        pg.wait_for_selector(".cell.sel")
        before = rs.session.state()["counts"]["lymphocyte"]
        pg.keyboard.press("4")  # lymphocyte
        _settle(pg)
        assert rs.session.state()["counts"]["lymphocyte"] == before + 1
    assert rs.session.state()["unidentified"] == 0

    # Reclassify one neutrophil as a monocyte by click.
    pg.click(".filters button[data-filter=neutrophil]")
    pg.wait_for_selector(".cell.sel")
    cid = pg.locator(".cell.sel").get_attribute("data-id")
    mono = rs.session.state()["counts"]["monocyte"]
    pg.click("#insp-actions button[data-action=monocyte]")
    _settle(pg)
    assert rs.session.state()["counts"]["monocyte"] == mono + 1
    cell = rs.session.cells[cid]
    assert cell["label"] == "neutrophil" and cell["reviewed_label"] == "monocyte"

    # Reject one (counted twice) through the dialog.
    pg.click(".filters button[data-filter=lymphocyte]")
    pg.wait_for_selector(".cell.sel")
    rid = pg.locator(".cell.sel").get_attribute("data-id")
    pg.click("#insp-actions button[data-action=reject]")
    pg.click("#dlg-reject button[value=counted_twice]")
    pg.locator("#toast", has_text="Cell rejected").wait_for()
    _settle(pg)
    assert rs.session.cells[rid]["reviewed_label"] == "rejected"
    assert rs.session.cells[rid]["review_reason"] == "counted_twice"
    _shot(pg, "review")

    # The rejection took the count below the target: one more capture, then finalise.
    pg.keyboard.press("Escape")
    if not rs.session.state()["complete"]:
        before = _counted(pg)
        pg.click("#capture")
        pg.wait_for_function(f"() => window.__counted > {before}", timeout=10000)
        s = rs.session.state()
        if s["unidentified"]:
            for c in list(rs.session.cells.values()):
                if c["label"] == "unidentified" and not c["reviewed_label"]:
                    rs.session.review(c["id"], "neutrophil")
    pg.wait_for_selector("#banner-finalise:not([disabled])")
    pg.click("#banner-finalise")
    pg.wait_for_selector("#banner.final")
    assert "finalised" in pg.locator("#banner-title").inner_text()
    assert pg.locator("#capture").is_disabled()
    _shot(pg, "finalised")

    # Download the report from the slide dialog.
    pg.click("#tab-slide")
    with pg.expect_download() as dl:
        pg.click("#report-links a:has-text('JSON')")
    path = dl.value.path()
    rep = json.loads(Path(path).read_text())
    assert rep["counted"] == rs.session.state()["counted"]
    changes = {c["cell_id"]: c for c in rep["reviewed_changes"]}
    assert changes[cid]["reviewed_label"] == "monocyte"
    assert changes[rid]["reviewed_label"] == "rejected"
    with pg.expect_download() as dl:
        pg.click("#report-links a:has-text('CSV')")
    assert Path(dl.value.path()).read_text().startswith("sample_id,slide_id")
    html = pg.request.get(rs.url + "/api/slide/report.html")
    assert html.ok and "Leukocyte differential" in html.text()
    _shot(pg, "slide-dialog")


def _settle(pg) -> None:
    """Wait until the page has finished its review request and redrawn the gallery."""
    pg.wait_for_function("() => window.__reviewsPending === 0", timeout=10000)


def test_desktop_layout_and_new_slide(page) -> None:
    pg, rs = page, page.rs
    pg.set_viewport_size({"width": 1440, "height": 900})
    pg.wait_for_function("() => window.__counted === 0")
    for _ in range(3):
        before = _counted(pg)
        pg.click("#capture")
        pg.wait_for_function(f"() => window.__counted > {before}", timeout=10000)
    pg.wait_for_selector("#field-svg rect")
    _shot(pg, "desktop")
    # A full disk: the page says the field was not counted; the count stays.
    from playwright.sync_api import expect

    counted = _counted(pg)
    rs.store.min_free_bytes = 1 << 62
    pg.click("#capture")
    expect(pg.locator("#alert")).to_be_visible()
    expect(pg.locator("#alert-text")).to_contain_text("not counted")
    assert _counted(pg) == counted == rs.session.state()["counted"]
    rs.store.min_free_bytes = 0
    pg.click("#alert-close")
    expect(pg.locator("#alert")).to_be_hidden()
    # New slide with a scanned sample id; the open slide must be explicitly abandoned.
    pg.click("#tab-slide")
    pg.fill("#new-sample", "H-2026-0815")
    pg.click("#btn-new")
    expect(pg.locator("#dlg-err")).to_contain_text("abandon")
    pg.check("#new-abandon")
    pg.click("#btn-new")
    pg.wait_for_function("() => document.getElementById('sample-id').textContent === 'H-2026-0815'")
    assert _counted(pg) == 0 and rs.session.state()["sample_id"] == "H-2026-0815"


@pytest.mark.skipif(not (ROOT / "models" / "manifest.json").is_file(),
                    reason="no shipped models yet")
def test_with_shipped_models(tmp_path: Path) -> None:
    """The same page over the real FieldAnalyzer and the shipped models: capture to a target of
    15, resolve what the classifier left unidentified with the keyboard, finalise."""
    _require_browser()
    from playwright.sync_api import expect, sync_playwright

    from edge_wbc.pipeline.analysis import FieldAnalyzer

    analyzer = FieldAnalyzer(ROOT / "models", threads=2)
    rs = RunningStation(tmp_path / "data", f"folder:{SAMPLES}", target=15, analyzer=analyzer)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            pg = browser.new_page(viewport={"width": 800, "height": 480})
            errors: list[str] = []
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.on("console", lambda m: errors.append(m.text)
                  if "Content Security Policy" in m.text else None)
            pg.goto(rs.url + "/", wait_until="domcontentloaded")
            pg.wait_for_function("() => window.__counted === 0")
            for _ in range(40):
                if rs.session.state()["complete"]:
                    break
                fields = rs.session.state()["fields"]
                pg.keyboard.press("Space")
                deadline = time.monotonic() + 20
                while rs.session.state()["fields"] == fields:
                    assert time.monotonic() < deadline, "capture was not analysed"
                    time.sleep(0.02)
                rs.wait_idle(20)
            s = rs.session.state()
            assert s["complete"] and s["counted"] >= 15
            expect(pg.locator("#counted")).to_have_text(str(s["counted"]))
            pg.click("#tab-review")
            pg.wait_for_selector(".cell")
            while rs.session.state()["unidentified"]:
                pg.click(".filters button[data-filter=unidentified]")
                pg.wait_for_selector(".cell.sel")
                pg.keyboard.press("1")
                _settle(pg)
            pg.keyboard.press("Escape")
            pg.wait_for_selector("#banner-finalise:not([disabled])")
            pg.click("#banner-finalise")
            pg.wait_for_selector("#banner.final")
            _shot(pg, "shipped-models")
            browser.close()
            assert not errors, errors
        assert rs.session.slide["status"] == "finalised"
        shas = [m["sha256"] for m in rs.session.state()["models"]["models"]]
        assert shas and all(len(x) == 64 and x != "0" * 64 for x in shas)
    finally:
        rs.close()


def test_lis_state_on_the_page(page, tmp_path: Path) -> None:
    """The LIS hand-off as the technician sees it: a finalised slide waiting for a LIS that is
    down, then delivered once it is back (real delivery thread logic, real MLLP listener)."""
    from lis_peers import MllpPeer, free_port

    from edge_wbc.comms.lis.delivery import LisDelivery
    from edge_wbc.config import load_config
    from edge_wbc.counting.events import Event
    from edge_wbc.counting.session import effective_label

    pg, rs = page, page.rs
    port = free_port()
    cfg = load_config(None, env={"HOME": str(tmp_path), "EDGE_WBC_LIS_DELIVERY": "mllp",
                                 "EDGE_WBC_LIS_HOST": "127.0.0.1", "EDGE_WBC_LIS_PORT": str(port),
                                 "EDGE_WBC_LIS_TIMEOUT_S": "0.5", "EDGE_WBC_LIS_RETRY_S": "1"})
    d = LisDelivery(cfg.lis, rs.store.db_path, rs.store.data_dir,
                    on_change=lambda: rs.fanout(Event("status", rs.station.status())))
    rs.store.add_transaction_hook(d.hook)
    rs.station.extra_status = lambda: {"lis": d.status()}
    for _ in range(3):
        rs.station.capture("test")
        rs.wait_idle()
    for c in list(rs.session.cells.values()):
        if effective_label(c) == "unidentified":
            rs.session.review(c["id"], "lymphocyte")
    rs.session.set_target(rs.session.state()["counted"])
    rs.session.finalise()
    d.run_once()
    line = pg.locator("#status-line")
    pg.wait_for_function("() => document.getElementById('status-line').textContent"
                         ".includes('LIS unreachable · 1 report waiting')")
    assert "cannot connect to the LIS" in (line.get_attribute("title") or "")
    _shot(pg, "lis-unreachable")
    peer = MllpPeer(port).start()
    try:
        deadline = time.monotonic() + 10
        while not peer.acked:
            assert time.monotonic() < deadline, d.status()
            d.run_once()
            time.sleep(0.1)
        pg.wait_for_function("() => document.getElementById('status-line').textContent"
                             ".includes('LIS ✓')")
    finally:
        d.stop()
        peer.close()
