"""The processors of the logs pipeline: parse a JSON log line, drop DEBUG, enrich.

Each gets what the previous one returned (a dict after ``parse``); the last one's dict is
sent on as compact JSON, which the database sinks' ``columns`` read field by field.
``lines_by_level`` is a prometheus_client counter in the default registry: the pipelines'
admin endpoint serves it beside its own metrics (``logs_lines_total{level="error"}``).
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import Counter

from trio_gateway import Message

lines_by_level = Counter("logs_lines", "Log lines received, by level.", ["level"])

LEVELS = ("debug", "info", "warning", "error", "critical")


def parse(message: Message) -> dict[str, Any]:
    """A JSON object with at least a message; anything else raises (counted as a
    processor_error in the ledger, logged once in a while, never fatal)."""
    record = json.loads(message.payload)
    if not isinstance(record, dict) or "message" not in record:
        raise ValueError("a log line is a JSON object with a message")
    level = str(record.get("level", "info")).lower()
    record["level"] = level if level in LEVELS else "info"
    lines_by_level.labels(record["level"]).inc()
    return record


def drop_debug(message: Message) -> dict[str, Any] | None:
    record: dict[str, Any] = message.payload  # type: ignore[assignment]
    return None if record["level"] == "debug" else record


def enrich(message: Message) -> dict[str, Any]:
    """Who sent it and when the gateway got it, unless the line says when it happened."""
    record: dict[str, Any] = message.payload  # type: ignore[assignment]
    record.setdefault("service", "unknown")
    record.setdefault("at", message.origin.received_at)
    record["peer"] = message.origin.peer
    return record
