"""``edge-wbc analyze`` (fields in, JSON/masks/overlays out) and ``edge-wbc bench``."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import typer

from edge_wbc.accelerators import ACCELERATORS
from edge_wbc.files import write_atomic
from edge_wbc.pipeline.results import ANALYSIS_SCHEMA, FieldResult

log = logging.getLogger(__name__)

#: A 640x480 BCCD test field with two leukocytes (BloodImage_00031, MIT licence), so the
#: benchmark runs the whole pipeline including classification, on any install.
BENCH_FIELD = Path(__file__).resolve().parent.parent / "data" / "bench_field.jpg"

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def _usage_error(msg: str) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(EXIT_USAGE)


def _write_png(path: Path, img: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", img)
    if not ok:  # pragma: no cover - encoding a uint8 array does not fail
        raise OSError(f"could not encode {path.name}")
    write_atomic(path, buf.tobytes())


def _write_jpeg(path: Path, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90]
    )
    if not ok:  # pragma: no cover
        raise OSError(f"could not encode {path.name}")
    write_atomic(path, buf.tobytes())


def _check_accelerator(accelerator: str | None) -> None:
    # Before any image is read, so a typo costs nothing.
    if accelerator is not None and accelerator not in ACCELERATORS:
        raise _usage_error(
            f"--accelerator must be {' or '.join(ACCELERATORS)}, not {accelerator!r}"
        )


def _load_settings(config: Path | None) -> Any:
    """The config file (explicit, or the system one) or None for built-in defaults."""
    from edge_wbc.config import ConfigError, default_config_path, load_config

    path = config or default_config_path()
    try:
        return load_config(path)
    except ConfigError as e:
        raise _usage_error(str(e)) from None


def _build_analyzer(
    config: Path | None,
    models: Path | None,
    threads: int | None,
    accelerator: str | None,
    cell_diameter: float | None,
    adaptation: Path | None = None,
    shipped_head: bool = False,
) -> Any:
    """``shipped_head``: ignore the adaptation the config names (not even loaded, so a broken or
    outdated one does not stop the caller)."""
    import dataclasses

    from edge_wbc.config import ConfigError
    from edge_wbc.logs import setup_logging
    from edge_wbc.pipeline.analysis import FieldAnalyzer
    from edge_wbc.pipeline.inference import AcceleratorError, ModelLoadError, RuntimeMissing
    from edge_wbc.pipeline.manifest import ManifestError

    cfg = _load_settings(config)
    setup_logging(cfg.logging.level)
    try:
        cfg = cfg.replace(
            models_dir=str(models) if models is not None else None,
            models_threads=threads,
            models_accelerator=accelerator,
            postprocess_cell_diameter_px=cell_diameter,
            models_adaptation=str(adaptation) if adaptation is not None else None,
        )
    except ConfigError as e:
        raise _usage_error(str(e)) from None
    if shipped_head:
        cfg = dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, adaptation=None))
    try:
        return FieldAnalyzer.from_config(cfg)
    except (ManifestError, AcceleratorError, ModelLoadError, RuntimeMissing) as e:
        raise _usage_error(str(e)) from None


def _no_entry(p: Path) -> bool:
    try:
        os.lstat(p)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False  # there, but not ours to see (a folder without x permission): its error
    return False


def _absolute(p: Path) -> Path:
    """The path without symlinks resolved where they resolve; a link loop or a dangling link
    keeps its own (absolute) name, so that file is reported, not the batch aborted."""
    try:
        return p.resolve(strict=True)
    except (OSError, RuntimeError):
        return Path(os.path.abspath(p))


def cell_diameter_option(value: str | None, images: Callable[[], list[Path]]) -> float | None:
    """``--cell-diameter PX|auto``: pixels, or measured on the given fields' red cells (printed
    for the technician to accept into the config). ``images`` lists the fields to measure."""
    if value is None:
        return None
    if value.strip().lower() != "auto":
        try:
            return float(value)  # its range is the config's rule (postprocess.cell_diameter_px)
        except ValueError:
            raise _usage_error(
                f"--cell-diameter must be a number of pixels or 'auto', not {value!r}"
            ) from None
    from edge_wbc.pipeline.scale import ScaleError, estimate_from_files

    files = images()
    if not files:
        raise _usage_error("--cell-diameter auto: no image files to measure")
    try:
        est = estimate_from_files(files)
    except ScaleError as e:
        raise _usage_error(f"--cell-diameter auto: {e}") from None
    typer.echo(est.describe(), err=True)
    return est.leukocyte_px


def _summary_line(res: FieldResult) -> str:
    if res.error:
        return f"{res.path}: ERROR {res.error}"
    counts = Counter(c.label for c in res.cells)
    what = ", ".join(f"{n} {k}" for k, n in counts.most_common()) or "no cells"
    flags = res.quality.get("flags") or []
    extra = f"  [{', '.join(flags)}]" if flags else ""
    ms = res.timing_ms.get("total", 0.0)
    notes = "".join(f"\n  note: {n}" for n in res.notes)
    return f"{res.path}: {len(res.cells)} cell(s): {what}{extra}  ({ms:.0f} ms){notes}"


def analyze(
    paths: list[Path] = typer.Argument(
        ..., help="Image files (jpg, png, bmp, tif) or folders of them.", show_default=False
    ),
    json_out: Path | None = typer.Option(
        None,
        "--json",
        help="Write the analysis document (schema edge-wbc/analysis/2); '-' for stdout.",
    ),
    masks: Path | None = typer.Option(
        None,
        "--masks",
        help="Write DIR/<stem>.png: 255 on counted cells, input-sized.",
        file_okay=False,
    ),
    overlays: Path | None = typer.Option(
        None,
        "--overlays",
        help="Write DIR/<stem>.jpg: the field with outlined, labelled cells.",
        file_okay=False,
    ),
    models: Path | None = typer.Option(
        None, "--models", help="Models folder (with manifest.json)."
    ),
    threads: int | None = typer.Option(
        None, "--threads", min=1, max=64, help="Interpreter threads."
    ),
    accelerator: str | None = typer.Option(
        None, "--accelerator", help=" or ".join(ACCELERATORS) + "."
    ),
    cell_diameter: str | None = typer.Option(
        None,
        "--cell-diameter",
        help="Expected leukocyte diameter in pixels (overrides the config), or 'auto': measured "
        "on these fields' red cells and printed.",
    ),
    adaptation: str | None = typer.Option(
        None,
        "--adaptation",
        help="A lab's adaptation folder ('edge-wbc adapt fit'; overrides models.adaptation); "
        "'' for none: the shipped classifier, whatever the config names.",
    ),
    config: Path | None = typer.Option(
        None, "--config", help="Config file (default: the system one, if any)."
    ),
) -> None:
    """Count and type the leukocytes of each field. Exit 0: all analysed; 1: some images failed
    (their entries carry "error"); 2: usage error (nothing analysed)."""
    from edge_wbc.pipeline.analysis import at_file_scale, draw_overlay
    from edge_wbc.pipeline.imageio import IMAGE_SUFFIXES, ImageError, list_images, read_field

    _check_accelerator(accelerator)
    # A name with no directory entry at all is a typing error (nothing analysed); a link that
    # leads nowhere or in a loop is that file's error, as it would be inside a folder.
    missing = [str(p) for p in paths if _no_entry(p)]
    if missing:
        raise _usage_error("no such file or folder: " + ", ".join(missing))
    images = list(dict.fromkeys(_absolute(p) for p in list_images(paths)))
    if not images:
        raise _usage_error(f"no images found (looked for {' '.join(IMAGE_SUFFIXES)})")
    for out_dir, what in ((masks, "--masks"), (overlays, "--overlays")):
        if out_dir is None:
            continue
        stems = Counter(p.stem for p in images)
        dup = sorted(s for s, n in stems.items() if n > 1)
        if dup:
            raise _usage_error(
                f"{what}: several inputs are named {dup[0]!r}; "
                "their outputs would overwrite each other"
            )
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _usage_error(f"{what}: cannot create {out_dir}: {e.strerror or e}") from None
    to_stdout = json_out is not None and str(json_out) == "-"
    if json_out is not None and not to_stdout:
        if not json_out.parent.resolve().is_dir():
            raise _usage_error(f"--json: folder {json_out.parent} does not exist")
        if json_out.is_dir():  # found after the whole batch, it lost the batch
            raise _usage_error(f"--json: {json_out} is a folder; give a file name")

    from edge_wbc.pipeline.imageio import list_images

    diameter = cell_diameter_option(cell_diameter, lambda: list_images(paths))
    # "" is "none" (as in the config), not the current folder (Path("") is ".").
    analyzer = _build_analyzer(config, models, threads, accelerator, diameter,
                               Path(adaptation) if adaptation else None,
                               shipped_head=adaptation == "")
    echo = (lambda s: typer.echo(s, err=True)) if to_stdout else typer.echo
    entries: list[dict[str, Any]] = []
    failed = 0
    for p in images:
        shown = str(p)
        t0 = time.perf_counter()
        overlay = None
        try:
            field = read_field(p)
        except ImageError as e:
            res = FieldResult(path=shown, width=0, height=0, error=str(e))
        else:
            decode_ms = (time.perf_counter() - t0) * 1000.0
            try:
                res = analyzer.analyze(field.rgb, shown, scale=field.scale)
                res.timing_ms = {"decode": decode_ms, **res.timing_ms}
                if overlays is not None:
                    # Drawn on the frame as analysed: a reduced read gives a reduced overlay.
                    overlay = draw_overlay(field.rgb, res)
                res = at_file_scale(res, field.width, field.height, mask=masks is not None)
            except Exception as e:  # one bad field must not stop the batch
                log.exception("analysis of %s failed", p)
                res = FieldResult(
                    path=shown,
                    width=field.width,
                    height=field.height,
                    error=f"analysis failed: {e}",
                )
            res.notes = list(field.notes)
            try:
                if masks is not None and res.error is None and res.mask is not None:
                    _write_png(masks / f"{p.stem}.png", res.mask)
                if overlays is not None and overlay is not None and res.error is None:
                    _write_jpeg(overlays / f"{p.stem}.jpg", overlay)
            except OSError as e:
                res.error = f"could not write output: {e.strerror or e}"
        if res.error:
            failed += 1
        entries.append(res.to_json())
        echo(_summary_line(res))
        del res  # crops and masks of a large batch are not kept in memory

    doc = {"schema": ANALYSIS_SCHEMA, "models": analyzer.describe(), "images": entries}
    if to_stdout:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    elif json_out is not None:
        try:
            write_atomic(json_out, (json.dumps(doc, indent=2) + "\n").encode())
        except OSError as e:
            typer.echo(f"error: could not write {json_out}: {e.strerror or e}", err=True)
            raise typer.Exit(EXIT_SOME_FAILED) from None
    n = len(entries)
    echo(f"{n - failed} of {n} image(s) analysed" + (f", {failed} failed" if failed else ""))
    raise typer.Exit(EXIT_SOME_FAILED if failed else EXIT_OK)


def _peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20  # KiB on Linux, bytes on macOS


def _stats(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, np.float64)
    return float(np.median(a)), float(np.percentile(a, 90))


def machine_description() -> str:
    """What a benchmark figure was measured on: the same code takes 12 ms per field on one VM
    and 34-46 ms on another, so a number without its machine means little."""
    import os
    import platform

    cpu = platform.processor() or ""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
        # x86 says "model name"; a Raspberry Pi says "Model" (board) and "Hardware" (SoC).
        cpu = info.get("model name") or info.get("model") or info.get("hardware") or cpu
    except OSError:
        pass
    return (f"{platform.machine()}, {os.cpu_count()} core(s), {cpu or 'unknown CPU'}, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def bench(
    image: Path = typer.Option(
        BENCH_FIELD, "--image", help="Field to analyse (default: a bundled BCCD field)."
    ),
    runs: int = typer.Option(50, "--runs", min=1, help="Timed runs."),
    warmup: int = typer.Option(3, "--warmup", min=0, help="Untimed runs first."),
    models: Path | None = typer.Option(
        None, "--models", help="Models folder (with manifest.json)."
    ),
    threads: int | None = typer.Option(None, "--threads", min=1, max=64),
    accelerator: str | None = typer.Option(
        None, "--accelerator", help=" or ".join(ACCELERATORS) + "."
    ),
    config: Path | None = typer.Option(None, "--config", help="Config file."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the numbers as JSON."),
) -> None:
    """Per-stage latency (median, p90), model load time and peak RSS of the field pipeline."""
    from edge_wbc.pipeline.imageio import ImageError, read_image
    from edge_wbc.pipeline.preprocess import letterbox, white_balance

    _check_accelerator(accelerator)
    rss_start = _peak_rss_mb()
    t0 = time.perf_counter()
    analyzer = _build_analyzer(config, models, threads, accelerator, None)
    load_ms = (time.perf_counter() - t0) * 1000.0
    try:
        rgb = read_image(image)
    except ImageError as e:
        raise _usage_error(f"{image}: {e}") from None

    stages: dict[str, list[float]] = {}
    result = None
    for i in range(warmup + runs):
        t = time.perf_counter()
        rgb = read_image(image)
        decode = (time.perf_counter() - t) * 1000.0
        result = analyzer.analyze(rgb, str(image))
        if i >= warmup:
            for k, v in {"decode": decode, **result.timing_ms}.items():
                stages.setdefault(k, []).append(v)
            stages.setdefault("decode + total", []).append(decode + result.timing_ms["total"])
    assert result is not None
    # Each model alone, on the inputs the pipeline gives it.
    balanced = white_balance(rgb)
    per_model: dict[str, list[float]] = {}
    for m in analyzer.segmenter.members:
        x = letterbox(balanced, m.model.input_hw)[0]
        for _ in range(runs):
            t = time.perf_counter()
            m.model.infer_pixels(x)
            label = f"  segmenter {m.name}" + (" (weight 0: not run)" if m.weight <= 0 else "")
            per_model.setdefault(label, []).append((time.perf_counter() - t) * 1000.0)
    if analyzer.classifier is not None:
        crop = (
            result.cells[0].crop
            if result.cells
            else np.full((analyzer.classifier.input_size,) * 2 + (3,), 200, np.uint8)
        )
        for _ in range(runs):
            t = time.perf_counter()
            analyzer.classifier.classify(crop)
            per_model.setdefault(
                f"  classifier {analyzer.classifier.model.path.name} "
                f"(1 crop, {analyzer.classifier.views} view(s))",
                [],
            ).append((time.perf_counter() - t) * 1000.0)

    h, w = rgb.shape[:2]
    rows = [(k, *_stats(v)) for k, v in {**stages, **per_model}.items()]
    peak = _peak_rss_mb()
    typer.echo(
        f"edge-wbc bench: {image.name} {w}x{h}, {len(result.cells)} cell(s), "
        f"{runs} runs after {warmup} warm-up\n"
        f"runtime {analyzer.runtime.name} {analyzer.runtime.version}, "
        f"{analyzer.threads} thread(s), "
        f"accelerator {analyzer.accelerator}, models {analyzer.models_location.describe()}\n"
        f"machine: {machine_description()}"
    )
    width = max(len(r[0]) for r in rows)
    typer.echo(f"{'stage':<{width}}  {'median ms':>10}  {'p90 ms':>8}")
    typer.echo("-" * (width + 22))
    for name, med, p90 in rows:
        typer.echo(f"{name:<{width}}  {med:>10.2f}  {p90:>8.2f}")
    typer.echo("-" * (width + 22))
    typer.echo(f"{'model load (manifest + sha256 + interpreters)':<{width}}  {load_ms:>10.0f} ms")
    typer.echo(
        f"{'peak RSS (whole process)':<{width}}  {peak:>10.0f} MB  (at start {rss_start:.0f} MB)"
    )
    field_ms = _stats(stages["decode + total"])[0]
    typer.echo(
        f"{'whole field, decode included':<{width}}  {field_ms:>10.1f} ms = "
        f"{1000.0 / max(field_ms, 1e-9):.1f} fields per second on this machine"
    )
    if json_out is not None:
        doc = {
            "image": str(image),
            "runs": runs,
            "runtime": f"{analyzer.runtime.name} {analyzer.runtime.version}",
            "threads": analyzer.threads,
            "accelerator": analyzer.accelerator,
            "machine": machine_description(),
            "models_dir": str(analyzer.models_location.path),
            "models_source": analyzer.models_location.source,
            "fields_per_second": 1000.0 / max(field_ms, 1e-9),
            "cells": len(result.cells),
            "load_ms": load_ms,
            "peak_rss_mb": peak,
            "stages_ms": {k: {"median": m, "p90": p} for k, m, p in rows},
        }
        write_atomic(json_out, (json.dumps(doc, indent=2) + "\n").encode())


def register(app: typer.Typer) -> None:
    app.command("analyze")(analyze)
    app.command("bench")(bench)
