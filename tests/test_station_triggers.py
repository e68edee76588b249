"""GPIO capture button (gpiozero, optional) on a stand-in module with gpiozero's Button API."""

from __future__ import annotations

import sys
import types

import pytest

from edge_wbc.station.triggers import TriggerError, gpio_button


class _Button:
    made: list[_Button] = []  # noqa: RUF012

    def __init__(self, pin: int, pull_up: bool, bounce_time: float) -> None:
        if pin == 99:
            raise RuntimeError("GPIOPinInUse: pin 99 is in use")
        self.pin, self.pull_up, self.bounce_time = pin, pull_up, bounce_time
        self.when_pressed = None
        _Button.made.append(self)


@pytest.fixture()
def gpiozero(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    mod = types.ModuleType("gpiozero")
    mod.Button = _Button  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gpiozero", mod)
    return mod


def test_press_triggers_capture_and_refusals_do_not_kill_it(gpiozero: types.ModuleType) -> None:
    calls: list[int] = []

    def capture() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("capture refused: queue full")

    b = gpio_button(17, capture)
    assert b.pin == 17 and b.pull_up and b.bounce_time > 0
    b.when_pressed()
    b.when_pressed()  # refused: logged, the button keeps working
    b.when_pressed()
    assert len(calls) == 3


def test_pin_in_use(gpiozero: types.ModuleType) -> None:
    with pytest.raises(TriggerError, match="pin 99"):
        gpio_button(99, lambda: None)


def test_without_gpiozero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gpiozero", None)
    with pytest.raises(TriggerError, match="edge-wbc\\[pi\\]"):
        gpio_button(17, lambda: None)
