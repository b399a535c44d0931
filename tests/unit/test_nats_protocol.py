"""The NATS sink's sans-IO client protocol and its credentials, fed bytes alone."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_gateway.sinks._nats_auth import _crc16, credentials, seed_private_bytes
from trio_gateway.sinks._nats_protocol import (
    Err,
    Event,
    Info,
    Msg,
    NatsParser,
    NatsProtocolError,
    Ok,
    Ping,
    Pong,
    connect_command,
    encode_headers,
    hpub,
    parse_headers,
    pub,
)
from trio_gateway.sinks._nats_url import parse_nats_url


def events_of(data: bytes, parser: NatsParser | None = None) -> list[Event]:
    parser = parser or NatsParser()
    parser.receive_data(data)
    out = []
    while (event := parser.next_event()) is not None:
        out.append(event)
    return out


SAMPLE = (
    b'INFO {"server_id":"X","max_payload":1048576,"headers":true,"nonce":"abc"}\r\n'
    b"PING\r\n"
    b'MSG _INBOX.a.1.0 1 22\r\n{"stream":"S","seq":1}\r\n'
    b"HMSG _INBOX.a.1.1 1 16 16\r\nNATS/1.0 503\r\n\r\n\r\n"
    b"MSG chat.room 7 reply.to 5\r\nhello\r\n"
    b"HMSG chat.room 7 24 29\r\nNATS/1.0\r\nA: b\r\nC: d\r\n\r\nhello\r\n"
    b"+OK\r\n"
    b"PONG\r\n"
    b"-ERR 'Authorization Violation'\r\n"
)


def test_every_server_operation_is_parsed() -> None:
    events = events_of(SAMPLE)
    assert isinstance(events[0], Info)
    assert events[0].max_payload == 1048576 and events[0].headers and events[0].nonce == "abc"
    assert events[1] == Ping()
    ack = events[2]
    assert isinstance(ack, Msg) and ack.subject == "_INBOX.a.1.0" and ack.reply is None
    assert ack.payload == b'{"stream":"S","seq":1}' and ack.status is None
    no_responders = events[3]
    assert isinstance(no_responders, Msg) and no_responders.status == 503
    assert no_responders.payload == b""
    assert events[4] == Msg("chat.room", "7", "reply.to", b"hello")
    with_headers = events[5]
    assert isinstance(with_headers, Msg) and with_headers.payload == b"hello"
    assert with_headers.headers is not None and with_headers.status is None
    assert parse_headers(with_headers.headers) == {"A": "b", "C": "d"}
    assert events[6:] == [Ok(), Pong(), Err("Authorization Violation")]


def test_split_at_every_byte_boundary_gives_the_same_events() -> None:
    whole = events_of(SAMPLE)
    for cut in range(len(SAMPLE) + 1):
        parser = NatsParser()
        assert events_of(SAMPLE[:cut], parser) + events_of(SAMPLE[cut:], parser) == whole


subjects = st.from_regex(r"[a-zA-Z0-9_$]{1,8}(\.[a-zA-Z0-9_$]{1,8}){0,3}", fullmatch=True)
header_text = st.from_regex(r"[A-Za-z0-9-]{1,12}", fullmatch=True)


@st.composite
def server_event(draw: st.DrawFn) -> tuple[bytes, Event]:
    kind = draw(st.sampled_from(["msg", "hmsg", "ping", "pong", "ok", "err", "info"]))
    if kind in ("msg", "hmsg"):
        subject, sid = draw(subjects), str(draw(st.integers(1, 999)))
        reply = draw(st.none() | subjects)
        payload = draw(st.binary(max_size=64))
        args = f"{subject} {sid}" + (f" {reply}" if reply else "")
        if kind == "msg":
            return (
                f"MSG {args} {len(payload)}\r\n".encode() + payload + b"\r\n",
                Msg(subject, sid, reply, payload),
            )
        headers = encode_headers(draw(st.dictionaries(header_text, header_text, max_size=3)))
        total = len(headers) + len(payload)
        return (
            f"HMSG {args} {len(headers)} {total}\r\n".encode() + headers + payload + b"\r\n",
            Msg(subject, sid, reply, payload, headers),
        )
    if kind == "info":
        return b'INFO {"max_payload":7}\r\n', Info({"max_payload": 7})
    if kind == "err":
        text = draw(header_text)
        return f"-ERR '{text}'\r\n".encode(), Err(text)
    return {
        "ping": (b"PING\r\n", Ping()),
        "pong": (b"PONG\r\n", Pong()),
        "ok": (b"+OK\r\n", Ok()),
    }[kind]


# Drawing a dozen events is slow on a loaded machine: the health check said so in CI runs.
@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(server_event(), max_size=12), st.lists(st.integers(0, 2000), max_size=12))
def test_any_split_of_any_event_sequence_parses_the_same(
    sequence: list[tuple[bytes, Event]], cuts: list[int]
) -> None:
    data = b"".join(raw for raw, _ in sequence)
    parser = NatsParser()
    got: list[Event] = []
    start = 0
    for cut in [*sorted({min(c, len(data)) for c in cuts}), len(data)]:
        got += events_of(data[start:cut], parser)
        start = cut
    assert got == [event for _, event in sequence]


@given(st.binary(max_size=300))
def test_garbage_is_a_protocol_error_or_waits_for_more(data: bytes) -> None:
    parser = NatsParser(max_control_line=128, max_payload=256)
    try:
        events_of(data, parser)
    except NatsProtocolError:
        pass


@pytest.mark.parametrize(
    "data",
    [
        b"HELLO\r\n",
        b"MSG a 1\r\n",
        b"MSG a 1 x\r\n",
        b"HMSG a 1 9 5\r\n",
        b"MSG a 1 3\r\nabcd\r\n",
        b"INFO [1]\r\n",
        b"INFO {\r\n",
        b"MSG a 1 999999\r\n",
        b"PING" + b"x" * 200,
    ],
)
def test_malformed_or_oversized_input_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(NatsProtocolError):
        events_of(data, NatsParser(max_control_line=128, max_payload=1000))


@pytest.mark.parametrize(
    ("usual", "unusual"),
    [
        (b"MSG a.b 7 5\r\nhello\r\n", b"msg a.b 7 5\r\nhello\r\n"),
        (b"MSG a.b 7 r.1 5\r\nhello\r\n", b"MSG  a.b\t7 r.1   5\r\nhello\r\n"),
        (
            b"HMSG a.b 7 12 17\r\nNATS/1.0\r\n\r\nhello\r\n",
            b"Hmsg a.b 7\t12 17\r\nNATS/1.0\r\n\r\nhello\r\n",
        ),
        (b"MSG a.b 7 5\r\nhello\r\n", b"MSG a.b 7 0000000000005\r\nhello\r\n"),
    ],
)
def test_a_message_line_in_an_unusual_form_gives_the_same_message(
    usual: bytes, unusual: bytes
) -> None:
    """The usual form takes the parser's fast path; any other form the general one."""
    (event,) = events_of(usual)
    assert events_of(unusual) == [event]
    assert events_of(usual + unusual + usual) == [event, event, event]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"MSG " + b"s" * 130 + b" 1 2\r\nab\r\n", "control line longer than 128 bytes"),
        (b"HMSG a 1 9 5\r\n", "HMSG header size exceeds total size"),
        (b"MSG a 1 1001\r\n", "message of 1001 bytes over 1000"),
        (b"MSG a 1 9999999999999\r\n", "message of 9999999999999 bytes over 1000"),
        (b"MSG a 1 3\r\nabcd\r\n", "message body not followed by CRLF"),
        (b"MSG a 1 2 3 4\r\n", "malformed MSG line b'a 1 2 3 4'"),
    ],
)
def test_each_fault_of_a_message_line_has_its_own_error(data: bytes, error: str) -> None:
    with pytest.raises(NatsProtocolError) as raised:
        events_of(data, NatsParser(max_control_line=128, max_payload=1000))
    assert str(raised.value) == error


