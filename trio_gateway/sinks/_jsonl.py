"""JSON Lines encoding of a batch, shared by the stdout and file sinks.

A record is ``{"transport", "peer", "received_at", "payload"}``, with ``"payload_b64"`` instead
of ``"payload"`` when the bytes are not UTF-8. The per-origin prefix is encoded once per run of
messages from the same read; the payload goes through the C JSON string encoder; the batch is
joined and encoded once.
"""

from __future__ import annotations

import base64
import json
from json.encoder import encode_basestring_ascii

from .._message import Batch, Origin

__all__ = ("decode_jsonl_record", "encode_jsonl")


def _prefix(origin: Origin) -> str:
    return (
        f'{{"transport":{json.dumps(origin.transport)},"peer":{json.dumps(origin.peer)},'
        f'"received_at":{origin.received_at!r},'
    )


def encode_jsonl(batch: Batch) -> bytes:
    """Encode a batch as JSON Lines (one record per message, each ending in ``\\n``)."""
    parts: list[str] = []
    append = parts.append
    payloads = batch.payloads
    start = 0
    for origin, count in batch.runs:
        prefix = _prefix(origin) + '"payload":'
        prefix_b64 = _prefix(origin) + '"payload_b64":"'
        for payload in payloads[start : start + count]:
            try:
                text = payload.decode()
            except UnicodeDecodeError:
                append(prefix_b64)
                append(base64.b64encode(payload).decode("ascii"))
                append('"}\n')
            else:
                append(prefix)
                append(encode_basestring_ascii(text))
                append("}\n")
        start += count
    return "".join(parts).encode("ascii")


def decode_jsonl_record(line: bytes | str) -> tuple[bytes, dict[str, object]]:
    """Parse one record back into ``(payload, record)`` (for tests and tools)."""
    record = json.loads(line)
    if "payload_b64" in record:
        return base64.b64decode(record["payload_b64"]), record
    return str(record["payload"]).encode(), record
