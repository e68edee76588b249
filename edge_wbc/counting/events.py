"""What the slide session tells the rest of the station (display, MQTT) — contract 3 of
docs/architecture.md.

The session is the single owner of counts; everything else listens. Listeners receive
``Event(kind, payload)`` through one callable, so counting code never imports the web or paho.
Kinds: ``slide`` (payload["action"]: started | target | finalised | abandoned), ``field``,
``cell`` (payload["action"]: counted | reclassified | rejected | restored), ``differential``
(the full state, the same dict as ``GET /api/state``) and ``status`` (station health: queue,
camera, errors — not counting, never persisted).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

KINDS = ("slide", "field", "cell", "differential", "status")


@dataclass(frozen=True)
class Event:
    kind: str
    payload: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown event kind {self.kind!r}; expected one of {KINDS}")


Publish = Callable[[Event], None]


class Fanout:
    """One ``publish`` callable that forwards each event to every subscribed listener.

    A listener that raises is logged and skipped: a broken display or broker client must never
    stop the count (the event is already persisted when it is published).
    """

    def __init__(self) -> None:
        self._listeners: list[Publish] = []
        self._lock = threading.Lock()

    def subscribe(self, listener: Publish) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def __call__(self, event: Event) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener %r failed on %s event", listener, event.kind)

    def __len__(self) -> int:
        with self._lock:
            return len(self._listeners)
