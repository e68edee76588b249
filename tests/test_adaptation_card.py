"""The model card keeps the adaptation section: rendered from models/adaptation_eval.json."""

from __future__ import annotations

import json
from pathlib import Path

from edge_wbc_convert import card


def _eval(models: Path, table: str) -> None:
    doc = {
        "command": "python scripts/eval_adaptation.py --card models/adaptation_eval.json",
        "classifier_sha256": "f" * 64,
        "tables": ["#### shared", "", table, ""],
    }
    (models / card.ADAPTATION_EVAL).write_text(json.dumps(doc))


def test_section_is_replaced_in_place_and_the_rest_kept(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(
        "# edge-wbc models\n\n## Fine classes\n\nfine text\n\n## Adaptation to a lab\n\nold "
        "numbers\n\n## Op gate and Edge TPU\n\ngate text\n"
    )
    _eval(tmp_path, "| bccd | 0.9 |")
    card.replace_adaptation_section(readme, tmp_path)
    text = readme.read_text()
    assert "old numbers" not in text
    assert "| bccd | 0.9 |" in text and "`ffffffffffff…`" in text
    assert text.index("fine text") < text.index("| bccd | 0.9 |") < text.index("gate text")
    assert text.count("## Adaptation to a lab") == 1


def test_section_is_inserted_before_the_op_gate_and_absent_without_json(tmp_path: Path) -> None:
    assert card.adaptation_section(tmp_path) == []
    readme = tmp_path / "README.md"
    readme.write_text("# card\n\n## Op gate and Edge TPU\n\ngate\n")
    _eval(tmp_path, "| raabin | 0.8 |")
    card.replace_adaptation_section(readme, tmp_path)
    text = readme.read_text()
    assert (
        text.index("## Adaptation to a lab")
        < text.index("| raabin | 0.8 |")
        < text.index("## Op gate")
    )
