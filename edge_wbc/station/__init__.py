"""The microscope station: camera → analysis → slide session → page, with its HTTP API.

``app.Station`` (trigger, bounded queue, analysis worker, health), ``server`` (HTTP JSON API,
server-sent events, MJPEG preview), ``triggers`` (GPIO button / foot pedal), ``command`` (the
``edge-wbc station`` command) and ``static/`` (the page: plain HTML/CSS/JS, no build step).
"""
