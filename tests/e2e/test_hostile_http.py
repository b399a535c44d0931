"""Hostile HTTP/2 peers against the HTTP listener of ``serve`` (every listener on, a
subprocess): each attack is a small real client sending raw HTTP/2 frames (tests/hostile_kit.py),
and each test checks that the gateway's peak memory stays bounded, that the attack is counted
under its reason in ``/metrics``, and that a well-behaved client on another connection is
served meanwhile. The gateway runs with ``idle_timeout = 1`` so that deadlines come within
the test; at the end of the module its shutdown ledger balances and nothing was counted
``internal_error``. bench/hostile.py runs the same attacks longer and at 1, 10 and 100
connections (figures in docs/reliability.md).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import pytest
import trio
from hostile_kit import (
    Gateway,
    GoodClient,
    h2_body_stall,
    h2_rapid_reset,
    h2_sequential,
    h2_slowloris,
    ledger_of,
    split_frames,
)
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame

from trio_gateway.sources.http._h2 import MAX_RESETS

IDLE_TIMEOUT = 1.0
RSS_MARGIN_MIB = 48
"""Peak RSS over the gateway's resting RSS the attacks may cause (before the fix, one stalled
connection held ~100 MB)."""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    process = Gateway(
        tmp_path_factory.mktemp("hostile-http"), idle_timeout=IDLE_TIMEOUT, max_connections=1024
    )
    try:
        yield process
        assert process.rejected("internal_error") == 0
    finally:
        code, log = process.stop()
    assert code == 0, log[-2000:]
    ledger = ledger_of(log)
    assert ledger["balanced"], ledger


async def attack_with_good_client(gateway: Gateway, attack: object, seconds: float) -> GoodClient:
    """Run ``attack`` (an awaitable factory) and a good HTTP/1.1 client side by side."""
    good = GoodClient(gateway.address("http"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(attack)  # type: ignore[arg-type]
        nursery.start_soon(good.run, seconds)
    return good


def check_good(good: GoodClient) -> None:
    assert good.latencies, good.failures
    assert not good.failures, good.failures


@pytest.mark.slow
async def test_a_body_that_never_finishes_is_cut_and_holds_little(gateway: Gateway) -> None:
    """100 streams on one connection send bodies they never finish, as far as the server's
    windows let them, kept alive with PINGs: the server holds about one body (not 100), cuts
    the connection at the deadline (PINGs do not extend it) with ENHANCE_YOUR_CALM, counted
    ``too_slow``."""
    gateway.reset_peak_rss()
    resting = gateway.rss_mib()
    before = gateway.rejected("too_slow", "http")
    outcome = None

    async def attack() -> None:
        nonlocal outcome
        outcome = await h2_body_stall(gateway.address("http"), duration=4 * IDLE_TIMEOUT)

    good = await attack_with_good_client(gateway, attack, 1.5 * IDLE_TIMEOUT)
    assert outcome is not None
    assert outcome.goaway_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert outcome.cut_after is not None and outcome.cut_after < 3 * IDLE_TIMEOUT
    assert outcome.sent_bytes < 4 << 20  # flow control held the rest back
    assert outcome.statuses == {408: 100}  # each slow request told, then the GOAWAY
    assert gateway.rejected("too_slow", "http") == before + 1
    assert gateway.peak_rss_mib() < resting + RSS_MARGIN_MIB
    check_good(good)


async def test_pings_alone_do_not_keep_a_connection_open(gateway: Gateway) -> None:
    """A connection that sends PINGs and no request is closed at ``idle_timeout`` with
    GOAWAY(NO_ERROR), counted ``idle_timeout``: PINGs are not activity."""
    before = gateway.rejected("idle_timeout", "http")
    outcome = await h2_body_stall(gateway.address("http"), streams=0, duration=3 * IDLE_TIMEOUT)
    assert outcome.goaway_code == h2.errors.ErrorCodes.NO_ERROR
    assert outcome.cut_after is not None and outcome.cut_after < 2 * IDLE_TIMEOUT
    assert gateway.rejected("idle_timeout", "http") == before + 1


@pytest.mark.slow
async def test_http2_slowloris_connections_are_cut_and_good_clients_served(
    gateway: Gateway,
) -> None:
    """50 connections send the preface, then trickle a HEADERS frame one byte every 0.25 s:
    each is cut within the deadline of the frame's first byte (``408`` is not possible: no
    request yet), counted ``too_slow``; new clients are served all along."""
    before = gateway.rejected("too_slow", "http")
    outcomes = []

    async def one() -> None:
        outcomes.append(
            await h2_slowloris(gateway.address("http"), interval=0.25, duration=4 * IDLE_TIMEOUT)
        )

    async def attack() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(one)

    good = await attack_with_good_client(gateway, attack, 1.5 * IDLE_TIMEOUT)
    assert len(outcomes) == 50
    for outcome in outcomes:
        assert outcome.cut_after is not None and outcome.cut_after < 3 * IDLE_TIMEOUT
    assert gateway.rejected("too_slow", "http") == before + 50
    check_good(good)


async def test_rapid_reset_ends_the_connection_with_enhance_your_calm(gateway: Gateway) -> None:
    """HEADERS + RST_STREAM pairs, 500 per write (CVE-2023-44487): past the reset limit the
    connection gets GOAWAY(ENHANCE_YOUR_CALM), counted ``rapid_reset``, never
    ``internal_error``; a good client is served meanwhile."""
    before = gateway.rejected("rapid_reset", "http")
    outcome = None

    async def attack() -> None:
        nonlocal outcome
        outcome = await h2_rapid_reset(gateway.address("http"), pairs_per_write=500, writes=20)

    good = await attack_with_good_client(gateway, attack, 0.5)
    assert outcome is not None
    assert outcome.goaway_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert outcome.goaway_last_stream is not None
    assert outcome.goaway_last_stream <= 2 * (MAX_RESETS + 500) + 1
    assert gateway.rejected("rapid_reset", "http") == before + 1
    assert gateway.rejected("internal_error") == 0
    check_good(good)


@pytest.mark.slow
async def test_the_1001st_request_on_one_connection_is_answered(gateway: Gateway) -> None:
    """One request at a time on one connection, as Go's client sends them: every one is
    answered (hypercorn stopped at the 1,001st and left it unanswered)."""
    outcome = await h2_sequential(gateway.address("http"), 1001)
    assert outcome.cut_after is None
    assert outcome.statuses == {202: 1001}
    assert outcome.goaway_code is None


async def test_shutdown_goaway_names_the_last_stream_and_finishes_it(tmp_path: Path) -> None:
    """SIGTERM with a request half sent: GOAWAY(NO_ERROR) names that stream as the last one
    processed, and its body, sent after the GOAWAY, is still read and answered ``202``."""
    gateway = Gateway(tmp_path, idle_timeout=10.0, max_connections=1024)
    try:
        client = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        client.initiate_connection()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", "/ingest")]
        headers.append((":authority", "x"))
        frames: list[Frame] = []
        with trio.fail_after(10):
            async with await trio.open_tcp_stream(*gateway.address("http")) as stream:
                client.send_headers(1, headers)
                client.send_data(1, b"first", end_stream=True)
                client.send_headers(3, headers)
                client.send_data(3, b"half")
                await stream.send_all(client.data_to_send())
                buffer = bytearray()
                while not any(isinstance(f, HeadersFrame) and f.stream_id == 1 for f in frames):
                    frames += await next_frames(stream, buffer)
                gateway.proc.send_signal(signal.SIGTERM)
                while not any(isinstance(f, GoAwayFrame) for f in frames):
                    frames += await next_frames(stream, buffer)
                # h2's client side refuses to send after a GOAWAY: the frame is written by hand
                rest = DataFrame(3, data=b"-and-the-rest", flags=["END_STREAM"])
                await stream.send_all(rest.serialize())
                while not any(isinstance(f, HeadersFrame) and f.stream_id == 3 for f in frames):
                    more = await next_frames(stream, buffer)
                    assert more, frames
                    frames += more
        goaway = next(f for f in frames if isinstance(f, GoAwayFrame))
        assert (goaway.error_code, goaway.last_stream_id) == (0, 3)
        answers = [f for f in frames if isinstance(f, HeadersFrame)]
        assert [(f.stream_id, client.decoder.decode(f.data)[0]) for f in answers] == [
            (1, (":status", "202")),
            (3, (":status", "202")),
        ]
    finally:
        code, log = gateway.stop()
    assert code == 0
    ledger = ledger_of(log)
    assert ledger["received"] == 2 and ledger["balanced"], ledger


async def next_frames(stream: trio.abc.Stream, buffer: bytearray) -> list[Frame]:
    """The whole frames the server has sent so far (``[]`` once it has closed)."""
    data = await stream.receive_some(65536)
    if not data:
        return []
    buffer += data
    return split_frames(buffer)
