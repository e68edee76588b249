"""Logging follows the process's current stderr: a stderr that was replaced and closed (a test
runner's capture, a CLI run in-process) never turns a later log line into a logging error."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from edge_wbc.logs import setup_logging


def test_log_lines_go_to_the_current_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    handler = setup_logging("INFO", env={})
    try:
        first.close()  # the stream the handler was set up under is gone
        second = io.StringIO()
        monkeypatch.setattr(sys, "stderr", second)
        errors: list[BaseException] = []
        monkeypatch.setattr(logging.Handler, "handleError", lambda self, r: errors.append(r))
        logging.getLogger("edge_wbc.test").warning("LIS: sample %s not delivered", "H-1")
        assert not errors
        assert "LIS: sample H-1 not delivered" in second.getvalue()
    finally:
        logging.getLogger().removeHandler(handler)
