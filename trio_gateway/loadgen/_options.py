"""The run's knobs and their checks: plain values, importable without a network library (the
command line reads them to build ``send --help``)."""

from __future__ import annotations

import os

from .._errors import ConfigurationError
from .._wire import GRPC_METHODS, MAX_KEY_LENGTH, idempotency_key

__all__ = (
    "DEFAULT_TIMEOUT",
    "FIRST_ANSWER_TIMEOUT",
    "GRPC_MODES",
    "MAX_CONCURRENCY",
    "MAX_RETRY_WAIT",
    "TRANSPORTS",
    "answer_timeout",
    "check_common",
    "check_ids",
    "check_retries",
    "resolve_token",
)

TRANSPORTS = ("tcp", "udp", "http", "ws", "grpc")
"""The transports ``send`` speaks, as its flags name them."""
DEFAULT_TIMEOUT = 30.0
"""Seconds any one network step (connect, a write, an answer, the close) may take."""
FIRST_ANSWER_TIMEOUT = 5.0
"""Seconds the first answer on a new connection may take (at most ``step_timeout``). The
gateway's HTTP, WebSocket and gRPC listeners answer at once (HTTP within its ``queue_wait``),
so silence this long means the port speaks another protocol: a TCP listener reads a request
as lines and never answers."""
MAX_CONCURRENCY = 1024
"""The most connections one run opens."""
MAX_RETRY_WAIT = 30.0
"""Longest wait for a ``Retry-After`` before sending again (``send --retries``)."""
GRPC_MODES = tuple(GRPC_METHODS)


def answer_timeout(step_timeout: float, *, first: bool) -> float:
    """How long an answer on a new connection may take: at most :data:`FIRST_ANSWER_TIMEOUT`
    for the ``first`` of a run (silence then means another protocol on the port), the step
    timeout after it (a busy gateway may be slow to take a new connection)."""
    return min(step_timeout, FIRST_ANSWER_TIMEOUT) if first else step_timeout


def check_common(
    count: int, size: int, concurrency: int, step_timeout: float, rate: float | None
) -> None:
    """The checks every transport shares; each error names the ``send`` flag."""
    if count < 0:
        raise ConfigurationError("--count", "must not be negative")
    if size < 0:
        raise ConfigurationError("--size", "must not be negative")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ConfigurationError("--concurrency", f"must be 1-{MAX_CONCURRENCY}")
    if step_timeout <= 0:
        raise ConfigurationError("--timeout", "must be positive")
    if rate is not None and rate <= 0:
        raise ConfigurationError("--rate", "must be positive")


def check_ids(prefix: str | None) -> None:
    """``--ids PREFIX``: message ``n`` of the run gets the id ``PREFIX:n``, which must be a
    valid key (visible ASCII, at most :data:`MAX_KEY_LENGTH` characters with the number)."""
    if prefix is not None and (
        len(prefix) > MAX_KEY_LENGTH - 24 or idempotency_key(prefix) != prefix
    ):
        raise ConfigurationError(
            "--ids",
            f"must be 1 to {MAX_KEY_LENGTH - 24} visible ASCII characters (no quotes, no space)",
        )


def check_retries(retries: int) -> None:
    """``--retries N``: how many times in a row a message may be sent again (0: never)."""
    if retries < 0:
        raise ConfigurationError("--retries", "must not be negative")


def resolve_token(value: str | None, *, key: str = "--token") -> str | None:
    """``TOKEN`` as it is, or ``env:NAME`` read from the environment."""
    if value is None:
        return None
    if value.startswith("env:"):
        name = value.removeprefix("env:")
        if name not in os.environ:
            raise ConfigurationError(key, f"environment variable {name} is not set")
        value = os.environ[name]
    if not value:
        raise ConfigurationError(key, "must not be empty")
    if any(c in value for c in "\r\n\0"):
        raise ConfigurationError(key, "must not contain line breaks")
    return value
