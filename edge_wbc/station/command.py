"""``edge-wbc station``: one long-running process, camera → analysis → slide session → page."""

from __future__ import annotations

import logging
import signal
import socket
import sqlite3
import threading
from functools import partial
from pathlib import Path
from typing import Any

import typer

log = logging.getLogger("edge_wbc.station")

EXIT_USAGE = 2


def _fail(msg: str) -> typer.Exit:
    typer.echo(f"edge-wbc station: {msg}", err=True)
    return typer.Exit(EXIT_USAGE)


def station(
    source: str | None = typer.Option(
        None, "--source", help="folder:DIR (replay images), picamera2[:N] or opencv:N | "
        "opencv:/dev/videoN. Default: camera.source of the config."),
    port: int | None = typer.Option(None, "--port", help="TCP port of the page and API."),
    host: str | None = typer.Option(
        None, "--host", help="Address to listen on (127.0.0.1 by default; any other address "
        "needs a token in EDGE_WBC_TOKEN)."),
    target: int | None = typer.Option(
        None, "--target", help="Cells per slide for new slides (100 or 200 in most labs; a "
        "resumed slide keeps its own target)."),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Where the database, crops and reports are kept."),
    config: Path | None = typer.Option(
        None, "--config", help="TOML config file (default: $EDGE_WBC_CONFIG or "
        "/etc/edge-wbc/config.toml when present)."),
    models: Path | None = typer.Option(
        None, "--models", help="Models folder with manifest.json (default: models.dir, "
        "$EDGE_WBC_MODELS, /opt/edge-wbc/models, then the packaged models)."),
    mqtt_host: str | None = typer.Option(
        None, "--mqtt-host", help="MQTT broker; without one the station runs without MQTT."),
    mqtt_port: int | None = typer.Option(None, "--mqtt-port", help="MQTT broker port."),
    station_id: str | None = typer.Option(
        None, "--station-id", help="This station's name in MQTT topics (default: host name)."),
    reset: bool = typer.Option(
        False, "--reset", help="Only when the station refuses a damaged database: move it aside "
        "(renamed, never deleted) and start an empty one."),
) -> None:
    """Run the microscope station: live preview, capture, running formula, review, reports."""
    from edge_wbc.config import ConfigError, default_config_path, load_config
    from edge_wbc.logs import setup_logging

    try:
        cfg = load_config(config if config is not None else default_config_path())
        cfg = cfg.replace(
            camera_source=source, station_port=port, station_host=host, session_target=target,
            session_data_dir=str(data_dir) if data_dir else None,
            models_dir=str(models) if models else None, mqtt_host=mqtt_host,
            mqtt_port=mqtt_port, mqtt_station_id=station_id,
        )
    except ConfigError as e:
        raise _fail(str(e)) from None
    setup_logging(cfg.logging.level)
    try:
        run(cfg, reset=reset)
    except StartupError as e:
        raise _fail(str(e)) from None


class StartupError(Exception):
    """The station cannot start; the message says what to fix."""


