"""Rules for values people type or send (a sample ID, a slide's target) and for text settings:
one function per rule, called by every door a value comes in through (the HTTP API and MQTT
commands reach them through the slide session; the config file through ``edge_wbc.config``).

A sample ID is shown on the page, in reports and at central monitoring, and identifies a
patient's slide. Control and formatting characters are refused in it (and in every text
setting) because they change what a reader sees without being seen themselves: U+202E
RIGHT-TO-LEFT OVERRIDE makes ``LAB-1<U+202E>2-34`` display as ``LAB-143-2``, zero-width
characters make two different IDs look the same, a newline splits a report line.
"""

from __future__ import annotations

import json
import math
import unicodedata
from typing import Any

MAX_SAMPLE_ID_CHARS = 64
#: The most leukocytes a slide may be set to count (config's session.target obeys it too).
MAX_TARGET = 10000

# Unicode general categories that render as nothing (or reorder what follows) rather than as a
# visible character: C0/C1 controls, format characters (bidi overrides and isolates, zero-width
# joiners, the BOM...), line and paragraph separators, surrogates and private-use code points.
_HIDDEN = {
    "Cc": "control character",
    "Cf": "invisible formatting character",
    "Zl": "line separator",
    "Zp": "paragraph separator",
    "Cs": "surrogate code point",
    "Co": "private-use character",
}


class InputError(ValueError):
    """A value that breaks one of the rules above; the message says which and where."""


def hidden_char(text: str) -> str | None:
    """Describe the first character of ``text`` that would not show as itself, else None."""
    for pos, ch in enumerate(text, 1):
        kind = _HIDDEN.get(unicodedata.category(ch))
        if kind is not None:
            name = unicodedata.name(ch, "")
            return f"U+{ord(ch):04X}{' ' + name if name else ''} ({kind}) at position {pos}"
    return None


def visible(text: str) -> str:
    """``text`` with every character ``hidden_char`` would name replaced by U+FFFD: for
    showing what another program sent (a monitor's terminal), where refusing is not an option."""
    return "".join("\ufffd" if unicodedata.category(ch) in _HIDDEN else ch for ch in text)


def check_sample_id(value: object) -> str:
    """The sample ID as stored (surrounding whitespace removed); ``""`` for none.

    Raises :class:`InputError` for a non-string, more than ``MAX_SAMPLE_ID_CHARS``
    characters, or a hidden character anywhere in it.
    """
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"the sample id must be text, got {type(value).__name__}")
    text = value.strip()
    bad = hidden_char(text)
    if bad is not None:
        raise InputError(f"the sample id must not contain {bad}")
    if len(text) > MAX_SAMPLE_ID_CHARS:
        raise InputError(f"the sample id must be at most {MAX_SAMPLE_ID_CHARS} characters, "
                              f"got {len(text)}")
    return text


def check_target(value: object) -> int:
    """A slide's target: a whole number of cells in 1..MAX_TARGET.

    ``true`` (JSON booleans are ints in Python), strings, ``Infinity``/``NaN`` and fractions
    are refused rather than coerced, so a malformed request never sets a target by accident.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"target must be a whole number of cells, got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise InputError(f"target must be a whole number of cells, got {value!r}")
    t = int(value)
    if not 1 <= t <= MAX_TARGET:
        raise InputError(f"target must be between 1 and {MAX_TARGET} cells, got {t}")
    return t


def _no_constant(name: str) -> Any:
    raise InputError(f"{name} is not a number JSON allows")


def parse_json_object(raw: bytes, what: str = "body") -> dict[str, Any]:
    """A request or command payload as a JSON object, or :class:`InputError` with the reason.

    Stricter than ``json.loads``: ``NaN``/``Infinity`` (not JSON, though Python accepts them)
    and nesting too deep for the parser are refused like any other malformed payload.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{what} is not UTF-8") from None
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise InputError(f"{what} is not JSON: {e.msg} at line {e.lineno} column {e.colno}"
                         ) from None
    except RecursionError:
        raise InputError(f"{what} is nested too deeply") from None
    if not isinstance(obj, dict):
        raise InputError(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj
