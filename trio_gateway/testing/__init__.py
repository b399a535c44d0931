"""Test kit for trio_gateway, in the style of trio's own tests: fast, deterministic, virtual time.

* :class:`MemorySource`: a source the test feeds (``await source.send(b"...")``) through the
  same :class:`~trio_gateway.Ingress` as the network sources, so backpressure and counting are
  the real ones;
* :class:`RecordingSink`: keeps what it was given; told to :meth:`~RecordingSink.fail`,
  :meth:`~RecordingSink.stall` or :meth:`~RecordingSink.recover`;
* :func:`open_gateway` / :func:`start_gateway`: run a :class:`~trio_gateway.Gateway` in the test
  and get a :class:`GatewayHandle` (bound addresses, statistics, ledger, shutdown);
* :func:`serve_source`: run one source on its own into a queue (no gateway, no sink) and get a
  :class:`ServedSource` (bound addresses, URL, queued payloads, counters), to test a source;
* a pytest plugin (``trio_gateway.testing._plugin``, registered as the ``trio_gateway`` entry
  point) with the fixtures ``memory_source``, ``recording_sink`` and ``gateway_factory``.

Everything here works under pytest-trio's ``autojump_clock``: idle timeouts, drain deadlines and
sink backoff then take no real time. See ``docs/testing.md``.
"""

from ._harness import GatewayFactory as GatewayFactory
from ._harness import GatewayHandle as GatewayHandle
from ._harness import GatewayStatistics as GatewayStatistics
from ._harness import open_gateway as open_gateway
from ._harness import start_gateway as start_gateway
from ._serve import ServedSource as ServedSource
from ._serve import serve_source as serve_source
from ._sink import RecordingSink as RecordingSink
from ._source import MemorySource as MemorySource

__all__ = (
    "GatewayFactory",
    "GatewayHandle",
    "GatewayStatistics",
    "MemorySource",
    "RecordingSink",
    "ServedSource",
    "open_gateway",
    "serve_source",
    "start_gateway",
)
