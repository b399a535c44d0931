"""Inflating compressed gRPC messages without a connection: the size limit, bombs, corrupt data."""

from __future__ import annotations

import gzip
import os
import random
import tracemalloc
import zlib
from collections.abc import Callable

import pytest
from helpers import DEFLATE, GZIP, bomb, deflate

from trio_gateway._errors import FrameTooLarge, ProtocolError
from trio_gateway.sources.grpc._calls import gzip_claims, inflate_message


@pytest.mark.parametrize(("wbits", "compress"), [(GZIP, gzip.compress), (DEFLATE, deflate)])
def test_inflate_up_to_the_limit_and_not_a_byte_more(
    wbits: int, compress: Callable[[bytes], bytes]
) -> None:
    data = os.urandom(1000) + bytes(3000)
    assert inflate_message(compress(data), wbits, 4000) == data
    assert inflate_message(compress(data), wbits, 4001) == data
    with pytest.raises(FrameTooLarge):
        inflate_message(compress(data), wbits, 3999)
    assert inflate_message(compress(b""), wbits, 1) == b""


@pytest.mark.parametrize("wbits", [GZIP, DEFLATE])
def test_a_bomb_is_refused_at_the_limit_with_memory_bounded(wbits: int) -> None:
    compressed = bomb(1 << 30, wbits=wbits)  # 1 GiB of zeros in about 1 MiB
    assert len(compressed) < 1_100_000
    limit = 4 << 20
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge):
            inflate_message(compressed, wbits, limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # zlib's output blocks joined into one bytes object (2x the limit at most), plus the
    # input left unconsumed; not the gigabyte
    assert peak < 2 * limit + len(compressed) + (256 << 10)
    # the same stream, inflated whole, is what the bomb claims to be
    assert len(zlib.decompressobj(wbits).decompress(bomb(4 << 20, wbits=wbits))) == 4 << 20


@pytest.mark.parametrize(("wbits", "compress"), [(GZIP, gzip.compress), (DEFLATE, deflate)])
def test_inflate_refuses_corrupt_truncated_and_trailing_data(
    wbits: int, compress: Callable[[bytes], bytes]
) -> None:
    good = compress(random.Random(1).randbytes(200) + b"hello " * 100)
    with pytest.raises(ProtocolError, match="corrupt"):
        inflate_message(good[:4] + b"\xff" * 20 + good[24:], wbits, 1 << 20)
    with pytest.raises(ProtocolError, match="truncated"):
        inflate_message(good[:-3], wbits, 1 << 20)
    with pytest.raises(ProtocolError, match="after the end"):
        inflate_message(good + b"junk", wbits, 1 << 20)
    with pytest.raises(ProtocolError):
        inflate_message(compress(b"x") if wbits == DEFLATE else deflate(b"x"), GZIP, 100)
    with pytest.raises(ProtocolError):
        inflate_message(b"", wbits, 100)


def test_gzip_claims_reads_the_trailer_and_only_for_gzip() -> None:
    data = gzip.compress(b"x" * 100)
    assert gzip_claims(data, GZIP) == 100
    assert gzip_claims(data[:-4] + (1 << 20).to_bytes(4, "little"), GZIP) == 1 << 20
    assert gzip_claims(deflate(b"x" * 100), DEFLATE) is None
    assert gzip_claims(b"short", GZIP) is None
