"""models/manifest.json: what each shipped model is, and the checks the runtime makes at load.

Shared with ``convert`` (which writes it), so the two sides read the same schema.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_wbc import taxonomy
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
class AnchorsRef:
    """Embeddings of cells of the classifier's own sources (``edge-wbc-convert anchors``): a lab
    adaptation keeps the shipped head's answers on them while it learns the lab, so another
    lab's head does not drift on the cells the model was made for. Read by ``edge-wbc adapt``
    only; a station that never adapts never opens the file."""

    file: str  # an .npz in the models folder: ``embeddings`` (cells x embedding_dim)
    sha256: str
    weight: float  # of the shipped answers on the anchors against the lab's own log-loss
    classifier_sha256: str  # the classifier whose embeddings they are


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
    #: classifier only: counting group -> its own confidence threshold (edge_wbc.taxonomy;
    #: absent: confidence_threshold), e.g. immature granulocytes named at a lower probability.
    group_thresholds: Mapping[str, float] = field(default_factory=dict)
    #: classifier only: views of each crop averaged (one of VIEW_COUNTS); the calibration was
    #: fitted with this many.
    views: int = 1
    crop_scale: float = CROP_SCALE
    #: classifier only: length of output 1, the pooled features in front of the class head
    #: (manifest "embedding"); None when the model emits only its classes.
    embedding_dim: int | None = None
    #: classifier only: the head on the embedding that names the cells (None: output 0 does).
    head: HeadRef | None = None
    #: classifier only: the anchor cells of a lab adaptation (None: adapt without them).
    anchors: AnchorsRef | None = None
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
                # The head that names the cells changes the answers as much as the model does.
                | ({"head": {"file": m.head.file, "sha256": m.head.sha256}} if m.head else {})
                for m in self.models
            ],
        }


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: The keys of a model entry that say what the model's outputs mean, bound to the model file by
#: ``label_binding`` at release: swapping two class names, or calling logits probabilities,
#: without re-releasing is refused at load instead of relabelling every cell.
BOUND_KEYS = ("sha256", "task", "classes", "output", "embedding")
#: What a classifier's classes may be: the five-part classifier's and the fine one's outputs.
CLASSIFIER_CLASSES = tuple(
    dict.fromkeys((*taxonomy.LEGACY_MODEL_CLASSES, *taxonomy.MODEL_CLASSES))
)
SEGMENTER_CLASSES = ((), ("leukocyte",))
OUTPUT_TYPES = ("probabilities", "logits")
_HEX = frozenset("0123456789abcdef")


def label_binding(entry: Mapping[str, Any]) -> str:
    """The sha256, over a canonical JSON text, of a model entry's BOUND_KEYS: the model file's
    sha256 with its class list (in output order), its output block(s) and declared embedding.

    ``edge-wbc-convert release`` records it as ``label_binding`` in every entry and the loader
    recomputes it, so a class list or an output meaning belongs to one model file. It guards
    against edits and mix-ups (a hand-edited or merged manifest, a model copied under another
    entry), not against someone who recomputes it on purpose: that needs a signature, and the
    sha256 of every file already stops a swapped model.
    """
    bound = {k: entry.get(k) for k in BOUND_KEYS}
    text = json.dumps(bound, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _require(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ManifestError(f"{where}: missing key '{key}'")
    return d[key]


def _obj(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ManifestError(f"{where}: expected an object, got {type(v).__name__} {v!r:.60}")
    return v


def _num(
    v: Any, where: str, lo: float, hi: float, *, lo_open: bool = False, integer: bool = False
) -> float:
    """A JSON number (not a string, not true/false, not NaN or infinite) within [lo, hi]
    ((lo, hi] when ``lo_open``)."""
    kinds = (int,) if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kinds):
        want = "an integer" if integer else "a number"
        raise ManifestError(f"{where}: expected {want}, got {type(v).__name__} {v!r:.60}")
    if not math.isfinite(v):
        raise ManifestError(f"{where}: {v} is not a finite number")
    if v < lo or v > hi or (lo_open and v == lo):
        raise ManifestError(f"{where}: {v} is not in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
    return float(v)


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise ManifestError(f"{where}: expected a non-empty string, got {v!r:.60}")
    return v


def _sha(v: Any, where: str) -> str:
    if not isinstance(v, str) or len(v) != 64 or not set(v) <= _HEX:
        raise ManifestError(f"{where}: expected a sha256 (64 lower-case hex digits), got {v!r:.80}")
    return v


def _file_name(v: Any, where: str) -> str:
    name = _str(v, where)
    # A plain name in the models folder: the loader must never be pointed outside it.
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ManifestError(f"{where}: {name!r} is not a file name in the models folder")
    return name


def _classes(d: dict[str, Any], task: str, where: str) -> tuple[str, ...]:
    raw = d.get("classes", [])
    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
        raise ManifestError(f"{where}.classes: expected a list of class names, got {raw!r:.80}")
    classes = tuple(raw)
    if len(set(classes)) != len(classes):
        dup = sorted({c for c in classes if classes.count(c) > 1})
        raise ManifestError(f"{where}.classes: {dup} listed twice")
    if task == "classification":
        unknown = [c for c in classes if c not in CLASSIFIER_CLASSES]
        if unknown:
            raise ManifestError(
                f"{where}.classes: {unknown} unknown (a classifier's classes are those of "
                f"edge_wbc.taxonomy: {', '.join(CLASSIFIER_CLASSES)})"
            )
        # Each five-part type needs an output (band + segmented make the neutrophil).
        missing = [
            g for g in CLASSES if not any(taxonomy.GROUP_OF[c] == g for c in classes)
        ]
        if missing:
            raise ManifestError(f"{where}.classes: classifier has no output for {missing}")
    elif classes not in SEGMENTER_CLASSES:
        raise ManifestError(f"{where}.classes: a segmenter's are [] or ['leukocyte'], not {raw}")
    return classes


def _float_weights(v: Any, model_file: str, where: str) -> None:
    """A model's float Keras weights (``edge-wbc-convert recover-float`` or ``release``): kept
    in the models folder to train from, never loaded here and left out of the wheel, so their
    description is checked, not their presence."""
    fw = _obj(v, where)
    name = _file_name(_require(fw, "file", where), f"{where}.file")
    if not name.endswith(".keras") or name == model_file:
        raise ManifestError(f"{where}.file: {name!r} is not a .keras file next to {model_file}")
    _sha(_require(fw, "sha256", where), f"{where}.sha256")
    recovered = _require(fw, "recovered_from_int8", where)
    if not isinstance(recovered, bool):
        raise ManifestError(
            f"{where}.recovered_from_int8: expected true or false, got {recovered!r:.40}"
        )
    if "agreement" in fw:
        _obj(fw["agreement"], f"{where}.agreement")


def _entry(d: Any, i: int) -> ModelEntry:
    where = f"models[{i}]"
    d = _obj(d, where)
    name = _str(_require(d, "name", where), f"{where}.name")
    file = _file_name(_require(d, "file", where), f"{where}.file")
    sha = _sha(_require(d, "sha256", where), f"{where}.sha256")
    task = _require(d, "task", where)
    if task not in TASKS:
        raise ManifestError(f"{where}.task: '{task}' is not one of {TASKS}")
    inp = _obj(_require(d, "input", where), f"{where}.input")
    raw_shape = _require(inp, "shape", where + ".input")
    if not isinstance(raw_shape, list):
        raise ManifestError(f"{where}.input.shape: expected a list, got {raw_shape!r:.60}")
    shape = tuple(
        int(_num(v, f"{where}.input.shape[{k}]", 1, 65535, integer=True))
        for k, v in enumerate(raw_shape)
    )
    if len(shape) != 4 or shape[0] != 1 or shape[3] != 3:
        raise ManifestError(f"{where}.input.shape: {list(shape)} is not [1, H, W, 3]")
    dtype = _require(inp, "dtype", where + ".input")
    if dtype not in ("int8", "uint8", "float32"):
        raise ManifestError(f"{where}.input.dtype: '{dtype}' not supported")
    if d.get("color_order", COLOR_ORDER) != COLOR_ORDER:
        raise ManifestError(f"{where}.color_order: {d.get('color_order')!r:.40} != {COLOR_ORDER}")
    pre = _obj(d.get("preprocessing", {}), f"{where}.preprocessing")
    if pre.get("version", PREPROCESS_VERSION) != PREPROCESS_VERSION:
        raise ManifestError(
            f"{where}.preprocessing.version: built for preprocessing v{pre.get('version')!r:.20}, "
            f"this runtime has v{PREPROCESS_VERSION}; reconvert the model or install the "
            "matching edge-wbc"
        )
    crop_scale = _num(
        pre.get("crop_scale", CROP_SCALE), f"{where}.preprocessing.crop_scale", 1.0, 4.0
    )
    classes = _classes(d, task, where)
    out = d.get("output")
    if out is not None:
        out = _obj(out, f"{where}.output")
        if out.get("type") is not None and out["type"] not in OUTPUT_TYPES:
            raise ManifestError(
                f"{where}.output.type: {out['type']!r:.40} is not one of {OUTPUT_TYPES}"
            )
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
            or isinstance(eshape[1], bool)
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
        h = _obj(h, hwhere)
        hfile = _file_name(_require(h, "file", hwhere), f"{hwhere}.file")
        hsha = _sha(_require(h, "sha256", hwhere), f"{hwhere}.sha256")
        hcls = _require(h, "classes", hwhere)
        if (
            not isinstance(hcls, list)
            or len(hcls) < 2
            or not all(isinstance(c, str) and c for c in hcls)
            or len(set(hcls)) != len(hcls)
        ):
            raise ManifestError(
                f"{hwhere}.classes: expected distinct class names, got {hcls!r:.80}"
            )
        unknown = [c for c in hcls if c not in taxonomy.GROUP_OF]
        if unknown:
            raise ManifestError(f"{hwhere}.classes: {unknown} are not classes of edge_wbc.taxonomy")
        head = HeadRef(hfile, hsha, tuple(hcls))
    cal = _obj(d.get("calibration", {}), f"{where}.calibration")
    views = d.get("views", 1)
    if isinstance(views, bool) or views not in VIEW_COUNTS:
        raise ManifestError(
            f"{where}: views {views!r:.20} is not one of {', '.join(map(str, VIEW_COUNTS))}"
        )
    other = cal.get("other_threshold")
    gthr_raw = _obj(cal.get("group_thresholds", {}), f"{where}.calibration.group_thresholds")
    gthr = {}
    for g, v in gthr_raw.items():
        if g not in taxonomy.GROUPS:
            raise ManifestError(
                f"{where}.calibration.group_thresholds: {g!r:.40} is not a group of "
                f"edge_wbc.taxonomy ({', '.join(taxonomy.GROUPS)})"
            )
        gthr[g] = _num(v, f"{where}.calibration.group_thresholds.{g}", 0.0, 1.0)
    for key in ("threshold",):  # a segmenter's own copy of the ensemble threshold
        if key in d:
            _num(d[key], f"{where}.{key}", 0.0, 1.0)
    for kind in ("edgetpu",):
        if kind in d and d[kind] is not None:
            block = _obj(d[kind], f"{where}.{kind}")
            if "sha256" in block:
                _sha(block["sha256"], f"{where}.{kind}.sha256")
            if "file" in block:
                _file_name(block["file"], f"{where}.{kind}.file")
    if d.get("float_weights") is not None:
        _float_weights(d["float_weights"], file, f"{where}.float_weights")
    anchors = None
    if d.get("adaptation_anchors") is not None:
        awhere = f"{where}.adaptation_anchors"
        if embedding_dim is None:
            raise ManifestError(f"{awhere}: anchors are embeddings; declare 'embedding'")
        a = _obj(d["adaptation_anchors"], awhere)
        afile = _file_name(_require(a, "file", awhere), f"{awhere}.file")
        if not afile.endswith(".npz"):
            raise ManifestError(f"{awhere}.file: {afile!r} is not an .npz file")
        anchors = AnchorsRef(
            afile,
            _sha(_require(a, "sha256", awhere), f"{awhere}.sha256"),
            _num(_require(a, "weight", awhere), f"{awhere}.weight", 0.0, 1e3),
            _sha(_require(a, "classifier_sha256", awhere), f"{awhere}.classifier_sha256"),
        )
    binding = d.get("label_binding")
    if binding is None:
        raise ManifestError(
            f"{where}.label_binding: missing: nothing ties this entry's classes and output to "
            f"{file}; release the models with edge-wbc-convert release"
        )
    try:
        expected = label_binding(d)
    except ValueError:  # NaN or Infinity, which JSON itself does not have
        raise ManifestError(
            f"{where}: NaN or Infinity in {', '.join(k for k in BOUND_KEYS if k in d)}"
        ) from None
    if binding != expected:
        raise ManifestError(
            f"{where}.label_binding: the classes, output or embedding of '{name}' are not the "
            f"ones released with {file} (edited after release?): refusing to relabel its "
            "answers; restore the released manifest.json or release again"
        )
    return ModelEntry(
        name=name,
        file=file,
        sha256=sha,
        task=task,
        input_shape=shape,
        input_dtype=dtype,
        classes=classes,
        ensemble_weight=_num(
            d.get("ensemble_weight", 1.0), f"{where}.ensemble_weight", 0.0, 1e6
        ),
        temperature=_num(
            cal.get("temperature", 1.0), f"{where}.calibration.temperature", 0.0, 1e3,
            lo_open=True,
        ),
        confidence_threshold=_num(
            cal.get("confidence_threshold", 0.0),
            f"{where}.calibration.confidence_threshold", 0.0, 1.0,
        ),
        other_threshold=(
            None if other is None
            else _num(other, f"{where}.calibration.other_threshold", 0.0, 1.0)
        ),
        group_thresholds=gthr,
        views=int(views),
        crop_scale=crop_scale,
        embedding_dim=embedding_dim,
        head=head,
        anchors=anchors,
        raw=d,
    )  # fmt: skip


def load_manifest(models_dir: str | Path, verify: bool = True) -> Manifest:
    """Read and validate ``models_dir/manifest.json``: every value's type and range, the class
    list against the five types, each entry's ``label_binding``.

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
    except RecursionError:
        raise ManifestError(f"{path}: unreadable manifest: nested too deeply") from None
    try:
        return _manifest(root, raw, verify)
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from None


