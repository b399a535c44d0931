"""The atheris codec fuzz target (tests/fuzz/fuzz_codecs.py), run for a few Hypothesis examples."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st


@settings(max_examples=400, deadline=None, database=None)
@given(data=st.binary(max_size=2048))
def test_the_codec_fuzz_target_holds(data: bytes) -> None:
    _check_codecs(data)


def test_the_codec_fuzz_target_catches_a_broken_decoder(monkeypatch: Any) -> None:
    """The target is not vacuous: a decoder that forgets a frame split across reads fails it."""
    from trio_gateway import codecs

    real = codecs.LengthPrefixDecoder.feed

    def forgetful(self: Any, data: Any) -> list[bytes]:
        self._pending.clear()
        self._size = -1
        return real(self, data)

    monkeypatch.setattr(codecs.LengthPrefixDecoder, "feed", forgetful)
    stream = b"\x00\x00\x00\x03abc" * 3
    # length codec (1), limit 1 + 8 = 9, two cuts (at 60/256 and 170/256 of the stream)
    data = bytes([1, 1, 2, 60, 170]) + stream
    try:
        _check_codecs(data)
    except AssertionError:
        return
    raise AssertionError("the fuzz target accepted a decoder that loses split frames")


def _load_fuzz_target() -> Callable[[bytes], None]:
    path = Path(__file__).parents[1] / "fuzz" / "fuzz_codecs.py"
    spec = importlib.util.spec_from_file_location("fuzz_codecs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    check: Callable[[bytes], None] = module.check
    return check


_check_codecs = _load_fuzz_target()
