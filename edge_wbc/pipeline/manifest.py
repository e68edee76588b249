"""models/manifest.json: what each shipped model is, and the checks the runtime makes at load.

Shared with ``convert`` (which writes it), so the two sides read the same schema.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_wbc.pipeline.preprocess import COLOR_ORDER, CROP_SCALE, PREPROCESS_VERSION
from edge_wbc.pipeline.results import CLASSES

MANIFEST_SCHEMA = "edge-wbc/manifest/1"
MANIFEST_NAME = "manifest.json"
TASKS = ("segmentation", "classification")
#: How many views of a crop the classifier may average: 1, 2 (with its mirror image), 4 (the four
#: right-angle rotations) or 8 (the rotations and their mirrors). A cell on a slide has no up
#: or left, so every view is as true as the others; averaging them removes the part of the
#: model's answer that depends on how the cell happened to lie.
VIEW_COUNTS = (1, 2, 4, 8)


class ManifestError(Exception):
    """The models folder cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class HeadRef:
    """A classifier's head on its embedding (edge_wbc.pipeline.heads): when present, the cell's
    classes and calibration are the head's, not output 0's."""

    file: str  # the head's JSON in the models folder (its .npz sits next to it)
    sha256: str  # of the JSON, which records the .npz's sha256 in turn
    classes: tuple[str, ...]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    file: str
    sha256: str
    task: str
    input_shape: tuple[int, ...]
    input_dtype: str
    classes: tuple[str, ...] = ()
    ensemble_weight: float = 1.0
    #: classifier only: softmax temperature fitted on val, and the confidence below which a cell
    #: goes to "unidentified".
    temperature: float = 1.0
    confidence_threshold: float = 0.0
    #: the confidence an "other" call needs to leave the count (None: confidence_threshold).
    other_threshold: float | None = None
    #: classifier only: views of each crop averaged (one of VIEW_COUNTS); the calibration was
    #: fitted with this many.
    views: int = 1
    crop_scale: float = CROP_SCALE
    #: classifier only: length of output 1, the pooled features in front of the class head
    #: (manifest "embedding"); None when the model emits only its classes.
    embedding_dim: int | None = None
    #: classifier only: the head on the embedding that names the cells (None: output 0 does).
    head: HeadRef | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def input_hw(self) -> tuple[int, int]:
        return int(self.input_shape[1]), int(self.input_shape[2])


