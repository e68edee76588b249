"""Physical capture triggers. The on-screen button, the space bar (and USB foot pedals that
emulate a key) are handled by the page; POST /api/capture by the server; this module adds a GPIO
push button or foot switch on a Raspberry Pi through gpiozero (the optional 'pi' extra)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class TriggerError(Exception):
    """The trigger cannot be set up; the message says what to install or check."""


def gpio_button(pin: int, on_press: Callable[[], Any], bounce_s: float = 0.05) -> Any:
    """Call ``on_press`` when the button on BCM ``pin`` (wired to ground) is pressed.

    Returns the gpiozero Button, which must be kept referenced for the trigger to stay alive.
    Errors from ``on_press`` are logged: the page shows them through the station's status.
    """
    try:
        from gpiozero import Button  # type: ignore[import-not-found]
    except ImportError as e:
        raise TriggerError(
            "a GPIO capture button is configured (station.gpio_pin) but gpiozero is not "
            "installed: pip install 'edge-wbc[pi]'"
        ) from e

    def pressed() -> None:
        try:
            on_press()
        except Exception as e:  # a refused capture is already on the page; keep the trigger
            log.info("GPIO capture not taken: %s", e)

    try:
        button = Button(pin, pull_up=True, bounce_time=bounce_s)
    except Exception as e:  # gpiozero raises BadPinFactory, GPIOPinInUse, ...
        raise TriggerError(f"GPIO capture button on BCM pin {pin}: {e}") from e
    button.when_pressed = pressed
    log.info("GPIO capture button on BCM pin %d", pin)
    return button
