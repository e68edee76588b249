"""``edge-wbc-convert``: the offline tool (train, quantize, verify, evaluate, gate, edgetpu,
manifest). Runs on a workstation; TensorFlow is imported lazily inside each command.

This module only parses arguments and prints: the work is in the library modules (train,
quantize, evaluate, release, ...), which never import it."""

from __future__ import annotations

import logging
import os
import struct
import sys
import traceback
from pathlib import Path
from typing import Any

import typer

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

app = typer.Typer(
    name="edge-wbc-convert",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
#: Set to see the traceback of an error the console entry reports in one line.
DEBUG_ENV = "EDGE_WBC_CONVERT_DEBUG"


def _input_errors() -> tuple[type[BaseException], ...]:
    """What a missing, unreadable or malformed input raises below the commands (a .tflite that
    is no flatbuffer: struct.error; a manifest cut short: ManifestError; Keras on a bad file:
    ValueError). Imported here, after TF_CPP_MIN_LOG_LEVEL is set."""
    from edge_wbc.pipeline.inference import ModelLoadError, RuntimeMissing
    from edge_wbc.pipeline.manifest import ManifestError

    return (OSError, struct.error, ValueError, ManifestError, ModelLoadError, RuntimeMissing)


@app.callback()
def _main() -> None:
    """Train, quantize, verify and evaluate the edge-wbc models."""


def _logging(run_dir: Path | None = None) -> None:
    from edge_wbc.logs import CurrentStderrHandler

    # The stderr of the moment, not the one at set-up: a command run in-process (a test's
    # CliRunner) closes its captured stream, and a later log line must not hit it.
    handlers: list[logging.Handler] = [CurrentStderrHandler()]
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(
        level=logging.INFO,
        handlers=handlers,
        force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command("train-seg")
def train_seg(
    encoder: str = typer.Option(
        ..., help="mnv2 | mnv3s | rescnn | efficientnetb2 | efficientnetb7 | inceptionresnetv2"
    ),
    run_dir: Path = typer.Option(..., help="checkpoints, metrics.csv, best.keras go here"),
    data_root: Path = typer.Option(DEFAULT_DATA, help="the shared data folder"),
    steps: int = 4000,
    batch: int = 8,
    lr: float = 2e-3,
    seed: int = 0,
    eval_every: int = 500,
    threads: int = 1,
    weights: str | None = typer.Option(None, help="local encoder weights file (.h5/.weights.h5)"),
    sources: str = typer.Option("zheng1,zheng2,bccd,raabin", help="training sources"),
    height: int = 192,
    width: int = 256,
    init: Path | None = typer.Option(None, help="start from the weights of this .keras model"),
    native_p: float = typer.Option(
        0.3, help="share of samples shown exactly as the device sees them (whole, letterboxed)"
    ),
    source_weights: str = typer.Option(
        "", help="sampling weight per source, e.g. 'zheng2=0.3,bccd=0.35' (others as default)"
    ),
    mono_p: float = typer.Option(
        0.08, help="share of fields made fully grey before white balance (monochrome cameras)"
    ),
) -> None:
    """Train one U-Net segmenter (resumes from RUN_DIR/last.keras when present)."""
    from edge_wbc_convert.train import train_segmenter

    _logging(run_dir)
    best = train_segmenter(
        encoder,
        run_dir,
        data_root,
        steps=steps,
        batch=batch,
        lr=lr,
        seed=seed,
        eval_every=eval_every,
        threads=threads,
        weights=weights,
        sources=tuple(s for s in sources.split(",") if s),
        hw=(height, width),
        init=init,
        native_p=native_p,
        source_weights=_source_weights(source_weights),
        mono_p=mono_p,
    )
    typer.echo(f"best model: {best}")


def _source_weights(spec: str) -> dict[str, float] | None:
    """'zheng2=0.3,bccd=0.35' -> {'zheng2': 0.3, 'bccd': 0.35}; '' -> None (the defaults)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        try:
            w = float(value)
        except ValueError:
            w = -1.0
        if w < 0:
            raise typer.BadParameter(f"expected SOURCE=WEIGHT (weight >= 0), got {part!r}")
        out[name.strip()] = w
    return out or None


# ----------------------------------------------------------------------------- segmentation


@app.command()
def quantize(
    run_dir: Path = typer.Option(..., help="a training run (uses best.keras)"),
    out: Path = typer.Option(..., help="the .tflite file to write"),
    data_root: Path = typer.Option(DEFAULT_DATA),
    samples: int = typer.Option(200, help="representative inputs (augmented training samples)"),
    seed: int = 123,
) -> None:
    """Full-integer int8 conversion with a representative set from the training distribution."""
    from edge_wbc_convert.quantize import quantize_run

    _logging()
    quantize_run(run_dir, out, data_root, samples=samples, seed=seed)
    typer.echo(f"wrote {out}")


@app.command()
def gate(files: list[Path] = typer.Argument(..., help=".tflite files (or folders)")) -> None:
    """The op gate: int8 input, batch 1, no dynamic-shape ops, no float convs, <= 4 MB."""
    from edge_wbc_convert.gate import check

    paths = [p for f in files for p in (sorted(f.glob("*.tflite")) if f.is_dir() else [f])]
    paths = [p for p in paths if not p.stem.endswith("_edgetpu")]
    if not paths:
        typer.echo("no .tflite files given", err=True)
        raise typer.Exit(2)
    bad = 0
    typer.echo(f"{'file':40} {'MB':>6} {'input':>18} {'ops':>5}  result")
    for p in paths:
        r = check(p)
        shape = "x".join(map(str, r.input_shape)) + " " + r.input_type.lower()
        typer.echo(
            f"{p.name:40} {r.size_bytes / 1e6:6.2f} {shape:>18} {sum(r.ops.values()):5d}  "
            + ("PASS" if r.ok else "FAIL: " + "; ".join(r.problems))
        )
        bad += not r.ok
    raise typer.Exit(1 if bad else 0)


@app.command("add-embedding")
def add_embedding(
    model: Path = typer.Argument(..., help="an int8 classifier .tflite"),
    out: Path = typer.Option(None, help="default: rewrite MODEL in place"),
    data_root: Path = typer.Option(DEFAULT_DATA),
    check_images: int = typer.Option(200, help="real crops on which output 0 must not change"),
) -> None:
    """Append the classifier's pooled features (global average pool, 1280-d for MobileNetV2) as
    a second output. Written only when output 0 is bit-identical on real crops and the op gate
    passes."""
    from edge_wbc_convert.graph_edit import GraphEditError, add_embedding_checked

    _logging()
    out = model if out is None else out
    try:
        shapes, n = add_embedding_checked(model, out, data_root, check_images)
    except (OSError, GraphEditError) as e:
        typer.echo(f"{model}: {e}", err=True)
        raise typer.Exit(1) from e
    typer.echo(
        f"wrote {out}: outputs {shapes}; output 0 bit-identical on {n} real crops; op gate PASS"
    )


@app.command("embed-cells")
def embed_cells(
    models: Path = typer.Option(Path("models"), help="models folder (classifier with embedding)"),
    data_root: Path = typer.Option(DEFAULT_DATA),
    cache: Path = typer.Option(Path("runs/fine"), help="where the embeddings are cached"),
    threads: int = typer.Option(1),
) -> None:
    """Embeddings of every labelled cell as the device sees it (cached; resumes)."""
    from edge_wbc_convert.fine import box_cells, pbc_cells

    _logging(cache)
    for name, fn in (("boxes", box_cells), ("pbc", pbc_cells)):
        cs = fn(data_root, models, cache, threads)
        found = sum(b is not None for b in cs.box)
        typer.echo(f"{name}: {len(cs.label)} cells, {found} with a box/cell found")


@app.command()
def anchors(
    models: Path = typer.Option(Path("models"), help="models folder (classifier with embedding)"),
    cache: Path = typer.Option(Path("runs/fine"), help="embed-cells' cache of this classifier"),
    cells: int = typer.Option(300, min=10, help="PBC val cells to keep"),
    weight: float = typer.Option(1.0, min=0.0, help="of the shipped answers on them in a fit"),
    seed: int = typer.Option(0),
) -> None:
    """Write the anchor cells of lab adaptation (PBC val embeddings) next to the classifier and
    name them in the manifest (adaptation_anchors). Run after embed-cells."""
    from edge_wbc_convert.anchors import AnchorsError, write_anchors

    from edge_wbc.pipeline.manifest import ManifestError

    try:
        block = write_anchors(models, cache, cells, weight, seed)
    except (AnchorsError, ManifestError, OSError) as e:
        typer.echo(f"anchors: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(
        f"{models / block['file']}: {block['cells']} cells, weight {block['weight']:g}, sha256 "
        f"{block['sha256'][:12]}… (recorded in {models / 'manifest.json'})"
    )


@app.command("refit-head")
def refit_head(
    run: Path = typer.Option(..., help="the released classifier's train-cls run folder"),
    models: Path = typer.Option(Path("models"), help="the models folder it was released into"),
    cache: Path = typer.Option(Path("runs/fine"), help="embed-cells' cache of that classifier"),
    out: Path = typer.Option(..., help="new run folder for release-classifier"),
    lam: list[float] = typer.Option(
        [1e-3, 1e-2, 1e-1], help="pulls toward the trained layer to try (chosen on val)"
    ),
    max_iter: int = typer.Option(400),
) -> None:
    """Refit the classifier's class layer on the device's embeddings of the train cells
    (edge_wbc_convert.refit); writes a run folder for release-classifier when a fit beats the
    trained layer on val, else nothing (exit 3)."""
    from edge_wbc_convert.refit import RefitError
    from edge_wbc_convert.refit import refit as do_refit

    from edge_wbc.pipeline.manifest import ManifestError

    _logging()
    try:
        rep = do_refit(run, models, cache, out, lam, max_iter)
    except (RefitError, ManifestError, OSError) as e:
        typer.echo(f"refit-head: {e}", err=True)
        raise typer.Exit(2) from None
    for c in rep["candidates"]:
        name = "trained layer" if c["lam"] is None else f"{c['weighting']}, lam {c['lam']:g}"
        vals = ", ".join(f"{s} {v:.3f}" for s, v in c["val_top1"].items())
        typer.echo(f"{name}: val top-1 {vals}; mean {c['score']:.4f}")
    if not rep["written"]:
        typer.echo("no fit beats the trained layer on val: nothing written")
        raise typer.Exit(3)
    ch = rep["chosen"]
    typer.echo(f"wrote {out} ({ch['weighting']}, lam {ch['lam']:g}); next: release-classifier "
               f"--cls {out}")  # fmt: skip


@app.command("fit-head")
def fit_head(
    models: Path = typer.Option(Path("models"), help="models folder whose classifier it reads"),
    cache: Path = typer.Option(Path("runs/fine"), help="embed-cells' cache"),
    lam: list[float] = typer.Option(
        [1e-6, 1e-5, 1e-4, 1e-3], help="pulls toward the shipped head to try (chosen on val)"
    ),
    out: Path = typer.Option(Path("models/classifier_head.json"), help="the head to write"),
    register: bool = typer.Option(False, help="name the head in the models' manifest"),
    max_iter: int = typer.Option(400),
) -> None:
    """The fine classes as a flat softmax head on the classifier's embedding: fitted on train,
    temperature and thresholds on val (four views, as shipped), evaluated on test."""
    import datetime as dt
    import json

    import numpy as np
    from edge_wbc_convert import fine
    from edge_wbc_convert import fine_fit as ff
    from edge_wbc_convert.fine import FINE
    from edge_wbc_convert.graph_edit import dense_head

    from edge_wbc.pipeline.heads import LinearHead
    from edge_wbc.pipeline.manifest import load_manifest

    _logging(cache)
    man = load_manifest(models)
    ce = man.classifier
    if ce is None or not ce.embedding_dim:
        typer.echo(f"{models}: no classifier with an embedding output", err=True)
        raise typer.Exit(2)
    base = ce.sha256
    sp = ff.load_splits(cache)
    tr, va, te = sp["train"], sp["val"], sp["test"]
    w6, b6, _ = dense_head(man.path(ce).read_bytes())
    w0, b0 = ff.prior_head(w6, b6)
    weights = ff.balanced_weights(tr.source, tr.label)
    candidates = []
    for lam_ in lam:
        w, b = ff.fit_flat(tr.x, tr.mask, weights, w0, b0, lam_, max_iter)
        t = ff.fit_temperature(va.x @ w + b, va.mask)
        pv = ff.softmax((va.x @ w + b) / t)
        conf, other = ff.fit_thresholds(pv, va.label, va.source, group_rule=False)
        val = ff.summary(pv, va, conf, False, other)
        pc = val["pbc"]["per_class"]
        row = {
            "lam": lam_,
            "val_pbc_macro_f1": ff.macro_f1(val["pbc"]),
            **{f"val_f1_{c}": pc[c]["f1"] for c in pc},
            "val_pbc_five_part_named": val["pbc"]["five_part_accuracy_named"],
            "val_bccd_five_part_named": val.get("bccd", {}).get("five_part_accuracy_named"),
        }
        typer.echo(f"lam {lam_:g}: val PBC macro-F1 {row['val_pbc_macro_f1']:.4f}")
        candidates.append((row["val_pbc_macro_f1"], row, (w, b, t, pv, conf, other)))
    # The best PBC val macro-F1 over the fine classes (the val split decides, never test).
    _, chosen, (w, b, t, pv, conf, other) = max(candidates, key=lambda c: c[0])
    lam_ = chosen["lam"]
    pt = ff.softmax((te.x @ w + b) / t)
    counts = {s: {} for s in sorted(set(tr.source))}
    for s_, lab in zip(tr.source, tr.label, strict=True):
        counts[s_][lab] = counts[s_].get(lab, 0) + 1
    # The shipped six-class answer on the same cells (five-part only), for comparison.
    ship = np.zeros((len(te.p6), len(FINE)))
    for k, c in enumerate(ff.SHIPPED6):
        ship[:, FINE.index("band_neutrophil" if c == "neutrophil" else c)] = te.p6[:, k]
    cal = {"temperature": t, "confidence_threshold": conf, "other_threshold": other}
    rep = {
        "method": f"flat softmax on the {tr.x.shape[1]}-d embedding, L2 pull {lam_:g} toward the "
        "shipped head; temperature and thresholds fitted on val (at most 4 % of PBC val "
        "unidentified; at most 0.5 % of val leukocytes leave the count as platelet/other)",
        "calibration": cal,
        "selection": [c[1] for c in candidates],
        "chosen": chosen,
        "train_cells": counts,
        "val": ff.summary(pv, va, conf, False, other),
        "test": ff.summary(pt, te, conf, False, other),
        "test_shipped_five_part": ff.summary(
            ship, te, ce.confidence_threshold, False, ce.other_threshold
        ),
    }
    info = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "fitted_on": "edge-wbc-convert fit-head: PBC (through the device's analysis), BCCD, "
        "Zheng 1/2, Raabin read cells, BCCD red cells/platelets; train splits",
        "lam": lam_,
        "train_cells": counts,
    }
    head = LinearHead(FINE, w, b, base, t, conf, other, info)
    jp = head.save(out)
    (cache / "head_report.json").write_text(json.dumps(rep, indent=2) + "\n")
    (jp.parent / "fine_eval.json").write_text(json.dumps(rep, indent=2) + "\n")
    for line in fine.summary_lines(rep):
        typer.echo(line)
    if register:
        fine.register_head(models, jp, "linear")
    typer.echo(f"wrote {jp} (+ .npz), {cache / 'head_report.json'}")


@app.command("fit-mixture")
def fit_mixture(
    models: Path = typer.Option(Path("models"), help="models folder whose classifier it reads"),
    cache: Path = typer.Option(Path("runs/fine"), help="embed-cells' cache"),
    flat: Path = typer.Option(..., help="the flat head fit-head wrote (its JSON)"),
    shift: list[float] = typer.Option(
        [-1.0, 0.0, 1.0, 2.0], help="log-odds added to immature granulocyte / erythroblast"
    ),
    group_threshold: list[float] = typer.Option(
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], help="their groups' confidence thresholds to try"
    ),
    out: Path = typer.Option(Path("models/classifier_head.json"), help="the head to write"),
    register: bool = typer.Option(False, help="name the head in the models' manifest"),
) -> None:
    """The fine classes as a refinement of the shipped six-class output: its calibrated
    probabilities split by the flat head's (band / segmented within neutrophil; immature
    granulocyte, erythroblast, platelet, other within other), decided on the counting group
    with the shipped thresholds. Chosen on val: every other lab's five-part no worse than the
    shipped output's, then the best PBC macro-F1; evaluated on test."""
    import datetime as dt
    import json

    from edge_wbc_convert import fine
    from edge_wbc_convert import fine_fit as ff
    from edge_wbc_convert.fine import FINE

    from edge_wbc.pipeline.heads import LinearHead
    from edge_wbc.pipeline.manifest import load_manifest

    _logging(cache)
    man = load_manifest(models)
    ce = man.classifier
    if ce is None or not ce.embedding_dim:
        typer.echo(f"{models}: no classifier with an embedding output", err=True)
        raise typer.Exit(2)
    if tuple(ce.classes) != ff.SHIPPED6:
        typer.echo(f"{models}: classifier classes {list(ce.classes)}, expected {ff.SHIPPED6}")
        raise typer.Exit(2)
    base = LinearHead.load(flat, ce.sha256)
    if base.is_mixture or base.classes != FINE:
        typer.echo(f"{flat}: not a flat head over {list(FINE)} (run fit-head first)", err=True)
        raise typer.Exit(2)
    sp = ff.load_splits(cache)
    va, te = sp["val"], sp["test"]
    conf, other = ce.confidence_threshold, ce.other_threshold
    ship_val = ff.shipped_summary(va, conf, other)
    refined = [FINE.index(c) for c in ff.REFINED]
    groups = ("immature_granulocyte", "nrbc")  # the taxonomy groups of ff.REFINED

    def make(sh: float, thr: float) -> LinearHead:
        b = base.bias.copy()
        b[refined] += sh * base.temperature  # a shift of the calibrated logits
        return LinearHead(
            FINE, base.weight, b, ce.sha256, base.temperature, conf, other,
            base_classes=ff.SHIPPED6, splits=ff.MIXTURE_SPLITS,
            group_thresholds=dict.fromkeys(groups, thr),
        )  # fmt: skip

    rows, best = [], None
    for sh in shift:
        for thr in group_threshold:
            head = make(sh, thr)
            val = ff.mixture_summary(head, va)
            pc = val["pbc"]["per_class"]
            row = {
                "shift": sh,
                "group_threshold": thr,
                "other_labs_no_worse": ff.mixture_ok(val, ship_val),
                "val_pbc_macro_f1": ff.macro_f1(val["pbc"]),
                **{f"val_f1_{c}": pc[c]["f1"] for c in pc},
                "val_pbc_five_part_named": val["pbc"]["five_part_accuracy_named"],
                "val_bccd_five_part_named": val.get("bccd", {}).get("five_part_accuracy_named"),
            }
            rows.append(row)
            typer.echo(
                f"shift {sh:+g} threshold {thr:g}: val PBC macro-F1 "
                f"{row['val_pbc_macro_f1']:.4f}, other labs no worse: "
                f"{row['other_labs_no_worse']}"
            )
            if row["other_labs_no_worse"] and (
                best is None or row["val_pbc_macro_f1"] > best[0]["val_pbc_macro_f1"]
            ):
                best = (row, head, val)
    if best is None:
        typer.echo("no candidate keeps the other labs' five-part: nothing written", err=True)
        raise typer.Exit(1)
    chosen, head, val = best
    info = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "fitted_on": "edge-wbc-convert fit-mixture on the flat head of fit-head "
        f"({base.info.get('fitted_on', '')}); shift and group threshold chosen on val",
        "shift": chosen["shift"],
        # The flat head's own calibration: a lab adaptation starts from the flat head
        # (edge_wbc.pipeline.adaptation.base_head_from_linear) and needs its thresholds.
        "flat": {
            "lam": base.info.get("lam"),
            "confidence_threshold": base.confidence_threshold,
            "other_threshold": base.other_threshold,
        },
        "train_cells": base.info.get("train_cells", {}),
    }
    head = LinearHead(**{**head.__dict__, "info": info})
    rep = {
        "method": "mixture: the shipped head's calibrated six-class probabilities split into the "
        "fine classes by a flat softmax head on the embedding (band / segmented within "
        "neutrophil; immature granulocyte, erythroblast, platelet, other within other; "
        f"flat head: L2 pull {base.info.get('lam')} toward the shipped head), decided on the "
        "counting group with the shipped thresholds; the immature granulocyte and erythroblast "
        "groups' threshold and log-odds shift chosen on val (every other lab's five-part no "
        "worse than the shipped output, then the best PBC macro-F1)",
        "calibration": {
            "temperature": base.temperature,
            "confidence_threshold": conf,
            "other_threshold": other,
            "group_thresholds": head.group_thresholds,
        },
        "selection": rows,
        "chosen": chosen,
        "train_cells": info["train_cells"],
        "val": val,
        "val_shipped_five_part": ship_val,
        "test": ff.mixture_summary(head, te),
        "test_shipped_five_part": ff.shipped_summary(te, conf, other),
    }
    jp = head.save(out)
    (jp.parent / "fine_eval.json").write_text(json.dumps(rep, indent=2) + "\n")
    for line in fine.summary_lines(rep):
        typer.echo(line)
    if register:
        fine.register_head(models, jp, "mixture")
    typer.echo(f"wrote {jp} (+ .npz), {jp.parent / 'fine_eval.json'}")


