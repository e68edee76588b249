"""``python -m edge_wbc.cli``: the same command as ``edge-wbc``, for a venv whose scripts are not
on PATH (and for scripts that run the CLI with a given interpreter)."""

from edge_wbc.cli import app

app(prog_name="edge-wbc")
