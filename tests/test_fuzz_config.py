"""Property-based tests of the config loader: any file is a Config or a ConfigError whose
every problem names its key (and the line, when the key is in the file); never a traceback."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_wbc.config import SECTIONS, Config, ConfigError, load_config

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
KNOWN = [(s, f.name) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _toml(v: Any) -> str:
    """A TOML literal for a drawn value (floats as TOML spells nan and inf)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string, except for the odd control character
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


values = st.recursive(
    st.one_of(
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(),
        st.text(max_size=20),
        st.sampled_from(["", "0.0.0.0", "folder:/nonexistent", "edgetpu", "cpu", "DEBUG"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=2)
    ),
    max_leaves=4,
)
keys = st.one_of(
    st.sampled_from(KNOWN),
    st.tuples(st.sampled_from(sorted(SECTIONS)), st.from_regex(r"[a-z_]{1,12}", fullmatch=True)),
    st.tuples(st.from_regex(r"[a-z]{1,8}", fullmatch=True), st.sampled_from([k for _, k in KNOWN])),
)


def _check(path: Path) -> None:
    try:
        cfg = load_config(path, env={})
    except ConfigError as e:
        assert e.problems
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for p in e.problems:
            assert p.message
            if p.line is not None:
                assert 1 <= p.line <= max(1, len(text))
                leaf = p.key.rsplit(".", 1)[-1]
                if p.key and p.source == str(path) and "TOML" not in p.message:
                    # The line named is the one that sets the key (or its table's header).
                    assert leaf in text[p.line - 1] or p.key.split(".")[0] in text[p.line - 1]
        return
    assert isinstance(cfg, Config)


@FUZZ
@given(st.lists(st.tuples(keys, values), max_size=6))
def test_drawn_settings(
    tmp_path_factory: Any, settings_: list[tuple[tuple[str, str], Any]]
) -> None:
    by_section: dict[str, dict[str, Any]] = {}
    for (sec, key), v in settings_:
        by_section.setdefault(sec, {})[key] = v
    lines = []
    for sec, kv in by_section.items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {_toml(v)}" for k, v in kv.items()]
    p = tmp_path_factory.mktemp("c") / "config.toml"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _check(p)


@FUZZ
@given(st.text(max_size=200))
def test_any_text(tmp_path_factory: Any, text: str) -> None:
    p = tmp_path_factory.mktemp("c") / "config.toml"
    p.write_text(text, encoding="utf-8", errors="surrogatepass")
    _check(p)


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes(tmp_path_factory: Any, data: bytes) -> None:
    p = tmp_path_factory.mktemp("c") / "config.toml"
    p.write_bytes(data)
    _check(p)
