"""``edge-wbc-convert``: the offline tool (train, quantize, verify, evaluate, gate, edgetpu,
manifest). Runs on a workstation; TensorFlow is imported lazily inside each command."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

app = typer.Typer(name="edge-wbc-convert", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@app.callback()
def _main() -> None:
    """Train, quantize, verify and evaluate the edge-wbc models."""


def _logging(run_dir: Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command("train-seg")
def train_seg(
    encoder: str = typer.Option(..., help="mnv2 | mnv3s | rescnn | efficientnetb2 | efficientnetb7 | inceptionresnetv2"),
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
) -> None:
    """Train one U-Net segmenter (resumes from RUN_DIR/last.keras when present)."""
    from convert.data import SegSampler, load_items, seg_eval_pairs
    from convert.train import TrainConfig, seg_evaluator, seg_loss, train
    from convert.architectures import build_unet

    _logging(run_dir)
    hw = (height, width)
    cfg = TrainConfig("segmentation", encoder, str(run_dir), str(data_root), steps, batch, lr,
                      seed, eval_every, hw, threads, weights)
    items = load_items(data_root, tuple(s for s in sources.split(",") if s))
    sampler = SegSampler([i for i in items if i.split == "train"], hw, run_dir.parent / "cache", seed)
    val = seg_eval_pairs([i for i in items if i.split == "val" and i.source != "raabin"],
                         run_dir.parent / "cache")
    best = train(cfg, lambda: sampler.batch(batch), seg_evaluator(val, hw),
                 lambda: build_unet(encoder, hw, weights=weights), seg_loss, "iou_mean")
    typer.echo(f"best model: {best}")


if __name__ == "__main__":
    app()
