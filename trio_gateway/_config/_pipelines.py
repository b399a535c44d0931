"""Building named pipelines: a :class:`GatewayConfig` with ``[pipelines.NAME]`` -> the
:class:`Pipelines` it describes.

Each pipeline is built from the same parts as a single gateway (``_build``'s sources, queue,
sinks, processors), plus what only pipelines have: routes between them (``pipeline:NAME``
sinks, checked for a target and for loops), a queue per sink when a pipeline fans out, and
errors keyed where the pipeline's TOML has the setting (``pipelines.logs.sinks[0].table``).
"""

from __future__ import annotations

from .._errors import ConfigurationError
from .._fanout import QueuedSink
from .._gateway import RetryPolicy
from .._pipelines import Pipeline, Pipelines
from .._routing import FromPipeline, ToPipeline, route_cycle
from ..sinks import Sink
from ._build import (
    admin_server,
    build_queue,
    build_sink,
    build_source,
    check_timings,
    dead_letter_sink,
    load_processor,
)
from ._schema import (
    DISK_QUEUE,
    PIPELINE_PREFIX,
    GatewayConfig,
    PipelineConfig,
    QueueConfig,
    SinkConfig,
)

__all__ = ("build_pipelines",)


def _rekeyed(key: str, exc: ConfigurationError) -> ConfigurationError:
    """An error of a pipeline's part (keyed ``sink.table``, ``queue.capacity``) keyed where
    the pipeline's TOML has it (``pipelines.logs.sinks[0].table``)."""
    rest = exc.key.partition(".")[2]
    return ConfigurationError(f"{key}.{rest}" if rest else key, exc.message)


def _check_routes(config: GatewayConfig) -> dict[str, list[str]]:
    """``{pipeline: the pipelines it routes to}``; a route to no pipeline, or a loop, is an
    error naming the sink's ``url`` that makes it."""
    specs = {spec.name: spec for spec in config.pipelines}
    routes: dict[str, list[str]] = {}
    for spec in config.pipelines:
        routes[spec.name] = []
        for index, target in spec.targets():
            if target not in specs:
                raise ConfigurationError(
                    f"pipelines.{spec.name}.sinks[{index}].url", f"there is no pipeline {target!r}"
                )
            routes[spec.name].append(target)
    cycle = route_cycle(routes)
    if cycle is not None:
        sender, target = cycle[0], cycle[1]
        index = next(i for i, t in specs[sender].targets() if t == target)
        raise ConfigurationError(
            f"pipelines.{sender}.sinks[{index}].url", "routes in a loop: " + " -> ".join(cycle)
        )
    return routes


def _pipeline_sink(sink_config: SinkConfig, key: str) -> Sink:
    """A pipeline's sink: ``pipeline:NAME`` routes to another pipeline, any other URL is
    :func:`build_sink`'s (errors keyed ``key``)."""
    if sink_config.url.startswith(PIPELINE_PREFIX):
        for option in sink_config.options:
            raise ConfigurationError(f"{key}.{option}", "a pipeline: sink takes no options")
        return ToPipeline(sink_config.url.removeprefix(PIPELINE_PREFIX))
    try:
        return build_sink(sink_config)
    except ConfigurationError as exc:
        raise _rekeyed(key, exc) from exc


def _build_pipeline(config: GatewayConfig, spec: PipelineConfig, senders: list[str]) -> Pipeline:
    key = f"pipelines.{spec.name}"
    sinks: list[Sink | QueuedSink] = []
    sinks_and_queues = zip(spec.sinks, spec.sink_queues, spec.sink_routes, strict=True)
    for index, (sink_config, queue, routes) in enumerate(sinks_and_queues):
        sink_key = f"{key}.sinks[{index}]"
        if sink_config.retry_max_attempts < 0:
            raise ConfigurationError(f"{sink_key}.retry_max_attempts", "must be 0 or more")
        sink = _pipeline_sink(sink_config, sink_key)
        retry = RetryPolicy(max_attempts=sink_config.retry_max_attempts or None)
        if (
            len(spec.sinks) == 1
            and queue is None
            and spec.route is None
            and sink_config.dead_letter is None
        ):
            sinks.append(sink)
            continue
        try:
            dead_letter = dead_letter_sink(sink_config.dead_letter)
        except ConfigurationError as exc:
            raise _rekeyed(sink_key, exc) from exc
        branch = queue or QueueConfig()
        if branch.kind != "ring" or branch.max_bytes is not None:
            raise ConfigurationError(
                f"{sink_key}.queue", "a sink's queue takes capacity (messages) and policy only"
            )
        try:
            sinks.append(
                QueuedSink(
                    sink,
                    capacity=branch.capacity,
                    policy=branch.policy,
                    retry=retry,
                    routes=routes,
                    dead_letter=dead_letter,
                )
            )
        except ConfigurationError as exc:
            raise _rekeyed(f"{sink_key}.queue", exc) from exc
    try:
        pipeline_queue = build_queue(spec.queue)
    except ConfigurationError as exc:
        raise _rekeyed(f"{key}.queue", exc) from exc
    first = spec.sinks[0]
    sources = [build_source(s) for s in spec.sources]
    return Pipeline(
        spec.name,
        # Each pipeline that routes here feeds this one through a source of its own.
        sources=[*sources, *(FromPipeline(s) for s in senders)],
        ack={source: s.ack for source, s in zip(sources, spec.sources, strict=True)},
        sinks=sinks,
        queue=pipeline_queue,
        processors=[load_processor(p) for p in spec.processors],
        batch_size=config.batch_size,
        drain_timeout=config.drain_timeout,
        grace_period=config.grace_period,
        retry=RetryPolicy(max_attempts=first.retry_max_attempts or None),
        sink_wait=max(s.wait for s in spec.sinks),
        route=spec.route,
    )


def build_pipelines(config: GatewayConfig, *, handle_signals: bool = False) -> Pipelines:
    """The named pipelines of a config (``[pipelines.NAME]``), one admin endpoint for all."""
    check_timings(config)
    if not config.pipelines:
        raise ConfigurationError("pipelines", "no pipeline configured")
    if config.workers > 1:
        for spec in config.pipelines:
            if spec.queue.kind == DISK_QUEUE:
                raise ConfigurationError(
                    f"pipelines.{spec.name}.queue.kind", "the disk queue serves one process"
                )
    routes = _check_routes(config)
    return Pipelines(
        [
            _build_pipeline(
                config, spec, [sender for sender, to in routes.items() if spec.name in to]
            )
            for spec in config.pipelines
        ],
        admin=admin_server(config),
        handle_signals=handle_signals,
    )
