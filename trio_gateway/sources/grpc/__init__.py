"""gRPC ingest on Trio: an h2-based server running grpclib-generated service handlers."""

from ._calls import StreamReset as StreamReset
from ._limits import DEFAULT_MAX_MESSAGE_SIZE as DEFAULT_MAX_MESSAGE_SIZE
from ._limits import ServerLimits as ServerLimits
from ._server import GrpcServer as GrpcServer
from ._services import GatewayService as GatewayService
from ._services import HealthService as HealthService
from ._services import StreamingInputterService as StreamingInputterService
from ._services import UnaryInputterService as UnaryInputterService
from ._source import GrpcSource as GrpcSource
from ._stream import GrpcStream as GrpcStream

__all__ = (
    "DEFAULT_MAX_MESSAGE_SIZE",
    "GatewayService",
    "GrpcServer",
    "GrpcSource",
    "GrpcStream",
    "HealthService",
    "ServerLimits",
    "StreamReset",
    "StreamingInputterService",
    "UnaryInputterService",
)