@dataclass(frozen=True)
class Manifest:
    root: Path
    models: tuple[ModelEntry, ...]
    seg_threshold: float
    raw: dict[str, Any] = field(compare=False, repr=False)

    @property
    def segmenters(self) -> tuple[ModelEntry, ...]:
        return tuple(m for m in self.models if m.task == "segmentation")

    @property
    def classifier(self) -> ModelEntry | None:
        cls = [m for m in self.models if m.task == "classification"]
        return cls[0] if cls else None

    def path(self, entry: ModelEntry) -> Path:
        return self.root / entry.file

    def summary(self) -> dict[str, Any]:
        """What an analysis or a report records about the models that produced it."""
        return {
            "manifest": str(self.root / MANIFEST_NAME),
            "created": self.raw.get("created"),
            "segmentation_threshold": self.seg_threshold,
            "models": [
                {
                    "name": m.name,
                    "file": m.file,
                    "sha256": m.sha256,
                    "task": m.task,
                    "ensemble_weight": m.ensemble_weight if m.task == "segmentation" else None,
                }
                for m in self.models
            ],
        }


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _require(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ManifestError(f"{where}: missing key '{key}'")
    return d[key]


def _entry(d: dict[str, Any], i: int) -> ModelEntry:
    where = f"models[{i}]"
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: expected an object")
    task = _require(d, "task", where)
    if task not in TASKS:
        raise ManifestError(f"{where}: task '{task}' is not one of {TASKS}")
    inp = _require(d, "input", where)
    shape = tuple(int(v) for v in _require(inp, "shape", where + ".input"))
    if len(shape) != 4 or shape[0] != 1 or shape[3] != 3:
        raise ManifestError(f"{where}: input shape {list(shape)} is not [1, H, W, 3]")
    dtype = _require(inp, "dtype", where + ".input")
    if dtype not in ("int8", "uint8", "float32"):
        raise ManifestError(f"{where}: input dtype '{dtype}' not supported")
    if d.get("color_order", COLOR_ORDER) != COLOR_ORDER:
        raise ManifestError(f"{where}: colour order {d.get('color_order')} != {COLOR_ORDER}")
    pre = d.get("preprocessing", {})
    if pre.get("version", PREPROCESS_VERSION) != PREPROCESS_VERSION:
        raise ManifestError(
            f"{where}: built for preprocessing v{pre.get('version')}, this runtime has "
            f"v{PREPROCESS_VERSION}; reconvert the model or install the matching edge-wbc"
        )
    classes = tuple(d.get("classes", ()))
    if task == "classification":
        missing = [c for c in CLASSES if c not in classes]
        if missing:
            raise ManifestError(f"{where}: classifier lacks classes {missing}")
    emb = d.get("embedding")
    embedding_dim = None
    if emb is not None:
        eshape = emb.get("shape") if isinstance(emb, dict) else None
        if (
            task != "classification"
            or not isinstance(eshape, list)
            or len(eshape) != 2
            or eshape[0] != 1
            or not isinstance(eshape[1], int)
            or eshape[1] < 1
            or emb.get("output_index", 1) != 1
        ):
            raise ManifestError(
                f"{where}.embedding: expected a classifier's output 1 shaped [1, D], got {emb!r}"
            )
        embedding_dim = int(eshape[1])
    head = None
    if d.get("head") is not None:
        h = d["head"]
        hwhere = f"{where}.head"
        if embedding_dim is None:
            raise ManifestError(f"{hwhere}: a head reads the embedding; declare 'embedding'")
        if not isinstance(h, dict):
            raise ManifestError(f"{hwhere}: expected an object, got {h!r:.60}")
        hfile, hsha, hcls = h.get("file"), h.get("sha256"), h.get("classes")
        if not isinstance(hfile, str) or not hfile or "/" in hfile or "\\" in hfile:
            raise ManifestError(f"{hwhere}.file: {hfile!r:.60} is not a file name")
        if not isinstance(hsha, str) or len(hsha) != 64:
            raise ManifestError(f"{hwhere}.sha256: expected a sha256, got {hsha!r:.80}")
        if (
            not isinstance(hcls, list)
            or len(hcls) < 2
            or not all(isinstance(c, str) and c for c in hcls)
            or len(set(hcls)) != len(hcls)
        ):
            raise ManifestError(
                f"{hwhere}.classes: expected distinct class names, got {hcls!r:.80}"
            )
        head = HeadRef(hfile, hsha, tuple(hcls))
    cal = d.get("calibration", {})
    views = d.get("views", 1)
    if views not in VIEW_COUNTS:
        raise ManifestError(
            f"{where}: views {views!r} is not one of {', '.join(map(str, VIEW_COUNTS))}"
        )
    return ModelEntry(
        name=str(_require(d, "name", where)),
        file=str(_require(d, "file", where)),
        sha256=str(_require(d, "sha256", where)),
        task=task,
        input_shape=shape,
        input_dtype=dtype,
        classes=classes,
        ensemble_weight=float(d.get("ensemble_weight", 1.0)),
        temperature=float(cal.get("temperature", 1.0)),
        confidence_threshold=float(cal.get("confidence_threshold", 0.0)),
        other_threshold=(
            float(cal["other_threshold"]) if cal.get("other_threshold") is not None else None
        ),
        views=int(views),
        crop_scale=float(pre.get("crop_scale", CROP_SCALE)),
        embedding_dim=embedding_dim,
        head=head,
        raw=d,
    )


def load_manifest(models_dir: str | Path, verify: bool = True) -> Manifest:
    """Read and validate ``models_dir/manifest.json``.

    With ``verify`` every file must exist and match its sha256: a model that was swapped,
    truncated by a failed copy or corrupted on the SD card is refused, never run.
    """
    root = Path(models_dir)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"no {MANIFEST_NAME} in {root} (is --models pointing at a models folder?)"
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: unreadable manifest: {e}") from e
    if raw.get("schema") != MANIFEST_SCHEMA:
        raise ManifestError(f"{path}: schema {raw.get('schema')!r}, expected {MANIFEST_SCHEMA!r}")
    entries = tuple(_entry(d, i) for i, d in enumerate(raw.get("models", [])))
    if not any(e.task == "segmentation" for e in entries):
        raise ManifestError(f"{path}: no segmentation model")
    ens = raw.get("ensemble", {})
    man = Manifest(
        root=root, models=entries, seg_threshold=float(ens.get("threshold", 0.5)), raw=raw
    )
    if verify:
        verify_files(man)
    return man


def verify_files(man: Manifest) -> None:
    for e in man.models:
        p = man.path(e)
        if not p.is_file():
            raise ManifestError(f"model file {p} listed in the manifest is missing")
        digest = sha256_file(p)
        if digest != e.sha256:
            raise ManifestError(
                f"model file {p} does not match the manifest (sha256 {digest[:12]}…, expected "
                f"{e.sha256[:12]}…): refusing to run a model that is not the one shipped"
            )
        if e.head is not None:
            hp = man.root / e.head.file
            if not hp.is_file():
                raise ManifestError(f"head file {hp} listed in the manifest is missing")
            if sha256_file(hp) != e.head.sha256:
                raise ManifestError(
                    f"head file {hp} does not match the manifest: refusing a head that is not "
                    "the one shipped"
                )


def write_manifest(models_dir: str | Path, raw: dict[str, Any]) -> Path:
    """Write atomically (a half-written manifest would make the station refuse to start)."""
    root = Path(models_dir)
    raw = {"schema": MANIFEST_SCHEMA, **{k: v for k, v in raw.items() if k != "schema"}}
    tmp = root / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(raw, indent=2, sort_keys=False) + "\n")
    tmp.replace(root / MANIFEST_NAME)
    return root / MANIFEST_NAME
