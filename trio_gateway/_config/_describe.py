"""A configuration as ``check-config`` prints it: one line per part, secrets redacted."""

from __future__ import annotations

from .._secrets import redact_option, redact_url
from ._schema import GatewayConfig

__all__ = ("describe",)


def _options(options: object) -> str:
    assert isinstance(options, dict)
    return "".join(f", {k}={redact_option(k, v)!r}" for k, v in options.items())


def _size(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and not n % size:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def describe(config: GatewayConfig) -> str:
    """What ``config`` resolves to: queue, sink, timings, admin endpoint, sources."""
    queue = config.queue
    sink = config.sink
    lines = [
        f"queue: {queue.kind}, capacity {queue.capacity}, policy {queue.policy}"
        + (f", max {queue.max_bytes} bytes" if queue.max_bytes else "")
        + (f", dir {queue.dir}, fsync {queue.fsync}" if queue.kind == "disk" else ""),
        f"sink: {redact_url(sink.url)}"
        + (f", wait {sink.wait:g} s" if sink.wait else "")
        + (f", retry_max_attempts={sink.retry_max_attempts}" if sink.retry_max_attempts else "")
        + (f", dead letter {redact_url(sink.dead_letter)}" if sink.dead_letter else "")
        + _options(dict(sink.options)),
        f"drain timeout {config.drain_timeout} s, grace period {config.grace_period} s, "
        f"batch size {config.batch_size}",
        f"memory budget {_size(config.max_memory)}, the queue's share "
        f"{_size(queue.max_bytes or config.max_memory // 2)}",
    ]
    if config.processor:
        lines.append(f"processor: {config.processor}")
    if config.workers > 1:
        lines.append(f"workers: {config.workers}")
    if config.admin is None:
        lines.append("admin: off (no [admin] listen)")
    elif config.admin == "off":
        lines.append("admin: off")
    else:
        lines.append(f"admin: http://{config.admin}/metrics, /healthz, /readyz")
    for source in config.sources:
        lines.append(
            f"source: {source.transport} on {source.host}:{source.port}"
            + (f", ack={source.ack}" if source.ack != "queued" else "")
            + _options(dict(source.options))
        )
    return "\n".join(lines)
