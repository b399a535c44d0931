"""The NATS source's JetStream pulls, fed bytes alone: what a pull's reply subject carries
(deliveries with their ack subjects, status messages) parsed and told apart under any split of
the stream, the acks and naks it writes, and one pull's bookkeeping."""

from __future__ import annotations

import json

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_gateway.sinks._nats_protocol import Msg, NatsParser, acks, nak, sub
from trio_gateway.sources import _nats_pull
from trio_gateway.sources._nats_pull import Pull, stream_sequence
from trio_gateway.sources.nats import _deliverable

INBOX = "_INBOX.abc."
token = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=8)
description = st.text(
    st.characters(min_codepoint=32, max_codepoint=126, exclude_characters=":"), max_size=30
).map(str.strip)


@st.composite
def pulled(draw: st.DrawFn) -> tuple[bytes, tuple[str, object]]:
    """One thing a pull's subscription gets: (its bytes, what the source must see in it)."""
    kind = draw(st.sampled_from(["delivery", "delivery_with_headers", "status"]))
    if kind == "status":
        code = draw(st.sampled_from([100, 404, 408, 409, 503]))
        text = draw(description)
        extra = draw(st.sampled_from(["", "Nats-Pending-Messages: 3\r\nNats-Pending-Bytes: 0\r\n"]))
        headers = f"NATS/1.0 {code}{' ' + text if text else ''}\r\n{extra}\r\n".encode()
        subject = f"{INBOX}p.{draw(st.integers(1, 99))}"
        raw = b"HMSG %s 1 %d %d\r\n%s\r\n" % (
            subject.encode(),
            len(headers),
            len(headers),
            headers,
        )
        return raw, ("status", (code, text))
    subject = ".".join(draw(st.lists(token, min_size=1, max_size=3)))
    reply = f"$JS.ACK.S.c.1.{draw(st.integers(1, 10**6))}.1.1700000000.0"
    payload = draw(st.binary(max_size=40))
    if kind == "delivery":
        raw = b"MSG %s 1 %s %d\r\n%s\r\n" % (
            subject.encode(),
            reply.encode(),
            len(payload),
            payload,
        )
    else:
        headers = b"NATS/1.0\r\nGateway-Peer: 1.2.3.4:5\r\n\r\n"
        raw = b"HMSG %s 1 %s %d %d\r\n%s%s\r\n" % (
            subject.encode(),
            reply.encode(),
            len(headers),
            len(headers) + len(payload),
            headers,
            payload,
        )
    return raw, ("delivery", (subject, reply, payload))


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)  # a loaded machine
@given(st.lists(pulled(), max_size=12), st.lists(st.integers(0, 3000), max_size=12))
def test_deliveries_and_statuses_are_told_apart_under_any_split(
    sequence: list[tuple[bytes, tuple[str, object]]], cuts: list[int]
) -> None:
    data = b"".join(raw for raw, _ in sequence)
    parser = NatsParser()
    seen: list[tuple[str, object]] = []
    start = 0
    for cut in [*sorted({min(c, len(data)) for c in cuts}), len(data)]:
        parser.receive_data(data[start:cut])
        start = cut
        while (event := parser.next_event()) is not None:
            assert isinstance(event, Msg)
            if _deliverable(event):
                assert event.status is None
                seen.append(("delivery", (event.subject, event.reply, event.payload)))
            else:
                assert event.subject.startswith(f"{INBOX}p.") and event.status is not None
                seen.append(("status", (event.status, event.description)))
    assert seen == [expected for _, expected in sequence]


@given(st.binary(max_size=80))
def test_any_header_block_has_a_status_or_none_and_never_raises(block: bytes) -> None:
    message = Msg("s", "1", None, b"", block)
    assert message.status is None or message.status >= 0
    assert isinstance(message.description, str)


def test_acks_naks_and_a_queue_group_subscription() -> None:
    assert acks(["$JS.ACK.a.1", "$JS.ACK.a.2"]) == (
        b"PUB $JS.ACK.a.1 4\r\n+ACK\r\nPUB $JS.ACK.a.2 4\r\n+ACK\r\n"
    )
    assert nak(0) == b"-NAK"
    assert nak(1.5) == b'-NAK {"delay":1500000000}'
    assert acks(["r"], nak(0.25)) == b'PUB r 24\r\n-NAK {"delay":250000000}\r\n'
    assert sub("chat.>", "2", "workers") == b"SUB chat.> workers 2\r\n"
    assert sub("chat.>", "2") == b"SUB chat.> 2\r\n"


async def test_a_pull_ends_with_its_batch_and_goes_silent_without_heartbeats() -> None:
    pull = Pull(f"{INBOX}p.1", 10)
    assert json.loads(pull.request()) == {
        "batch": 10,
        "expires": round(_nats_pull.PULL_EXPIRES * 1e9),
        "idle_heartbeat": round(_nats_pull.PULL_HEARTBEAT * 1e9),
    }
    assert pull.silent_after() == pull.last_heard + 3 * _nats_pull.PULL_HEARTBEAT
    pull.received(4)
    assert not pull.ended
    await trio.sleep(0.01)
    before = pull.silent_after()
    pull.heard()
    assert pull.silent_after() > before
    pull.received(6)
    assert pull.ended and not pull.refused
    assert Pull.batch_limit("Exceeded MaxRequestBatch of 3") == 3
    assert Pull.batch_limit("Exceeded MaxWaiting") is None


def test_the_stream_sequence_is_read_from_both_forms_of_ack_subject() -> None:
    # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>,
    # and the form with a domain, an account hash and a token.
    assert stream_sequence("$JS.ACK.ORDERS.gateway.1.4242.17.1733244000000000000.3") == 4242
    v2 = "$JS.ACK.hub.ACCHASH.ORDERS.gateway.2.4243.18.1733244000000000000.0.tok"
    assert stream_sequence(v2) == 4243
    assert stream_sequence("_INBOX.abc.1") == 0  # not an ack subject
