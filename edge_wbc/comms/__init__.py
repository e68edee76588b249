"""Listeners of the counting:
MQTT transport, Home Assistant discovery, the central monitor, the LIS."""