def run(cfg: Any, stop: threading.Event | None = None, reset: bool = False) -> None:
    """Start everything, serve until SIGTERM/SIGINT (or ``stop``), then shut down in order."""
    from edge_wbc import sdnotify
    from edge_wbc.camera import CameraError, open_source
    from edge_wbc.counting.events import Event, Fanout
    from edge_wbc.counting.reports import write_reports
    from edge_wbc.counting.session import SlideSession
    from edge_wbc.counting.store import Store, StoreError
    from edge_wbc.pipeline.manifest import ManifestError
    from edge_wbc.station.actions import Actions
    from edge_wbc.station.app import Station
    from edge_wbc.station.server import EventHub, StationServer, serve_in_thread

    stop = stop or threading.Event()
    # The store first: it takes the data folder's lock, so a second station on the same folder
    # stops here, before it loads models, opens the camera or touches the broker.
    try:
        store = Store(cfg.session.data_dir, mqtt=bool(cfg.mqtt.host),
                      outbox_max=cfg.mqtt.outbox_max, backups_keep=cfg.session.backups_keep,
                      reset=reset)
    except StoreError as e:
        raise StartupError(str(e)) from e
    try:
        from edge_wbc.pipeline.analysis import FieldAnalyzer

        analyzer = FieldAnalyzer.from_config(cfg)
    except ManifestError as e:
        store.close()
        raise StartupError(f"models: {e}") from e
    except (OSError, RuntimeError, ValueError) as e:
        store.close()
        raise StartupError(f"cannot load the models: {e}") from e
    from edge_wbc.station.magnification import Magnification, config_rule, restore_saved

    # Before the session is made: its models (recorded on every field, and on a slide it
    # starts now) carry the diameter in use.
    check_diameter = config_rule(cfg)
    saved_diameter, problem = restore_saved(analyzer, store.data_dir,
                                            cfg.postprocess.cell_diameter_px, check_diameter)
    if problem:
        log.warning("%s", problem)
    models = analyzer.describe()
    log.info("models loaded from %s in %.0f ms on %s", analyzer.models_location.describe(),
             analyzer.load_ms, analyzer.accelerator)
    lis = None
    if cfg.lis.delivery != "off":
        from edge_wbc.comms.lis.delivery import LisDelivery

        try:
            # Its tables exist before the store's first finalise runs the hook.
            lis = LisDelivery(cfg.lis, store.db_path, store.data_dir,
                              station_id=cfg.mqtt.station_id,
                              on_change=lambda: push_status())
        except (OSError, sqlite3.Error) as e:
            store.close()
            raise StartupError(f"LIS delivery: {e}") from e
        store.add_transaction_hook(lis.hook)
    fanout = Fanout()
    hub = EventHub()
    fanout.subscribe(hub)
    if lis is not None:
        fanout.subscribe(lis)
    session = SlideSession(
        store, fanout, default_target=cfg.session.target,
        duplicate_overlap=cfg.session.duplicate_overlap, models=models,
        station_id=cfg.mqtt.station_id,
        reporter=partial(write_reports, data_dir=store.data_dir, tz=cfg.report.timezone),
        formula=cfg.formula.build(),
        require_sample_id=cfg.report.require_sample_id,
        require_operator=cfg.report.require_operator,
    )
    from edge_wbc.station.adaptations import LabAdaptation

    lab_adaptation = None
    if analyzer.classifier is not None and analyzer.classifier.embedding_dim is not None:
        lab_adaptation = LabAdaptation(analyzer, session, store.data_dir)
        problem = lab_adaptation.restore()
        if problem:
            log.warning("%s", problem)
    try:
        # A folder is replayed once per slide (loop=False): going round again would count the
        # same fields twice, which the duplicate guard (last few fields only) would not catch.
        source = open_source(cfg.camera.source, cfg.camera.width, cfg.camera.height, loop=False)
    except CameraError as e:
        if lis is not None:
            lis.stop()
        store.close()
        raise StartupError(str(e)) from e
    _follow_slides(source, session, fanout)

    live = sdnotify.Liveness(stuck_after_s=cfg.station.stuck_after_s)
    st = Station(
        source, analyzer.analyze, session, fanout, queue_max=cfg.station.queue_max,
        liveness=live,
        info={"accelerator": analyzer.accelerator, "station_id": cfg.mqtt.station_id,
              "models": [m["name"] for m in models.get("models", [])],
              "data_dir": str(store.data_dir),
              # The page offers "Adapt to this lab" only where the classifier can be adapted.
              "adaptable": lab_adaptation is not None},
    )
    magnification = Magnification(analyzer, st, cfg.postprocess.cell_diameter_px,
                                  store.data_dir, check_diameter, saved_diameter)
    st.info["measurable"] = True  # the page offers "Measure magnification"
    actions = Actions(st)
    extra: dict[str, Any] = {}
    if lis is not None:
        extra["lis"] = lis.status
    st.extra_status = lambda: {k: f() for k, f in extra.items()}

    def push_status() -> None:
        # The page hears of the LIS or the broker going away, or an outbox filling, without
        # waiting for a capture to refresh the station's status.
        fanout(Event("status", st.status()))

    publisher = None
    if cfg.mqtt.host:
        from edge_wbc.comms import mqtt as edge_mqtt

        try:
            publisher = edge_mqtt.start_publisher(
                cfg.mqtt, store.db_path, state_provider=session.state,
                command_handler=actions.remote, on_change=lambda _status: push_status(),
                health_provider=lambda: {"accelerator": analyzer.accelerator,
                                         "queue": st.status()["queue"]},
            )
        except edge_mqtt.MqttError as e:
            source.close()
            if lis is not None:
                lis.stop()
            store.close()
            raise StartupError(f"MQTT: {e}") from e
        if publisher is not None:
            fanout.subscribe(publisher.publish)
            extra["mqtt"] = publisher.status
    try:
        server = StationServer(st, hub, cfg.station.host, cfg.station.port, cfg.station.token,
                               cfg.camera.preview_fps, lis=cfg.lis, actions=actions,
                               adaptation=lab_adaptation, magnification=magnification)
    except (OSError, ValueError) as e:
        source.close()
        if publisher is not None:
            publisher.stop()
        if lis is not None:
            lis.stop()
        store.close()
        raise StartupError(f"cannot listen on {cfg.station.host}:{cfg.station.port}: {e}") from e

    button = None
    if cfg.station.gpio_pin is not None:
        from edge_wbc.station.triggers import TriggerError, gpio_button

        try:
            button = gpio_button(cfg.station.gpio_pin, lambda: actions.capture("gpio"))
        except TriggerError as e:
            log.warning("%s (the on-screen button and the space bar still work)", e)

    st.start()
    if lis is not None:
        lis.start()
    live.watch_thread(st.worker)
    live.start()
    serve_in_thread(server)
    url = _url(cfg.station.host, server.port)
    state = session.state()
    typer.echo(
        f"edge-wbc station: open {url}  (camera: {source.name}; slide {state['sample_id']}, "
        f"{state['counted']}/{state['target']} cells; data in {store.data_dir}; Ctrl-C stops)"
    )
    sdnotify.notify_ready(f"listening on {url}")

    def _signal(signum: int, _frame: Any) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
    try:
        while not stop.wait(1.0):
            st.poll()
            s = session.state()
            sdnotify.notify_status(f"slide {s['sample_id']}: {s['counted']}/{s['target']} cells")
    finally:
        sdnotify.notify_stopping("shutting down")
        # Before the worker stops: a watchdog that sees it gone would exit 70 on a clean stop.
        live.stop()
        server.shutdown()
        server.server_close()
        st.stop()
        if button is not None:
            button.close()
        if publisher is not None:
            publisher.stop()
        if lis is not None:
            lis.stop()
        store.close()
        typer.echo("edge-wbc station: stopped; every counted cell is saved", err=True)