def test_next_events_hands_a_read_at_once_then_the_error_after_it() -> None:
    parser = NatsParser()
    assert parser.next_events() == []
    parser.receive_data(b"PING\r\nMSG a 1 2\r\nhi\r\nMSG b 1 2\r\nh")
    assert parser.next_event() == Ping()
    assert parser.next_events() == [Msg("a", "1", None, b"hi")]
    assert parser.next_events() == []  # the rest of b's body is still to come
    parser.receive_data(bytearray(b"o\r\nPONG\r\nNOPE\r\n"))
    assert parser.next_events() == [Msg("b", "1", None, b"ho"), Pong()]
    with pytest.raises(NatsProtocolError, match="unknown operation"):
        parser.next_events()


def test_many_subjects_and_replies_keep_their_own_strings() -> None:
    """Subject and sid strings are kept per line shape (a bounded number of them)."""
    data = b"".join(
        b"MSG room.%d %d%s 1\r\n%d\r\n" % (n % 1500, n % 7, b" r.%d" % n if n % 3 else b"", n % 10)
        for n in range(4000)
    )
    expected = [
        Msg(f"room.{n % 1500}", str(n % 7), f"r.{n}" if n % 3 else None, b"%d" % (n % 10))
        for n in range(4000)
    ]
    assert events_of(data) == expected


