"""The only module that touches h2's private internals, checked against h2's version at import.

Three things are done below h2's public API, each for speed on the hot path of a call:

* ``_receive_frame`` without the ``repr(frame)`` h2 formats for its trace log on every frame
  received, even when nothing logs: for a DATA frame that hex-encodes the whole payload (a
  third of the CPU of a large-message stream). The body is h2 4.x's method without that line.
* :meth:`ShimmedH2Connection.send_encoded_headers`: a HEADERS frame whose HPACK block is
  encoded once per process (see ``_protocol``), through h2's state machines but not its
  encoder or header checks (about a fifth of a unary call's CPU).
* :meth:`ShimmedH2Connection.send_data_frame`: h2's ``send_data`` for one DATA frame without
  building and serializing a ``DataFrame`` object.

They rely on ``H2Connection._frame_dispatch_table``, ``_data_to_send``,
``_prepare_for_sending``, ``_stream_is_closed_by_reset``, ``_stream_is_closed_by_end``,
``StreamClosedError._events`` and ``encoder.header_table.resized``. Import fails with
:class:`ImportError` naming what is missing if h2 is outside the tested range or lacks one of
them; ``tests/unit/test_grpc_h2shim.py`` also fails when h2's ``_receive_frame`` changes (its
source is fingerprinted in :data:`RECEIVE_FRAME_FINGERPRINTS`), so an upgrade is reviewed.
"""

from __future__ import annotations

import h2
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.stream
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, RstStreamFrame

__all__ = ("RECEIVE_FRAME_FINGERPRINTS", "SUPPORTED_H2", "ShimmedH2Connection", "check_h2")

SUPPORTED_H2 = ((4, 1), (5, 0))
"""h2 versions this shim was written for: at least the first, below the second (the pin in
pyproject.toml says the same)."""

RECEIVE_FRAME_FINGERPRINTS = {
    "4.1.0": "4beae2c3c05681b0f5a501f24234fe2c673148c0734e61bcc3554102e2a3e961",
    "4.4.1": "39b2e16b4fd74ed014ca144a0c6e388aef3dc51f116d6f0a874b70d92bd92873",
}
"""SHA-256 of ``inspect.getsource(H2Connection._receive_frame)`` in the h2 releases whose
method :meth:`ShimmedH2Connection._receive_frame` was compared with (the same logic in each)."""

_END_HEADERS = 0x4
_END_STREAM = 0x1
_HEADERS = 0x1


def check_h2() -> None:
    """Raise :class:`ImportError` unless the installed h2 has what this shim relies on."""
    version = getattr(h2, "__version__", "0")
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        major_minor = (0, 0)
    low, high = SUPPORTED_H2
    if not low <= major_minor < high:
        raise ImportError(
            f"trio_gateway's gRPC server needs h2 >={low[0]}.{low[1]},<{high[0]}.{high[1]} "
            f"(it uses h2 internals, see {__name__}); h2 {version} is installed"
        )
    conn = h2.connection.H2Connection()
    missing = [
        name
        for obj, name in (
            (conn, "_frame_dispatch_table"),
            (conn, "_data_to_send"),
            (conn, "_prepare_for_sending"),
            (conn, "_stream_is_closed_by_reset"),
            (conn, "_stream_is_closed_by_end"),
            (conn.encoder.header_table, "resized"),
            (h2.exceptions.StreamClosedError(1), "_events"),
        )
        if not hasattr(obj, name)
    ]
    if not isinstance(getattr(conn, "_data_to_send", None), bytearray):
        missing.append("_data_to_send as a bytearray")
    if missing:
        raise ImportError(
            f"h2 {version} lacks what trio_gateway's gRPC server relies on "
            f"({', '.join(missing)}); see {__name__}"
        )


check_h2()


class ShimmedH2Connection(h2.connection.H2Connection):
    """h2's connection with the three fast paths described in the module docstring."""

    def _receive_frame(self, frame: Frame) -> list[h2.events.Event]:
        # h2 4.x's H2Connection._receive_frame, less its eager repr(frame)
        events: list[h2.events.Event]
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except h2.exceptions.StreamClosedError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                events = e._events
            else:
                raise
        except h2.exceptions.StreamIDTooLowError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                raise h2.exceptions.StreamClosedError(e.stream_id) from e
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events

    def pending_output(self) -> int:
        """How many bytes :meth:`data_to_send` would return now."""
        return len(self._data_to_send)

    def append_output(self, data: bytes) -> None:
        """Queue bytes framed elsewhere (a GOAWAY that leaves h2's state machine open) after
        what h2 has queued, so the order on the wire is the order of the calls."""
        self._data_to_send += data

    def send_encoded_headers(self, stream_id: int, block: bytes, *, end_stream: bool) -> bool:
        """Send one HEADERS frame whose HPACK ``block`` is already encoded (literals without
        indexing only), through h2's state machines but without its encoder and header
        checks. False (nothing done) when h2's own path must be taken: the stream is gone or
        the encoder owes the peer a table-size update."""
        stream = self.streams.get(stream_id)
        if stream is None or self.encoder.header_table.resized:
            return False
        self.state_machine.process_input(h2.connection.ConnectionInputs.SEND_HEADERS)
        stream.state_machine.process_input(h2.stream.StreamInputs.SEND_HEADERS)
        flags = _END_HEADERS
        if end_stream:
            stream.state_machine.process_input(h2.stream.StreamInputs.SEND_END_STREAM)
            flags |= _END_STREAM
        self._data_to_send += (
            len(block).to_bytes(3, "big")
            + bytes((_HEADERS, flags))
            + stream_id.to_bytes(4, "big")
            + block
        )
        return True

    def send_data_frame(self, stream_id: int, data: bytes | memoryview) -> None:
        """h2's ``send_data`` for one unpadded DATA frame that the caller has checked against
        both flow-control windows and the peer's frame size, minus its per-frame objects (a
        ``DataFrame`` to build and serialize, log calls, the checks made twice)."""
        size = len(data)
        stream = self.streams.get(stream_id)
        if stream is None or size == 0:
            self.send_data(stream_id, data)
            return
        self.state_machine.process_input(h2.connection.ConnectionInputs.SEND_DATA)
        stream.state_machine.process_input(h2.stream.StreamInputs.SEND_DATA)
        stream.outbound_flow_control_window -= size
        self.outbound_flow_control_window -= size
        buffer = self._data_to_send
        buffer += size.to_bytes(3, "big") + b"\x00\x00" + stream_id.to_bytes(4, "big")
        buffer += data
