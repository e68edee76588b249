"""Commands from the broker (``<prefix>/<station>/capture/set`` and ``.../slide/set``, only
with ``mqtt.commands_enabled``): payloads checked and turned into the station's action names
(``edge_wbc.station.actions.REMOTE``). The sample ID, target and JSON obey ``edge_wbc.inputs``,
the rules the HTTP API's values obey; the publisher runs what comes out through the station's
command handler and echoes the result on ``.../state``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edge_wbc.inputs import (
    InputError,
    check_sample_id,
    check_target,
    hidden_char,
    parse_json_object,
)

MAX_COMMAND_BYTES = 4096
#: A request_id is echoed on every answer and remembered to spot a repeat: kept short.
MAX_REQUEST_ID_CHARS = 64


class CommandError(ValueError):
    """A malformed command payload; the message says why."""


class NoCommand(CommandError):
    """An empty payload: how a client deletes a retained message, not a request (answered
    with nothing)."""


def request_id_of(raw: bytes) -> str | None:
    """The request_id of a refused command, when it has a valid one, so the sender can match
    the echo."""
    try:
        rid = parse_json_object(raw[:MAX_COMMAND_BYTES]).get("request_id")
        return _check_request_id(rid)
    except (InputError, CommandError):
        return None


def _check_request_id(rid: Any) -> str | None:
    if rid is None:
        return None
    if not isinstance(rid, str):
        raise CommandError("request_id must be a string")
    if len(rid) > MAX_REQUEST_ID_CHARS:
        raise CommandError(f"request_id must be at most {MAX_REQUEST_ID_CHARS} characters, "
                           f"got {len(rid)}")
    bad = hidden_char(rid)
    if bad is not None:
        raise CommandError(f"request_id must not contain {bad}")
    return rid or None


@dataclass(frozen=True)
class Command:
    """One command from the broker as the station's action it asks for."""

    kind: str  # the topic it came on: "capture" or "slide"
    action: str  # a name in edge_wbc.station.actions.REMOTE
    args: dict[str, Any]
    request_id: str | None = None


#: slide/set "action" -> the station's action and the fields it takes.
SLIDE_COMMANDS: dict[str, tuple[str, frozenset[str]]] = {
    "new": ("new_slide", frozenset({"sample_id", "target"})),
    "finalise": ("finalise", frozenset()),
    "target": ("set_target", frozenset({"target"})),
}


def parse_command(kind: str, raw: bytes) -> Command:
    """Validate a command payload; raises CommandError with the reason for a malformed one.

    capture/set: ``PRESS`` (Home Assistant's button), ``capture``, or a JSON object
    ``{"request_id": "..."}``; an empty payload raises NoCommand (deleting a retained message
    must not take a field). slide/set: a JSON object ``{"action": "new", "sample_id": "S1",
    "target": 100}``, ``{"action": "finalise"}`` or ``{"action": "target", "target": 200}``.
    The sample ID and target obey edge_wbc.inputs, the rules the HTTP API's values obey.
    """
    if len(raw) > MAX_COMMAND_BYTES:
        raise CommandError(f"payload of {len(raw)} bytes is over {MAX_COMMAND_BYTES}")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise CommandError("payload is not UTF-8") from exc
    if not text:
        raise NoCommand("an empty payload is no command (it is how a retained message is "
                        "deleted)")
    if kind == "capture" and text in ("PRESS", "capture"):
        return Command(kind, "capture", {})
    try:
        data = parse_json_object(raw, "payload")
    except InputError as exc:
        raise CommandError(str(exc)) from None
    request_id = _check_request_id(data.get("request_id"))
    if kind == "capture":
        unknown = set(data) - {"request_id", "action"}
        if unknown:
            raise CommandError(f"unexpected capture fields {sorted(unknown)}")
        if data.get("action", "capture") != "capture":
            raise CommandError(f"capture action must be 'capture', got {data['action']!r}")
        return Command(kind, "capture", {}, request_id or None)
    if kind != "slide":
        raise CommandError(f"unknown command {kind!r}")
    name = data.get("action")
    if not isinstance(name, str) or name not in SLIDE_COMMANDS:
        raise CommandError(f"slide action must be one of {', '.join(SLIDE_COMMANDS)}, "
                           f"got {name!r}")
    action, allowed = SLIDE_COMMANDS[name]
    unknown = set(data) - allowed - {"action", "request_id"}
    if unknown:
        raise CommandError(f"unexpected fields for {name}: {sorted(unknown)}")
    args: dict[str, Any] = {}
    try:
        if "target" in data or name == "target":
            args["target"] = check_target(data.get("target"))
        if name == "new":
            sample = check_sample_id(data.get("sample_id"))
            if not sample:
                raise CommandError("new slide needs a sample_id")
            args["sample_id"] = sample
    except InputError as exc:
        raise CommandError(str(exc)) from None
    return Command(kind, action, args, request_id or None)
