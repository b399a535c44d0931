"""The one module that relies on h2's internals: it fails loudly when an h2 upgrade breaks it."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import h2
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from h2.errors import ErrorCodes

from trio_gateway.sources.grpc import _h2shim
from trio_gateway.sources.grpc._h2shim import (
    RECEIVE_FRAME_FINGERPRINTS,
    ShimmedH2Connection,
    check_h2,
)


def test_h2s_receive_frame_is_the_one_the_shim_copies() -> None:
    """An h2 release whose ``_receive_frame`` differs from every release the shim was
    compared with fails here: compare ``ShimmedH2Connection._receive_frame`` with the new
    method, then add the new fingerprint."""
    source = inspect.getsource(h2.connection.H2Connection._receive_frame)
    fingerprint = hashlib.sha256(source.encode()).hexdigest()
    assert fingerprint in RECEIVE_FRAME_FINGERPRINTS.values(), (
        f"h2 {h2.__version__} changed H2Connection._receive_frame (sha256 {fingerprint}): "
        "review trio_gateway/sources/grpc/_h2shim.py against it"
    )


def test_the_installed_h2_passes_the_import_check() -> None:
    check_h2()


def test_an_h2_outside_the_range_or_missing_an_internal_is_refused_at_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(h2, "__version__", "5.0.0")
    with pytest.raises(ImportError, match=r"needs h2 >=4\.1,<5\.0.*h2 5\.0\.0 is installed"):
        check_h2()
    monkeypatch.setattr(h2, "__version__", "4.2.0")
    monkeypatch.delattr(h2.exceptions.StreamClosedError, "__init__")  # no _events any more
    with pytest.raises(ImportError, match=r"lacks .*_events"):
        check_h2()


def _pair() -> tuple[h2.connection.H2Connection, ShimmedH2Connection, h2.connection.H2Connection]:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
    shimmed, plain = ShimmedH2Connection(config), h2.connection.H2Connection(config)
    for server in (shimmed, plain):
        server.initiate_connection()
    return client, shimmed, plain


def _kinds(events: list[h2.events.Event]) -> list[tuple[str, int | None]]:
    return [(type(e).__name__, getattr(e, "stream_id", None)) for e in events]


def test_the_shimmed_receive_gives_what_h2s_own_gives() -> None:
    """Same frames into h2's connection and the shimmed one, including a frame on a stream
    closed by a reset (the branches copied from h2): same events, same bytes back."""
    client, shimmed, plain = _pair()
    headers = [(":method", "POST"), (":path", "/x"), (":scheme", "http"), (":authority", "a")]
    client.send_headers(1, headers)
    client.send_data(1, b"hello")
    client.send_headers(3, headers, end_stream=True)
    first = client.data_to_send()
    assert _kinds(shimmed.receive_data(first)) == _kinds(plain.receive_data(first))
    assert shimmed.data_to_send() == plain.data_to_send()
    for server in (shimmed, plain):
        server.reset_stream(1, ErrorCodes.CANCEL)
        server.data_to_send()
    # the client has not seen the reset yet: DATA on stream 1 is answered RST_STREAM
    client.send_data(1, b"late", end_stream=True)
    late = client.data_to_send()
    assert _kinds(shimmed.receive_data(late)) == _kinds(plain.receive_data(late))
    assert shimmed.data_to_send() == plain.data_to_send() != b""


def test_pre_encoded_headers_and_data_frames_read_as_h2s_own() -> None:
    client, shimmed, _ = _pair()
    client.send_headers(
        1, [(":method", "POST"), (":path", "/x"), (":scheme", "http"), (":authority", "a")]
    )
    shimmed.receive_data(client.data_to_send())
    # ":status: 200" (static entry 8), then "x-a: b" as a literal without indexing
    assert shimmed.send_encoded_headers(1, b"\x88\x00\x03x-a\x01b", end_stream=False)
    shimmed.send_data_frame(1, b"payload")
    assert shimmed.pending_output() > 0
    shimmed.append_output(b"")
    events = client.receive_data(shimmed.data_to_send())
    assert [type(e) for e in events if not isinstance(e, h2.events.RemoteSettingsChanged)] == [
        h2.events.SettingsAcknowledged,
        h2.events.ResponseReceived,
        h2.events.DataReceived,
    ]
    response, data = events[-2], events[-1]
    assert isinstance(response, h2.events.ResponseReceived)
    assert response.headers == [(b":status", b"200"), (b"x-a", b"b")]
    assert isinstance(data, h2.events.DataReceived) and data.data == b"payload"
    assert not shimmed.send_encoded_headers(99, b"\x88", end_stream=True)  # no such stream


def test_the_shim_is_the_only_module_that_touches_h2_internals() -> None:
    for path in Path(inspect.getfile(_h2shim)).parent.glob("*.py"):
        if path.name == "_h2shim.py":
            continue
        text = path.read_text()
        for internal in ("_receive_frame", "_frame_dispatch_table", "_data_to_send", "._events"):
            assert internal not in text, (path.name, internal)
