"""What the LIS hand-off costs on this machine: import, building and checking each message.

Times, on a synthetic finalised report with the ru formula's rows and two raised flags:

* import: ``edge_wbc.comms.lis`` with python-hl7 and fhir.resources (R4B models), in a fresh
  interpreter (paid once, by the delivery thread's first report or the first on-demand route);
* hl7: ``build_oru`` (escape + assemble) and parsing the result back;
* fhir: ``build_bundle`` including validation of the Bundle and every resource;
* mllp: one delivery to a python-hl7 MLLP listener on loopback, ACK included.

Prints one table. Example: ``python scripts/bench_lis.py --repeat 200``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _report() -> dict[str, Any]:
    rows = []
    for label, n in (("basophil", 1), ("eosinophil", 3), ("myelocyte", 1), ("metamyelocyte", 1),
                     ("band_neutrophil", 8), ("segmented_neutrophil", 52), ("lymphocyte", 28),
                     ("monocyte", 5), ("plasma_cell", 1)):
        rows.append({"label": label, "group": label, "kind": "counted", "classes": [label],
                     "count": n, "percent": float(n), "ci_low": max(0.0, n - 5.0),
                     "ci_high": n + 6.0})
    rows.append({"label": "nrbc", "group": "nrbc", "kind": "per_100_wbc",
                 "classes": ["erythroblast"], "count": 2, "percent": 2.0, "ci_low": None,
                 "ci_high": None})
    rows.append({"label": "non_wbc", "group": "non_wbc", "kind": "count_only",
                 "classes": ["platelet", "smudge_cell"], "count": 14, "percent": 14.0,
                 "ci_low": None, "ci_high": None})
    return {
        "schema": "edge-wbc/report/2", "software": {"version": "bench"}, "sample_id": "A|B^C",
        "slide_id": "S20260101T000000-0000", "station_id": "bench", "counted": 100,
        "started_at": "2026-01-01T00:00:00.000Z", "finalised_at": "2026-01-01T00:10:00.000Z",
        "target": 100, "ci_method": "clopper-pearson", "differential": rows,
        "flags": [{"name": "band_neutrophil", "op": ">", "threshold": 6,
                   "text": "Band neutrophils: 8.0 % (band_neutrophil > 6 %)"},
                  {"name": "myelocyte", "op": ">", "threshold": 0,
                   "text": "Myelocytes: 1 (myelocyte > 0)"}],
        "reviewed_changes": [{"cell_id": "c1"}], "models": {"models": []},
    }


def _time(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    fn()  # warm
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1000)
    ts.sort()
    return statistics.median(ts), ts[int(0.9 * (len(ts) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--repeat", type=int, default=100)
    args = ap.parse_args()

    imports = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import edge_wbc.comms.lis.hl7v2, "
                        "edge_wbc.comms.lis.fhir, edge_wbc.comms.lis.transports; "
                        "from fhir.resources.R4B.bundle import Bundle"], check=True)
        imports.append((time.perf_counter() - t0) * 1000)

    import hl7
    from lis_peers import mllp_peer

    from edge_wbc.comms.lis.fhir import build_bundle
    from edge_wbc.comms.lis.hl7v2 import build_oru
    from edge_wbc.comms.lis.transports import HL7Header, MllpTransport

    rep = _report()
    rows = [("import (fresh interpreter, incl. Python start)", min(imports), max(imports))]
    rows.append(("hl7: build ORU^R01", *_time(lambda: build_oru(rep), args.repeat)))
    text = build_oru(rep)
    rows.append(("hl7: parse it back", *_time(lambda: hl7.parse(text), args.repeat)))
    rows.append(("fhir: build + validate Bundle", *_time(lambda: build_bundle(rep),
                                                          args.repeat)))
    with mllp_peer() as peer:
        t = MllpTransport("127.0.0.1", peer.port, 5.0, HL7Header())
        rows.append(("mllp: send + ACK on loopback", *_time(lambda: t.send(rep),
                                                            min(args.repeat, 50))))
    print(f"edge-wbc LIS hand-off on {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}; {len(rep['differential'])} formula rows, "
          f"{len(text)} bytes of HL7; repeat {args.repeat}")
    print(f"{'step':<50} {'median ms':>10} {'p90 ms':>10}")
    for name, med, p90 in rows:
        print(f"{name:<50} {med:>10.2f} {p90:>10.2f}")
    print("(import row: min and max of 3 runs)")


if __name__ == "__main__":
    main()
