"""Operator commands: ``edge-wbc check-config`` and ``edge-wbc doctor``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from edge_wbc.config import Config, ConfigError, default_config_path, load_config


def _config_path(path: Path | None) -> Path | None:
    return path if path is not None else default_config_path()


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a TOML basic string is a JSON string for our values


def format_config(cfg: Config) -> str:
    """The effective settings as TOML (secrets redacted); unset optional values as comments."""
    lines: list[str] = []
    for sec, values in cfg.to_dict(redact=True).items():
        lines.append(f"[{sec}]")
        for k, v in values.items():
            lines.append(f"# {k} = (unset)" if v is None else f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def check_config(
    file: Annotated[
        Path | None,
        typer.Argument(help="Config file (default: $EDGE_WBC_CONFIG, "
                       "$CONFIGURATION_DIRECTORY/config.toml or /etc/edge-wbc/config.toml)."),
    ] = None,
    show: Annotated[bool, typer.Option("--show", help="Print the effective settings.")] = False,
) -> None:
    """Validate a config file plus the EDGE_WBC_* environment; print every problem with its line."""
    path = _config_path(file)
    try:
        cfg = load_config(path)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(1) from None
    where = str(path) if path is not None else "no config file (defaults + environment)"
    if show:
        typer.echo(format_config(cfg))
    typer.echo(f"{where}: OK")


def doctor(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Config file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="Run just these checks (camera, models, interpreter, "
                     "accelerator, disk, broker, lis, system); repeatable."),
    ] = None,
    broker_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the broker's (and the LIS's) TCP port.",
                            min=0.1)
    ] = 3.0,
) -> None:
    """Check that this station can run: camera, models (sha256), interpreter, Edge TPU, disk,
    broker, LIS. Exit 1 when a required check fails."""
    from edge_wbc.cli import doctor as doc

    path = _config_path(config)
    try:
        cfg = load_config(path)
    except ConfigError as e:
        rows = [doc.Check("config", doc.FAIL, f"{len(e.problems)} problem(s); run "
                          f"edge-wbc check-config {path or ''}".rstrip())]
        if as_json:
            typer.echo(doc.to_json(rows, str(path) if path else None))
        else:
            typer.echo(doc.format_table(rows))
            typer.echo(str(e), err=True)
        raise typer.Exit(1) from None
    names = [n for n, _ in doc.CHECKS]
    for n in only or []:
        if n not in names:
            raise typer.BadParameter(f"unknown check {n!r}; choose from {', '.join(names)}",
                                     param_hint="--only")
    rows = [doc.Check("config", doc.OK, str(path) if path else "defaults + environment"),
            *doc.run_checks(cfg, only, broker_timeout=broker_timeout)]
    if as_json:
        typer.echo(doc.to_json(rows, str(path) if path else None))
    else:
        typer.echo(doc.format_table(rows))
        typer.echo("")
        typer.echo(doc.summary(rows))
    if any(r.status == doc.FAIL for r in rows):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("check-config")(check_config)
    app.command("doctor")(doctor)
