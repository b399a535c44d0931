"""Unary HTTP source: ``POST /ingest`` over HTTP/1.1, HTTP/2 (h2c and TLS/ALPN).

The request rules (path, method, token, size limit, NDJSON batches, what each refusal looks
like) live in :class:`IngestRules` (:mod:`._rules`), which knows nothing about the wire.
Three front ends apply them:

* an HTTP/2 path (:mod:`._h2`) on the project's sans-IO HTTP/2 layer (``sources/_http2.py``,
  the gRPC server's too) on the Trio stream (prior knowledge on cleartext, or ALPN ``h2`` on
  TLS), with deadlines, bounded bodies and a rapid-reset limit;
* a lean HTTP/1.1 path (:mod:`._h11`) that parses with llhttp directly on the Trio stream, taken by
  HTTP/1.1 (cleartext or TLS) by default;
* :class:`IngestApp` (:mod:`._asgi`), a plain ASGI application served by hypercorn's Trio
  support for HTTP/1.1 when ``fast_path=False``. It is also usable on its own under any ASGI
  server.

:class:`HttpSource` (:mod:`._source`) owns the listener and routes each connection.
"""

from ._asgi import IngestApp as IngestApp
from ._rules import BodyKind as BodyKind
from ._rules import IngestRules as IngestRules
from ._rules import Reply as Reply
from ._source import HttpSource as HttpSource

__all__ = ("BodyKind", "HttpSource", "IngestApp", "IngestRules", "Reply")
