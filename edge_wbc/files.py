"""Writing a file whole or not at all: the one rule every writer of reports, settings and
analysis output follows."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replaced_atomically(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path next to ``path`` for whatever writes the file (a library's ``save``):
    renamed over ``path`` when the block ends, removed when it raises, so ``path`` is either
    the old file or the whole new one. ``suffix``: for writers that want an extension."""
    path = Path(path)
    # hidden and per process: two writers of one file never share a temporary
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` so that a reader, a crash or a power cut never
    sees half a file and an older file is replaced only by a complete new one. A failure (a full
    disk, a folder that does not exist, a target that is a folder) raises OSError and leaves no
    temporary file behind."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with replaced_atomically(path) as tmp, open(tmp, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
