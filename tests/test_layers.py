"""The package's folders are layers, as in the README's data-flow diagram: each imports only
the layers below it (and itself), so the data flow cannot quietly grow a loop.

    cli > station > comms > counting > camera > pipeline > config, logs, sdnotify, accelerators,
                                                            inputs, bundled, taxonomy

Read from the source (every ``import``, inside functions too), so a lazy import breaks the rule
as visibly as a top-level one. That nothing imports TensorFlow at run time is
tests/test_no_tensorflow.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edge_wbc"

#: Lowest first. A module of layer i may import layers 0..i.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"", "config", "logs", "sdnotify", "accelerators", "inputs", "bundled", "files",
               "taxonomy"}),
    frozenset({"pipeline"}),
    frozenset({"camera"}),
    frozenset({"counting"}),
    frozenset({"comms"}),
    frozenset({"station"}),
    frozenset({"cli"}),
)

#: Top-level packages a part of edge_wbc must never import.
FORBIDDEN: dict[str, frozenset[str]] = {
    # The offline tool and its training stack never reach a device.
    "": frozenset({"tensorflow", "keras", "tf_keras", "edge_wbc_convert", "convert"}),
    # The counting knows nothing of the broker or the web.
    "counting": frozenset({"paho", "http", "socketserver", "urllib", "wsgiref"}),
}


def _part(module: str) -> str:
    """``edge_wbc.counting.store`` -> ``counting``; ``edge_wbc.config`` -> ``config``;
    ``edge_wbc`` -> ``''``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(part: str) -> int:
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    raise AssertionError(f"edge_wbc.{part} is in no layer: add it to LAYERS in {__file__}")


def _module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.append((node.lineno, name))
    return out


def violations(path: Path, root: Path = PACKAGE) -> list[str]:
    module = _module_name(path, root)
    part = _part(module)
    mine = _layer(part)
    bad = []
    for line, name in _imports(path, module):
        top = name.split(".")[0]
        if top == "edge_wbc":
            target = _part(name)
            if _layer(target) > mine:
                bad.append(f"line {line}: {name} (layer {target or 'edge_wbc'} is above {part})")
        elif top in FORBIDDEN[""] or top in FORBIDDEN.get(part, frozenset()):
            bad.append(f"line {line}: {name} is not for edge_wbc.{part or '(root)'}")
    return bad


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_folder_has_a_layer() -> None:
    for p in SOURCES:
        _layer(_part(_module_name(p)))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_point_down(path: Path) -> None:
    bad = violations(path)
    assert not bad, f"{_module_name(path)}:\n  " + "\n  ".join(bad)


def test_the_rule_catches_upward_and_forbidden_imports(tmp_path: Path) -> None:
    """The checker itself: a lazy import of the MQTT layer, paho and a relative import of the
    station from counting are all caught; an import from below is not."""
    root = tmp_path / "edge_wbc"
    src = root / "counting" / "leak.py"
    src.parent.mkdir(parents=True)
    src.write_text(
        "from edge_wbc.pipeline import results\n"
        "from ..station import server\n"
        "def f():\n    from edge_wbc.comms import mqtt\n    import paho.mqtt.client\n"
    )
    bad = violations(src, root)
    assert [b.split(":")[0] for b in bad] == ["line 2", "line 4", "line 5"], bad
