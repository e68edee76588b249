"""The benchmark scripts' argument handling (scripts/bench_*.py): what they pass on and what
they refuse before a long run starts. The benchmarks themselves are not run here (minutes)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "fields"
FIXTURE_MODELS = ROOT / "tests" / "fixtures" / "models"


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}",
                                                  ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_paper_passes_absolute_paths_and_the_warmup_to_the_edge_bench(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The edge bench runs with cwd=ROOT: a relative --models/--image named files there.
    bench = _script("bench_paper")
    monkeypatch.chdir(tmp_path)
    args = bench.parse_args(["--models", "m", "--image", "f.jpg", "--warmup", "5"])
    assert args.models == tmp_path / "m" and args.image == tmp_path / "f.jpg"
    cmd = bench.edge_command(args, tmp_path / "edge.json")
    assert cmd[cmd.index("--models") + 1] == str(tmp_path / "m")
    assert cmd[cmd.index("--image") + 1] == str(tmp_path / "f.jpg")
    assert cmd[cmd.index("--warmup") + 1] == "5"


def test_bench_paper_without_models_says_so_without_a_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_paper.py"), "--models", "missing",
         "--runs", "1", "--edge-runs", "1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"no manifest.json in {tmp_path / 'missing'}" in done.stderr
    assert "Traceback" not in done.stderr and "CalledProcessError" not in done.stderr


@pytest.mark.parametrize(
    ("captures", "browser", "most", "message"),
    [
        (116, False, 115, r"1 warm-up \+ 116 \(HTTP\) = 117 fields, .* the 116 fields of .*"
                          r"give --captures 115 or fewer, or a --source"),
        (58, True, 57, r"1 warm-up \+ 58 \(HTTP\) \+ 58 \(browser\) = 117 fields, .*"
                       r"give --captures 57 or fewer, or --no-browser"),
    ],
)
def test_bench_station_refuses_more_captures_than_the_folder_has(
    captures: int, browser: bool, most: int, message: str
) -> None:
    # Before, the run started and died minutes later on "all 116 fields ... captured".
    bench = _script("bench_station")
    problem = bench.captures_problem(f"folder:{SAMPLES}", captures, browser)
    assert problem is not None and re.search(message, problem), problem
    assert bench.captures_problem(f"folder:{SAMPLES}", most, browser) is None
    assert bench.captures_problem(f"folder:{SAMPLES}", 0, browser) == (
        "--captures 0: give at least 1")
    assert bench.captures_problem("opencv:0", 10_000, browser) is None  # a camera has no end


def test_bench_station_checks_before_starting_the_station(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bench = _script("bench_station")
    code = bench.main(["--models", str(FIXTURE_MODELS), "--captures", "200", "--no-browser",
                       "--source", f"folder:{SAMPLES}"])
    assert code == 2
    assert "give --captures 115 or fewer" in capsys.readouterr().err
    code = bench.main(["--models", str(FIXTURE_MODELS), "--no-browser",
                       "--source", f"folder:{tmp_path / 'none'}"])
    assert code == 2
    assert "--source: folder source:" in capsys.readouterr().err
