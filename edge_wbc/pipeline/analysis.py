"""One field in, counted and typed leukocytes out: the device pipeline composed.

    white balance ▸ segment (ensemble) ▸ postprocess (5 steps) ▸ classify ▸ quality

``FieldAnalyzer`` builds every interpreter once; ``analyze`` then runs a field in tens of
milliseconds. One analyzer belongs to one thread (TFLite interpreters are not re-entrant).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_wbc.bundled import locate_models
from edge_wbc.pipeline.adaptation import Adaptation, AdaptationError, load_adaptation
from edge_wbc.pipeline.classify import CellClassifier, Prediction
from edge_wbc.pipeline.heads import HeadError, LinearHead
from edge_wbc.pipeline.inference import (
    CPU,
    TFLiteModel,
    get_runtime,
    open_accelerator,
    output_kind,
)
from edge_wbc.pipeline.manifest import Manifest, ManifestError, ModelEntry, load_manifest
from edge_wbc.pipeline.postprocess import PostprocessParams, crop_cells, postprocess, work_scale
from edge_wbc.pipeline.preprocess import CROP_SCALE, ensure_rgb_uint8, white_balance
from edge_wbc.pipeline.quality import QualityParams, assess
from edge_wbc.pipeline.results import UNIDENTIFIED, Cell, FieldResult
from edge_wbc.pipeline.segment import EnsembleSegmenter, Member

log = logging.getLogger(__name__)


class FieldAnalyzer:
    def __init__(
        self,
        models_dir: str | Path | None = None,
        threads: int = 2,
        accelerator: str = CPU,
        edgetpu_device: str = "",
        require_accelerator: bool = False,
        postprocess: PostprocessParams | None = None,
        quality: QualityParams | None = None,
        adaptation: str | Path | None = None,
    ) -> None:
        """``adaptation``: a lab's adaptation folder (edge_wbc.pipeline.adaptation), or None /
        "" for the shipped head; one fitted on another classifier is a ManifestError."""
        t0 = time.perf_counter()
        # None: the one resolution rule (--models, models.dir, $EDGE_WBC_MODELS, installed,
        # packaged) in edge_wbc.bundled.
        self.models_location = locate_models("" if models_dir is None else str(models_dir))
        self.manifest: Manifest = load_manifest(self.models_location.path)
        self.runtime = get_runtime()
        self.threads = int(threads)
        self.accel = open_accelerator(
            accelerator, edgetpu_device, require_accelerator, self.runtime
        )
        self.params = postprocess or PostprocessParams()
        self.quality_params = quality or QualityParams()

        loaded: list[TFLiteModel] = []

        def load(entry: ModelEntry) -> TFLiteModel:
            # The manifest keeps the compiled file's digest under the accelerator's name.
            compiled = (entry.raw.get(self.accel.kind) if self.accel.kind != CPU else None) or {}
            model = TFLiteModel(
                self.manifest.path(entry),
                self.threads,
                self.accel,
                require_accelerator,
                self.runtime,
                compiled_sha256=compiled.get("sha256") if isinstance(compiled, dict) else None,
            )
            if tuple(model.input_shape) != tuple(entry.input_shape):
                raise ManifestError(
                    f"{entry.file}: the model's input is {list(model.input_shape)} but the "
                    f"manifest says {list(entry.input_shape)}"
                )
            if model.input.dtype.name != entry.input_dtype:
                raise ManifestError(
                    f"{entry.file}: the model's input is {model.input.dtype.name} but the "
                    f"manifest says {entry.input_dtype}"
                )
            loaded.append(model)
            return model

        members = []
        for e in self.manifest.segmenters:
            m = load(e)
            declared = (e.raw.get("output") or {}).get("type")
            members.append(
                Member(e.name, m, e.ensemble_weight, output_kind(m.outputs[0], declared))
            )
        self.segmenter = EnsembleSegmenter(members, self.manifest.seg_threshold)
        self.classifier: CellClassifier | None = None
        ce = self.manifest.classifier
        if ce is not None:
            cm = load(ce)
            if cm.input_hw[0] != cm.input_hw[1]:
                raise ManifestError(f"{ce.file}: classifier input must be square, is {cm.input_hw}")
            declared = (ce.raw.get("output") or {}).get("type")
            head = None
            if ce.head is not None:
                try:
                    head = LinearHead.load(self.manifest.root / ce.head.file, ce.sha256)
                except HeadError as e:
                    raise ManifestError(str(e)) from e
                if head.classes != ce.head.classes:
                    raise ManifestError(
                        f"{ce.head.file}: classes {list(head.classes)}, the manifest says "
                        f"{list(ce.head.classes)}"
                    )
            try:
                classifier = CellClassifier(
                    cm,
                    ce.classes,
                    ce.temperature,
                    ce.confidence_threshold,
                    output_kind(cm.outputs[0], declared),
                    ce.other_threshold,
                    ce.views,
                    ce.embedding_dim,
                    head,
                    ce.group_thresholds,
                )
            except ValueError as e:
                raise ManifestError(f"{ce.file}: {e}") from e
            self.classifier = classifier
            self.crop_scale = ce.crop_scale
        else:
            log.warning(
                "%s lists no classifier: every cell will be 'unidentified'", self.manifest.root
            )
            self.crop_scale = CROP_SCALE
        #: Every interpreter, segmenters first (what runs where: ``accelerator``).
        self.models = loaded
        #: The lab head in use instead of the shipped one (``set_adaptation``), or None.
        self.adaptation: Adaptation | None = None
        if adaptation:
            try:
                self.set_adaptation(adaptation)
            except AdaptationError as e:
                raise ManifestError(str(e)) from e
        self.load_ms = (time.perf_counter() - t0) * 1000.0

    @classmethod
    def from_config(cls, cfg: Any) -> FieldAnalyzer:
        """Build from an ``edge_wbc.config.Config`` (models + postprocess sections)."""
        m = cfg.models
        return cls(
            models_dir=m.dir,  # None: resolved by edge_wbc.bundled.locate_models
            threads=m.threads,
            accelerator=m.accelerator,
            edgetpu_device=m.edgetpu_device,
            require_accelerator=m.require_accelerator,
            postprocess=PostprocessParams.from_config(cfg.postprocess),
            adaptation=m.adaptation or None,
        )

    def set_adaptation(self, path: str | Path | None) -> Adaptation | None:
        """Use a lab's adaptation from the next field on (None: back to the shipped head).

        The folder is read and checked completely before anything changes: a corrupt one, or
        one fitted on another classifier, raises AdaptationError and the current head stays.
        """
        if not path:
            self.adaptation = None
            return None
        ce = self.manifest.classifier
        if self.classifier is None or ce is None:
            raise AdaptationError(f"{path}: the models in use have no classifier to adapt")
        if self.classifier.embedding_dim is None:
            raise AdaptationError(
                f"{path}: {ce.file} emits no embedding, so no lab head can be applied to it"
            )
        ad = load_adaptation(Path(path), ce.sha256)
        if ad.head.dim != self.classifier.embedding_dim:
            raise AdaptationError(
                f"{ad.path}: the head reads {ad.head.dim} features, {ce.file} emits "
                f"{self.classifier.embedding_dim}"
            )
        self.adaptation = ad
        return ad

    @property
    def provenance(self) -> dict[str, Any]:
        """Which classifier (sha256) and which adaptation (id, sha256; None: the shipped head)
        produce the labels: every result, report and message carries it, so a reader can tell
        labs and model versions apart."""
        ce = self.manifest.classifier
        return {
            "classifier_sha256": ce.sha256 if ce is not None else None,
            "adaptation": self.adaptation.describe() if self.adaptation is not None else None,
        }

    @property
    def accelerator(self) -> str:
        """What the models really run on: "cpu", "edgetpu", or "edgetpu+cpu" when mixed."""
        kinds = sorted({m.kind for m in self.models})
        return "+".join(reversed(kinds)) if len(kinds) > 1 else kinds[0]

    def describe(self) -> dict[str, Any]:
        """The "models" block of an analysis document."""
        return {
            **self.manifest.summary(),
            "models_dir": str(self.models_location.path),
            "models_source": self.models_location.source,
            "runtime": f"{self.runtime.name} {self.runtime.version}",
            "accelerator": self.accelerator,
            "accelerator_note": self.accel.message,
            "threads": self.threads,
            "cell_diameter_px": self.params.cell_diameter_px,
            **self.provenance,
        }

    def analyze(self, rgb: np.ndarray, path: str = "", scale: float = 1.0) -> FieldResult:
        """Analyse one field (RGB uint8, any size; other layouts are converted).

        ``scale``: pixels of ``rgb`` per pixel of the frame the settings are for, when the field
        was read reduced (``imageio.DecodedImage.scale``): every size in the settings shrinks
        with it. Positions stay in ``rgb``'s pixels (``at_file_scale`` maps them back).
        """
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"scale must be in (0, 1], not {scale}")
        params = self.params
        if scale != 1.0:
            params = dataclasses.replace(
                params,
                cell_diameter_px=params.cell_diameter_px * scale,
                border_margin_px=round(params.border_margin_px * scale),
            )
        timing: dict[str, float] = {}
        t_start = t = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal t
            now = time.perf_counter()
            timing[stage] = (now - t) * 1000.0
            t = now

        rgb = ensure_rgb_uint8(rgb)
        h, w = rgb.shape[:2]
        balanced = white_balance(rgb)
        lap("preprocess")

        s = work_scale((h, w), params)
        work_hw = (max(1, round(h * s)), max(1, round(w * s)))
        prob = self.segmenter.probability(balanced, work_hw)
        lap("segment")

        regions, _ = postprocess(
            self.segmenter.mask(prob), (h, w), params, work_hw[0] / h, prob
        )
        size = self.classifier.input_size if self.classifier else 96
        crop_cells(balanced, regions, size, self.crop_scale)
        lap("postprocess")

        if self.classifier is not None:
            preds = self.classifier.classify_all([r.crop for r in regions])  # type: ignore[misc]
            if self.adaptation is not None:
                head = self.adaptation.head
                preds = [p if p.embedding is None else head.predict(p.embedding) for p in preds]
        else:
            preds = [Prediction(UNIDENTIFIED, 0.0, {}) for _ in regions]
        lap("classify")

        cells = [
            Cell(
                r.bbox,
                p.label,
                p.score,
                p.probs,
                r.area_px,
                crop=r.crop,
                mask=r.mask,
                embedding=p.embedding,
            )
            for r, p in zip(regions, preds, strict=True)
        ]
        mask = np.zeros((h, w), np.uint8)
        for c in cells:
            if c.counted:
                x0, y0, x1, y1 = c.bbox
                mask[y0:y1, x0:x1][c.mask] = 255
        quality = assess(
            rgb,
            n_cells=sum(1 for c in cells if c.counted),
            foreground_px=int(np.count_nonzero(mask)),
            n_split=sum(1 for r in regions if r.split),
            cell_diameter_px=params.cell_diameter_px,
            params=self.quality_params,
        )
        lap("quality")
        timing["total"] = (time.perf_counter() - t_start) * 1000.0
        return FieldResult(
            path=path,
            width=w,
            height=h,
            cells=cells,
            quality=quality,
            timing_ms=timing,
            mask=mask,
            model=self.provenance,
        )


def at_file_scale(result: FieldResult, width: int, height: int, mask: bool = True) -> FieldResult:
    """A result computed on a field read reduced, in the pixels of the file (``width`` x
    ``height``): boxes, cell masks and areas scaled up; the field mask is rebuilt at full size
    only when ``mask`` is asked for (a 64 MP frame's mask is 64 MB)."""
    if (result.width, result.height) == (width, height):
        return result
    fx, fy = width / result.width, height / result.height
    cells = []
    for c in result.cells:
        x0, y0, x1, y1 = c.bbox
        bx0, by0 = math.floor(x0 * fx), math.floor(y0 * fy)
        box = (
            bx0,
            by0,
            min(width, max(bx0 + 1, math.ceil(x1 * fx))),
            min(height, max(by0 + 1, math.ceil(y1 * fy))),
        )
        cm = None
        area = round(c.area_px * fx * fy)
        if c.mask is not None:
            size = (box[2] - box[0], box[3] - box[1])
            up = cv2.resize(c.mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
            cm = up.astype(bool)
            area = int(np.count_nonzero(cm))
        cells.append(dataclasses.replace(c, bbox=box, area_px=area, mask=cm))
    full = None
    if mask:
        full = np.zeros((height, width), np.uint8)
        for c in cells:
            if c.counted and c.mask is not None:
                x0, y0, x1, y1 = c.bbox
                full[y0:y1, x0:x1][c.mask] = 255
    return dataclasses.replace(result, width=width, height=height, cells=cells, mask=full)


def draw_overlay(rgb: np.ndarray, result: FieldResult) -> np.ndarray:
    """The field with each cell outlined and labelled (RGB uint8), for --overlays and reports."""
    out = ensure_rgb_uint8(rgb).copy()
    h, w = out.shape[:2]
    thick = max(1, round(max(h, w) / 400))
    font = max(0.4, max(h, w) / 1200)
    colours = {
        "neutrophil": (230, 60, 60),
        "eosinophil": (240, 140, 20),
        "basophil": (140, 60, 200),
        "lymphocyte": (40, 120, 230),
        "monocyte": (20, 160, 90),
        UNIDENTIFIED: (250, 200, 0),
        "immature_granulocyte": (200, 40, 140),
        "abnormal_wbc": (120, 0, 0),
        "nrbc": (150, 90, 40),
        "non_wbc": (128, 128, 128),
    }
    for c in result.cells:
        col = colours.get(c.label) or colours.get(c.group, (255, 255, 255))
        x0, y0, x1, y1 = c.bbox
        if c.mask is not None and c.mask.any():
            m = np.zeros((h, w), np.uint8)
            m[y0:y1, x0:x1][c.mask] = 255
            contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(out, contours, -1, col, thick)
        else:
            cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), col, thick)
        text = f"{c.label} {c.score:.2f}" if c.label != UNIDENTIFIED else c.label
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font, thick)
        ty = y0 - 4 if y0 - th - 6 >= 0 else min(h - 2, y1 + th + 4)
        tx = min(max(0, x0), max(0, w - tw))
        cv2.rectangle(out, (tx, ty - th - 2), (tx + tw, ty + base), (255, 255, 255), cv2.FILLED)
        cv2.putText(out, text, (tx, ty), cv2.FONT_HERSHEY_SIMPLEX, font, col, thick, cv2.LINE_AA)
    return out