def _follow_slides(source: Any, session: Any, fanout: Any) -> None:
    """For a replayed folder: resume at the field after the last one counted on the open slide,
    and start each new slide at the first field."""
    seek = getattr(source, "seek", None)
    if seek is None:
        return
    seek(_resume_at(source, session))

    def on_event(ev: Any) -> None:
        if ev.kind == "slide" and ev.payload.get("action") == "started":
            seek(0)

    fanout.subscribe(on_event)


def _resume_at(source: Any, session: Any) -> int:
    """Where the replay of the open slide goes on: after the file its last field came from.
    Not the number of fields counted: a refused frame (a corrupt file) moved the replay on too
    without adding a field, so that number lands earlier and a file already counted would be
    counted again. The count is the fallback when the file is not in the folder (renamed,
    another folder, a slide begun on another camera)."""
    last = session.last_field()
    if last is None:
        return 0
    index_of = getattr(source, "index_of", None)
    i = index_of(str(last.get("source") or "")) if index_of is not None else None
    if i is None:
        return int(session.state()["fields"])
    return int(i) + 1


def _url(host: str, port: int) -> str:
    shown = host
    if host in ("0.0.0.0", "::", ""):
        shown = socket.gethostname()
    elif ":" in host:
        shown = f"[{host}]"
    return f"http://{shown}:{port}/"


def register(app: typer.Typer) -> None:
    app.command("station")(station)

