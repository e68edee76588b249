"""U-Net with pluggable encoders, and classifiers.

All models are built with batch size 1 and static shapes (dynamic batch adds SHAPE/
STRIDED_SLICE/PACK ops that the Edge TPU compiler rejects), and the decoder upsamples with
bilinear UpSampling2D + Conv2D (Conv2DTranspose+BN converts to TRANSPOSE_CONV v4, which fails
the Edge TPU compiler; Keras 3 nearest upsampling converts to RESHAPE+TILE).

Encoders:
- edge (shipped): ``mnv2`` (MobileNetV2 alpha 0.35), ``mnv3s`` (MobileNetV3-Small minimalistic:
  no hard-swish, no squeeze-excite), ``rescnn`` (a plain residual CNN).
- paper: ``efficientnetb2``, ``efficientnetb7``, ``inceptionresnetv2`` (Keras applications,
  ``weights=None`` or a local weights file: ImageNet weights cannot be downloaded here).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

EDGE_ENCODERS = ("mnv2", "mnv3s", "rescnn")
PAPER_ENCODERS = ("efficientnetb2", "efficientnetb7", "inceptionresnetv2")
CLASSIFIERS = ("mnv2", "inceptionresnetv2")
BN_MOMENTUM = 0.99  # Keras' 0.999 leaves short from-scratch runs with useless moving stats


def _keras() -> Any:
    import keras

    return keras


def _set_bn_momentum(model: Any, momentum: float = BN_MOMENTUM) -> None:
    keras = _keras()
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum


def _app_encoder(name: str, inp: Any, weights: str | None) -> Any:
    keras = _keras()
    apps = keras.applications
    kw: dict[str, Any] = {"include_top": False, "input_tensor": inp, "weights": None}
    if name == "mnv2":
        enc = apps.MobileNetV2(alpha=0.35, **kw)
    elif name == "mnv3s":
        enc = apps.MobileNetV3Small(
            alpha=0.75, minimalistic=True, include_preprocessing=False, **kw
        )
    elif name == "efficientnetb2":
        enc = (
            apps.EfficientNetB2(include_preprocessing=False, **kw)
            if _has_prep(apps.EfficientNetB2)
            else apps.EfficientNetB2(**kw)
        )
    elif name == "efficientnetb7":
        enc = (
            apps.EfficientNetB7(include_preprocessing=False, **kw)
            if _has_prep(apps.EfficientNetB7)
            else apps.EfficientNetB7(**kw)
        )
    elif name == "inceptionresnetv2":
        enc = apps.InceptionResNetV2(**kw)
    else:
        raise ValueError(f"unknown encoder {name!r}")
    if weights:
        p = Path(weights)
        if not p.is_file():
            raise FileNotFoundError(f"encoder weights file {p} not found")
        enc.load_weights(str(p), skip_mismatch=True)
    return enc


def _has_prep(fn: Any) -> bool:
    import inspect

    return "include_preprocessing" in inspect.signature(fn).parameters


def _rescnn(inp: Any) -> list[Any]:
    """A small residual encoder; returns features at strides 2, 4, 8, 16, 32."""
    keras = _keras()
    L = keras.layers

    def cbr(x: Any, f: int, s: int = 1) -> Any:
        x = L.Conv2D(f, 3, strides=s, padding="same", use_bias=False)(x)
        x = L.BatchNormalization(momentum=BN_MOMENTUM)(x)
        return L.ReLU(6.0)(x)

    def block(x: Any, f: int) -> Any:
        y = L.SeparableConv2D(f, 3, padding="same", use_bias=False)(x)
        y = L.BatchNormalization(momentum=BN_MOMENTUM)(y)
        y = L.ReLU(6.0)(y)
        y = L.SeparableConv2D(f, 3, padding="same", use_bias=False)(y)
        y = L.BatchNormalization(momentum=BN_MOMENTUM)(y)
        return L.ReLU(6.0)(L.Add()([x, y]))

    feats = []
    x = inp
    for f in (16, 24, 40, 64, 96):
        x = cbr(x, f, 2)
        x = block(x, f)
        feats.append(x)
    return feats


def _pick_features(enc: Any, in_hw: tuple[int, int]) -> list[Any]:
    """For strides 2..32, the deepest encoder layer at the resolution nearest that stride.

    Encoders with 'valid' padding (InceptionResNetV2) never hit H/s exactly; the nearest size
    is used and the decoder resizes the skip to match.
    """
    H = in_hw[0]
    last_at: dict[int, Any] = {}
    for layer in enc.layers:
        shape = getattr(getattr(layer, "output", None), "shape", None)
        if shape is None or len(shape) != 4 or shape[1] is None or shape[1] >= H:
            continue
        last_at[int(shape[1])] = layer.output
    if not last_at:
        raise ValueError("encoder has no downsampled feature maps")
    feats, used = [], set()
    for s in (2, 4, 8, 16, 32):
        size = min(
            (h for h in last_at if h not in used), key=lambda h: abs(h - H / s), default=None
        )
        if size is None:
            raise ValueError(f"encoder has no feature map for stride {s}")
        used.add(size)
        feats.append(last_at[size])
    return feats


def build_unet(
    encoder: str,
    input_hw: tuple[int, int] = (192, 256),
    decoder_filters: tuple[int, ...] = (96, 64, 40, 24, 16),
    weights: str | None = None,
) -> Any:
    """U-Net: encoder features at strides 2-32, bilinear upsampling decoder, 1-channel sigmoid."""
    keras = _keras()
    L = keras.layers
    inp = keras.Input(shape=(*input_hw, 3), batch_size=1, name="image")
    if encoder == "rescnn":
        feats = _rescnn(inp)
    else:
        enc = _app_encoder(encoder, inp, weights)
        feats = _pick_features(enc, input_hw)
    skips, x = feats[:-1][::-1], feats[-1]
    for i, f in enumerate(decoder_filters[: len(skips)]):
        x = L.UpSampling2D(2, interpolation="bilinear")(x)
        skip = skips[i]
        if tuple(skip.shape[1:3]) != tuple(x.shape[1:3]):
            # Encoders with 'valid' padding (InceptionResNetV2) give odd sizes.
            skip = L.Resizing(int(x.shape[1]), int(x.shape[2]), interpolation="bilinear")(skip)
        x = L.Concatenate()([x, skip])
        x = L.SeparableConv2D(f, 3, padding="same", use_bias=False)(x)
        x = L.BatchNormalization(momentum=BN_MOMENTUM)(x)
        x = L.ReLU(6.0)(x)
    x = L.UpSampling2D(2, interpolation="bilinear")(x)
    if tuple(x.shape[1:3]) != tuple(input_hw):
        x = L.Resizing(*input_hw, interpolation="bilinear")(x)
    x = L.Conv2D(decoder_filters[-1], 3, padding="same", use_bias=False)(x)
    x = L.BatchNormalization(momentum=BN_MOMENTUM)(x)
    x = L.ReLU(6.0)(x)
    out = L.Conv2D(1, 1, activation="sigmoid", name="mask")(x)
    model = keras.Model(inp, out, name=f"unet_{encoder}")
    _set_bn_momentum(model)
    return model


def build_classifier(
    arch: str = "mnv2",
    input_size: int = 96,
    n_classes: int = 6,
    weights: str | None = None,
    alpha: float = 0.5,
) -> Any:
    """Crop -> class probabilities (softmax). ``mnv2`` is shipped; ``inceptionresnetv2`` is the
    paper's (it needs inputs >= 75 px)."""
    keras = _keras()
    L = keras.layers
    inp = keras.Input(shape=(input_size, input_size, 3), batch_size=1, name="crop")
    kw: dict[str, Any] = {"include_top": False, "input_tensor": inp, "weights": None}
    if arch == "mnv2":
        base = keras.applications.MobileNetV2(alpha=alpha, **kw)
    elif arch == "inceptionresnetv2":
        base = keras.applications.InceptionResNetV2(**kw)
    else:
        raise ValueError(f"unknown classifier {arch!r}")
    if weights:
        base.load_weights(str(weights), skip_mismatch=True)
    x = L.GlobalAveragePooling2D()(base.output)
    x = L.Dropout(0.2)(x)
    logits = L.Dense(n_classes, name="logits")(x)
    out = L.Softmax(name="probs")(logits)
    model = keras.Model(inp, out, name=f"cls_{arch}")
    _set_bn_momentum(model)
    return model