def test_hpub_and_pub_frame_sizes_match_what_a_server_reads() -> None:
    headers = encode_headers({"Nats-Msg-Id": "s.1", "Gateway-Peer": "1.2.3.4:5"})
    frame = hpub(b"chat.in", b"_INBOX.x.1.0", headers, b"payload")
    # The server reads it as a HMSG reads: same sizes, same layout after the sid.
    as_hmsg = frame.replace(b"HPUB chat.in ", b"HMSG chat.in 1 ", 1)
    (msg,) = events_of(as_hmsg)
    assert isinstance(msg, Msg) and msg.payload == b"payload" and msg.headers == headers
    assert msg.reply == "_INBOX.x.1.0"
    assert parse_headers(headers) == {"Nats-Msg-Id": "s.1", "Gateway-Peer": "1.2.3.4:5"}
    request_frame = pub(b"$JS.API.INFO", b"r.1", b"{}")
    (request,) = events_of(request_frame.replace(b"PUB $JS.API.INFO ", b"MSG $JS.API.INFO 9 "))
    assert isinstance(request, Msg) and request.payload == b"{}" and request.reply == "r.1"


def test_connect_is_json_and_header_values_cannot_break_lines() -> None:
    line = connect_command({"headers": True, "no_responders": True})
    assert line == b'CONNECT {"headers":true,"no_responders":true}\r\n'
    with pytest.raises(ValueError, match="CR or LF"):
        encode_headers({"Nats-Msg-Id": "a\r\nInjected: 1"})
    assert encode_headers({}, close=False) == b"NATS/1.0\r\n"


# -- credentials ------------------------------------------------------------------------------


def make_seed(key: bytes) -> bytes:
    """An NKey user seed (``SU...``) for ``key``, encoded as nkeys does."""
    seed, user = 18 << 3, 20 << 3
    body = bytes([seed | (user >> 5), (user & 31) << 3]) + key
    raw = body + _crc16(body).to_bytes(2, "little")
    return base64.b32encode(raw).rstrip(b"=")


def test_crc16_is_xmodem() -> None:
    assert _crc16(b"123456789") == 0x31C3


def test_a_seed_decodes_to_its_key_and_a_damaged_one_is_refused() -> None:
    key = bytes(range(32))
    seed = make_seed(key)
    assert seed.startswith(b"SU") and seed_private_bytes(seed) == key
    damaged = seed[:10] + (b"A" if seed[10:11] != b"A" else b"B") + seed[11:]
    with pytest.raises(ValueError):
        seed_private_bytes(damaged)


def test_creds_file_signs_the_nonce(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = bytes(range(1, 33))
    creds = tmp_path / "user.creds"
    creds.write_bytes(
        b"-----BEGIN NATS USER JWT-----\neyJhbGciOi.body.sig\n------END NATS USER JWT------\n\n"
        b"************************* IMPORTANT *************************\n\n"
        b"-----BEGIN USER NKEY SEED-----\n" + make_seed(key) + b"\n"
        b"------END USER NKEY SEED------\n"
    )
    fields = credentials(parse_nats_url(f"nats://h/a?creds={creds}"), "nonce-1")
    assert fields["jwt"] == "eyJhbGciOi.body.sig"
    signature = base64.urlsafe_b64decode(fields["sig"] + "==")
    Ed25519PrivateKey.from_private_bytes(key).public_key().verify(signature, b"nonce-1")
    assert credentials(parse_nats_url("nats://u:p@h/a"), None) == {"user": "u", "pass": "p"}
    assert credentials(parse_nats_url("nats://tok@h/a"), None) == {"auth_token": "tok"}
