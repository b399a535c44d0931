"""Destinations. Every sink takes whole batches; the gateway's pump retries failed ones."""

from ._base import Sink as Sink
from ._http import HttpSink as HttpSink
from ._jsonl import decode_jsonl_record as decode_jsonl_record
from ._jsonl import encode_jsonl as encode_jsonl
from ._nats import NatsSink as NatsSink
from ._postgres import PostgresSink as PostgresSink
from ._simple import FileSink as FileSink
from ._simple import NullSink as NullSink
from ._simple import StdoutSink as StdoutSink
from ._sqlite import SqliteSink as SqliteSink
from ._tcp import TcpSink as TcpSink
from ._websocket import WebSocketSink as WebSocketSink
from ._wsbroadcast import WebSocketBroadcastSink as WebSocketBroadcastSink

__all__ = (
    "FileSink",
    "HttpSink",
    "NatsSink",
    "NullSink",
    "PostgresSink",
    "Sink",
    "SqliteSink",
    "StdoutSink",
    "TcpSink",
    "WebSocketBroadcastSink",
    "WebSocketSink",
    "decode_jsonl_record",
    "encode_jsonl",
)
