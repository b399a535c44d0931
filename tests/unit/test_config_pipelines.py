"""``[pipelines.NAME]`` in a TOML config: read, checked (every error naming its key), built."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest
from helpers import ROUTED_PIPELINES

from trio_gateway import ConfigurationError
from trio_gateway._config import build_pipelines, config_from_mapping
from trio_gateway._fanout import FanOutSink
from trio_gateway.sinks import NullSink, SqliteSink

BASE = """
[pipelines.logs]
processors = ["json:loads"]
queue = { capacity = 500, policy = "drop_newest" }
[[pipelines.logs.sources]]
transport = "tcp"
[[pipelines.logs.sinks]]
url = "null"
[[pipelines.logs.sinks]]
url = "sqlite:logs.db"
table = "logs"
queue = { capacity = 4096, policy = "drop_oldest" }
"""


def config(extra: str = "", base: str = BASE) -> Any:
    return config_from_mapping(tomllib.loads(base + extra))


def test_a_pipeline_is_read_and_built_with_a_fanout() -> None:
    read = config()
    (pipeline,) = read.pipelines
    assert pipeline.processors == ("json:loads",) and pipeline.queue.capacity == 500
    assert [s.url for s in pipeline.sinks] == ["null", "sqlite:logs.db"]
    assert pipeline.sink_queues[0] is None and pipeline.sink_queues[1] is not None
    built = build_pipelines(read)["logs"]
    assert isinstance(built.fanout, FanOutSink)
    assert isinstance(built.sinks[0], NullSink) and isinstance(built.sinks[1], SqliteSink)
    branch = built.fanout.branches[1]
    assert (branch.queue.capacity, branch.queue.policy) == (4096, "drop_oldest")
    assert built.gateway.queue.policy == "drop_newest" and built.gateway.processor is not None
    assert read.with_default_sources() is read  # no default listeners beside pipelines


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[sink]\nurl = 'null'\n", "sink"),
        ("[gateway]\nprocessor = 'json:loads'\n", "gateway.processor"),
        ("[pipelines.other]\nsinks = [{url = 'null'}]\n", "pipelines.other.sources"),
        ("[pipelines.other]\nsauces = 1\n", "pipelines.other.sauces"),
        (
            "[pipelines.bad]\nprocessors = 'x:y'\nsources = [{transport = 'tcp'}]\n"
            "sinks = [{url = 'null'}]\n",
            "pipelines.bad.processors",
        ),
    ],
)
def test_errors_name_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        config(text)
    assert caught.value.key == key


def test_build_errors_are_keyed_where_the_pipeline_has_them() -> None:
    bad_option = BASE.replace('table = "logs"', 'tabel = "logs"')
    with pytest.raises(ConfigurationError) as caught:
        build_pipelines(config(base=bad_option))
    assert caught.value.key == "pipelines.logs.sinks[1].tabel"
    small = BASE.replace("capacity = 4096", "capacity = 10")
    with pytest.raises(ConfigurationError, match="smaller than a batch"):
        build_pipelines(config(base=small))


def test_routes_are_read_built_and_drawn() -> None:
    routed = BASE.replace(
        'processors = ["json:loads"]', 'processors = ["json:loads"]\nroute = "level"'
    )
    routed = routed.replace('table = "logs"', 'table = "logs"\nroutes = ["error", "critical"]')
    read = config(base=routed)
    (pipeline,) = read.pipelines
    assert pipeline.route == "level" and pipeline.sink_routes == (None, ("error", "critical"))
    built = build_pipelines(read)["logs"]
    assert built.fanout is not None and built.fanout.route == "level"
    assert built.fanout.branches[1].routes == frozenset({"error", "critical"})
    from trio_gateway._config._describe import describe, mermaid

    assert "[routes: error, critical]" in describe(read)
    assert "-- level = error or critical -->" in mermaid(read)
    with pytest.raises(ConfigurationError) as caught:
        config(base=BASE.replace('table = "logs"', 'table = "logs"\nroutes = ["x"]'))
    assert caught.value.key == "pipelines.logs.route"


def test_a_pipeline_sink_takes_its_own_dead_letter() -> None:
    one = BASE.replace(
        'url = "null"\n[[pipelines.logs.sinks]]\nurl = "sqlite:logs.db"\ntable = "logs"\n'
        'queue = { capacity = 4096, policy = "drop_oldest" }\n',
        'url = "null"\ndead_letter = "refused.jsonl"\n',
    )
    read = config(base=one)
    assert read.pipelines[0].sinks[0].dead_letter == "refused.jsonl"
    built = build_pipelines(read)["logs"]
    # One sink with a dead letter: a branch of its own, which sets refusals aside.
    assert built.fanout is not None
    (branch,) = built.fanout.branches
    assert branch.dead_letter is not None and branch.dead_letter.name == "file:refused.jsonl"
    from trio_gateway._config._describe import describe

    assert "-> sink: null, dead letter refused.jsonl" in describe(read)
    with pytest.raises(ConfigurationError) as caught:
        build_pipelines(config(base=one.replace('"refused.jsonl"', '"ftp://x"')))
    assert caught.value.key == "pipelines.logs.sinks[0].dead_letter"


ROUTED = ROUTED_PIPELINES.format(all="all.jsonl", alerts="alerts.jsonl")


def test_a_route_to_another_pipeline_is_read_built_and_drawn() -> None:
    from trio_gateway import FromPipeline, ToPipeline
    from trio_gateway._config._describe import describe, mermaid

    read = config(base=ROUTED)
    built = build_pipelines(read)
    assert built.routes == {"logs": ["alerts"], "alerts": []}
    (inbox,) = built["alerts"].gateway.sources  # no source of its own: the route feeds it
    assert isinstance(inbox, FromPipeline) and inbox.label == "pipeline:logs"
    route = built["logs"].sinks[1]
    assert isinstance(route, ToPipeline) and route.source is inbox
    text = describe(read)
    sink = "-> sink: pipeline:alerts [queue: ring, capacity 10000, policy block] [routes: error]"
    assert sink in text
    assert "pipeline alerts:\n  source: routed from pipeline logs\n" in text
    assert "  p0k1 -- routed --> p1q\n" in mermaid(read)


LOOP = '[pipelines.alerts]\n[[pipelines.alerts.sinks]]\nurl = "pipeline:logs"\n'
ALARMS = '[pipelines.alerts]\nsources = [{transport = "udp"}]\n'
TO_ALERTS = 'url = "pipeline:alerts"'


@pytest.mark.parametrize(
    ("change", "key", "message"),
    [
        # the first sink of the loop, in the file's order
        (("[pipelines.alerts]\n", LOOP), "logs.sinks[1].url", "loop: logs -> alerts -> logs"),
        ((TO_ALERTS, 'url = "pipeline:alarms"'), "logs.sinks[1].url", "no pipeline 'alarms'"),
        ((TO_ALERTS, 'url = "pipeline:logs"'), "logs.sinks[1].url", "loop: logs -> logs"),
        (('routes = ["error"]', 'routes = ["x"]\ntimeout = 3'), "logs.sinks[1].timeout", "options"),
    ],
)
def test_a_bad_route_is_refused_naming_the_key(
    change: tuple[str, str], key: str, message: str
) -> None:
    text = ROUTED.replace(*change, 1)
    if change[0] == TO_ALERTS:  # alerts then needs a source of its own
        text = text.replace("[pipelines.alerts]\n", ALARMS)
    with pytest.raises(ConfigurationError, match=message) as caught:
        build_pipelines(config(base=text))
    assert caught.value.key == f"pipelines.{key}"


def test_a_pipeline_without_sources_needs_a_route_to_it() -> None:
    with pytest.raises(ConfigurationError) as caught:
        config(base=ROUTED.replace('url = "pipeline:alerts"', 'url = "stdout"'))
    assert caught.value.key == "pipelines.alerts.sources"
