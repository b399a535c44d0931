"""A configuration as ``check-config`` prints it: one line per part, secrets redacted."""

from __future__ import annotations

from .._secrets import redact_option, redact_url
from ._schema import GatewayConfig, PipelineConfig, QueueConfig, SinkConfig, SourceConfig

__all__ = ("describe", "mermaid")


def _options(options: object) -> str:
    assert isinstance(options, dict)
    return "".join(f", {k}={redact_option(k, v)!r}" for k, v in options.items())


def _size(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and not n % size:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def _queue(queue: QueueConfig) -> str:
    return (
        f"{queue.kind}, capacity {queue.capacity}, policy {queue.policy}"
        + (f", max {queue.max_bytes} bytes" if queue.max_bytes else "")
        + (f", dir {queue.dir}, fsync {queue.fsync}" if queue.kind == "disk" else "")
    )


def _source(source: SourceConfig) -> str:
    if source.transport == "nats":  # a subscription: its URL, not a listen address
        return f"nats subscription {redact_url(str(source.options.get('url', '')))}"
    return f"{source.transport} on {source.host}:{source.port}"


def _source_options(source: SourceConfig) -> str:
    return _options({k: v for k, v in source.options.items() if k != "url"})


def _sink(sink: SinkConfig) -> str:
    return redact_url(sink.url)


def _senders(config: GatewayConfig, name: str) -> list[str]:
    """The pipelines that route to pipeline ``name``."""
    return [p.name for p in config.pipelines if any(t == name for _, t in p.targets())]


def _pipeline_graph(pipeline: PipelineConfig, senders: list[str]) -> list[str]:
    """One pipeline as an indented graph: sources, queue, processors, sinks."""
    lines = [f"pipeline {pipeline.name}:"]
    lines += [f"  source: {_source(s)}" + _source_options(s) for s in pipeline.sources]
    lines += [f"  source: routed from pipeline {sender}" for sender in senders]
    lines.append(f"    -> queue: {_queue(pipeline.queue)}")
    lines += [f"    -> processor: {name}" for name in pipeline.processors]
    fanout = (
        len(pipeline.sinks) > 1
        or any(q is not None for q in pipeline.sink_queues)
        or pipeline.route is not None
    )
    if fanout:
        routed = f", routed by {pipeline.route}" if pipeline.route else ""
        lines.append(
            f"    -> fan-out to {len(pipeline.sinks)} sinks, each with its own queue{routed}:"
        )
    for sink, queue, routes in zip(
        pipeline.sinks, pipeline.sink_queues, pipeline.sink_routes, strict=True
    ):
        own = f" [queue: {_queue(queue or QueueConfig())}]" if fanout else ""
        if routes is not None:
            own += f" [routes: {', '.join(routes)}]"
        lines.append(
            ("         -> sink: " if fanout else "    -> sink: ")
            + _sink(sink)
            + (f", wait {sink.wait:g} s" if sink.wait else "")
            + (f", dead letter {redact_url(sink.dead_letter)}" if sink.dead_letter else "")
            + _options(dict(sink.options))
            + own
        )
    return lines


def mermaid(config: GatewayConfig) -> str:
    """The pipelines of ``config`` as a Mermaid flowchart (``check-config --mermaid``): the
    picture of each pipeline in the docs is this output, not drawn by hand."""
    lines = ["flowchart LR"]
    names = [p.name for p in config.pipelines]
    between: list[str] = []  # routes from one pipeline's sink to another's queue
    for index, pipeline in enumerate(config.pipelines):
        p = f"p{index}"
        lines.append(f'  subgraph {p} ["pipeline {pipeline.name}"]')
        queue = pipeline.queue
        lines.append(f'    {p}q[("queue<br/>{queue.kind} {queue.capacity}, {queue.policy}")]')
        for k, source in enumerate(pipeline.sources):
            lines.append(f'    {p}s{k}["{_source(source)}"] --> {p}q')
        for k, target in pipeline.targets():
            between.append(f"  {p}k{k} -- routed --> p{names.index(target)}q")
        last = f"{p}q"
        for k, name in enumerate(pipeline.processors):
            lines.append(f'    {last} --> {p}f{k}["{name}"]')
            last = f"{p}f{k}"
        fanout = len(pipeline.sinks) > 1 or pipeline.route is not None
        sinks = zip(pipeline.sinks, pipeline.sink_queues, pipeline.sink_routes, strict=True)
        for k, (sink, own, routes) in enumerate(sinks):
            if fanout:
                branch = own or QueueConfig()
                edge = f" -- {pipeline.route} = {' or '.join(routes)} -->" if routes else " -->"
                lines.append(
                    f'    {last}{edge} {p}b{k}[("{branch.capacity}, {branch.policy}")] '
                    f'--> {p}k{k}["{_sink(sink)}"]'
                )
            else:
                lines.append(f'    {last} --> {p}k{k}["{_sink(sink)}"]')
        lines.append("  end")
    return "\n".join(lines + between) + "\n"


def describe(config: GatewayConfig) -> str:
    """What ``config`` resolves to: queue, sink, timings, admin endpoint, sources; with
    named pipelines, each one's graph."""
    if config.pipelines:
        lines = [
            f"drain timeout {config.drain_timeout} s, grace period {config.grace_period} s, "
            f"batch size {config.batch_size}",
            _admin(config),
        ]
        if config.workers > 1:
            lines.insert(1, f"workers: {config.workers} (each runs every pipeline)")
        for pipeline in config.pipelines:
            lines += _pipeline_graph(pipeline, _senders(config, pipeline.name))
        return "\n".join(lines)
    queue = config.queue
    sink = config.sink
    lines = [
        f"queue: {_queue(queue)}",
        f"sink: {_sink(sink)}"
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
    lines.append(_admin(config))
    for source in config.sources:
        lines.append(
            f"source: {_source(source)}"
            + (f", ack={source.ack}" if source.ack != "queued" else "")
            + _source_options(source)
        )
    return "\n".join(lines)


def _admin(config: GatewayConfig) -> str:
    if config.admin is None:
        return "admin: off (no [admin] listen)"
    if config.admin == "off":
        return "admin: off"
    return f"admin: http://{config.admin}/metrics, /healthz, /readyz"
