"""The leukocyte formula: the one table of classes, [formula] in the config (presets, a lab's own
rows, flags, every bad input with key and line), counting by it, and what reports and the
monitor carry."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from station_fakes import fake_cell
from typer.testing import CliRunner

from edge_wbc import taxonomy
from edge_wbc.cli import app
from edge_wbc.comms.monitor import StationTable
from edge_wbc.config import ConfigError, load_config
from edge_wbc.counting.reports import ROW_KEYS, write_reports
from edge_wbc.counting.session import SessionError, SlideSession
from edge_wbc.counting.store import Store
from edge_wbc.pipeline.results import Cell, FieldResult

FIELDS = sorted((Path(__file__).resolve().parent.parent / "samples" / "fields").glob("*.jpg"))


def _rgb(i: int) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(FIELDS[i])), cv2.COLOR_BGR2RGB)


def _session(tmp_path: Path, formula: taxonomy.Formula | None = None,
             target: int = 100) -> SlideSession:
    data = tmp_path / "data"
    return SlideSession(Store(data), default_target=target, formula=formula,
                        reporter=lambda sl, st, cs, fs, out: write_reports(sl, st, cs, fs, out,
                                                                           data))


def _add(s: SlideSession, labels: list[str], field: int = 0) -> None:
    """One field per call, each a different sample image (no duplicate-field guard)."""
    cells = [fake_cell((10 + 60 * (i % 10), 10 + 110 * (i // 10), 60 + 60 * (i % 10),
                        100 + 110 * (i // 10)), lab) for i, lab in enumerate(labels)]
    s.add_field(_rgb(field), FieldResult("f.jpg", 640, 480, cells, quality={"flags": []}))


def _formula(**kw: object) -> taxonomy.Formula:
    return taxonomy.formula_or_raise(**kw)


# --------------------------------------------------------------------------- the table


def test_every_class_has_exactly_one_group_and_the_models_are_covered() -> None:
    assert len(taxonomy.CLASSES) == len(set(taxonomy.CLASSES))
    for c in (*taxonomy.MODEL_CLASSES, *taxonomy.LEGACY_MODEL_CLASSES, *taxonomy.REVIEW_CLASSES):
        assert c in taxonomy.GROUP_OF, c
    assert taxonomy.group_of("band_neutrophil") == "neutrophil"
    assert taxonomy.group_of("myelocyte") == "immature_granulocyte"
    assert taxonomy.group_of("erythroblast") == "nrbc"
    assert taxonomy.group_of("smudge_cell") == "non_wbc"
    assert taxonomy.group_of("blast") == taxonomy.group_of("plasma_cell") == "abnormal_wbc"
    assert taxonomy.is_leukocyte("blast") and not taxonomy.is_leukocyte("erythroblast")
    assert taxonomy.kind_of("platelet") == taxonomy.COUNT_ONLY
    with pytest.raises(ValueError, match="unknown cell class"):
        taxonomy.group_of("unicorn")


def test_a_cell_json_carries_label_and_group() -> None:
    c = Cell((0, 0, 10, 10), "band_neutrophil", 0.9, {}, 100).to_json()
    assert (c["label"], c["group"]) == ("band_neutrophil", "neutrophil")
    assert Cell((0, 0, 1, 1), "erythroblast", 0.9, {}, 1).counted is False
    assert Cell((0, 0, 1, 1), "unidentified", 0.3, {}, 1).to_json()["group"] == "unidentified"


# --------------------------------------------------------------------------- config


def test_presets_and_a_labs_own_formula_load(tmp_path: Path) -> None:
    assert load_config(None, env={}).formula.build().name == "five-part"
    p = tmp_path / "c.toml"
    p.write_text('[formula]\npreset = "ru"\n')
    ru = load_config(p, env={}).formula.build()
    assert [r.key for r in ru.rows][:9] == [
        "basophil", "eosinophil", "myelocyte", "metamyelocyte", "band_neutrophil",
        "segmented_neutrophil", "lymphocyte", "monocyte", "plasma_cell"]
    p.write_text('[formula]\ncounted = ["neutrophil", "immature_granulocyte", "blast",'
                 ' "eosinophil", "basophil", "lymphocyte", "monocyte"]\n'
                 'per_100_wbc = ["nrbc"]\ncount_only = ["smudge_cell", "platelet"]\n'
                 'flags = ["blast > 0", "smudge_cell > 10%"]\n')
    own = load_config(p, env={}).formula.build()
    assert own.name == "custom"
    assert [(r.key, r.kind) for r in own.rows][-3:] == [
        ("nrbc", "per_100_wbc"), ("smudge_cell", "count_only"), ("platelet", "count_only")]
    env = {"EDGE_WBC_FORMULA_FLAGS": "blast > 0, eosinophil >= 5%"}
    flags = load_config(None, env=env).formula.build().flags
    assert [(f.name, f.op, f.threshold, f.unit) for f in flags] == [
        ("blast", ">", 0.0, "count"), ("eosinophil", ">=", 5.0, "percent")]


def test_check_config_names_key_and_line_for_every_formula_problem(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(
        "[formula]\n"  # 1
        "counted = [\n"  # 2
        '  "neutrophil",\n'  # 3
        '  "band_neutrophil",\n'  # 4: already in the neutrophil group row
        '  "monocyt",\n'  # 5: unknown
        '  "erythroblast",\n'  # 6: does not count toward the target
        "]\n"  # 7
        'count_only = ["blast"]\n'  # 8: a leukocyte cannot be count-only
        'flags = ["blast > 0", "eos > 5%", "band_neutrophil >> 6"]\n'  # 9
        'preset = "de"\n'  # 10
        "extra = 1\n",  # 11
    )
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={})
    got = [(pr.key, pr.line, pr.message) for pr in exc.value.problems]
    by_line = {line: (key, msg) for key, line, msg in got}
    assert by_line[4][0] == "formula.counted" and "two rows" in by_line[4][1]
    assert "'neutrophil'" in by_line[4][1]
    assert by_line[5] == ("formula.counted",
                          "unknown class or group 'monocyt' (did you mean 'monocyte'?)")
    assert "does not count toward the target" in by_line[6][1]
    assert "'per_100_wbc'" in by_line[6][1]
    assert by_line[8][0] == "formula.count_only" and "counts toward the target" in by_line[8][1]
    assert [m for k, line, m in got if line == 9 and "eos" in m]
    assert [m for k, line, m in got if line == 9 and ">>" in m]
    assert by_line[10][0] == "formula.preset" and "five-part" in by_line[10][1]
    assert by_line[11][0] == "formula.extra"
    # The command says the same, and fails.
    res = CliRunner().invoke(app, ["check-config", str(p)])
    assert res.exit_code == 1
    assert f"{p}:4: formula.counted: 'band_neutrophil' would be in two rows" in res.output
    assert f"{p}:6: formula.counted: 'erythroblast' is reported per 100" in res.output


def test_a_flag_on_cells_the_formula_sets_aside_is_refused(tmp_path: Path) -> None:
    # A smudge cell not listed under count_only is set aside uncounted: its flag never fires.
    p = tmp_path / "c.toml"
    p.write_text('[formula]\nflags = [\n  "blast > 0",\n  "smudge_cell > 10%",\n]\n')
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={})
    (pr,) = exc.value.problems
    assert (pr.key, pr.line) == ("formula.flags", 4)
    assert "would never be raised" in pr.message and "under 'count_only'" in pr.message
    p.write_text('[formula]\ncount_only = ["smudge_cell"]\nflags = ["smudge_cell > 10%"]\n')
    assert load_config(p, env={}).formula.build().flags[0].name == "smudge_cell"


def test_a_flag_raised_on_every_slide_or_on_none_is_refused_with_its_line(
        tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[formula]\nflags = [\n  "blast >= 0",\n  "eosinophil > 100%",\n'
                 '  "monocyte >= 100.5%",\n  "nrbc > 150%",\n  "blast\t>\t0",\n]\n')
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={})
    got = {pr.line: pr.message for pr in exc.value.problems}
    assert set(got) == {3, 4, 5}  # NRBC per 100 WBC may well pass 150; a tab is a space
    assert "raised on every slide" in got[3] and "'blast > 0' flags any" in got[3]
    assert "can never be raised" in got[4] and "at most 100 %" in got[4]
    assert "can never be raised" in got[5]
    flag = taxonomy.parse_flag("blast\t>\t0")
    assert flag.rule == "blast > 0" and flag.threshold == 0


def test_a_raised_flag_shows_its_value_beyond_the_threshold(tmp_path: Path) -> None:
    f = _formula(counted=["band_neutrophil", "segmented_neutrophil"],
                 flags=["band_neutrophil > 6%"])
    s = _session(tmp_path, f, target=400)
    labels = ["band_neutrophil"] * 12 + ["segmented_neutrophil"] * 187  # 12/199 = 6.03 %
    for i in range(0, len(labels), 40):
        _add(s, labels[i:i + 40], field=(i // 40) % len(FIELDS))
    (flag,) = s.state()["flags"]
    assert flag["value"] == 6.03 and "6.03 %" in flag["text"]
    s2 = _session(tmp_path / "b", _formula(flags=["eosinophil > 5%"]))
    _add(s2, ["eosinophil"] * 3 + ["lymphocyte"] * 7)
    (flag,) = s2.state()["flags"]
    assert flag["value"] == 30.0 and flag["text"] == "Eosinophil: 30.0 % (eosinophil > 5%)"


def test_a_formula_problem_set_by_the_environment_is_the_environment_s(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[formula]\npreset = "ru"\nflags = ["blast > 0"]\n')
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={"EDGE_WBC_FORMULA_FLAGS": "eos > 5%"})
    (pr,) = exc.value.problems
    assert (pr.source, pr.line) == ("environment", None)
    assert pr.message.startswith("EDGE_WBC_FORMULA_FLAGS: flag 'eos > 5%'")


def test_a_repeated_item_is_named_at_its_repeat_and_comments_are_not_read(
    tmp_path: Path,
) -> None:
    p = tmp_path / "c.toml"
    p.write_text(
        "[formula]\n"  # 1
        "counted = [\n"  # 2
        '  "lymphocyte",  # not "monocyt"\n'  # 3
        '  "monocyt",\n'  # 4: unknown
        '  "monocyte",\n'  # 5
        '  "monocyte",\n'  # 6: listed twice
        "]\n"  # 7
        'flags = [\n  "blast > 0",\n  "blast > 0",\n]\n'  # 8-11: the repeat on 10
    )
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={})
    got = [(pr.line, pr.message) for pr in exc.value.problems]
    assert got == [
        (4, "unknown class or group 'monocyt' (did you mean 'monocyte'?)"),
        (6, "'monocyte' is listed twice"),
        (10, "flag 'blast > 0' is listed twice"),
    ]


def test_a_name_in_capitals_is_pointed_at_its_lower_case_self() -> None:
    _, problems = taxonomy.build_formula(counted=["Monocyte"], flags=["BLAST > 0"])
    assert [p.message for p in problems] == [
        "unknown class or group 'Monocyte' (did you mean 'monocyte'?)",
        "flag 'BLAST > 0': unknown class or group 'BLAST' (did you mean 'blast'?)",
    ]


def test_a_formula_list_must_be_strings(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[formula]\ncounted = \"neutrophil\"\nflags = [1]\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={})
    msgs = {pr.key: (pr.line, pr.message) for pr in exc.value.problems}
    assert msgs["formula.counted"] == (2, "must be an array of strings, got string 'neutrophil'")
    assert msgs["formula.flags"][0] == 3


# --------------------------------------------------------------------------- counting


def test_five_part_keeps_todays_rows_with_todays_classifier(tmp_path: Path) -> None:
    s = _session(tmp_path)
    _add(s, ["neutrophil", "neutrophil", "lymphocyte", "other", "unidentified"])
    st = s.state()
    assert [r["label"] for r in st["classes"]] == [*taxonomy.FIVE_PART, "unidentified"]
    assert st["counts"] == {"neutrophil": 2, "eosinophil": 0, "basophil": 0, "lymphocyte": 1,
                            "monocyte": 0, "unidentified": 1}
    assert st["counted"] == 4 and st["excluded"]["other"] == 1 and st["flags"] == []
    assert {r["kind"] for r in st["classes"]} == {"counted"}


def test_new_classes_are_counted_where_the_formula_says(tmp_path: Path) -> None:
    s = _session(tmp_path)
    _add(s, ["band_neutrophil", "segmented_neutrophil", "immature_granulocyte", "erythroblast",
             "platelet", "lymphocyte"])
    st = s.state()
    rows = {r["label"]: r for r in st["classes"]}
    # five-part: band and segmented are neutrophils; an IG is never dropped: a counted row of
    # its own; an erythroblast is reported per 100 leukocytes; a platelet is set aside.
    assert rows["neutrophil"]["count"] == 2
    assert rows["immature_granulocyte"]["kind"] == "counted"
    assert rows["immature_granulocyte"]["configured"] is False
    assert rows["immature_granulocyte"]["count"] == 1
    assert rows["erythroblast"]["kind"] == "per_100_wbc" and rows["erythroblast"]["count"] == 1
    assert rows["erythroblast"]["percent"] == 25.0 and rows["erythroblast"]["ci_low"] is None
    assert st["counted"] == 4 and st["excluded"]["other"] == 1
    assert sum(r["percent"] for r in st["classes"] if r["kind"] == "counted") == pytest.approx(100)
    assert "platelet" not in rows


def test_ru_formula_review_only_classes_and_count_only_rows(tmp_path: Path) -> None:
    ru = _formula(preset="ru", per_100_wbc=["erythroblast"],
                  count_only=["smudge_cell", "platelet"],
                  flags=["blast > 0", "band_neutrophil > 6%", "erythroblast > 1%",
                         "smudge_cell > 10%"])
    s = _session(tmp_path, ru, target=10)
    _add(s, ["band_neutrophil", "segmented_neutrophil", "segmented_neutrophil", "neutrophil",
             "lymphocyte", "monocyte", "immature_granulocyte", "erythroblast", "platelet",
             "eosinophil", "segmented_neutrophil", "lymphocyte"])
    ids = list(s.cells)
    s.review(ids[6], "myelocyte")  # the model's IG, subtyped by the technician
    s.review(ids[5], "plasma_cell")
    s.review(ids[4], "smudge_cell")  # a leukocyte that turns out to be a smudge cell
    st = s.state()
    rows = {r["label"]: r for r in st["classes"]}
    assert [r["label"] for r in st["classes"]] == [
        "basophil", "eosinophil", "myelocyte", "metamyelocyte", "band_neutrophil",
        "segmented_neutrophil", "lymphocyte", "monocyte", "plasma_cell",
        "neutrophil",  # today's classifier's unsubtyped neutrophil: its own row, still counted
        "unidentified", "erythroblast", "smudge_cell", "platelet"]
    assert rows["myelocyte"]["count"] == 1 and rows["plasma_cell"]["count"] == 1
    assert rows["neutrophil"]["configured"] is False and rows["neutrophil"]["count"] == 1
    assert st["counted"] == 9 and rows["smudge_cell"]["count"] == 1
    assert rows["platelet"]["count"] == 1 and rows["platelet"]["kind"] == "count_only"
    raised = {f["name"]: f for f in st["flags"]}
    assert set(raised) == {"band_neutrophil", "erythroblast", "smudge_cell"}
    assert raised["band_neutrophil"]["value"] == pytest.approx(11.1)
    assert raised["smudge_cell"]["text"] == "Smudge cell: 11.1 % (smudge_cell > 10%)"
    # Review offers the formula's rows first, then every other class of the table.
    offer = st["formula"]["review_classes"]
    assert offer[:9] == ["basophil", "eosinophil", "myelocyte", "metamyelocyte",
                         "band_neutrophil", "segmented_neutrophil", "lymphocyte", "monocyte",
                         "plasma_cell"]
    assert {"blast", "reactive_lymphocyte", "artefact", "giant_platelet"} <= set(offer)
    assert "other" not in offer and "unidentified" not in offer
    view = next(c for c in s.gallery() if c["id"] == ids[6])
    assert view["counted_as"] == "myelocyte" and view["group"] == "myelocyte"
    assert view["class_group"] == "immature_granulocyte"


def test_cells_added_by_hand_are_counted_alike_on_the_page_and_in_the_report(
    tmp_path: Path,
) -> None:
    # A hand-added platelet has no row in the ru formula: set aside, not one of the cells the
    # count says were added by hand (the page said 3, the report 2).
    s = _session(tmp_path, _formula(preset="ru"), target=2)
    _add(s, ["lymphocyte"])
    for label in ("myelocyte", "erythroblast", "platelet"):
        s.add_manual(label)
    assert s.state()["manual"] == 2
    s.finalise()
    rep = json.loads((tmp_path / "data" / s.store.slide(s.slide["id"])["reports"]["json"])
                     .read_text())  # fmt: skip
    assert rep["manual_cells"] == 2


def test_a_blast_assigned_in_review_raises_the_flag_in_state_and_reports(tmp_path: Path) -> None:
    s = _session(tmp_path, target=3)
    _add(s, ["neutrophil", "lymphocyte", "monocyte"])
    assert s.state()["flags"] == []
    blast = list(s.cells)[1]
    s.review(blast, "blast")
    st = s.state()
    assert [f["rule"] for f in st["flags"]] == ["blast > 0"]
    assert {r["label"]: r["count"] for r in st["classes"]}["blast"] == 1
    cell_ev = s.store.events(s.slide["id"])[-1]["payload"]
    assert (cell_ev["reviewed_label"], cell_ev["group"], cell_ev["counted_as"]) == (
        "blast", "abnormal_wbc", "blast")
    s.finalise()
    data = tmp_path / "data"
    rep = json.loads((data / s.slide["reports"]["json"]).read_text())
    assert rep["schema"] == "edge-wbc/report/2"
    assert rep["formula"]["name"] == "five-part" and rep["formula"]["flags"] == ["blast > 0"]
    assert [f["text"] for f in rep["flags"]] == ["Blast: 1 (blast > 0)"]
    for row in rep["differential"]:
        assert tuple(row) == ROW_KEYS
    assert {r["label"]: r["group"] for r in rep["differential"]}["blast"] == "abnormal_wbc"
    rows = list(csv.DictReader((data / s.slide["reports"]["csv"]).open()))
    assert {r["class"] for r in rows} >= {"neutrophil", "blast"}
    assert all(r["flags"] == "Blast: 1 (blast > 0)" and r["formula"] == "five-part"
               for r in rows)
    cells = list(csv.DictReader((data / s.slide["reports"]["cells_csv"]).open()))
    assert [c["counted_as"] for c in cells] == ["neutrophil", "blast", "monocyte"]
    page = (data / s.slide["reports"]["html"]).read_text()
    assert "class='flags raised'" in page and "Blast: 1 (blast &gt; 0)" in page


def test_bad_labels_are_refused_whole(tmp_path: Path) -> None:
    s = _session(tmp_path)
    with pytest.raises(SessionError, match="unknown cell class"):
        _add(s, ["neutrophil", "unicorn"])
    assert s.state()["cells_detected"] == 0 and s.state()["fields"] == 0
    _add(s, ["neutrophil"])
    with pytest.raises(SessionError, match="cannot reclassify as 'unicorn'"):
        s.review(next(iter(s.cells)), "unicorn")


# --------------------------------------------------------------------------- monitor


def test_monitor_shows_each_stations_formula_and_flags(tmp_path: Path) -> None:
    ru = _session(tmp_path / "a", _formula(preset="ru"))
    _add(ru, ["band_neutrophil", "segmented_neutrophil", "lymphocyte"])
    ru.review(list(ru.cells)[2], "blast")
    five = _session(tmp_path / "b")
    _add(five, ["neutrophil", "lymphocyte"])
    t = StationTable()
    t.handle("edge-wbc/ru-1/differential", json.dumps(ru.state()).encode(), now=1.0)
    one = t.render(now=2.0).splitlines()
    assert one[0].split()[4:14] == ["BAS%", "EOS%", "MY%", "MMY%", "BAND%", "SEG%", "LYM%",
                                    "MON%", "PLC%", "BLA%"]
    assert one[0].split()[-1] == "FLAGS" and one[1].split()[-1] == "blast>0"
    t.handle("edge-wbc/five-1/differential", json.dumps(five.state()).encode(), now=1.0)
    both = t.render(now=2.0).splitlines()
    assert "FORMULA" in both[0].split()  # two formulas: one column says each station's
    assert "NEU 50.0 EOS 0.0" in both[1]
    v = t.stations["ru-1"].to_json()
    assert v["formula"] == "ru" and v["flags"] == ["Blast: 1 (blast > 0)"]
    assert {r["label"]: r["count"] for r in v["rows"]}["blast"] == 1


def test_before_any_leukocyte_is_counted_the_intervals_say_nothing_is_known(
        tmp_path: Path) -> None:
    s = _session(tmp_path, _formula(per_100_wbc=["nrbc"]))
    _add(s, ["erythroblast"] * 5)
    st = s.state()
    assert st["counted"] == 0
    counted = [r for r in st["classes"] if r["kind"] == "counted"]
    assert counted and all((r["ci_low"], r["ci_high"]) == (0.0, 100.0) for r in counted)
    assert {r["label"]: r["count"] for r in st["classes"]}["nrbc"] == 5


def test_a_flag_names_the_rows_it_is_about(tmp_path: Path) -> None:
    ru = _formula(preset="ru", flags=["neutrophil > 50%", "blast > 0"])
    s = _session(tmp_path, ru)
    _add(s, ["band_neutrophil", "segmented_neutrophil", "lymphocyte"])
    s.review(list(s.cells)[2], "blast")
    flags = {f["name"]: f for f in s.state()["flags"]}
    assert flags["neutrophil"]["rows"] == ["band_neutrophil", "segmented_neutrophil"]
    assert flags["neutrophil"]["row"] == "band_neutrophil"
    assert (flags["blast"]["row"], flags["blast"]["rows"]) == ("blast", ["blast"])


def test_a_reopened_station_counts_the_open_slide_by_the_same_formula(tmp_path: Path) -> None:
    ru = _formula(preset="ru", per_100_wbc=["nrbc"])
    s = _session(tmp_path, ru)
    _add(s, ["band_neutrophil", "erythroblast", "lymphocyte", "platelet"])
    s.review(list(s.cells)[2], "blast")
    before = s.state()
    s.store.close()
    again = _session(tmp_path, ru)
    after = again.state()
    for key in ("classes", "counts", "flags", "class_counts", "excluded", "counted"):
        assert after[key] == before[key], key
    assert after["flags"][0]["rule"] == "blast > 0"


def test_a_restart_with_another_formula_is_in_the_slides_trail_and_report(
        tmp_path: Path) -> None:
    s = _session(tmp_path, target=5)  # five-part, flag blast > 0
    _add(s, ["neutrophil", "neutrophil", "lymphocyte", "monocyte", "eosinophil"])
    s.review(list(s.cells)[1], "blast")
    assert [f["rule"] for f in s.state()["flags"]] == ["blast > 0"]
    sid = s.slide["id"]
    s.store.close()
    same = _session(tmp_path)  # the same formula: nothing to record
    assert not [e for e in same.store.events(sid) if e["action"] == "formula"]
    same.store.close()
    s = _session(tmp_path, _formula(preset="ru", flags=[]))
    (ev,) = [e for e in s.store.events(sid) if e["action"] == "formula"]
    assert ev["payload"]["previous"]["name"] == "five-part"
    assert ev["payload"]["previous"]["flags"] == ["blast > 0"]
    assert ev["payload"]["formula"] == {"name": "ru", "rows": ev["payload"]["formula"]["rows"],
                                        "flags": []}
    assert s.state()["flags"] == []
    s.finalise()
    rep = json.loads((s.store.data_dir / s.slide["reports"]["json"]).read_text())
    (ch,) = rep["formula_changes"]
    assert (ch["previous"]["name"], ch["formula"]["name"]) == ("five-part", "ru")
    html = (s.store.data_dir / s.slide["reports"]["html"]).read_text()
    assert "from five-part (flags: blast &gt; 0) to ru (flags: none)" in html
    s.store.close()
    assert not [e for e in _session(tmp_path, _formula(preset="ru", flags=[])).store.events(sid)
                if e["action"] == "formula" and e["id"] != ev["id"]]


def test_home_assistant_sensors_follow_the_formula(tmp_path: Path) -> None:
    from edge_wbc.comms import ha_discovery

    mqtt = load_config(None, env={"EDGE_WBC_MQTT_HOST": "broker",
                                  "EDGE_WBC_MQTT_STATION_ID": "st1"}).mqtt
    s = _session(tmp_path, _formula(preset="ru", per_100_wbc=["nrbc"], count_only=["platelet"]))
    got = {t.split("/")[3]: c for t, c in ha_discovery.configs(mqtt, s.state())}
    assert {"band_neutrophil", "segmented_neutrophil", "myelocyte", "nrbc", "platelet",
            "unidentified", "flags", "counted"} <= set(got)
    assert "neutrophil" not in got
    assert got["band_neutrophil"]["value_template"] == (
        "{{ value_json.percentages.band_neutrophil | default(0) }}")
    assert got["nrbc"]["unit_of_measurement"] == "per 100 WBC"
    assert got["platelet"]["value_template"] == "{{ value_json.counts.platelet | default(0) }}"
    assert got["flags"]["value_template"] == "{{ value_json.flags | default([]) | length }}"
    # Without a formula in the state (an older station's): five-part, as before.
    five = {t.split("/")[3] for t, _ in ha_discovery.configs(mqtt, None)}
    assert {*taxonomy.FIVE_PART, "unidentified"} <= five
