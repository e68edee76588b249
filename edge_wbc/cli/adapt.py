"""``edge-wbc adapt``: fit a lab's classifier head on its labelled cells, and export them.

    edge-wbc adapt fit DIR... --out OUT [--models M] [--cell-diameter PX|auto]
    edge-wbc adapt fit --data-dir D --out OUT
    edge-wbc adapt export --data-dir D --out DIR

Exit 0: the adaptation is better on held-out cells and was written; 3: it is not (nothing
written, the reason printed); 2: usage error (nothing fitted).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import typer

from edge_wbc.cli.analyze import _build_analyzer, _usage_error, cell_diameter_option
from edge_wbc.pipeline.adaptation import (
    EXIT_NOT_BETTER,
    LabCells,
    cells_from_rows,
    shipped_base,
)

adapt_app = typer.Typer(
    help="Adapt the classifier to this lab from its labelled cells (no TensorFlow).",
    no_args_is_help=True,
)


def nearest_centre(cells: list[Any], width: int, height: int) -> Any | None:
    """The leukocyte nearest the image centre: the labelled one in a single-cell export."""
    counted = [c for c in cells if c.counted or c.label == "unidentified"]
    if not counted:
        return None

    def dist(c: Any) -> float:
        x0, y0, x1, y1 = c.bbox
        return float(np.hypot((x0 + x1) / 2 - width / 2, (y0 + y1) / 2 - height / 2))

    return min(counted, key=dist)


def class_folders(
    dirs: list[Path], known: Any, skip: Callable[[str], str | None] | None = None
) -> list[tuple[str, Path]]:
    """(label, folder) for every DIR/<class>/; an unknown class name is a usage error naming the
    folder. ``known(name)`` raises AdaptationError for a name it does not know; ``skip(name)``
    says why a known class is left out (printed as a skipped folder), or None."""
    from edge_wbc.pipeline.adaptation import AdaptationError

    out: list[tuple[str, Path]] = []
    bad: list[str] = []
    for d in dirs:
        if not d.is_dir():
            raise _usage_error(f"{d}: not a folder")
        subs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not subs:
            raise _usage_error(f"{d}: no class folders (expected {d}/<class>/<images>)")
        for s in subs:
            why = skip(s.name) if skip is not None else None
            if why is not None:
                typer.echo(f"skipped {s}: {why}", err=True)
                continue
            try:
                known(s.name)
            except AdaptationError as e:
                bad.append(f"{s}: {e}")
                continue
            out.append((s.name, s))
    if bad:
        raise _usage_error("\n  ".join(["unknown class folder(s):", *bad]))
    return out


def cells_from_folders(analyzer: Any, folders: list[tuple[str, Path]]) -> LabCells:
    from edge_wbc.pipeline.imageio import ImageError, list_images, read_field

    lab = LabCells()
    for label, folder in folders:
        for p in list_images([folder]):
            try:
                f = read_field(p)
                res = analyzer.analyze(f.rgb, str(p), scale=f.scale)
            except ImageError as e:
                lab.skipped.append(f"{p}: {e}")
                continue
            cell = nearest_centre(res.cells, res.width, res.height)
            if cell is None:
                lab.skipped.append(f"{p}: no leukocyte found")
                continue
            if cell.embedding is None:
                raise _usage_error(
                    "the classifier emits no embedding: a lab head cannot be fitted on it"
                )
            lab.embeddings.append(cell.embedding)
            lab.labels.append(label)
            lab.keys.append(str(p))
    return lab


def _table(v: dict[str, Any]) -> str:
    s, a = v["shipped"], v["adapted"]
    classes = list(a["per_class"])
    w = max(12, *(len(c) for c in classes))
    rows = [
        f"held-out validation: {v['folds']} nested grouped folds ({v['groups']} groups), "
        f"head: {v['method']}",
        f"{'class':<{w}} {'n':>5} {'shipped top-1':>14} {'adapted top-1':>14}",
    ]
    for c in classes:
        rows.append(
            f"{c:<{w}} {a['per_class'][c]['n']:>5} {s['per_class'][c]['top1']:>14.3f} "
            f"{a['per_class'][c]['top1']:>14.3f}"
        )
    t = f"{v['target_precision']:.0%}"
    rows += [
        f"{'all':<{w}} {a['n']:>5} {s['top1']:>14.3f} {a['top1']:>14.3f}",
        f"{'named at >= ' + t + ' precision':<{w + 6}} {s['named_at_target']:>14.3f} "
        f"{a['named_at_target']:>14.3f}",
        f"{'unidentified':<{w}} {'':>5} {s['unidentified']:>14.3f} {a['unidentified']:>14.3f}"
        f"   (at threshold {s['threshold']:.3f} shipped, {a['threshold']:.3f} fitted)",
    ]
    return "\n".join(rows)


@adapt_app.command("fit")
def fit(
    dirs: list[Path] = typer.Argument(
        None,
        help="Folders of labelled cells: DIR/<class>/<image>, one leukocyte per image (the one "
        "nearest the centre is the labelled one).",
        show_default=False,
    ),
    out: Path = typer.Option(..., "--out", help="The adaptation folder to write (must not exist)."),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Take the reviewed cells of this station's store instead."
    ),
    models: Path | None = typer.Option(None, "--models", help="Models folder (manifest.json)."),
    cell_diameter: str | None = typer.Option(
        None,
        "--cell-diameter",
        help="Leukocyte diameter in pixels of these images, or 'auto' to measure it from them.",
    ),
    config: Path | None = typer.Option(None, "--config", help="Config file."),
    seed: int = typer.Option(0, "--seed", help="Seed of the fold assignment."),
) -> None:
    """Fit this lab's head and validate it on held-out cells against the shipped one."""
    from edge_wbc.pipeline import adaptation as A

    if dirs and data_dir is not None:
        raise _usage_error("give either folders of labelled cells or --data-dir, not both")
    if not dirs and data_dir is None:
        raise _usage_error("give folders of labelled cells (DIR/<class>/) or --data-dir")
    _new_folder(out, "an adaptation is a version, never overwritten")
    if cell_diameter is not None and cell_diameter.strip().lower() == "auto" and not dirs:
        raise _usage_error("--cell-diameter auto measures image folders, not --data-dir")
    diameter = cell_diameter_option(cell_diameter, lambda: _class_images(dirs or []))

    # The base is the shipped head, even when the config names an adaptation: a lab head is
    # always fitted from, and validated against, the model as shipped. The configured one is not
    # even loaded: after a model update it is refused, and this fit is how the lab replaces it.
    analyzer = _build_analyzer(config, models, None, None, diameter, shipped_head=True)
    try:
        base = shipped_base(analyzer)
    except A.AdaptationError as e:
        raise _usage_error(str(e)) from None
    ce = analyzer.manifest.classifier

    t0 = time.perf_counter()
    if dirs:
        folders = class_folders(
            list(dirs), lambda name: A.label_masks([name], base), lambda n: A.unlearnable(n, base)
        )
        lab = cells_from_folders(analyzer, folders)
        source: dict[str, Any] = {"folders": [str(d) for d in dirs]}
    else:
        assert data_dir is not None
        lab = cells_from_store(data_dir, ce.sha256).learnable(base)
        source = {"data_dir": str(data_dir)}
    embed_s = time.perf_counter() - t0
    for s in lab.skipped:
        typer.echo(f"skipped {s}", err=True)
    typer.echo(
        f"{len(lab.labels)} labelled cell(s) ({embed_s:.1f} s to read), {len(lab.skipped)} skipped"
    )
    try:
        result = A.fit_adaptation(
            np.stack(lab.embeddings) if lab.embeddings else np.zeros((0, base.W.shape[1])),
            lab.labels,
            base,
            lab.keys,
            seed=seed,
        )
    except A.AdaptationError as e:
        raise _usage_error(str(e)) from None
    for c, n in sorted(result.too_few.items()):
        typer.echo(
            f"too few cells: {c} has {n} (needs >= {A.MIN_CELLS_PER_CLASS}); left as shipped",
            err=True,
        )
    typer.echo(_table(result.validation))
    anchors = result.validation.get("anchors")
    typer.echo(
        f"fit {result.seconds:.1f} s; "
        + (
            f"the shipped answers kept on {anchors['cells']} anchor cells of its own sources "
            f"(weight {anchors['weight']:g})"
            if anchors
            else "no anchor cells in the manifest: the shipped sources are not guarded"
        )
    )
    if not result.accepted:
        typer.echo(f"not written: {result.reason}")
        raise typer.Exit(EXIT_NOT_BETTER)
    source["cell_diameter_px"] = analyzer.params.cell_diameter_px
    try:
        ad = A.write_adaptation(out, result, base, source)
    except (A.AdaptationError, OSError) as e:
        raise _usage_error(f"could not write {out}: {e}") from None
    typer.echo(f"written {ad.path} (id {ad.id}): {result.reason}")
    typer.echo(
        f"use it: edge-wbc analyze ... --adaptation {ad.path}, or [models] adaptation = "
        f'"{ad.path}" in the config'
    )