@app.command("fine-card")
def fine_card(
    models: Path = typer.Option(Path("models"), help="models folder with fine_eval.json"),
    formula: Path = typer.Option(None, help="scripts/eval_formula.py --json of the head"),
    formula_shipped: Path = typer.Option(
        None, help="the same for the six-class output (a models folder without the head)"
    ),
) -> None:
    """Record the PBC test through `edge-wbc analyze` in fine_eval.json and rewrite the card's
    fine-class section from it."""
    import json

    from edge_wbc_convert.card import update_fine_section

    fp = models / "fine_eval.json"
    fe = json.loads(fp.read_text())
    for key, f in (("pbc_test_analyze", formula), ("pbc_test_analyze_shipped", formula_shipped)):
        if f is not None:
            fe[key] = json.loads(f.read_text())
    fp.write_text(json.dumps(fe, indent=2) + "\n")
    typer.echo(f"wrote {fp}, {update_fine_section(models)}")


@app.command()
def edgetpu(
    files: list[Path] = typer.Argument(...),
    out_dir: Path = typer.Option(None, help="default: next to each file"),
) -> None:
    """Compile for the Coral Edge TPU when edgetpu_compiler is on PATH; record the mapping."""
    from edge_wbc_convert.edgetpu import compile_model

    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        typer.echo(f"edgetpu: no such file: {', '.join(missing)}", err=True)
        raise typer.Exit(2)
    for f in files:
        r = compile_model(f, out_dir or f.parent)
        typer.echo(f"{f.name}: {r['message']}")


