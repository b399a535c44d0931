"""Sans-IO framing: bytes in, frames out. Nothing here imports trio or touches a socket.

=====================  ==================================  ===========================
framing                decoder                             encoder
=====================  ==================================  ===========================
newline (NDJSON)       :class:`NewlineDecoder`             :func:`encode_newline`
4-byte length prefix   :class:`LengthPrefixDecoder`        :func:`encode_length_prefixed`
gRPC 5-byte prefix     :class:`GrpcMessageDecoder`         :func:`encode_grpc_message`
=====================  ==================================  ===========================

:data:`FRAMINGS` names the stream framings a TCP listener can choose (``--tcp-framing``).
"""

from collections.abc import Mapping as _Mapping

from ._base import Decoder as Decoder
from ._base import DecoderFactory as DecoderFactory
from ._newline import NewlineDecoder as NewlineDecoder
from ._newline import encode_newline as encode_newline
from ._prefix import GrpcMessageDecoder as GrpcMessageDecoder
from ._prefix import LengthPrefixDecoder as LengthPrefixDecoder
from ._prefix import encode_grpc_message as encode_grpc_message
from ._prefix import encode_length_prefixed as encode_length_prefixed

FRAMINGS: _Mapping[str, DecoderFactory] = {
    "newline": NewlineDecoder,
    "length": LengthPrefixDecoder,
}
"""Stream framings by the name used in configuration; each value builds a decoder."""

__all__ = (
    "FRAMINGS",
    "Decoder",
    "DecoderFactory",
    "GrpcMessageDecoder",
    "LengthPrefixDecoder",
    "NewlineDecoder",
    "encode_grpc_message",
    "encode_length_prefixed",
    "encode_newline",
)
