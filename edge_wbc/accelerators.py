"""The accelerators a station can run its models on: the CPU, and one row per TFLite delegate.

A new accelerator is a new row of :data:`DELEGATES`: the config accepts its name
(``[models] accelerator``), :func:`edge_wbc.pipeline.inference.open_accelerator` loads its
library, and every model runs the file compiled for it when one sits next to the CPU file.

This is plain data at the bottom of the package (nothing of edge_wbc imported) because both
the config schema, which must stay importable without numpy or OpenCV for ``check-config``, and
the interpreter layer read it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

CPU = "cpu"


@dataclass(frozen=True)
class Delegate:
    """An external TFLite delegate, loaded once with ``load_delegate(library, options)``."""

    #: The config value, and the key of the manifest block that holds the compiled file's sha256.
    name: str
    label: str  # how messages call it, e.g. "Edge TPU"
    #: ``platform.system()`` -> the delegate's shared library (else ``default_library``).
    libraries: Mapping[str, str]
    default_library: str
    install_hint: str  # how to get the library, said when it is missing
    #: A model compiled for this accelerator sits next to the CPU file as ``<stem><suffix>.tflite``.
    compiled_suffix: str
    compile_hint: str  # how to make that file, said when it is missing
    #: Device selector syntax (full match) and its spellings for messages; '' is "first found".
    device_pattern: str = ""
    device_spellings: tuple[str, ...] = field(default=())

    def library(self, system: str) -> str:
        return self.libraries.get(system, self.default_library)

    def device_ok(self, device: str) -> bool:
        return re.fullmatch(self.device_pattern, device) is not None

    def options(self, device: str) -> dict[str, str]:
        """The delegate's options for a device selector ('' passes none: first found)."""
        return {"device": device} if device else {}


DELEGATES: dict[str, Delegate] = {
    "edgetpu": Delegate(
        name="edgetpu",
        label="Edge TPU",
        libraries={
            "Linux": "libedgetpu.so.1",
            "Darwin": "libedgetpu.1.dylib",
            "Windows": "edgetpu.dll",
        },
        default_library="libedgetpu.so.1",
        install_hint="install libedgetpu1-std from Coral's apt repository",
        compiled_suffix="_edgetpu",
        compile_hint="compile it with edgetpu_compiler",
        # pycoral's spellings: "" (first found), ":<N>", "usb", "usb:<N>", "pci", "pci:<N>".
        device_pattern=r"(usb|pci)?(:[0-9]+)?",
        device_spellings=("", ":0", "usb", "usb:0", "pci", "pci:0"),
    ),
}

#: Every value ``[models] accelerator`` accepts.
ACCELERATORS: tuple[str, ...] = (CPU, *DELEGATES)