@app.command()
def verify(
    keras_model: Path = typer.Option(..., "--keras", help="float model (.keras)"),
    tflite: Path = typer.Option(..., help="its int8 conversion"),
    data_root: Path = typer.Option(DEFAULT_DATA),
    split: str = "val",
    max_delta: float = typer.Option(0.01, help="fail when int8 IoU is lower by more"),
) -> None:
    """Float vs int8 foreground IoU per source on a split."""
    from edge_wbc_convert.data import seg_split
    from edge_wbc_convert.evaluate import by_source, keras_prob_fn, tflite_prob_fn
    from edge_wbc_convert.quantize import load_keras

    _logging()
    pairs = seg_split(data_root, split, Path("runs/cache"))
    if not pairs:
        typer.echo(f"no {split} images with masks under {data_root}", err=True)
        raise typer.Exit(2)
    fk, fq = keras_prob_fn(load_keras(keras_model)), tflite_prob_fn(tflite)
    srcs = [p[0].source for p in pairs]
    gts = [p[2] for p in pairs]
    a = by_source(srcs, [fk(p[1]) for p in pairs], gts, 0.5)
    b = by_source(srcs, [fq(p[1]) for p in pairs], gts, 0.5)
    worst = 0.0
    typer.echo(f"{'source':10} {'n':>4} {'float IoU':>10} {'int8 IoU':>10} {'delta':>8}")
    for s in a:
        d = b[s]["iou"] - a[s]["iou"]
        worst = min(worst, d)
        typer.echo(f"{s:10} {a[s]['n']:4d} {a[s]['iou']:10.4f} {b[s]['iou']:10.4f} {d:+8.4f}")
    raise typer.Exit(1 if worst < -max_delta else 0)


