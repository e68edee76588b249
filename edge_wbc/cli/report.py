"""``edge-wbc report`` (a finalised slide's report in any format, the LIS ones included) and
``edge-wbc lis status|send|retry`` (the LIS outbox of a station's data directory)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

FORMATS = ("hl7", "fhir", "json", "csv", "html")

lis_app = typer.Typer(help="The LIS outbox: what waits for the laboratory information system, "
                      "and why.", no_args_is_help=True)


def _fail(msg: str) -> typer.Exit:
    typer.echo(f"edge-wbc: {msg}", err=True)
    return typer.Exit(1)


def _config(config: Path | None) -> Any:
    from edge_wbc.config import ConfigError, default_config_path, load_config

    try:
        return load_config(config if config is not None else default_config_path())
    except ConfigError as e:
        raise _fail(str(e)) from None


def _store(data_dir: Path | None, cfg: Any) -> Any:
    from edge_wbc.counting.store import DB_NAME, Store, StoreError

    d = Path(data_dir) if data_dir is not None else Path(cfg.session.data_dir)
    try:
        if not (d / DB_NAME).is_file():
            raise _fail(f"no station database in {d} ({DB_NAME} missing): give --data-dir")
        return Store(d, read_only=True)  # beside the running station, which holds the folder
    except StoreError as e:
        raise _fail(str(e)) from None
    except PermissionError:
        # The unit's StateDirectoryMode=0750 keeps the data to the service's user.
        raise _fail(f"cannot read {d}: run this as the station's user "
                    "(sudo -u edge-wbc edge-wbc ...)") from None


def _finalised(store: Any, slide_id: str) -> dict[str, Any]:
    slide = store.slide(slide_id)
    if slide is None:
        recent = ", ".join(s["id"] for s in store.slides(5)) or "none"
        raise _fail(f"no slide {slide_id!r} in {store.data_dir} (recent: {recent})")
    if slide["status"] != "finalised":
        raise _fail(f"slide {slide_id} is {slide['status']}, not finalised: it has no report")
    return slide


DataDir = Annotated[Path | None, typer.Option(
    "--data-dir", help="The station's data directory (default: session.data_dir).")]
Config = Annotated[Path | None, typer.Option("--config", help="TOML config file.")]


def report(
    slide: Annotated[str, typer.Option("--slide", help="Slide ID (see /api/slides).")],
    fmt: Annotated[str, typer.Option("--format", help="hl7 | fhir | json | csv | html")] = "json",
    data_dir: DataDir = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write here instead of stdout.")
                   ] = None,
    config: Config = None,
) -> None:
    """Print a finalised slide's report: as the LIS gets it (HL7 v2.5.1 ORU^R01, FHIR R4 Bundle)
    or as written on finalise (JSON, CSV, HTML)."""
    from edge_wbc.comms.lis import ReportError, render
    from edge_wbc.comms.lis.delivery import load_report

    if fmt not in FORMATS:
        raise typer.BadParameter(f"{fmt!r}: choose from {', '.join(FORMATS)}",
                                 param_hint="--format")
    cfg = _config(config)
    store = _store(data_dir, cfg)
    try:
        s = _finalised(store, slide)
        reports = s.get("reports") or {}
        rel = reports.get("json" if fmt in ("hl7", "fhir") else fmt)
        if not rel:
            raise _fail(f"slide {slide} has no {fmt} report on record")
        if fmt in ("hl7", "fhir"):
            try:
                data = render(load_report(store.data_dir, rel), fmt, cfg.lis,
                              s.get("station_id") or "").encode("utf-8")
            except ReportError as e:
                raise _fail(f"slide {slide}: {e}") from None
        else:
            try:
                data = (store.data_dir / rel).read_bytes()
            except OSError as e:
                raise _fail(f"report file {rel}: {e.strerror or e}") from None
    finally:
        store.close()
    if out is not None:
        from edge_wbc.files import write_atomic

        try:
            write_atomic(out, data)
        except OSError as e:
            raise _fail(f"cannot write {out}: {e.strerror or e}") from None
        typer.echo(f"{out}: {len(data)} bytes", err=True)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


@lis_app.command("status")
def lis_status(
    data_dir: DataDir = None,
    config: Config = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Reports waiting for the LIS, those it refused (with its reason), the last delivery."""
    from edge_wbc.comms.lis import outbox

    cfg = _config(config)
    store = _store(data_dir, cfg)
    try:
        conn = outbox.connect_read_only(str(store.db_path))
        try:
            st = {"delivery": cfg.lis.delivery, **outbox.status(conn)}
        finally:
            conn.close()
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps(st, indent=2))
        return
    typer.echo(f"delivery: {st['delivery']}; waiting: {st['waiting']}"
               + (f" (since {st['oldest_waiting_since']})" if st["waiting"] else "")
               + f"; refused by the LIS: {st['held']}")
    for p in st["problems"]:
        what = "REFUSED" if p["held"] else "retrying"
        typer.echo(f"  {what}  sample {p['sample_id']} (slide {p['slide_id']}), "
                   f"{p['attempts']} attempt(s), last {p['at']}: {p['error']}")
    last = st["last_delivered"]
    if last:
        typer.echo(f"last delivered: sample {last['sample_id']} (slide {last['slide_id']}) at "
                   f"{last['at']} to {last['destination']}: {last['detail']}")


