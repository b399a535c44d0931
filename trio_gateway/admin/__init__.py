"""Observability: the admin HTTP endpoint, the Prometheus collector, ``top`` and progress.

``AdminServer`` is a gateway service (``Gateway(services=[AdminServer("127.0.0.1", 9100)])``);
``GatewayCollector`` / ``make_registry`` expose the same metrics to a program that already
serves its own registry. ``trio_gateway.admin.top`` is the live terminal view (imported lazily:
it needs rich).
"""

from .._histogram import DEFAULT_BATCH_BUCKETS as DEFAULT_BATCH_BUCKETS
from .._histogram import LatencyHistogram as LatencyHistogram
from ._collector import GatewayCollector as GatewayCollector
from ._collector import HistogramLike as HistogramLike
from ._collector import make_registry as make_registry
from ._server import DEFAULT_ADMIN as DEFAULT_ADMIN
from ._server import AdminServer as AdminServer

__all__ = (
    "DEFAULT_ADMIN",
    "DEFAULT_BATCH_BUCKETS",
    "AdminServer",
    "GatewayCollector",
    "HistogramLike",
    "LatencyHistogram",
    "make_registry",
)
