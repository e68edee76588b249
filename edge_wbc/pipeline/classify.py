"""Stage 3: what each cell is — calibrated probabilities, and "unidentified" when unsure.

Like commercial analyzers, the classifier never forces a low-confidence call into the
differential: below the manifest's confidence threshold a cell is "unidentified" and waits for
the technician. The softmax is temperature-scaled with the temperature fitted on validation
data, so the score is a probability a threshold can mean something against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from edge_wbc import taxonomy
from edge_wbc.pipeline.inference import Model
from edge_wbc.pipeline.manifest import VIEW_COUNTS
from edge_wbc.pipeline.results import UNIDENTIFIED

if TYPE_CHECKING:  # heads builds on this module's Prediction and decide
    from edge_wbc.pipeline.heads import LinearHead


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float  # calibrated probability of the top class
    probs: dict[str, float]
    #: the classifier's pooled features (float32, mean over the views), when the model emits
    #: them as its second output; None for single-output models.
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)


def crop_views(crop: np.ndarray, n: int) -> list[np.ndarray]:
    """The first ``n`` of the crop's dihedral views (n in VIEW_COUNTS), each contiguous."""
    if n not in VIEW_COUNTS:
        raise ValueError(f"views must be one of {VIEW_COUNTS}, not {n}")
    if n == 1:
        return [crop]
    if n == 2:
        return [crop, np.ascontiguousarray(crop[:, ::-1])]
    rots = [np.ascontiguousarray(np.rot90(crop, k)) for k in range(4)]
    if n == 4:
        return rots
    return rots + [np.ascontiguousarray(r[:, ::-1]) for r in rots]


def as_logits(out: np.ndarray, output_type: str = "logits") -> np.ndarray:
    v = np.asarray(out, np.float64).reshape(-1)
    if output_type == "probabilities":
        # log p recovers the logits up to a constant; the floor is one int8 output step, so a
        # class quantised to exactly 0 stays finite.
        v = np.log(np.maximum(v, 1.0 / 256.0))
    return v


def combine_views(outs: Sequence[np.ndarray], output_type: str = "logits") -> np.ndarray:
    """The model's outputs on several views of one crop -> one vector of logits (their mean:
    a normalised geometric mean of the probabilities)."""
    return np.mean([as_logits(o, output_type) for o in outs], axis=0)


def calibrated_softmax(
    out: np.ndarray, temperature: float = 1.0, output_type: str = "logits"
) -> np.ndarray:
    """Logits (or probabilities, if that is what the model emits) -> softmax(logits / T)."""
    v = as_logits(out, output_type)
    z = v / max(float(temperature), 1e-6)
    z -= z.max()
    e = np.exp(z)
    return e / e.sum()


def decide(
    probs: np.ndarray,
    classes: Sequence[str],
    confidence_threshold: float,
    other_threshold: float | None = None,
    group_thresholds: Mapping[str, float] | None = None,
) -> Prediction:
    """The cell's counting group (edge_wbc.taxonomy), named by its most probable class, or
    "unidentified" below the threshold. The group decides: a cell that is surely a neutrophil
    but split between band and segmented is a neutrophil to count, named by the likelier of
    the two, not a cell to review. With one class per group (the five-part classifier) this is
    the top class. ``group_thresholds`` replace the confidence threshold for some groups.

    A confident "other" (not a leukocyte: the taxonomy's count-only groups) stays out of the
    differential; an unsure one goes to the technician like any unsure cell, so a leukocyte is
    never dropped from the count on a weak vote. Leaving the count needs ``other_threshold``
    (at least the confidence threshold): the segmenter already voted the region a leukocyte,
    and dropping a real one silently is worse than one more cell to review, above all on
    stains and cameras the classifier never saw. Every class the table knows keeps its name (an
    immature granulocyte or an erythroblast is never folded into "other"); a class the table
    does not know is its own group and goes to the technician rather than out of the count.
    """
    groups: dict[str, float] = {}
    for c, v in zip(classes, probs, strict=True):
        g = taxonomy.GROUP_OF.get(c, "?" + c)
        groups[g] = groups.get(g, 0.0) + float(v)
    g = max(groups, key=groups.__getitem__)
    score = groups[g]
    thr = (group_thresholds or {}).get(g, confidence_threshold)
    known = g in taxonomy.GROUPS
    if known and taxonomy.GROUPS[g][0] == taxonomy.COUNT_ONLY:
        thr = max(thr, confidence_threshold, other_threshold or 0.0)
    if score < thr or not known:
        label = UNIDENTIFIED
    else:
        members = [k for k, c in enumerate(classes) if taxonomy.GROUP_OF.get(c) == g]
        label = classes[max(members, key=lambda k: probs[k])]
    return Prediction(label, score, {c: float(p) for c, p in zip(classes, probs, strict=True)})