def _new_folder(out: Path, why_new: str) -> None:
    """``--out`` must name a folder still to be made, in one that exists (usage error if not)."""
    if out.exists():
        raise _usage_error(f"--out {out} exists: {why_new}")
    if not out.parent.resolve().is_dir():
        raise _usage_error(f"--out: {out.parent} " + (
            "is a file, not a folder" if out.parent.exists() else "does not exist"))


def _class_images(dirs: list[Path]) -> list[Path]:
    """Every image of DIR/<class>/ folders, classes in turn, to measure the magnification on."""
    from edge_wbc.pipeline.imageio import list_images

    return list_images([s for d in dirs if d.is_dir() for s in sorted(d.iterdir()) if s.is_dir()])


def cells_from_store(data_dir: Path, base_sha256: str) -> LabCells:
    from edge_wbc.counting.store import Store, StoreError

    try:
        rows = Store.reviewed_cells_readonly(data_dir)
    except StoreError as e:
        raise _usage_error(str(e)) from None
    return cells_from_rows(rows, base_sha256)


@adapt_app.command("export")
def export(
    data_dir: Path = typer.Option(..., "--data-dir", help="The station's data folder."),
    out: Path = typer.Option(
        ..., "--out", help="Folder to write OUT/<class>/<cell>.jpg into (must not exist)."
    ),
) -> None:
    """Write the reviewed (changed or confirmed) cells of a station as OUT/<class>/<cell>.jpg,
    the layout 'adapt fit' reads, with OUT/cells.json saying what each one is."""
    import json
    import secrets
    import shutil

    from edge_wbc.counting.session import CROP_PX
    from edge_wbc.counting.store import Store, StoreError
    from edge_wbc.pipeline.preprocess import CROP_SCALE

    # A new folder, written whole or not at all: crops merged into an earlier export would be
    # fitted on although its cells.json no longer lists them.
    _new_folder(out, "export writes a new folder")
    try:
        rows = Store.reviewed_cells_readonly(data_dir)
    except StoreError as e:
        raise _usage_error(str(e)) from None
    if not rows:
        raise _usage_error(f"{data_dir}: no reviewed cells (confirm or change cells first)")
    with_crop = []
    for r in rows:
        if r.crop_path is not None and r.crop_path.is_file():
            with_crop.append(r)
        else:
            typer.echo(f"skipped cell {r.cell_id}: its crop image is missing", err=True)
    if not with_crop:
        raise _usage_error(
            f"{data_dir}: none of the {len(rows)} reviewed cell(s) has its crop image; "
            "nothing written"
        )
    # mkdir, not mkdtemp: the folder keeps the user's umask (mkdtemp's 0700 would hide the
    # export from the IT account that copies it off the station).
    tmp = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise _usage_error(f"cannot write in {out.parent}: {e.strerror or e}") from None
    listed = []
    try:
        for r in with_crop:
            assert r.crop_path is not None
            name = f"{r.label}/{r.cell_id}{r.crop_path.suffix}"
            (tmp / r.label).mkdir(exist_ok=True)
            shutil.copyfile(r.crop_path, tmp / name)
            listed.append(
                {
                    "cell_id": r.cell_id,
                    "file": name,
                    "label": r.label,
                    "review": "confirmed" if r.confirmed else "changed",
                    "machine_label": r.machine_label,
                    "embedding_model": r.embedding_model,
                }
            )
        (tmp / "cells.json").write_text(json.dumps({"cells": listed}, indent=2) + "\n")
        tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _usage_error(f"cannot write {out}: {e.strerror or e}; nothing written") from None
    # The crops are CROP_PX wide around a box CROP_SCALE times smaller than the crop.
    typer.echo(
        f"{len(listed)} reviewed cell(s) written to {out}"
        + (f", {len(rows) - len(listed)} skipped" if len(rows) > len(listed) else "")
        + f"; to fit on them: edge-wbc adapt fit {out} --out OUT "
        f"--cell-diameter {CROP_PX / CROP_SCALE:.0f} (or --data-dir {data_dir})"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(adapt_app, name="adapt")
