"""``send`` without a network: its payloads, summary line, and refusal of bad options and flags."""

from __future__ import annotations

import json

import pytest

from trio_gateway._cli import main
from trio_gateway._errors import ConfigurationError
from trio_gateway.loadgen import (
    SendSummary,
    make_payload,
    send_http,
    send_websocket,
)
from trio_gateway.loadgen._http import retry_after
from trio_gateway.loadgen._resend import backoff


def test_payloads_are_exact_size_and_valid_json() -> None:
    for size in (0, 1, 5, 18, 19, 64, 4266):
        for seq in (0, 7, 123_456):
            payload = make_payload(size, seq)
            assert len(payload) == size
            assert b"\n" not in payload
            if size:
                json.loads(payload)


def test_summary_line_and_exit_rule() -> None:
    summary = SendSummary(10, 180, 0.5, accepted=7, rejected={"503": 2, "401": 1})
    assert summary.line() == (
        "sent 10 messages, 180 bytes in 0.500 s: 20 msg/s, 0.00 MB/s; "
        "accepted 7, rejected 3 (503: 2, 401: 1)"
    )
    assert not summary.all_accepted
    assert SendSummary(10, 180, 0.5, accepted=10).all_accepted
    assert SendSummary(10, 180, 0.5).line().endswith("MB/s")  # TCP/UDP: no answer to report
    assert SendSummary(10, 180, 0.5).all_accepted


def test_summary_line_says_what_retries_resent_and_gave_up() -> None:
    summary = SendSummary(
        100,
        1800,
        0.5,
        accepted=90,
        rejected={"connection lost": 10},
        resent=30,
        resent_after_loss=20,
        reconnects=2,
        given_up=10,
    )
    assert summary.line().endswith(
        "accepted 90, rejected 10 (connection lost: 10); "
        "resent 30 (10 after a refusal, 20 after a lost connection); "
        "reconnected 2 times; gave up on 10"
    )
    once = SendSummary(5, 90, 0.5, accepted=5, resent=5, resent_after_loss=5, reconnects=1)
    assert once.all_accepted
    assert once.line().endswith("resent 5 (5 after a lost connection); reconnected 1 time")


def test_reconnect_backoff_doubles_to_five_seconds_with_jitter() -> None:
    for tries, ceiling in ((1, 0.1), (2, 0.2), (4, 0.8), (7, 5.0), (30, 5.0)):
        for _ in range(20):
            assert ceiling / 2 <= backoff(tries) <= ceiling


def test_retry_after_is_read_as_seconds_only() -> None:
    assert retry_after([(b"retry-after", b"3")]) == 3.0
    assert retry_after([(b"retry-after", b"Wed, 21 Oct 2015 07:28:00 GMT")]) is None
    assert retry_after([(b"content-length", b"3")]) is None


async def test_bad_urls_name_the_flag() -> None:
    with pytest.raises(ConfigurationError, match="--http"):
        await send_http("ftp://127.0.0.1/x", count=1, size=1)
    with pytest.raises(ConfigurationError, match="--ws"):
        await send_websocket("http://127.0.0.1/", count=1, size=1)
    with pytest.raises(ConfigurationError, match="--ca"):
        await send_http("http://127.0.0.1/", count=1, size=1, cafile="ca.pem")


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--tcp", "127.0.0.1:1", "--ndjson", "5"], "--ndjson"),
        (["--tcp", "127.0.0.1:1", "--retries", "3"], "--retries"),  # no acks: nothing to resend
        (["--http", "http://127.0.0.1:1/", "--retries", "-1"], "--retries"),
        (["--http", "http://127.0.0.1:1/", "--mode", "bidi"], "--mode"),
        (["--udp", "127.0.0.1:1", "--token", "x"], "--token"),
        (["--tcp", "127.0.0.1:1", "--concurrency", "2"], "--concurrency"),
        (["--http", "http://127.0.0.1:1/", "--concurrency", "0"], "--concurrency"),
        (["--http", "http://127.0.0.1:1/", "--tls"], "--tls"),
        (["--http", "gopher://127.0.0.1:1/"], "--http"),
        (["--ws", "127.0.0.1:1"], "--ws"),
        (["--grpc", "127.0.0.1"], "--grpc"),
        (["--http", "https://127.0.0.1:1/", "--ca", "/nonexistent/ca.pem"], "--ca"),
        (["--grpc", "127.0.0.1:1", "--token", "env:SEND_TEST_UNSET_VARIABLE"], "--token"),
        (["--http", "http://127.0.0.1:1/", "--timeout", "0"], "--timeout"),
        (["--ws", "ws://127.0.0.1:1/", "--ids", "run"], "--ids"),
        (["--http", "http://127.0.0.1:1/", "--ids", "two words"], "--ids"),
        (["--grpc", "127.0.0.1:1", "--ids", ""], "--ids"),
    ],
)
def test_cli_bad_flags_exit_2_naming_the_flag(
    args: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["send", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0], err
