"""The acknowledgement state of the WebSocket ack subprotocol, without a connection."""

from __future__ import annotations

import json

from trio_gateway.sources.websocket import (
    MAX_ACK_RANGES,
    AckState,
)


def test_ack_state_coalesces_and_bounds_its_ranges() -> None:
    state = AckState()
    assert (state.take(), state.pending) == (b"", False)
    for _ in range(100_000):  # all accepted: one small ack, whatever the number of reads
        state.record(3, 0, "queue_full")
    frame = state.take()
    assert frame[2:] == b'{"acked":300000}' and frame[:2] == b"\x81\x10"
    state.record(2, 3, "queue_full")  # adjacent refusals merge
    state.record(0, 4, "queue_full")
    state.record(1, 1, "gateway_stopping")
    assert json.loads(state.take()[2:]) == {
        "acked": 300011,
        "refused": [[300003, 300009, "queue_full"], [300011, 300011, "gateway_stopping"]],
    }
    for _ in range(MAX_ACK_RANGES):  # alternating: one range per record, until full
        assert not state.full
        state.record(1, 1, "queue_full")
    assert state.full
    frame = state.take()
    assert len(frame) < 64 * 40 and not state.full
