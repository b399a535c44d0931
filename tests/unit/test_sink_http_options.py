"""The HTTP sink without a network: Retry-After, splitting bodies, and its options from config."""

from __future__ import annotations

import email.utils
from typing import Any

import pytest

from trio_gateway import (
    ConfigurationError,
)
from trio_gateway._config import SinkConfig, build_sink, config_from_mapping
from trio_gateway.sinks import HttpSink
from trio_gateway.sinks._http import parse_retry_after, split_body


def test_parse_retry_after() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-3") is None
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after(date, now=1_000_000) == 30.0
    assert parse_retry_after(date, now=2_000_000) == 0.0


def test_split_body_cuts_at_line_ends() -> None:
    body = b"".join(b"%04d\n" % i for i in range(10))  # 5-byte lines
    assert split_body(body, 1 << 20) == [body]
    chunks = split_body(body, 12)
    assert b"".join(chunks) == body and all(c.endswith(b"\n") for c in chunks)
    assert [len(c) for c in chunks] == [10] * 5
    long = b"x" * 40 + b"\n"
    assert split_body(b"a\n" + long + b"b\n", 8) == [b"a\n", long, b"b\n"]


@pytest.mark.parametrize(
    "url", ["ftp://host/x", "http:///x", "http://host:99999/x", "nats://host/x", "host/x"]
)
def test_bad_http_url_is_a_config_error_naming_sink(url: str) -> None:
    with pytest.raises(Exception) as caught:
        HttpSink(url)
    assert type(caught.value).__name__ == "ConfigurationError"
    assert str(caught.value).startswith("sink: ")


def test_config_builds_the_http_sink() -> None:
    sink = build_sink(SinkConfig(url="https://collector.example:8443/ingest"))
    assert isinstance(sink, HttpSink) and sink.name == "https://collector.example:8443/ingest"
    assert isinstance(build_sink(SinkConfig(url="http://127.0.0.1/x")), HttpSink)


@pytest.mark.parametrize(
    ("sink", "key", "message"),
    [
        ({"url": "http://127.0.0.1/x", "tokn": "a"}, "sink.tokn", "unknown option"),
        ({"url": "http://127.0.0.1/x", "timeout": "soon"}, "sink.timeout", "a number"),
        ({"url": "http://127.0.0.1/x", "verify": 3}, "sink.verify", "true or false or a string"),
        ({"url": "http://127.0.0.1/x", "token": "env:TG_TEST_UNSET"}, "sink.token", "not set"),
        ({"url": "null", "fsync": True}, "sink.fsync", "unknown option for the null sink"),
        ({"url": "tcp:127.0.0.1:9", "send_timeout": True}, "sink.send_timeout", "a number"),
    ],
)
def test_bad_sink_options_name_the_key(sink: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        build_sink(config_from_mapping({"sink": sink}).sink)
    assert caught.value.key == key
