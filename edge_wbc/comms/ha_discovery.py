"""Home Assistant MQTT discovery: retained config messages that make the station's differential
appear as sensors (and, with commands enabled, a capture button) without any YAML.

https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery. The publisher sends these on
every connect when ``mqtt.ha_discovery`` is set; they only describe the station's own topics.
The sensors follow the lab's formula as the station's state carries it: one per formula row
(a percentage for counted rows, per 100 leukocytes for NRBC, a count for count-only rows) and
one for the raised flags. A row a cell needed beyond the lab's has no sensor of its own.
"""

from __future__ import annotations

from typing import Any

from edge_wbc.config import MqttConfig
from edge_wbc.taxonomy import COUNT_ONLY, COUNTED, FIVE_PART, NAMES, UNIDENTIFIED

PREFIX = "homeassistant"


def _rows(state: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(row key, kind) of the formula in ``state``; five-part without one."""
    formula = (state or {}).get("formula")
    rows = formula.get("rows") if isinstance(formula, dict) else None
    if isinstance(rows, list) and rows:
        return [(str(r["key"]), str(r["kind"])) for r in rows
                if isinstance(r, dict) and "key" in r and "kind" in r]
    return [(c, COUNTED) for c in (*FIVE_PART, UNIDENTIFIED)]


def configs(cfg: MqttConfig,
            state: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(topic, config payload) for one sensor per formula row plus progress and flag sensors.

    ``state``: the station's differential (for its formula); None gives five-part's sensors."""
    node = f"edge_wbc_{cfg.station_id}".replace("-", "_")
    device = {"identifiers": [node], "name": f"edge-wbc {cfg.station_id}",
              "manufacturer": "edge-wbc", "model": "leukocyte differential station"}
    availability = [{"topic": cfg.topic("available"),
                     "value_template": "{{ 'online' if value == 'online' else 'offline' }}"}]
    common = {"state_topic": cfg.topic("differential"), "availability": availability,
              "device": device}
    out: list[tuple[str, dict[str, Any]]] = []
    for cls, kind in _rows(state):
        name = NAMES.get(cls, cls)
        if kind == COUNT_ONLY:
            out.append((f"{PREFIX}/sensor/{node}/{cls}/config", {
                **common, "name": name, "unique_id": f"{node}_{cls}_count",
                "unit_of_measurement": "cells", "state_class": "measurement",
                "value_template": f"{{{{ value_json.counts.{cls} | default(0) }}}}",
            }))
            continue
        per_100 = kind != COUNTED
        out.append((f"{PREFIX}/sensor/{node}/{cls}/config", {
            **common, "name": f"{name} {'/100 WBC' if per_100 else '%'}",
            "unique_id": f"{node}_{cls}_pct",
            "unit_of_measurement": "per 100 WBC" if per_100 else "%",
            "state_class": "measurement",
            "value_template": f"{{{{ value_json.percentages.{cls} | default(0) }}}}",
            "json_attributes_topic": cfg.topic("differential"),
            "json_attributes_template": (
                f"{{{{ {{'count': value_json.counts.{cls} | default(0), "
                f"'ci95': value_json.ci95.{cls} | default(none)}} | tojson }}}}"),
        }))
    out.append((f"{PREFIX}/sensor/{node}/flags/config", {
        **common, "name": "Flags", "unique_id": f"{node}_flags", "icon": "mdi:flag",
        "value_template": "{{ value_json.flags | default([]) | length }}",
        "json_attributes_topic": cfg.topic("differential"),
        "json_attributes_template": (
            "{{ {'flags': value_json.flags | default([]) | map(attribute='text') | list} "
            "| tojson }}"),
    }))
    for key, name in (("counted", "Cells counted"), ("target", "Target")):
        out.append((f"{PREFIX}/sensor/{node}/{key}/config", {
            **common, "name": name, "unique_id": f"{node}_{key}", "state_class": "measurement",
            "value_template": f"{{{{ value_json.{key} }}}}",
        }))
    out.append((f"{PREFIX}/sensor/{node}/sample/config", {
        **common, "name": "Sample", "unique_id": f"{node}_sample",
        "value_template": "{{ value_json.sample_id }}",
    }))
    if cfg.commands_enabled:
        out.append((f"{PREFIX}/button/{node}/capture/config", {
            "name": "Capture field", "unique_id": f"{node}_capture",
            "command_topic": cfg.topic("capture", "set"), "payload_press": "PRESS",
            "availability": availability, "device": device,
        }))
    return out
