"""Home Assistant MQTT discovery: retained config messages that make the station's differential
appear as sensors (and, with commands enabled, a capture button) without any YAML.

https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery. The publisher sends these on
every connect when ``mqtt.ha_discovery`` is set; they only describe the station's own topics.
"""

from __future__ import annotations

from typing import Any

from edge_wbc.config import MqttConfig
from edge_wbc.pipeline.results import CLASSES, UNIDENTIFIED

PREFIX = "homeassistant"


def configs(cfg: MqttConfig) -> list[tuple[str, dict[str, Any]]]:
    """(topic, config payload) for one sensor per class percentage plus progress sensors."""
    node = f"edge_wbc_{cfg.station_id}".replace("-", "_")
    device = {"identifiers": [node], "name": f"edge-wbc {cfg.station_id}",
              "manufacturer": "edge-wbc", "model": "leukocyte differential station"}
    availability = [{"topic": cfg.topic("available"),
                     "value_template": "{{ 'online' if value == 'online' else 'offline' }}"}]
    common = {"state_topic": cfg.topic("differential"), "availability": availability,
              "device": device}
    out: list[tuple[str, dict[str, Any]]] = []
    for cls in (*CLASSES, UNIDENTIFIED):
        out.append((f"{PREFIX}/sensor/{node}/{cls}/config", {
            **common, "name": f"{cls.capitalize()} %", "unique_id": f"{node}_{cls}_pct",
            "unit_of_measurement": "%", "state_class": "measurement",
            "value_template": f"{{{{ value_json.percentages.{cls} | default(0) }}}}",
            "json_attributes_topic": cfg.topic("differential"),
            "json_attributes_template": (
                f"{{{{ {{'count': value_json.counts.{cls} | default(0), "
                f"'ci95': value_json.ci95.{cls} | default(none)}} | tojson }}}}"),
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