@app.command("recover-float")
def recover_float(
    models: Path = typer.Option(Path("models"), help="the models folder (manifest.json)"),
    data_root: Path = typer.Option(DEFAULT_DATA),
    split: str = typer.Option("test", help="the fields (BCCD, Zheng) the models are compared on"),
    min_iou: float = typer.Option(0.97, help="least mean float-vs-int8 mask IoU per segmenter"),
    min_top1: float = typer.Option(0.97, help="least float-vs-int8 top-1 agreement (classifier)"),
) -> None:
    """Rebuild each shipped model's float Keras weights from its int8 file, compare the two on
    real fields, write them next to the int8 files (NAME.keras) and record them in the
    manifest (float_weights). The int8 files are not changed."""
    from edge_wbc_convert.data import seg_split
    from edge_wbc_convert.recover import RecoveryError, recover_models

    from edge_wbc.pipeline.manifest import ManifestError

    _logging()
    try:
        pairs = seg_split(data_root, split, Path("runs/cache"))
    except FileNotFoundError as e:
        typer.echo(f"recover-float: {e}", err=True)
        raise typer.Exit(2) from None
    try:
        rows = recover_models(models, pairs, min_iou=min_iou, min_top1=min_top1)
    except (RecoveryError, ManifestError, ValueError) as e:
        typer.echo(f"recover-float: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{'model':11} {'float file':18} {'n':>4}  agreement with the int8 file")
    for r in rows:
        a = r["agreement"]
        if "mean_iou" in a:
            what = (
                f"mask IoU mean {a['mean_iou']:.4f} (min {a['min_iou']:.4f}, thr "
                f"{a['threshold']:.2f}), |dp| mean {a['mean_abs_prob_diff']:.4f} "
                f"max {a['max_abs_prob_diff']:.3f}"
            )
        else:
            what = (
                f"top-1 {a['top1_agreement']:.4f}, |dp| mean {a['mean_abs_prob_diff']:.4f} "
                f"max {a['max_abs_prob_diff']:.3f}"
            )
        typer.echo(f"{r['name']:11} {r['file']:18} {int(a['n']):4d}  {what}")
    typer.echo(f"recorded in {models / 'manifest.json'} (float_weights)")


