"""The IoT example's processors: parse a bulb's reading, then set its room's light level
from the average of the room's readings over the last ``WINDOW`` seconds (auto-dimming).

A reading is ``{"room": "kitchen", "device": "bulb-3", "lux": 120.5}``. ``dim`` hands on the
reading with ``avg_lux`` and ``level`` (0-100: how bright the room's bulbs should be), which
the WebSocket sink sends to the room's bulbs and the SQLite sink stores. The window is kept
per room, bounded (``MAX_SAMPLES``), and in the gateway's one thread: no lock needed.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict, deque
from typing import Any

from trio_gateway import Message

WINDOW = 10.0
"""Seconds of readings the average is taken over."""
TARGET_LUX = 300.0
"""The light level a room should have: bulbs fill what daylight does not."""
MAX_SAMPLES = 10_000

_windows: defaultdict[str, deque[tuple[float, float]]] = defaultdict(
    lambda: deque(maxlen=MAX_SAMPLES)
)


def parse(message: Message) -> dict[str, Any]:
    reading = json.loads(message.payload)
    if not isinstance(reading, dict):
        raise ValueError("a reading is a JSON object")
    room, lux = reading.get("room"), reading.get("lux")
    if not isinstance(room, str) or not room or "/" in room:
        raise ValueError("room: a name without /")
    if not isinstance(lux, int | float) or isinstance(lux, bool) or not math.isfinite(lux):
        raise ValueError("lux: a number")
    return {"room": room, "device": str(reading.get("device", "")), "lux": float(lux)}


def dim(message: Message) -> dict[str, Any]:
    reading: dict[str, Any] = message.payload  # type: ignore[assignment]
    now = message.origin.received_at
    window = _windows[reading["room"]]
    window.append((now, reading["lux"]))
    while window and window[0][0] < now - WINDOW:
        window.popleft()
    average = sum(lux for _, lux in window) / len(window)
    level = round(100 * min(1.0, max(0.0, 1 - average / TARGET_LUX)))
    return {**reading, "avg_lux": round(average, 1), "level": level}
