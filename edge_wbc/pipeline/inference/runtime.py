"""Which TFLite interpreter this device has: LiteRT first, tflite-runtime as a fallback.

Both expose the same ``Interpreter`` and ``load_delegate``; nothing here imports TensorFlow
(the full TensorFlow package is never installed on the station).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


class RuntimeMissing(RuntimeError):
    """No TFLite interpreter package is installed."""


@dataclass(frozen=True)
class Runtime:
    name: str  # the importable package that provided the interpreter
    version: str
    interpreter_cls: Any
    load_delegate: Any


#: Tried in order. LiteRT is ~8x faster on int8 here (XNNPACK); tflite-runtime is what older
#: boards and the Coral instructions install.
_CANDIDATES: tuple[tuple[str, str], ...] = (
    ("ai_edge_litert", "ai_edge_litert.interpreter"),
    ("tflite_runtime", "tflite_runtime.interpreter"),
)

_cached: Runtime | None = None


def get_runtime(prefer: str | None = None) -> Runtime:
    """Import the first interpreter package that works (cached).

    ``prefer`` (a package name from the list above) is tried first; used by tests and by
    benchmarks comparing the two.
    """
    global _cached
    if _cached is not None and (prefer is None or _cached.name == prefer):
        return _cached
    order = list(_CANDIDATES)
    if prefer is not None:
        order.sort(key=lambda c: c[0] != prefer)
    errors: list[str] = []
    for pkg, module in order:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            errors.append(f"{pkg}: {e}")
            continue
        try:
            version = importlib.import_module(pkg).__dict__.get("__version__", "")
        except ImportError:  # pragma: no cover - the submodule imported, so the package exists
            version = ""
        if not version:
            try:
                from importlib.metadata import version as dist_version

                version = dist_version(pkg.replace("_", "-"))
            except Exception:  # metadata is informative only
                version = "unknown"
        rt = Runtime(pkg, str(version), mod.Interpreter, mod.load_delegate)
        if prefer is None or pkg == prefer:
            _cached = rt
        return rt
    raise RuntimeMissing(
        "no TFLite interpreter found; install one with `pip install ai-edge-litert` "
        "(or `pip install 'edge-wbc[tflite-runtime]'` on boards without a LiteRT wheel). "
        "Tried: " + "; ".join(errors)
    )