# ----------------------------------------------------------------------------- classifier


@app.command("train-cls")
def train_cls(
    run_dir: Path = typer.Option(...),
    segmenter: Path = typer.Option(..., help="int8 segmenter used to box single-cell images"),
    data_root: Path = typer.Option(DEFAULT_DATA),
    arch: str = "mnv2",
    size: int = 96,
    alpha: float = typer.Option(0.5, help="MobileNetV2 width multiplier"),
    steps: int = 4000,
    batch: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    eval_every: int = 500,
    threads: int = 1,
    weights: str | None = None,
    init: Path | None = typer.Option(None, help="start from the weights of this .keras model"),
    source_weights: str = typer.Option(
        "", help="override sampling weights of sources within a class, e.g. 'bccd=0.5'"
    ),
    fine: bool = typer.Option(
        False, help="ten outputs (band/segmented, IG, erythroblast, platelet) instead of six"
    ),
    init_int8: Path | None = typer.Option(
        None, help="start from the float weights recovered from this int8 classifier"
    ),
    head_init: Path | None = typer.Option(
        None, help="class layer from this head .npz (weight, bias) when the outputs differ"
    ),
) -> None:
    """Train the cell classifier on crops made by the device's rule."""
    from edge_wbc_convert.train import train_classifier

    _logging(run_dir)
    best = train_classifier(
        run_dir,
        segmenter,
        data_root,
        arch=arch,
        size=size,
        alpha=alpha,
        steps=steps,
        batch=batch,
        lr=lr,
        seed=seed,
        eval_every=eval_every,
        threads=threads,
        weights=weights,
        init=init,
        source_weights=_source_weights(source_weights),
        fine=fine,
        init_int8=init_int8,
        head_init=head_init,
    )
    typer.echo(f"best model: {best}")