@lis_app.command("send")
def lis_send(
    slide: Annotated[str, typer.Option("--slide", help="Slide ID of a finalised slide.")],
    data_dir: DataDir = None,
    config: Config = None,
) -> None:
    """Queue a finalised slide for the LIS (again); the running station delivers it."""
    from edge_wbc.comms.lis import outbox

    cfg = _config(config)
    store = _store(data_dir, cfg)
    try:
        s = _finalised(store, slide)
        conn = outbox.connect(str(store.db_path))
        outbox.queue_now(conn, s["id"], s["sample_id"], (s.get("reports") or {}).get("json", ""))
        conn.close()
    finally:
        store.close()
    note = "" if cfg.lis.delivery != "off" else (" (lis.delivery is 'off' in this config: "
                                                 "nothing will send it until it is set)")
    typer.echo(f"sample {s['sample_id']} (slide {slide}) queued for the LIS{note}")


@lis_app.command("retry")
def lis_retry(
    slide: Annotated[str | None, typer.Option(
        "--slide", help="Only this slide (default: every report the LIS refused).")] = None,
    data_dir: DataDir = None,
    config: Config = None,
) -> None:
    """Send reports the LIS refused (AE/AR, HTTP 4xx) again, once the cause is fixed there."""
    from edge_wbc.comms.lis import outbox

    cfg = _config(config)
    store = _store(data_dir, cfg)
    try:
        conn = outbox.connect(str(store.db_path))
        try:
            n = outbox.release(conn, slide)
            where = outbox.find(conn, slide) if slide is not None and not n else None
        finally:
            conn.close()
        known = slide is None or n or where is not None or store.slide(slide) is not None
    finally:
        store.close()
    if slide is None or n:
        typer.echo(f"{n} report(s) released for another attempt")
        return
    if where is None:
        if not known:
            raise _fail(f"no slide {slide!r} in {store.data_dir}")
        raise _fail(f"slide {slide} was never queued for the LIS: `edge-wbc lis send --slide "
                    f"{slide}` queues it")
    if where["state"] == "delivered":
        raise _fail(f"slide {slide} was delivered to {where['destination']} at {where['at']} "
                    f"({where['detail']}): nothing to release; `edge-wbc lis send --slide "
                    f"{slide}` sends it again")
    last = f"; last try {where['at']}: {where['error']}" if where["error"] else ""
    typer.echo(f"slide {slide} was not refused: its report is waiting for the LIS "
               f"({where['attempts']} attempt(s){last}) and goes out by itself; nothing "
               "released")


def register(app: typer.Typer) -> None:
    app.command("report")(report)
    app.add_typer(lis_app, name="lis")
