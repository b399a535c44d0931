"""The tutorial's processor (docs/tutorial.md, step 5); tests/e2e/test_docs_examples.py runs it."""

import json

from trio_gateway import Message


def bright_only(message: Message) -> bytes | None:
    reading = json.loads(message.payload)
    if reading.get("lux", 0) < 100:
        return None  # counted as filtered in the ledger
    reading["gateway"] = "edge-7"
    return json.dumps(reading).encode()