def _fail(msg: str) -> typer.Exit:
    """A usage error of finetune: said on stderr, exit 2, nothing written."""
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(2)


def _check_start(start: Any, threads: int) -> None:
    from edge_wbc_convert import finetune as ft
    from edge_wbc_convert.train import set_threads

    set_threads(threads)  # before the start model is built: TensorFlow fixes it at first use
    try:
        ft.check_start(start)
    except ft.FinetuneError as e:
        raise _fail(str(e)) from None


def _new_finetune_run(
    out: Path,
    cells: list[Path],
    start: Any,
    segmenter: Path,
    models: Path,
    data_root: Path,
    base_cells: Path | None,
    cell_diameter: str | None,
    seed: int,
    train_args: dict[str, Any],
) -> dict[str, Any]:
    """Box and split the labs' cells, check the start weights, then write the run folder (its
    cells.json and finetune.json); returns what finetune.json says."""
    from dataclasses import fields

    from edge_wbc_convert import finetune as ft
    from edge_wbc_convert.cells import prepare_cells

    from edge_wbc.cli.adapt import _class_images, class_folders
    from edge_wbc.cli.analyze import cell_diameter_option
    from edge_wbc.pipeline.adaptation import MIN_CELLS_PER_CLASS
    from edge_wbc.pipeline.analysis import FieldAnalyzer
    from edge_wbc.pipeline.inference import ModelLoadError, RuntimeMissing
    from edge_wbc.pipeline.postprocess import PostprocessParams

    threads = int(train_args["threads"])
    rule = ft.label_rule(start.fine)
    class_folders(list(cells), rule)  # a misnamed folder costs no analysis (exits 2)
    diameter = cell_diameter_option(cell_diameter, lambda: _class_images(list(cells)))

    params = PostprocessParams()
    if diameter is not None:
        # The config schema's range for the key, so the two cannot disagree.
        meta = next(f.metadata for f in fields(PostprocessParams) if f.name == "cell_diameter_px")
        if not meta["min"] <= diameter <= meta["max"]:
            raise _fail(f"--cell-diameter {diameter:g}: outside {meta['min']:g}-{meta['max']:g} px")
        params = PostprocessParams(cell_diameter_px=diameter)
    try:
        analyzer = FieldAnalyzer(models, threads=threads, postprocess=params)
    except (ModelLoadError, RuntimeMissing) as e:
        raise _fail(str(e)) from None
    # Two labs of one name (two sites each exporting to "export") are refused before minutes
    # of analysis, as one line.
    names: dict[str, Path] = {}
    for d in cells:
        src = ft.lab_source(d)
        if src in names:
            raise _fail(f"{d} and {names[src]}: two labs named {src}; rename one folder")
        names[src] = d
    try:
        labs = ft.box_labs(cells, analyzer, rule, seed)
    except ft.FinetuneError as e:
        raise _fail(str(e)) from None
    for lab in labs:
        for s in lab.skipped:
            typer.echo(f"skipped {s}", err=True)
    try:
        ft.validate_labs(labs, MIN_CELLS_PER_CLASS)
    except ft.FinetuneError as e:
        raise _fail(str(e)) from None
    for lab in labs:
        for c, n in lab.too_few.items():
            typer.echo(
                f"too few cells: {lab.source} {c} has {n} (< {MIN_CELLS_PER_CLASS}): "
                "trained on, not in val/test",
                err=True,
            )
    _check_start(start, threads)
    info = {
        "models": str(models.resolve()),
        "start": {
            "weights": str(start.keras or start.int8),
            "sha256": start.sha256,
            "note": start.note,
            "classes": list(start.classes),
        },
        "cell_diameter_px": params.cell_diameter_px,
        "base_cells": str(base_cells.resolve()) if base_cells else f"boxed by {segmenter}",
        "labs": ft.lab_info(labs),
        "train": train_args,
    }
    try:
        ft.write_run(
            out,
            labs,
            (lambda _d: ft.base_cells_from(base_cells))
            if base_cells is not None
            else (lambda d: prepare_cells(d, data_root, segmenter)),
            info,
        )
    except (ft.FinetuneError, FileNotFoundError) as e:
        raise _fail(str(e)) from None
    return info


