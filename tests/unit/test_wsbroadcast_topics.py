"""The broadcast sink's topic read: the fast path over a batch (the C scanner straight on a
payload that looks like a JSON object) answers exactly as the reference, ``_field``, which
reads each payload as ``json.loads`` reads bytes."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from trio_gateway import Batch, Origin
from trio_gateway.sinks import WebSocketBroadcastSink

ORIGIN = Origin("nats", "nats:x", "chat", 1.0)

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and the infinities too: json writes and reads them
    | st.text()
    | st.sampled_from(["a", "room", "", "2", "\u00e9t\u00e9", "\ud7ff", "x\\y", 'q"q'])
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
keys = st.sampled_from(["room", "Room", "room ", "r\u00f6om", "n", "t"]) | st.text(max_size=6)


@st.composite
def json_objects(draw: st.DrawFn) -> bytes:
    """An object as some sender might write it: any members (the topic's key among them,
    maybe twice: the last one counts), any spacing, escaped or raw non-ASCII, any encoding
    json.loads reads."""
    members = draw(st.lists(st.tuples(keys, values), max_size=5))
    spaces = st.sampled_from(["", " ", "\n", "\t ", "\r\n"])
    ensure_ascii = draw(st.booleans())
    text = draw(spaces) + "{" + draw(spaces)
    text += ",".join(
        draw(spaces)
        + json.dumps(key, ensure_ascii=ensure_ascii)
        + draw(spaces)
        + ":"
        + draw(spaces)
        + json.dumps(value, ensure_ascii=ensure_ascii)
        + draw(spaces)
        for key, value in members
    )
    text += "}" + draw(spaces)
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "utf-32"]))
    try:
        return text.encode(encoding)
    except UnicodeEncodeError:  # a lone surrogate, written raw
        return text.encode("utf-8", "surrogatepass")


def _spoiled(data: bytes, cut: int, junk: bytes) -> bytes:
    """A payload broken at ``cut`` (a byte dropped, or junk put in)."""
    cut %= len(data) + 1
    return data[:cut] + junk + data[cut + 1 :]


payloads = (
    json_objects()
    | st.builds(_spoiled, json_objects(), st.integers(0, 200), st.binary(max_size=3))
    | st.builds(lambda inner: b"{" + inner + b"}", st.binary(max_size=40))
    | st.binary(max_size=40)
)


def _reference(sink: WebSocketBroadcastSink, batch: list[bytes]) -> list[str | None]:
    return [sink._topic(payload, ORIGIN) for payload in batch]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(payloads, min_size=1, max_size=6))
@example([b'{"":}'])  # a missing value: the scanner raises StopIteration, not ValueError
def test_the_fast_topic_read_answers_as_the_reference(batch: list[bytes]) -> None:
    sink = WebSocketBroadcastSink(topic="room")
    assert sink._topics(Batch(batch, [(ORIGIN, len(batch))])) == _reference(sink, batch)


@given(st.lists(st.tuples(keys, values), max_size=4), keys)
def test_any_topic_key_reads_as_the_reference(members: list[tuple[str, Any]], key: str) -> None:
    sink = WebSocketBroadcastSink(topic=key or "k")
    batch = [json.dumps(dict(members)).encode(), json.dumps(dict(members), indent=1).encode()]
    assert sink._topics(Batch(batch, [(ORIGIN, 2)])) == _reference(sink, batch)


def test_the_last_of_a_repeated_key_counts_and_numbers_read_as_the_reference() -> None:
    sink = WebSocketBroadcastSink(topic="room")
    batch = [
        b'{"room":"a","room":"b"}',
        b'{"room":"a","room":2.0}',
        b'{"room":1e400}',
        b'{"room":NaN}',
        b'{"room":"a"}}',
        b'{"room":"a"} }',
        b'{"room":"\\u00e9"}',
        b'{"room":}',  # the scanner raises StopIteration for a missing value
        b'{"room":"a","n":[}',
    ]
    topics = sink._topics(Batch(batch, [(ORIGIN, len(batch))]))
    assert topics == ["b", "2", "inf", "nan", None, None, "\u00e9", None, None]
    assert topics == _reference(sink, batch)


def test_a_payload_nested_past_the_recursion_limit_has_no_topic() -> None:
    """A hostile payload nested deeper than the interpreter can decode has no topic; it
    must not fail the batch (and with it every other room's messages)."""
    sink = WebSocketBroadcastSink(topic="room")
    deep = b'{"room":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    open_ended = b'{"room":' + b"[" * 200_000
    batch = [deep, open_ended, b'{"room":"a"}', deep.decode().encode("utf-16")]
    assert sink._topics(Batch(batch, [(ORIGIN, len(batch))])) == [None, None, "a", None]


def test_peer_topics_come_from_each_run_of_the_batch() -> None:
    sink = WebSocketBroadcastSink()  # topic="$peer"
    other = Origin("nats", "nats:x", "other", 1.0)
    batch = Batch([b"1", b"2", b"3"], [(ORIGIN, 2), (other, 1)])
    assert sink._topics(batch) == ["chat", "chat", "other"]
