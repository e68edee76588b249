"""Writing a file whole or not at all: the one rule every writer of reports, settings and
analysis output follows."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` so that a reader, a crash or a power cut never
    sees half a file and an older file is replaced only by a complete new one. A failure (a full
    disk, a folder that does not exist, a target that is a folder) raises OSError and leaves no
    temporary file behind."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    # hidden and per process: two writers of one file never share a temporary
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