@app.command()
def finetune(
    cells: list[Path] = typer.Option(
        ...,
        help="a lab's labelled cells, DIR/<class>/<image> with the labelled leukocyte nearest "
        "the centre (repeat for more labs: one source and one card row each)",
    ),
    out: Path = typer.Option(
        ...,
        help="the classifier run to write; the same command on an interrupted one resumes it "
        "(its cells, split and settings; a larger --steps extends it)",
    ),
    models: Path = typer.Option(Path("models"), help="the released models folder to start from"),
    data_root: Path = typer.Option(DEFAULT_DATA, help="the training sources' data folder"),
    base_cells: Path | None = typer.Option(
        None,
        help="the training sources' cells from an earlier run (RUN/cells.json) instead of "
        "boxing them again through the released segmenter",
    ),
    cell_diameter: str | None = typer.Option(
        None, help="leukocyte diameter in pixels of the lab's images, or 'auto'"
    ),
    steps: int = typer.Option(3000, help="training steps (about 15 min on 2 CPU cores)"),
    lab_weight: float = typer.Option(
        0.5, help="how often a class's draw comes from the lab (PBC 0.5, BCCD 0.25, ...)"
    ),
    seed: int = 0,
    lr: float = typer.Option(3e-4, help="peak learning rate (cosine schedule)"),
    batch: int = 32,
    eval_every: int = typer.Option(1000, help="val evaluation (and best.keras) every N steps"),
    threads: int = 2,
) -> None:
    """Fine-tune the shipped classifier (every layer but the BatchNorms) on a lab's exported
    cells mixed with the training sources; `release-classifier` makes the int8 model."""
    import json

    from edge_wbc_convert import finetune as ft

    if not out.resolve().parent.is_dir():
        raise _fail(f"--out: folder {out.parent} does not exist")
    if steps < 1 or batch < 1 or eval_every < 1 or lab_weight <= 0:
        raise _fail("--steps, --batch and --eval-every must be >= 1, --lab-weight > 0")
    for d in cells:
        if not d.is_dir():
            raise _fail(f"--cells {d}: not a folder")
    if base_cells is not None and not base_cells.is_file():
        raise _fail(f"--base-cells {base_cells}: no such file")
    _logging()
    try:
        start = ft.shipped_start(models)
        segmenter = ft.segmenter_of(models)
    except ft.FinetuneError as e:
        raise _fail(str(e)) from None
    if out.exists():
        try:
            info = ft.resume_info(out, cells, start)
        except ft.FinetuneError as e:
            raise _fail(str(e)) from None
        # The run's own settings: a different --lr or --seed halfway would be another run.
        t = info["train"]
        batch, lr, seed, eval_every, lab_weight = (
            t["batch"], t["lr"], t["seed"], t["eval_every"], t["lab_weight"]
        )  # fmt: skip
        info["train"]["steps"] = steps
        (out / ft.RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")
        typer.echo(f"resuming {out} (its cells, split and settings; --steps {steps})")
        _check_start(start, threads)
    else:
        info = _new_finetune_run(
            out, cells, start, segmenter, models, data_root, base_cells, cell_diameter, seed,
            {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "eval_every": eval_every,
             "threads": threads, "lab_weight": lab_weight},
        )  # fmt: skip
    typer.echo(f"start: {start.note}; {len(start.classes)} outputs")
    table = ft.split_table(info["labs"])
    typer.echo("\n".join(table))
    _logging(out)
    from edge_wbc_convert.train import train_classifier

    best = train_classifier(
        out, segmenter, data_root, arch=start.arch, size=start.size, alpha=start.alpha,
        steps=steps, batch=batch, lr=lr, seed=seed, eval_every=eval_every, threads=threads,
        init=start.keras, init_int8=None if start.keras else start.int8, fine=start.fine,
        source_weights=dict.fromkeys(info["labs"], lab_weight), freeze_bn=True,
    )  # fmt: skip
    typer.echo(f"best model: {best}")
    typer.echo("\n".join(table))
    typer.echo(
        "next: make the int8 model in a copy of the models folder (gate, calibration, a card "
        f"row per lab):\n  cp -r {models} {models}_lab && edge-wbc-convert release-classifier "
        f"--cls {out} --models {models}_lab"
    )


# ----------------------------------------------------------------------------- release


def _pairs(specs: list[str]) -> dict[str, Path]:
    out = {}
    for s in specs:
        name, sep, path = s.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected NAME=RUN_DIR, got {s!r}")
        out[name] = Path(path)
    return out


@app.command()
def release(
    seg: list[str] = typer.Option(..., help="NAME=RUN_DIR of a segmenter run (repeat)"),
    cls: Path | None = typer.Option(None, help="classifier run dir"),
    out: Path = typer.Option(Path("models"), help="the models folder to write"),
    data_root: Path = typer.Option(DEFAULT_DATA),
    requantize: bool = typer.Option(False, help="convert again even if the .tflite exists"),
    rep_samples: int = typer.Option(200, help="representative inputs per model"),
    cls_views: int = typer.Option(
        4, help="views of each crop the classifier averages on the device: 1, 2, 4 or 8"
    ),
) -> None:
    """Quantize, gate, compile for the Edge TPU (when possible), fit the ensemble on val,
    evaluate on test, calibrate the classifier, write manifest.json and the model card."""
    from edge_wbc_convert.release import ReleaseError, make_release

    _logging()
    try:
        path = make_release(
            _pairs(seg),
            cls,
            out,
            data_root,
            requantize=requantize,
            rep_samples=rep_samples,
            cls_views=cls_views,
        )
    except ReleaseError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {path} and {out / 'README.md'}")


@app.command("release-classifier")
def release_classifier_cmd(
    cls: Path = typer.Option(..., help="classifier run dir (train-cls)"),
    models: Path = typer.Option(Path("models"), help="a released models folder to update"),
    data_root: Path = typer.Option(DEFAULT_DATA),
    views: int = typer.Option(4, help="views of each crop the device averages: 1, 2, 4 or 8"),
    rep_samples: int = typer.Option(200, help="representative inputs for quantization"),
) -> None:
    """Replace the classifier of a released models folder, keeping its segmenters: quantize,
    gate, calibrate, evaluate per source and per class, swap the file, manifest entry and card
    section in (the replaced files go to MODELS.previous/)."""
    from edge_wbc_convert.release import ReleaseError, release_classifier

    _logging()
    if not (models / "manifest.json").is_file():
        typer.echo(f"{models}: no manifest.json (release the whole set with `release`)", err=True)
        raise typer.Exit(2)
    if not (cls / "best.keras").is_file():
        typer.echo(f"{cls}: no best.keras (not a finished train-cls run)", err=True)
        raise typer.Exit(2)
    try:
        path = release_classifier(cls, models, data_root, views=views, rep_samples=rep_samples)
    except ReleaseError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {path} and {models / 'README.md'}")


def main() -> None:
    """The console entry point: the command, then an exit without the interpreter's teardown.

    TensorFlow's and LiteRT's C++ thread pools can abort the process while Python tears it
    down ("terminate called without an active exception", exit -6): seen once in CI after a
    `finetune` had written and printed everything. The command's own files are closed by
    then; stdout, stderr and the log files are flushed here, and the exit status is the
    command's. (Tests that run ``app`` in-process never come here.)"""
    try:
        app()
        code = 0
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            code = 1
        else:
            code = int(e.code or 0)
    except Exception as e:
        if not isinstance(e, _input_errors()):
            raise
        # A file that is missing, unreadable or not what it should be (a .tflite that is not
        # one, a manifest cut short): one line and exit 2, as the commands' own checks say it;
        # 1 stays "a check failed" (gate, verify). The traceback on request, for a bug.
        if os.environ.get(DEBUG_ENV):
            traceback.print_exc()
        detail = str(e) or type(e).__name__
        print(f"error: {detail}" + ("" if os.environ.get(DEBUG_ENV) else
                                    f"  ({DEBUG_ENV}=1 shows the traceback)"), file=sys.stderr)
        code = 2
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