def _manifest(root: Path, raw: Any, verify: bool) -> Manifest:
    raw = _obj(raw, "the manifest")
    if raw.get("schema") != MANIFEST_SCHEMA:
        raise ManifestError(f"schema {raw.get('schema')!r:.60}, expected {MANIFEST_SCHEMA!r}")
    models = _require(raw, "models", "the manifest")
    if not isinstance(models, list):
        raise ManifestError(f"models: expected a list of models, got {type(models).__name__}")
    entries = tuple(_entry(d, i) for i, d in enumerate(models))
    names = [e.name for e in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ManifestError(f"models: name {dup[0]!r} is used twice")
    segs = [e for e in entries if e.task == "segmentation"]
    if not segs:
        raise ManifestError("no segmentation model")
    if sum(e.ensemble_weight for e in segs) <= 0:
        raise ManifestError(
            "models[*].ensemble_weight: the segmenters' weights sum to 0, so no field would "
            "have a leukocyte"
        )
    if sum(1 for e in entries if e.task == "classification") > 1:
        raise ManifestError("models: more than one classification model")
    ens = _obj(raw.get("ensemble", {}), "ensemble")
    threshold = _num(ens.get("threshold", 0.5), "ensemble.threshold", 0.0, 1.0, lo_open=True)
    man = Manifest(root=root, models=entries, seg_threshold=threshold, raw=raw)
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
