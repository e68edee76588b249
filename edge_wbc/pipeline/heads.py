"""Linear heads on the classifier's embedding: numpy only, no interpreter.

The shipped int8 classifier emits its pooled features (``Prediction.embedding``, 1280-d for
MobileNetV2) next to its classes. A head is a softmax layer on those features fitted elsewhere
(offline for the fine classes, on the station for a lab's adaptation), with its own calibration
and thresholds. A head is only meaningful on the features of the model it was fitted on, so it
records that model's sha256 and refuses any other.

On disk a head is two files written together: ``NAME.json`` (schema, classes, calibration, the
base model's sha256, provenance) and ``NAME.npz`` (``weight`` D x K and ``bias`` K, float64),
whose sha256 the JSON records; the JSON is written last, so a half-written head is never read.

    head = LinearHead.load(path, base_sha256=manifest.classifier.sha256)
    pred = head.predict(cell.embedding)   # an edge_wbc.pipeline.classify.Prediction

A *mixture* head (``kind: mixture``) refines the classifier's own output instead of replacing
it: each of the classifier's classes (``base_classes``, output 0, calibrated as shipped) hands
its probability to the head classes it ``splits`` into, in the proportions the head's softmax
gives them (band vs segmented within neutrophil; immature granulocyte, erythroblast, platelet,
other within other). The cell is then decided on its counting group (edge_wbc.taxonomy: band +
segmented are one neutrophil, platelet + other one non-leukocyte) under the classifier's own
thresholds, so where the shipped output is unsure the cell stays unidentified, and the group's
finer class names it. ``group_thresholds`` replaces the confidence threshold for the groups
the classifier has no output for (an immature granulocyte or an erythroblast named at a lower
probability rather than sent to review).

    pred = head.predict(cell.embedding, base_probs)   # base_probs: the classifier's output 0
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_wbc import taxonomy
from edge_wbc.pipeline.classify import Prediction, decide
from edge_wbc.pipeline.results import UNIDENTIFIED

HEAD_SCHEMA = "edge-wbc/head/1"


class HeadError(ValueError):
    """A head that cannot be used (corrupt, inconsistent, or for another base model)."""


@dataclass(frozen=True, eq=False)
class LinearHead:
    """softmax((embedding @ weight + bias) / temperature) over ``classes``.

    ``confidence_threshold`` / ``other_threshold`` mean what they mean for the classifier
    (edge_wbc.pipeline.classify.decide): below them a cell is "unidentified".
    ``info`` is free-form provenance saved with the head (created, cell counts, validation).
    """

    classes: tuple[str, ...]
    weight: np.ndarray
    bias: np.ndarray
    base_sha256: str
    temperature: float = 1.0
    confidence_threshold: float = 0.0
    other_threshold: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    #: mixture only: the classifier's classes (output 0) and what each splits into.
    base_classes: tuple[str, ...] = ()
    splits: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: mixture only: counting group -> its confidence threshold (default: confidence_threshold)
    group_thresholds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        w = np.asarray(self.weight, np.float64)
        b = np.asarray(self.bias, np.float64).reshape(-1)
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "bias", b)
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        k = len(self.classes)
        if k < 2 or len(set(self.classes)) != k:
            raise HeadError(f"a head needs at least two distinct classes, got {self.classes}")
        if w.ndim != 2 or w.shape[1] != k or b.shape != (k,):
            raise HeadError(
                f"weight {list(w.shape)} / bias {list(b.shape)} do not fit {k} classes "
                "(expected weight [D, K], bias [K])"
            )
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise HeadError("weight or bias holds NaN or infinity")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise HeadError(f"temperature must be > 0, got {self.temperature}")
        for name in ("confidence_threshold", "other_threshold"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise HeadError(f"{name} must lie in [0, 1], got {v}")
        if len(self.base_sha256) != 64:
            raise HeadError(f"base_sha256 {self.base_sha256!r} is not a sha256 hex digest")
        object.__setattr__(self, "base_classes", tuple(str(c) for c in self.base_classes))
        splits = {str(g): tuple(str(c) for c in m) for g, m in dict(self.splits).items()}
        object.__setattr__(self, "splits", splits)
        gthr = {str(g): float(v) for g, v in dict(self.group_thresholds).items()}
        object.__setattr__(self, "group_thresholds", gthr)
        if self.base_classes or splits or gthr:
            if set(splits) != set(self.base_classes):
                raise HeadError(
                    f"a mixture head splits each base class: splits name {sorted(splits)}, "
                    f"base_classes are {list(self.base_classes)}"
                )
            covered = {c for m in splits.values() for c in m}
            if not all(m for m in splits.values()) or covered != set(self.classes):
                raise HeadError(
                    f"splits cover {sorted(covered)}, the head's classes are {list(self.classes)}"
                    " (every class from at least one base class, nothing else)"
                )
            unknown = [c for c in self.classes if c not in taxonomy.GROUP_OF]
            if unknown:
                raise HeadError(f"a mixture head decides on taxonomy groups; unknown {unknown}")
            bad = {g: v for g, v in gthr.items() if g not in taxonomy.GROUPS or not 0 <= v <= 1}
            if bad:
                raise HeadError(f"group_thresholds: unknown group or not in [0, 1]: {bad}")

    @property
    def dim(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, embedding: np.ndarray) -> np.ndarray:
        """(D,) -> (K,) or (N, D) -> (N, K), before temperature."""
        e = np.asarray(embedding, np.float64)
        if e.shape[-1] != self.dim:
            raise HeadError(f"embedding has {e.shape[-1]} features, the head reads {self.dim}")
        return e @ self.weight + self.bias

    def probs(self, embedding: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities, (K,) or (N, K)."""
        z = self.logits(embedding) / self.temperature
        z = z - z.max(axis=-1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=-1, keepdims=True)

    @property
    def is_mixture(self) -> bool:
        """True when the head refines the classifier's output (needs ``base_probs``)."""
        return bool(self.base_classes)

    def mixture_probs(self, embedding: np.ndarray, base_probs: np.ndarray) -> np.ndarray:
        """The classifier's calibrated probabilities (..., B) split over the head's classes
        by the head's own, (..., K); rows still sum to one."""
        f = self.probs(embedding)
        b = np.asarray(base_probs, np.float64)
        if b.shape[-1] != len(self.base_classes):
            raise HeadError(
                f"{b.shape[-1]} base probabilities, the head splits {len(self.base_classes)}"
            )
        q = np.zeros(f.shape)
        for j, g in enumerate(self.base_classes):
            idx = [self.classes.index(c) for c in self.splits[g]]
            share = f[..., idx]
            q[..., idx] += b[..., j : j + 1] * share / share.sum(axis=-1, keepdims=True)
        return q

    def decide_groups(self, q: np.ndarray) -> tuple[str, float]:
        """One cell's (label or "unidentified", its group's probability) from mixture
        probabilities: the group decides under the thresholds, its top class names the cell."""
        groups: dict[str, float] = {}
        for c, v in zip(self.classes, q, strict=True):
            g = taxonomy.GROUP_OF[c]
            groups[g] = groups.get(g, 0.0) + float(v)
        g = max(groups, key=groups.__getitem__)
        score = groups[g]
        thr = self.group_thresholds.get(g, self.confidence_threshold)
        if taxonomy.GROUPS[g][0] == taxonomy.COUNT_ONLY:
            # leaving the count needs the stricter threshold, as in classify.decide
            thr = max(thr, self.other_threshold or 0.0)
        if score < thr:
            return UNIDENTIFIED, score
        members = [k for k, c in enumerate(self.classes) if taxonomy.GROUP_OF[c] == g]
        return self.classes[max(members, key=lambda k: q[k])], score

    def predict(self, embedding: np.ndarray, base_probs: np.ndarray | None = None) -> Prediction:
        """One cell's label (or "unidentified") under this head's thresholds. A mixture head
        needs the classifier's calibrated output 0 (``base_probs``, in ``base_classes`` order)."""
        e = np.asarray(embedding).reshape(-1)
        if self.is_mixture:
            if base_probs is None:
                raise HeadError("a mixture head refines the classifier's output: pass base_probs")
            q = self.mixture_probs(e, np.asarray(base_probs).reshape(-1))
            label, score = self.decide_groups(q)
            probs = {c: float(v) for c, v in zip(self.classes, q, strict=True)}
            return Prediction(label, score, probs, np.asarray(embedding, np.float32))
        p = self.probs(e)
        pred = decide(p, self.classes, self.confidence_threshold, self.other_threshold)
        return Prediction(pred.label, pred.score, pred.probs, np.asarray(embedding, np.float32))

    # ------------------------------------------------------------------ files

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.json) and its .npz next to it; returns the JSON path."""
        jp = Path(path).with_suffix(".json")
        npz = jp.with_suffix(".npz")
        buf = io.BytesIO()
        np.savez(buf, weight=self.weight, bias=self.bias)
        data = buf.getvalue()
        doc = {
            "schema": HEAD_SCHEMA,
            "kind": "mixture" if self.is_mixture else "linear",
            "classes": list(self.classes),
            "dim": self.dim,
            "temperature": float(self.temperature),
            "confidence_threshold": float(self.confidence_threshold),
            "other_threshold": (
                None if self.other_threshold is None else float(self.other_threshold)
            ),
            "base_sha256": self.base_sha256,
            "weights": {"file": npz.name, "sha256": hashlib.sha256(data).hexdigest()},
            "info": self.info,
        }
        if self.is_mixture:
            doc["base_classes"] = list(self.base_classes)
            doc["splits"] = {g: list(m) for g, m in self.splits.items()}
            doc["group_thresholds"] = dict(self.group_thresholds)
        text = json.dumps(doc, indent=2) + "\n"  # fails here, before any file, if info is odd
        jp.parent.mkdir(parents=True, exist_ok=True)
        for p, payload in ((npz, data), (jp, text.encode())):
            tmp = p.with_name(p.name + ".tmp")
            tmp.write_bytes(payload)
            tmp.replace(p)
        return jp

    @classmethod
    def load(cls, path: str | Path, base_sha256: str | None = None) -> LinearHead:
        """Read a head; with ``base_sha256``, refuse one fitted on another classifier."""
        jp = Path(path)
        try:
            doc = json.loads(jp.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HeadError(f"{jp}: unreadable head: {e}") from e
        if not isinstance(doc, dict) or doc.get("schema") != HEAD_SCHEMA:
            got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
            raise HeadError(f"{jp}: schema {got!r}, expected {HEAD_SCHEMA!r}")
        try:
            wf = doc["weights"]
            npz = jp.parent / Path(str(wf["file"])).name
            want = str(wf["sha256"])
            classes, base = doc["classes"], str(doc["base_sha256"])
        except (KeyError, TypeError) as e:
            raise HeadError(f"{jp}: missing key {e}") from e
        if base_sha256 is not None and base != base_sha256:
            raise HeadError(
                f"{jp}: fitted on the classifier with sha256 {base[:12]}…, this one is "
                f"{base_sha256[:12]}…: a head only reads the features of its own model"
            )
        try:
            data = npz.read_bytes()
        except OSError as e:
            raise HeadError(f"{jp}: weights {npz.name}: {e}") from e
        if hashlib.sha256(data).hexdigest() != want:
            raise HeadError(f"{npz}: sha256 does not match {jp.name} (corrupt or replaced)")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                w, b = z["weight"], z["bias"]
        except (OSError, ValueError, KeyError) as e:
            raise HeadError(f"{npz}: unreadable weights: {e}") from e
        if w.ndim != 2 or w.shape[0] != doc.get("dim"):
            raise HeadError(f"{npz}: weight {list(w.shape)}, {jp.name} says dim {doc.get('dim')}")
        kind = doc.get("kind", "linear")
        if kind not in ("linear", "mixture"):
            raise HeadError(f"{jp}: kind {kind!r}, expected 'linear' or 'mixture'")
        mix: dict[str, Any] = {}
        if kind == "mixture":
            try:
                mix = {
                    "base_classes": tuple(doc["base_classes"]),
                    "splits": dict(doc["splits"]),
                    "group_thresholds": dict(doc.get("group_thresholds") or {}),
                }
            except (KeyError, TypeError, ValueError) as e:
                raise HeadError(f"{jp}: mixture head without a valid {e}") from e
            if not mix["base_classes"]:
                raise HeadError(f"{jp}: a mixture head names its base_classes")
        try:
            other = doc.get("other_threshold")
            return cls(
                classes=tuple(classes) if isinstance(classes, list) else (),
                weight=w,
                bias=b,
                base_sha256=base,
                temperature=float(doc.get("temperature", 1.0)),
                confidence_threshold=float(doc.get("confidence_threshold", 0.0)),
                other_threshold=None if other is None else float(other),
                info=dict(doc.get("info") or {}),
                **mix,
            )
        except HeadError as e:
            raise HeadError(f"{jp}: {e}") from e
        except (TypeError, ValueError) as e:
            raise HeadError(f"{jp}: {e}") from e