def embedding_size(model: Model) -> int | None:
    """Length of the model's embedding output (output 1: the pooled features in front of the
    class head, [1, D]), or None when the model has only its class output."""
    if len(model.outputs) < 2:
        return None
    shape = tuple(model.outputs[1].shape)
    if len(model.outputs) > 2 or len(shape) != 2 or shape[0] != 1:
        raise ValueError(
            f"classifier outputs {[list(o.shape) for o in model.outputs]}: expected the class "
            "output and at most one embedding output shaped [1, D]"
        )
    return int(shape[1])


class CellClassifier:
    def __init__(
        self,
        model: Model,
        classes: Sequence[str],
        temperature: float = 1.0,
        confidence_threshold: float = 0.0,
        output_type: str = "logits",
        other_threshold: float | None = None,
        views: int = 1,
        embedding_dim: int | None = None,
        head: LinearHead | None = None,
        group_thresholds: Mapping[str, float] | None = None,
    ) -> None:
        """``embedding_dim``: what the manifest declares for output 1 (None: not declared; a
        model that has one still hands it out). ``head``: a head on the embedding that names
        the cells instead of output 0 (its classes, calibration and thresholds)."""
        if views not in VIEW_COUNTS:
            raise ValueError(f"classifier views must be one of {VIEW_COUNTS}, not {views}")
        n_out = int(np.prod(model.outputs[0].shape))
        if n_out != len(classes):
            raise ValueError(
                f"classifier has {n_out} outputs but the manifest lists {len(classes)} classes"
            )
        self.embedding_dim = embedding_size(model)
        if embedding_dim is not None and embedding_dim != self.embedding_dim:
            raise ValueError(
                f"the manifest declares a {embedding_dim}-d embedding output, the model has "
                + ("none" if self.embedding_dim is None else f"{self.embedding_dim}-d")
            )
        if head is not None and head.dim != self.embedding_dim:
            raise ValueError(
                f"the head reads a {head.dim}-d embedding, the model emits "
                + ("none" if self.embedding_dim is None else f"a {self.embedding_dim}-d one")
            )
        if head is not None and head.is_mixture and head.base_classes != tuple(classes):
            raise ValueError(
                f"the mixture head splits {list(head.base_classes)}, the classifier's output 0 "
                f"is {list(classes)}"
            )
        self.head = head
        self.model = model
        #: what output 0 means; the cells' classes are ``labels``.
        self.classes = tuple(classes)
        self.temperature = float(temperature)
        self.confidence_threshold = float(confidence_threshold)
        self.other_threshold = None if other_threshold is None else float(other_threshold)
        self.group_thresholds = dict(group_thresholds or {})
        self.output_type = output_type
        self.views = views

    @property
    def input_size(self) -> int:
        return self.model.input_hw[0]

    def classify(self, crop: np.ndarray) -> Prediction:
        """One RGB uint8 crop at the model's input size (averaged over ``views`` views)."""
        outs = [self.model.infer_pixels(v) for v in crop_views(crop, self.views)]
        if self.head is not None:
            # A linear head on the views' mean embedding is the mean of its logits over the
            # views: the same averaging as output 0's.
            emb = np.stack([o[1].reshape(-1) for o in outs]).mean(axis=0, dtype=np.float64)
            if not self.head.is_mixture:
                return self.head.predict(emb.astype(np.float32))
            # A mixture refines output 0 as shipped (same views, same calibration).
            base = calibrated_softmax(
                combine_views([o[0] for o in outs], self.output_type), self.temperature
            )
            return self.head.predict(emb.astype(np.float32), base)
        logits = combine_views([o[0] for o in outs], self.output_type)
        probs = calibrated_softmax(logits, self.temperature)
        pred = decide(
            probs,
            self.classes,
            self.confidence_threshold,
            self.other_threshold,
            self.group_thresholds,
        )
        if self.embedding_dim is None:
            return pred
        # Averaged over the views like the logits, so the embedding does not depend on how the
        # cell happened to lie either.
        emb = np.stack([o[1].reshape(-1) for o in outs]).mean(axis=0, dtype=np.float64)
        return replace(pred, embedding=emb.astype(np.float32))

    @property
    def labels(self) -> tuple[str, ...]:
        """The classes a cell's probabilities are over (the head's when there is one)."""
        return self.head.classes if self.head is not None else self.classes

    def classify_all(self, crops: Sequence[np.ndarray]) -> list[Prediction]:
        # Batch 1 models (the op gate demands it): one invoke per crop.
        return [self.classify(c) for c in crops]
