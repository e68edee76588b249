"""``python -m edge_wbc.cli``: the same command as ``edge-wbc``, for a venv whose scripts are not
on PATH (and for scripts that run the CLI with a given interpreter)."""

from edge_wbc.cli import app

# Guarded: tools that import every module (tests/test_no_tensorflow.py) must not run the CLI.
if __name__ == "__main__":
    app(prog_name="edge-wbc")