def with_batch(model: Any, batch: int | None) -> Any:
    """The same graph and weights with another batch size (training uses batches; the shipped
    file must be batch 1)."""
    keras = _keras()
    shape = model.input.shape[1:]
    clone = keras.models.clone_model(
        model, input_tensors=keras.Input(shape=shape, batch_size=batch)
    )
    clone.set_weights(model.get_weights())
    return clone


# The manifest's "architecture" text of each model: written by release, read back by
# ``recover-float`` to rebuild the float model an int8 file came from.


def describe_unet(encoder: str) -> str:
    return f"U-Net, {encoder} encoder, bilinear decoder"


def describe_classifier(arch: str, alpha: float | None, size: int) -> str:
    tag = f"-{alpha:g}" if alpha is not None and arch == "mnv2" else ""
    return f"{arch}{tag} {size}x{size}"


_UNET_TEXT = re.compile(r"U-Net, (\w+) encoder, bilinear decoder")
_CLS_TEXT = re.compile(r"(\w+?)(?:-(\d+(?:\.\d+)?))? (\d+)x(\d+)")


def parse_architecture(text: str, task: str) -> dict[str, Any]:
    """A manifest's "architecture" back to build_unet / build_classifier arguments:
    {"encoder"} for a segmenter, {"arch", "alpha", "size"} for a classifier."""
    if task == "segmentation":
        m = _UNET_TEXT.fullmatch(text)
        if m is None or m.group(1) not in EDGE_ENCODERS + PAPER_ENCODERS:
            raise ValueError(f"segmenter architecture {text!r}: expected {describe_unet('ENC')!r}")
        return {"encoder": m.group(1)}
    c = _CLS_TEXT.fullmatch(text)
    if c is None or c.group(1) not in CLASSIFIERS or c.group(3) != c.group(4):
        raise ValueError(f"classifier architecture {text!r}: expected e.g. 'mnv2-0.75 96x96'")
    if c.group(1) == "mnv2" and c.group(2) is None:
        raise ValueError(
            f"classifier architecture {text!r}: MobileNetV2 without its width (-ALPHA)"
        )
    alpha = float(c.group(2)) if c.group(2) else 1.0
    return {"arch": c.group(1), "alpha": alpha, "size": int(c.group(3))}
