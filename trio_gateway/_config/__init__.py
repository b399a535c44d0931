"""Configuration: a TOML file and command-line flags -> one frozen :class:`GatewayConfig`.

Every error is a :class:`ConfigurationError` whose ``key`` names the setting to fix
(``queue.capacity``, ``sources[1].port``, ``--tcp``), so the CLI can print one line.

* :mod:`._schema`: the dataclasses, the embedded defaults and the value parsers (no Trio);
* :mod:`._toml`: a TOML file -> config; :mod:`._flags`: ``serve``'s flags on top of it;
* :mod:`._build`: config -> the sources, queue, sink and :class:`Gateway` (loaded on first use,
  so the command line starts without importing the servers); :mod:`._pipelines`: config ->
  named :class:`Pipelines`, from the same parts;
* :mod:`._describe`: a config as ``check-config`` prints it, secrets redacted.

The TOML layout (every key optional; see docs/reference.md)::

    [gateway]
    drain_timeout = 10.0      # seconds to flush the queue into the sink at shutdown
    grace_period = 2.0        # seconds open connections get to finish at shutdown
    batch_size = 1024         # messages per sink batch
    processor = "mypkg.filters:drop_debug"
    workers = 1               # processes sharing the ports with SO_REUSEPORT (docs/workers.md)

    [limits]
    max_memory = "256MiB"     # the memory budget (bytes, or KiB/MiB/GiB); the queue gets half

    [queue]
    kind = "ring"             # ring | locked_ring | channel | locked_list
    capacity = 10000
    policy = "block"          # block | drop_newest | drop_oldest (drop-oldest works too)
    max_bytes = 67108864      # optional bound in payload bytes

    [sink]
    url = "stdout"            # stdout | null | file:PATH | tcp:HOST:PORT | http(s)://... | nats://...
                              # | sqlite:PATH | postgresql://...
    retry_max_attempts = 0    # 0 = retry until shutdown
    wait = 0                  # seconds to wait at start for the destination (0: fail at once)
    token = "env:NAME"        # any other key is an option of that sink (docs/sinks.md)

    [admin]
    listen = "127.0.0.1:9100" # /metrics, /healthz, /readyz; "off" to turn it off

    [[sources]]
    transport = "tcp"         # tcp | udp | http | websocket | grpc
    listen = "127.0.0.1:7000"
    framing = "newline"       # any other key is passed to the source (max_connections, ...)
    # certfile / keyfile / client_ca: TLS; token = "env:NAME" reads a secret from the environment

Or named pipelines instead of the top-level sources, queue, sink and processor
(docs/pipelines.md)::

    [pipelines.logs]
    processors = ["mypkg.logs:parse", "mypkg.logs:enrich"]
    queue = { capacity = 10000 }
    [[pipelines.logs.sources]]
    transport = "tcp"
    listen = "127.0.0.1:7000"
    [[pipelines.logs.sinks]]  # several: a fan-out, each sink with its own queue
    url = "sqlite:logs.db"
    queue = { capacity = 20000, policy = "drop_oldest" }
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._schema import DEFAULT_ADMIN as DEFAULT_ADMIN
from ._schema import DEFAULT_TCP as DEFAULT_TCP
from ._schema import DEFAULT_UDP as DEFAULT_UDP
from ._schema import GatewayConfig as GatewayConfig
from ._schema import PipelineConfig as PipelineConfig
from ._schema import QueueConfig as QueueConfig
from ._schema import SinkConfig as SinkConfig
from ._schema import SourceConfig as SourceConfig
from ._schema import normalize_policy as normalize_policy
from ._schema import parse_hostport as parse_hostport
from ._schema import sink_kind as sink_kind
from ._schema import source_from_flag as source_from_flag
from ._toml import config_from_mapping as config_from_mapping
from ._toml import load_config as load_config

if TYPE_CHECKING:
    from ._build import SINK_KINDS as SINK_KINDS
    from ._build import SOURCE_KINDS as SOURCE_KINDS
    from ._build import build_gateway as build_gateway
    from ._build import build_queue as build_queue
    from ._build import build_sink as build_sink
    from ._build import build_source as build_source
    from ._build import checked_options as checked_options
    from ._build import load_processor as load_processor
    from ._pipelines import build_pipelines as build_pipelines

__all__ = (
    "DEFAULT_ADMIN",
    "DEFAULT_TCP",
    "DEFAULT_UDP",
    "SINK_KINDS",
    "SOURCE_KINDS",
    "GatewayConfig",
    "PipelineConfig",
    "QueueConfig",
    "SinkConfig",
    "SourceConfig",
    "build_gateway",
    "build_pipelines",
    "build_queue",
    "build_sink",
    "build_source",
    "checked_options",
    "config_from_mapping",
    "load_config",
    "load_processor",
    "normalize_policy",
    "parse_hostport",
    "sink_kind",
    "source_from_flag",
)


_BUILDERS = {"build_pipelines": "._pipelines"}
"""Where each builder lives, if not in ``._build``."""


def __getattr__(name: str) -> Any:
    # The builders (the names imported under TYPE_CHECKING above) import every source and
    # sink (hypercorn, h2, ...): loaded on first use.
    if name.startswith("_") or name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_BUILDERS.get(name, "._build"), __name__), name)
