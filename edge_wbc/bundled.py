"""What the installed package carries (the shipped int8 models, the demo's sample fields) and
where the models are found.

A wheel installed on a Pi or in a fresh venv must analyse without a checkout, so both travel
inside the package (``edge_wbc/models`` and ``edge_wbc/samples`` are links to the repository's
``models/`` and ``samples/fields/``; a wheel carries the files). The models folder is resolved in
one place, in this order: ``--models``, the config's ``models.dir``, ``$EDGE_WBC_MODELS``, the
installed-models folder that ``install-pi.sh`` and an update write, then the packaged models.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

#: What install-pi.sh writes and an update replaces (docs/pi.md).
INSTALLED_MODELS = Path("/opt/edge-wbc/models")
MODELS_ENV = "EDGE_WBC_MODELS"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ModelsLocation:
    path: Path
    #: Which rule chose it: "--models", "models.dir", "EDGE_WBC_MODELS", "installed", "packaged".
    source: str

    def describe(self) -> str:
        return f"{self.path} ({self.source})"


def _package_dir(name: str) -> Path:
    # as_file is not needed: setuptools installs the package as plain files (zip-safe is off).
    return Path(str(resources.files("edge_wbc").joinpath(name)))


def packaged_models() -> Path:
    return _package_dir("models")


def packaged_samples() -> Path:
    """The bundled sample fields (116 BCCD train/val fields) that the demo replays."""
    return _package_dir("samples")


def locate_models(
    configured: str = "",
    flag: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    installed: Path = INSTALLED_MODELS,
) -> ModelsLocation:
    """The models folder to use and why. Explicit choices (flag, config, environment) are
    returned even when they hold no manifest, so the error names the folder the user chose
    instead of silently falling back to other models."""
    environ: Mapping[str, str] = os.environ if env is None else env
    if flag:
        return ModelsLocation(Path(flag), "--models")
    if configured:
        return ModelsLocation(Path(configured), "models.dir")
    if environ.get(MODELS_ENV):
        return ModelsLocation(Path(environ[MODELS_ENV]), MODELS_ENV)
    if (installed / MANIFEST).is_file():
        return ModelsLocation(installed, "installed")
    return ModelsLocation(packaged_models(), "packaged")
