"""The logger the ``websockets`` protocol layer writes to, with bearer tokens redacted.

websockets logs every handshake and close at INFO, and at debug level every handshake header
and the request path: its records go to ``trio_gateway.sources.websocket.protocol`` (below our
own lines), through :class:`RedactSecrets`.
"""

from __future__ import annotations

import logging
import re

__all__ = ("RedactSecrets", "protocol_log")


class RedactSecrets(logging.Filter):
    """At debug level websockets logs every handshake header and the request path: hide the
    bearer token (``Authorization`` header, ``?token=`` query) before anything is written."""

    _SECRETS = re.compile(r"(?i)(authorization:\s*).*|([?&]token=)[^&\s]*")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self._SECRETS.sub(lambda m: (m[1] or m[2]) + "[redacted]", message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


protocol_log = logging.getLogger("trio_gateway.sources.websocket.protocol")
protocol_log.addFilter(RedactSecrets())
