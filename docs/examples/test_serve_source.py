"""Testing a source on its own: a real client against a real listener, no gateway, no sink."""

from __future__ import annotations

import httpx
import pytest

from trio_gateway import HttpSource, RingBuffer
from trio_gateway.testing import serve_source

pytestmark = pytest.mark.trio


async def test_http_source_answers_202_then_503_when_the_queue_is_full() -> None:
    queue = RingBuffer[bytes](2)  # nothing takes from it: it fills
    async with serve_source(HttpSource(port=0, queue_wait=0.05), queue) as served:
        async with httpx.AsyncClient() as client:
            answers = [
                (await client.post(served.url, content=b"reading %d" % i)).status_code
                for i in range(3)
            ]

        assert answers == [202, 202, 503]
        assert served.payloads() == [b"reading 0", b"reading 1"]
        assert served.counters.received == 2
        assert served.counters.rejected == {"queue_full": 1}
