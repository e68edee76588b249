"""Reviews as labels: confirmed vs changed cells, embeddings kept per cell, the confirm API, and
`edge-wbc adapt export`."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import typer
from station_fakes import RunningStation, fake_cell
from test_station_api import SAMPLES, capture, jreq
from typer.testing import CliRunner

from edge_wbc.cli import adapt as cli_adapt
from edge_wbc.counting.events import Fanout
from edge_wbc.counting.session import SessionError, SlideSession
from edge_wbc.counting.store import Store
from edge_wbc.pipeline.results import FieldResult

FIELDS = sorted((Path(__file__).parent.parent / "samples" / "fields").glob("*.jpg"))
SHA = "d" * 64


@pytest.fixture
def session(tmp_path: Path):
    store = Store(tmp_path / "data")
    s = SlideSession(store, Fanout(), default_target=10, models={"models": []})
    yield s
    store.close()


def _add(
    session: SlideSession, labels: list[str], k: int = 0, sha: str = SHA, seed: int | None = None
) -> list[str]:
    img = cv2.cvtColor(cv2.imread(str(FIELDS[k])), cv2.COLOR_BGR2RGB)
    cells = []
    for i, lab in enumerate(labels):
        c = fake_cell((20 + 110 * i, 20, 120 + 110 * i, 120), lab)
        c.embedding = (
            np.full(1280, 0.01 * (i + 1), np.float32)
            if seed is None
            else np.random.default_rng(seed + i).uniform(0, 2, 1280).astype(np.float32)
        )
        cells.append(c)
    res = FieldResult(
        path="f",
        width=img.shape[1],
        height=img.shape[0],
        cells=cells,
        model={"classifier_sha256": sha, "adaptation": None},
    )
    before = set(session.cells)
    session.add_field(img, res)
    return [c for c in session.cells if c not in before]


def test_confirm_is_a_review_distinct_from_a_change(session: SlideSession) -> None:
    a, b, c, d = _add(session, ["neutrophil", "lymphocyte", "unidentified", "monocyte"])
    before = session.state()["counts"]
    done = session.confirm([a, b, a])
    assert [x["id"] for x in done] == [a, b]
    assert session.state()["counts"] == before  # a confirmation changes no count
    session.review(d, "eosinophil")
    with pytest.raises(SessionError, match="no class to confirm"):
        session.confirm([c])
    with pytest.raises(SessionError, match="no cell"):
        session.confirm([a, "nope"])
    assert session.confirm([a, d]) == []  # already reviewed: left as they are
    rows = {r.cell_id: r for r in session.store.reviewed_cells()}
    assert set(rows) == {a, b, d}
    assert rows[a].confirmed and rows[a].label == "neutrophil"
    assert not rows[d].confirmed and rows[d].label == "eosinophil"
    assert rows[d].machine_label == "monocyte"
    assert rows[a].embedding_model == SHA
    np.testing.assert_allclose(rows[b].embedding, np.full(1280, 0.02), rtol=1e-3)
    assert rows[a].crop_path is not None and rows[a].crop_path.is_file()
    session.review(b, "rejected", "unusable")  # a rejected cell is no label
    assert {r.cell_id for r in Store.reviewed_cells_readonly(session.store.data_dir)} == {a, d}


def test_confirm_api_one_cell_and_a_group(tmp_path: Path) -> None:
    rs = RunningStation(tmp_path / "data", f"folder:{SAMPLES}", target=10)
    try:
        capture(rs, 3)
        cells = jreq(rs.url + "/api/cells")[1]["cells"]
        named = [c["id"] for c in cells if c["group"] not in ("unidentified",)]
        status, body = jreq(rs.url + f"/api/cells/{named[0]}/confirm", "POST")
        assert status == 200 and [c["id"] for c in body["confirmed"]] == [named[0]]
        status, body = jreq(rs.url + "/api/cells/confirm", "POST", {"ids": named})
        assert status == 200 and [c["id"] for c in body["confirmed"]] == named[1:]
        assert jreq(rs.url + "/api/cells/confirm", "POST", {"ids": "x"})[0] == 400
        assert jreq(rs.url + "/api/cells/nope/confirm", "POST")[0] == 404
    finally:
        rs.close()


def test_export_writes_reviewed_cells_by_class(session: SlideSession, tmp_path: Path) -> None:
    a, b, _ = _add(session, ["neutrophil", "lymphocyte", "monocyte"])
    app = typer.Typer()
    cli_adapt.register(app)
    out = tmp_path / "export"
    r = CliRunner().invoke(
        app, ["adapt", "export", "--data-dir", str(session.store.data_dir), "--out", str(out)]
    )
    assert r.exit_code == 2 and "no reviewed cells" in r.stderr
    session.confirm([a])
    session.review(b, "basophil")
    r = CliRunner().invoke(
        app, ["adapt", "export", "--data-dir", str(session.store.data_dir), "--out", str(out)]
    )
    assert r.exit_code == 0, r.stderr
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg")) == [
        f"basophil/{b}.jpg",
        f"neutrophil/{a}.jpg",
    ]
    assert json.loads((out / "cells.json").read_text())["cells"][0]["cell_id"] == a


def _export(session: SlideSession, out: Path) -> tuple[int, str]:
    app = typer.Typer()
    cli_adapt.register(app)
    r = CliRunner().invoke(
        app, ["adapt", "export", "--data-dir", str(session.store.data_dir), "--out", str(out)]
    )
    return r.exit_code, r.stderr


def test_export_never_merges_into_an_earlier_folder(session: SlideSession, tmp_path: Path) -> None:
    # Crops of another export left in OUT would be fitted on without cells.json listing them.
    (a,) = _add(session, ["neutrophil"])
    session.confirm([a])
    out = tmp_path / "export"
    assert _export(session, out)[0] == 0
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # readable as any folder the user makes
    code, err = _export(session, out)
    assert code == 2 and "exists" in err
    assert [p.name for p in out.rglob("*.jpg")] == [f"{a}.jpg"]
    code, err = _export(session, tmp_path / "no" / "export")
    assert code == 2 and "does not exist" in err
    (tmp_path / "afile").write_text("")
    code, err = _export(session, tmp_path / "afile" / "export")
    assert code == 2 and "is a file, not a folder" in err


def test_export_without_any_crop_says_so_and_writes_nothing(
    session: SlideSession, tmp_path: Path
) -> None:
    a, b = _add(session, ["neutrophil", "lymphocyte"])
    session.confirm([a, b])
    for r in session.store.reviewed_cells():
        assert r.crop_path is not None
        r.crop_path.unlink()
    code, err = _export(session, tmp_path / "export")
    assert code == 2, err
    assert f"skipped cell {a}: its crop image is missing" in err
    assert "none of the 2 reviewed cell(s) has its crop image" in err
    assert list(tmp_path.iterdir()) == [tmp_path / "data"]  # no folder, no temporary left


def test_a_reviewed_blast_does_not_block_the_lab_fit(session: SlideSession, tmp_path: Path) -> None:
    # Blasts are assigned only in review and the classifier has no output for them: the fit
    # leaves them out and says so, instead of refusing every reviewed cell of the lab.
    manifest = json.loads((Path(cli_adapt.__file__).parents[1] / "models" / "manifest.json")
                          .read_text())  # fmt: skip
    sha = next(m["sha256"] for m in manifest["models"] if m["name"] == "classifier")
    ids = []
    for k in range(6):
        ids += _add(session, ["neutrophil", "lymphocyte"], k=k % len(FIELDS), sha=sha, seed=10 * k)
    (blast,) = _add(session, ["lymphocyte"], sha=sha, seed=99)
    session.confirm(ids)
    session.review(blast, "blast")
    app = typer.Typer()
    cli_adapt.register(app)
    r = CliRunner().invoke(app, ["adapt", "fit", "--data-dir", str(session.store.data_dir),
                                 "--out", str(tmp_path / "o")])  # fmt: skip
    assert f"skipped cell {blast}: reviewed as blast, which the classifier has no output" in (
        r.stderr
    )
    assert "12 labelled cell(s)" in r.stdout and "1 skipped" in r.stdout
    assert r.exit_code in (0, 3), r.stdout + r.stderr  # judged, not refused as a usage error
