"""The chat example's processor: check a client's message and stamp it with an id and a time.

The id (random, 128 bits) makes the history's upsert idempotent when a batch is retried, and
lets every client tell messages apart; ``sent_at`` is when this gateway received it.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from trio_gateway import Message

MAX_TEXT = 4000


def stamp(message: Message) -> dict[str, Any]:
    """``{"room", "author", "text"}`` (strings; text at most 4000 characters), else raises:
    counted as a processor_error, the sender's other messages go on."""
    record = json.loads(message.payload)
    if not isinstance(record, dict):
        raise ValueError("a chat message is a JSON object")
    room, author, text = record.get("room"), record.get("author"), record.get("text")
    if not all(isinstance(v, str) and v for v in (room, author, text)):
        raise ValueError("room, author and text are non-empty strings")
    if len(text) > MAX_TEXT or "/" in room:  # type: ignore[arg-type]
        raise ValueError("text too long, or a / in the room's name")
    return {
        "id": uuid.uuid4().hex,
        "room": room,
        "author": author,
        "text": text,
        "sent_at": message.origin.received_at,
    }
