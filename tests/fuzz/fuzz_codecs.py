"""Coverage-guided fuzzing of the sans-IO codecs, for a bounded time.

With atheris (libFuzzer under Python; ``pip install atheris``, wheels for CPython 3.11)::

    python tests/fuzz/fuzz_codecs.py -max_total_time=60
    python tests/fuzz/fuzz_codecs.py -max_total_time=60 -jobs=2 corpus/   # keep a corpus

Without it (or with ``--hypothesis``) the same check runs under Hypothesis'
``fuzz_one_input`` on random buffers for the same time::

    python tests/fuzz/fuzz_codecs.py --hypothesis -max_total_time=60

Not collected by pytest (the file name does not start with ``test_``); the suite runs the same
``check`` for a few hundred Hypothesis examples (tests/unit/test_codec_fuzz_target.py), so
this harness cannot rot. A failure prints the input; atheris also writes it as ``crash-<sha1>``.

One input drives one decoder: its first bytes pick the codec, its size limit and where the
stream is split into reads; the rest is the stream. The properties, for every input:

1. nothing but :class:`~trio_gateway.ProtocolError` (or its :class:`FrameTooLarge`) escapes;
2. how the stream is split into reads changes nothing: the same frames, then the same error
   (or the same end-of-stream result); except that a :class:`ProtocolError` (unlike
   :class:`FrameTooLarge`, which carries them) discards the frames completed by the feed that
   raised it, so there the frames of the whole stream need only be a prefix;
3. no frame is larger than the limit, and the decoder never holds more than the limit plus
   one header;
4. the frames re-encoded decode to themselves.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run from a checkout without installing: import the tree's package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

HEADER = {0: 0, 1: 4, 2: 5}
"""Per codec kind (newline, length prefix, gRPC): the bytes of a frame header."""

_codecs: Any = None
_errors: Any = None


def _load() -> None:
    """Import the code under test (inside atheris' instrumentation when there is one)."""
    global _codecs, _errors
    import trio_gateway._errors as errors
    import trio_gateway.codecs as codecs

    _codecs, _errors = codecs, errors


def _decode(make: Callable[[], Any], chunks: list[bytes]) -> tuple[list[Any], str, list[Any]]:
    """Feed ``chunks`` to a new decoder, then close it.

    Returns (every frame before any error, the error's class name or "", what close gave).
    Checks the holding bound after every feed.
    """
    decoder = make()
    frames: list[Any] = []
    limit = decoder.max_message_size if hasattr(decoder, "max_message_size") else None
    if limit is None:
        limit = decoder.max_frame_size
    header = 5 if isinstance(decoder, _codecs.GrpcMessageDecoder) else 4
    try:
        for chunk in chunks:
            frames += decoder.feed(chunk)
            # a newline decoder holds at most the limit; a prefix decoder one header more
            assert decoder.buffered <= limit + header, (decoder.buffered, limit)
        tail = decoder.close()
    except _errors.FrameTooLarge as exc:
        return frames + list(exc.frames), "FrameTooLarge", []
    except _errors.ProtocolError:
        return frames, "ProtocolError", []
    return frames, "", tail


def check(data: bytes) -> None:
    """The fuzz target: raises AssertionError (or anything unexpected) on a bug."""
    if _codecs is None:
        _load()
    if len(data) < 3:
        return
    kind = data[0] % 3
    limit = 1 + data[1] * 8  # 1 to 2041 bytes: small enough to reach every limit path
    cuts = data[2] % 16
    stream = data[3 + cuts :]
    points = sorted({b * len(stream) // 256 for b in data[3 : 3 + cuts]})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    codecs = _codecs
    make: Callable[[], Any]
    if kind == 0:
        make = lambda: codecs.NewlineDecoder(limit)  # noqa: E731
    elif kind == 1:
        make = lambda: codecs.LengthPrefixDecoder(limit)  # noqa: E731
    else:
        make = lambda: codecs.GrpcMessageDecoder(limit)  # noqa: E731

    whole = _decode(make, [stream])
    split = _decode(make, chunks)
    if whole[1] == "ProtocolError" and split[1] == "ProtocolError":
        # A ProtocolError (unlike FrameTooLarge) discards the frames completed by the feed
        # that raised it, so a split stream may hand over more of them first.
        assert split[0][: len(whole[0])] == whole[0], f"split at {points}: {split} vs {whole}"
    else:
        assert split == whole, f"splitting at {points} changed the result: {split} != {whole}"
    frames, _, tail = whole
    out = frames + tail
    payloads = [f[1] if kind == 2 else f for f in out]
    assert all(len(p) <= limit for p in payloads), "a frame larger than the limit"
    if not out:
        return
    # Re-encoded, the frames decode to themselves.
    if kind == 0:
        assert all(p and b"\n" not in p for p in payloads)
        encoded = codecs.encode_newline(payloads)
    elif kind == 1:
        encoded = codecs.encode_length_prefixed(payloads)
    else:
        encoded = b"".join(codecs.encode_grpc_message(p, c) for c, p in out)
    again, again_error, again_tail = _decode(make, [encoded])
    assert (again + again_tail, again_error) == (out, ""), "frames do not round-trip"


def _max_total_time(argv: list[str]) -> float:
    for arg in argv:
        if arg.startswith("-max_total_time="):
            return float(arg.split("=", 1)[1])
    return 60.0


def _fuzz_with_hypothesis(seconds: float) -> int:
    """Random buffers through Hypothesis' fuzz_one_input (it shrinks nothing: it reports)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=4096))
    def target(data: bytes) -> None:
        check(data)

    _load()
    fuzz_one_input = target.hypothesis.fuzz_one_input  # type: ignore[attr-defined]
    deadline = time.monotonic() + seconds
    runs = 0
    while time.monotonic() < deadline:
        fuzz_one_input(os.urandom(1 + runs % 4096))
        runs += 1
    print(f"fuzz_codecs: {runs} inputs in {seconds:.0f} s under hypothesis, no failure")
    return 0


def main(argv: list[str]) -> int:
    if "--hypothesis" not in argv:
        try:
            import atheris
        except ImportError:
            print("fuzz_codecs: atheris is not installed; using hypothesis", file=sys.stderr)
        else:
            with atheris.instrument_imports():
                _load()
            atheris.Setup(argv, check)
            atheris.Fuzz()
            return 0
    return _fuzz_with_hypothesis(_max_total_time(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
