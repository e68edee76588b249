"""The Edge TPU step: run edgetpu_compiler when it is installed and record what it mapped."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any


def compile_model(path: Path, out_dir: Path, timeout_s: int = 600) -> dict[str, Any]:
    exe = shutil.which("edgetpu_compiler")
    if exe is None:
        return {
            "available": False,
            "message": "edgetpu_compiler not on PATH: no *_edgetpu.tflite made (install it from "
            "Coral's apt repository on an x86-64 Debian/Ubuntu host; the station then runs "
            "these int8 files on the CPU)",
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [exe, "-s", "-o", str(out_dir), str(path)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    log = proc.stdout + proc.stderr
    tpu = re.search(r"Number of operations that will run on Edge TPU:\s*(\d+)", log)
    cpu = re.search(r"Number of operations that will run on CPU:\s*(\d+)", log)
    return {
        "available": True,
        "ok": proc.returncode == 0,
        "ops_on_tpu": int(tpu.group(1)) if tpu else None,
        "ops_on_cpu": int(cpu.group(1)) if cpu else None,
        "output": str(out_dir / f"{path.stem}_edgetpu.tflite"),
        "message": (
            f"compiled: {tpu.group(1) if tpu else '?'} ops on the Edge TPU, "
            f"{cpu.group(1) if cpu else '?'} on the CPU"
        )
        if proc.returncode == 0
        else f"edgetpu_compiler failed (exit {proc.returncode}): {log.strip()[-400:]}",
        "log": log[-4000:],
    }
