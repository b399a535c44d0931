"""Packed newline frames (what a TCP read queues) and the batches made of them."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from trio_gateway import Batch, Origin
from trio_gateway._frames import MARK_STEP, Frames
from trio_gateway.codecs import NewlineDecoder, _newline

ORIGIN = Origin("tcp", "tcp:test", "peer:1", 1.0)


def packed(payloads: list[bytes]) -> Frames:
    return Frames(b"".join(p + b"\n" for p in payloads), len(payloads))


@settings(max_examples=100, deadline=None)
@given(
    payloads=st.lists(st.binary(min_size=1, max_size=30).filter(lambda p: b"\n" not in p)),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=6),
)
def test_slices_and_cuts_give_the_payloads_with_exact_counts(
    payloads: list[bytes], cuts: list[int]
) -> None:
    frames = packed(payloads)
    assert len(frames) == len(payloads) and frames.nbytes == sum(map(len, payloads))
    for k in cuts:  # several cuts of one object: each narrows the next one's search
        part, rest = frames[:k], frames[k:]
        assert list(part) == payloads[:k] and list(rest) == payloads[k:]
        assert len(part) == len(payloads[:k])
        if isinstance(part, Frames):
            assert part.nbytes == sum(map(len, payloads[:k]))
        if 0 < k < len(payloads):
            head, tail = frames.cut(k)
            assert (list(head), list(tail)) == (payloads[:k], payloads[k:])
    assert list(frames) == payloads and list(frames[-1:]) == payloads[-1:]


def test_a_batch_of_pieces_splits_only_when_payloads_are_asked_for() -> None:
    frames = packed([b"a", b"bb", b"ccc"])
    batch = Batch.of_pieces([b"x", frames], 4, [(ORIGIN, 4)])
    assert len(batch) == 4 and batch.nbytes == 7
    assert frames._split is None  # counted and weighed without a split
    assert batch.pieces == [b"x", frames]
    assert batch.payloads == [b"x", b"a", b"bb", b"ccc"]
    assert [m.payload for m in batch] == batch.payloads and batch[2].origin is ORIGIN
    assert len(batch) == 4 and batch.pieces == batch.payloads


def test_cuts_through_a_decoded_chunk_use_its_marks() -> None:
    # A chunk much longer than MARK_STEP, frames of uneven lengths: every cut, from the whole
    # or from a piece already cut, is where the split says.
    assert _newline.MARK_STEP == MARK_STEP  # the decoder's marks are the ones Frames reads
    rng = random.Random(7)
    payloads = [b"x" * rng.randint(1, 90) for _ in range(3000)]
    data = b"".join(p + b"\n" for p in payloads)
    decoder = NewlineDecoder(max_frame_size=len(data) + 1)
    chunk, end, count = decoder.feed_packed(data)
    assert count == len(payloads) and len(decoder.marks) > 10
    frames = Frames(chunk, count, 0, end, marks=decoder.marks)
    for _ in range(200):
        k = rng.randrange(1, count)
        head, tail = frames.cut(k)
        assert list(head) == payloads[:k] and len(tail) == count - k
        j = rng.randrange(1, count - k) if count - k > 1 else 0
        if j:
            middle, _ = tail.cut(j)
            assert list(middle) == payloads[k : k + j]
            assert middle.nbytes == sum(map(len, payloads[k : k + j]))
