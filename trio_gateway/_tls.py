"""Server-side TLS: one function that turns certificate paths into an ``ssl.SSLContext``.

Shared by every source that speaks TLS (HTTP, WebSocket, TCP, gRPC). Errors name the
configuration key that points at the bad file, so the command line can say what to fix.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Sequence

from ._errors import ConfigurationError

__all__ = ("resolve_server_tls", "server_ssl_context")


def _check_readable(key: str, path: str | os.PathLike[str]) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigurationError(key, f"cannot read {os.fspath(path)!r}: {exc.strerror}") from exc


def server_ssl_context(
    certfile: str | os.PathLike[str],
    keyfile: str | os.PathLike[str] | None = None,
    *,
    alpn: Sequence[str] | None = ("h2", "http/1.1"),
    client_ca: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """Build a server ``SSLContext`` (TLS 1.2 or newer) from PEM files.

    ``keyfile`` may be omitted when ``certfile`` holds the key too. ``alpn`` lists the
    application protocols offered in preference order (``None`` or empty: no ALPN).
    ``client_ca`` turns on mutual TLS: clients must present a certificate signed by it.

    Raises :class:`ConfigurationError` naming ``tls.certfile``, ``tls.keyfile`` or
    ``tls.client_ca`` when that file is missing, unreadable, or not valid PEM.
    """
    _check_readable("tls.certfile", certfile)
    if keyfile is not None:
        _check_readable("tls.keyfile", keyfile)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as exc:
        key = "tls.keyfile" if keyfile is not None and "KEY" in str(exc).upper() else "tls.certfile"
        raise ConfigurationError(key, f"cannot load the certificate chain: {exc}") from exc
    if client_ca is not None:
        _check_readable("tls.client_ca", client_ca)
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            raise ConfigurationError("tls.client_ca", f"not a valid CA bundle: {exc}") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def resolve_server_tls(
    transport: str,
    ssl_context: ssl.SSLContext | None,
    certfile: str | os.PathLike[str] | None,
    keyfile: str | os.PathLike[str] | None,
    client_ca: str | os.PathLike[str] | None,
    *,
    alpn: Sequence[str] | None,
) -> ssl.SSLContext | None:
    """What every TLS-capable source does with its TLS options.

    Either a ready ``ssl_context`` or ``certfile`` (+ ``keyfile``, + ``client_ca`` for mutual
    TLS), never both; errors name ``<transport>.certfile``.
    """
    if ssl_context is not None and certfile is not None:
        raise ConfigurationError(f"{transport}.certfile", "give ssl_context or certfile, not both")
    if certfile is None:
        if keyfile is not None or client_ca is not None:
            raise ConfigurationError(f"{transport}.certfile", "keyfile/client_ca need a certfile")
        return ssl_context
    return server_ssl_context(certfile, keyfile, alpn=alpn, client_ca=client_ca)
