"""What the station can be asked to do, in one place, whoever asks: the page and HTTP API
(``server``), MQTT commands (``comms.mqtt`` parses them, ``command`` wires them here) and the
GPIO button. Each action validates through the session (edge_wbc.inputs' rules), raises the
session's, station's or camera's own exception when refused, and returns what the caller shows.
"""

from __future__ import annotations

from typing import Any

from edge_wbc.station.app import Station

#: Actions central monitoring may run over MQTT (when mqtt.commands_enabled): counting, never
#: review or error clearing, which need a person at the microscope.
REMOTE = frozenset({"capture", "new_slide", "finalise", "set_target"})


class Actions:
    def __init__(self, station: Station) -> None:
        self.station = station
        self.session = station.session

    def capture(self, trigger: str = "api") -> dict[str, Any]:
        """Take the frame under the objective now and queue it for analysis."""
        return self.station.capture(trigger)

    # slide_id: the slide the caller saw (the page's dialogs send it; None: the open one).

    def new_slide(self, sample_id: str | None = None, target: int | None = None,
                  abandon: bool = False, operator: str | None = None,
                  slide_id: str | None = None) -> dict[str, Any]:
        # Passed as given: the session's rule refuses 0, [] or false rather than reading them
        # as "no sample id" (None is none).
        self.session.new_slide(sample_id, target, abandon=abandon, operator=operator,
                               slide_id=slide_id)
        return self.session.state()

    def set_notes(self, operator: str | None = None, signed_off_by: str | None = None,
                  comment: str | None = None, slide_id: str | None = None) -> dict[str, Any]:
        self.session.set_notes(slide_id, operator=operator, signed_off_by=signed_off_by,
                               comment=comment)
        return self.session.state()

    def set_sample_id(self, sample_id: str | None, slide_id: str | None = None
                      ) -> dict[str, Any]:
        self.session.set_sample_id(sample_id, slide_id)
        return self.session.state()

    def set_target(self, target: Any, slide_id: str | None = None) -> dict[str, Any]:
        self.session.set_target(target, slide_id)
        return self.session.state()

    def finalise(self, slide_id: str | None = None) -> dict[str, Any]:
        return self.station.finalise(slide_id)

    def review(self, cell_id: str, label: str | None, reason: str | None = None,
               if_unreviewed: bool = False) -> dict[str, Any]:
        cell = self.session.review(cell_id, label, reason, if_unreviewed)
        return self.session.cell_view(cell)

    def comment_cell(self, cell_id: str, comment: str | None) -> dict[str, Any]:
        return self.session.cell_view(self.session.comment_cell(cell_id, comment))

    def add_cell(self, label: str) -> dict[str, Any]:
        """A cell the camera missed, counted by key (manual differential counter)."""
        return self.session.cell_view(self.session.add_manual(label))

    def discard_field(self, field_id: str, reason: str | None) -> dict[str, Any]:
        return self.session.discard_field(field_id, reason)
    def confirm(self, cell_ids: list[str]) -> dict[str, Any]:
        """The shown classes are right: the cells become reviewed (labelled) cells."""
        cells = self.session.confirm(cell_ids)
        return {"confirmed": [self.session.cell_view(c) for c in cells]}

    def clear_error(self) -> dict[str, Any]:
        self.station.clear_error()
        return {"ok": True}

    def remote(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        """An action asked for over MQTT (a name in REMOTE, arguments already parsed)."""
        if action not in REMOTE:
            raise ValueError(f"{action!r} cannot be run remotely (allowed: "
                             f"{', '.join(sorted(REMOTE))})")
        if action == "capture":
            return self.capture("mqtt")
        result: dict[str, Any] = getattr(self, action)(**args)
        return result
