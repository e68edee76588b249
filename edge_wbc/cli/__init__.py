"""The ``edge-wbc`` command. Each stage's module registers its own commands here."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="edge-wbc",
    help="Leukocyte differential at the microscope.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# One line per module that owns commands; each exposes register(app: typer.Typer) -> None.
_COMMAND_MODULES: tuple[str, ...] = (
    "edge_wbc.cli.ops",
    "edge_wbc.cli.analyze",
    "edge_wbc.cli.adapt",
    "edge_wbc.cli.report",
    "edge_wbc.comms.monitor",
    "edge_wbc.station.command",
)

for _name in _COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:  # pragma: no cover - console entry point
    app()

