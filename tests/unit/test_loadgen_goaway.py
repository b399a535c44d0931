"""The gRPC client notices a GOAWAY that ``h2`` never reports: ``h2`` raises on the PING that
follows it in the same read, so the client walks the frame headers itself."""

from __future__ import annotations

import pytest
from hyperframe.frame import DataFrame, GoAwayFrame, PingFrame, SettingsFrame

from trio_gateway.loadgen._h2 import _GoawayWatch


def frames(*, goaway: bool) -> bytes:
    data = DataFrame(1, data=b"\x07" * 300)  # a body whose bytes look like a GOAWAY type
    out = SettingsFrame(0).serialize() + data.serialize()
    if goaway:
        out += GoAwayFrame(0, last_stream_id=1).serialize()
    return out + PingFrame(0, opaque_data=b"12345678").serialize()


@pytest.mark.parametrize("goaway", [True, False])
def test_a_goaway_is_seen_however_the_reads_cut_the_frames(goaway: bool) -> None:
    stream = frames(goaway=goaway)
    for cut in range(1, 40):
        watch = _GoawayWatch()
        seen = [watch.feed(stream[i : i + cut]) for i in range(0, len(stream), cut)]
        assert any(seen) is goaway, cut
