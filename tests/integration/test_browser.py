"""A real headless Chromium as the client: a page from its own origin sends over WebSocket,
``fetch`` (``text/plain`` and ``application/json``) and ``navigator.sendBeacon``.

The page is served by a small server of the test (another port: another origin) and posts
what it saw back to that server; the test then checks it against what the gateway counted.
Two HTTP listeners: one with ``cors_origins`` naming the page's origin, one without (there the
browser hides the answer of a ``text/plain`` POST the gateway did queue, and never sends the
JSON one: its preflight gets ``405``). Needs Debian's ``chromium`` (``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from functools import partial
from pathlib import Path

import pytest
import trio

from trio_gateway import Gateway, HttpSource, WebSocketSource
from trio_gateway._h11server import H11Server
from trio_gateway.testing import RecordingSink, open_gateway

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (.ci/run installs it)")

WS_MESSAGES = 200

PAGE = """<!doctype html>
<html><body><script>
const results = {};
async function post(url, body, type) {
  try {
    const headers = {"Content-Type": type};
    const response = await fetch(url, {method: "POST", body: body, headers: headers});
    return {status: response.status, body: await response.json()};
  } catch (error) {
    return {error: String(error)};
  }
}
function sendOverWebSocket(url, count) {
  return new Promise((resolve) => {
    const ws = new WebSocket(url);
    ws.onopen = () => {
      for (let i = 0; i < count; i++) ws.send("ws " + i);
      ws.close(1000, "done");
    };
    ws.onclose = (event) => resolve({code: event.code, clean: event.wasClean});
    ws.onerror = () => {};
  });
}
async function main() {
  results.websocket = await sendOverWebSocket(WS_URL, WS_MESSAGES);
  results.text = await post(CORS_URL, "text from the page", "text/plain");
  results.json = await post(CORS_URL, JSON.stringify({t: 21.5}), "application/json");
  results.beacon = navigator.sendBeacon(CORS_URL, "beacon from the page");
  results.text_no_cors = await post(PLAIN_URL, "text without cors", "text/plain");
  results.json_no_cors = await post(PLAIN_URL, JSON.stringify({t: 0}), "application/json");
  await fetch("/results", {method: "POST", body: JSON.stringify(results)});
}
main();
</script></body></html>
"""


async def serve_page(
    listener: trio.SocketListener, page: bytes, results: list[bytes], done: trio.Event
) -> None:
    """Serve ``page`` at ``/``; keep the body of ``POST /results`` (then set ``done``)."""

    async def one(stream: trio.SocketStream) -> None:
        async with stream:
            http = H11Server(stream, max_header_size=16 * 1024)
            while True:
                request = await http.receive_request(trio.current_time() + 30)
                if request is None:
                    return
                if request.method == b"POST" and request.target == b"/results":
                    results.append(await http.receive_body(1 << 20, trio.current_time() + 30))
                    await http.respond(204, [], b"")
                    done.set()
                elif request.target == b"/":
                    await http.respond(200, [(b"content-type", b"text/html")], page)
                else:
                    await http.respond(404, [], b"")
                if not http.next_cycle():
                    return

    async with trio.open_nursery() as nursery:
        while True:
            nursery.start_soon(one, await listener.accept())


async def test_a_browser_page_sends_over_websocket_fetch_and_beacon(tmp_path: Path) -> None:
    assert CHROMIUM is not None
    (page_listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    page_origin = "http://127.0.0.1:%d" % page_listener.socket.getsockname()[1]
    sink = RecordingSink()
    sources = [
        HttpSource(cors_origins=[page_origin]),
        HttpSource(),
        WebSocketSource(allowed_origins=[page_origin]),
    ]
    with trio.fail_after(60):
        async with open_gateway(Gateway(sources=sources, sink=sink)) as handle:
            (_, cors_port), (_, plain_port), (_, ws_port) = (handle.address(i) for i in range(3))
            page = PAGE.replace(
                "async function main",
                f"const CORS_URL = 'http://127.0.0.1:{cors_port}/ingest';\n"
                f"const PLAIN_URL = 'http://127.0.0.1:{plain_port}/ingest';\n"
                f"const WS_URL = 'ws://127.0.0.1:{ws_port}/';\n"
                f"const WS_MESSAGES = {WS_MESSAGES};\n"
                "async function main",
            )
            results: list[bytes] = []
            done = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_page, page_listener, page.encode(), results, done)
                browser = await nursery.start(
                    partial(
                        trio.run_process,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,  # its complaints about D-Bus and the GPU
                        check=False,
                    ),
                    [
                        CHROMIUM,
                        "--headless",
                        "--no-sandbox",  # running as root in CI containers
                        "--disable-gpu",
                        "--disable-dev-shm-usage",
                        "--no-first-run",
                        f"--user-data-dir={tmp_path / 'profile'}",
                        f"{page_origin}/",
                    ],
                )
                await done.wait()
                expected = WS_MESSAGES + 4  # text, json, beacon, and text_no_cors (queued)
                await sink.wait_for(expected)
                browser.terminate()
                nursery.cancel_scope.cancel()
        seen = json.loads(results[0])
    assert seen["websocket"] == {"code": 1000, "clean": True}
    assert seen["text"] == {"status": 202, "body": {"accepted": 1}}
    assert seen["json"] == {"status": 202, "body": {"accepted": 1}}
    assert seen["beacon"] is True
    # Without CORS the page cannot tell: queued, yet the page saw a failure ...
    assert "Failed to fetch" in seen["text_no_cors"]["error"]
    # ... and a JSON body is not even sent (the preflight got 405).
    assert "Failed to fetch" in seen["json_no_cors"]["error"]
    payloads = sink.payloads
    assert [p for p in payloads if p.startswith(b"ws ")] == [
        b"ws %d" % i for i in range(WS_MESSAGES)
    ]
    others = {p for p in payloads if not p.startswith(b"ws ")}
    assert others == {
        b"text from the page",
        b'{"t":21.5}',
        b"beacon from the page",
        b"text without cors",
    }
    ledger = handle.ledger
    assert ledger.received == WS_MESSAGES + 4
    assert ledger.delivered == WS_MESSAGES + 4
    assert ledger.balanced
    for counters in handle.gateway.source_counters:
        assert not counters.rejected, counters
