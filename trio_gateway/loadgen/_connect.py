"""Connecting, and saying in one line why it failed.

The gateway's listeners differ in what a wrong client sees: a refused connection (the listener
is off), a TLS record where a plaintext answer was expected (or the other way round), an answer
in another protocol, or silence (a TCP listener reads anything as lines and never answers).
:class:`Peer` turns each into a :class:`~trio_gateway.TransportError` that names the likely
cause, so a user who picked the wrong port, scheme or flag learns which.
"""

from __future__ import annotations

import errno
import socket
import ssl
from dataclasses import dataclass

import trio

from .._errors import ConfigurationError, TransportError
from ._options import FIRST_ANSWER_TIMEOUT, answer_timeout

__all__ = ("Misdirected", "Peer", "client_ssl_context", "connect", "looks_like_tls")


class Misdirected(TransportError):
    """The peer is not what the run expects (another protocol, not a gRPC endpoint): the
    run's error whenever it shows, never a sign of the gateway going away."""


_LISTENERS = {"tcp": "TCP", "udp": "UDP", "http": "HTTP", "ws": "WebSocket", "grpc": "gRPC"}
_PROTOCOLS = {"tcp": "TCP", "udp": "UDP", "http": "HTTP", "ws": "WebSocket", "grpc": "HTTP/2"}
_USE_TLS = {"tcp": "--tls", "grpc": "--tls", "http": "an https:// URL", "ws": "a wss:// URL"}
_NO_TLS = {"tcp": "no --tls", "grpc": "no --tls", "http": "an http:// URL", "ws": "a ws:// URL"}


def client_ssl_context(
    cafile: str | None = None, *, alpn: list[str] | None = None, key: str = "--ca"
) -> ssl.SSLContext:
    """A verifying client context: the system's CAs, or only ``cafile`` (a private CA)."""
    context = ssl.create_default_context()
    if cafile is not None:
        try:
            context.load_verify_locations(cafile=cafile)
        except FileNotFoundError as exc:
            raise ConfigurationError(key, f"cannot read {cafile!r}: {exc.strerror}") from exc
        except (ssl.SSLError, OSError) as exc:
            raise ConfigurationError(key, f"not a valid CA bundle: {exc}") from exc
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def looks_like_tls(data: bytes) -> bool:
    """A TLS record's header (handshake or alert, TLS 1.x) where plaintext was expected."""
    return len(data) >= 2 and data[0] in (0x15, 0x16) and data[1] == 0x03


def _refused(exc: OSError) -> bool:
    """ECONNREFUSED, also inside trio's "all attempts to connect failed" (its cause)."""
    if exc.errno == errno.ECONNREFUSED:
        return True
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        leaves = cause.exceptions
        return bool(leaves) and all(isinstance(e, OSError) and _refused(e) for e in leaves)
    return isinstance(cause, OSError) and _refused(cause)


@dataclass(frozen=True, slots=True)
class Peer:
    """Where a run sends, and how to word what went wrong there."""

    transport: str  # tcp, udp, http, ws or grpc
    host: str
    port: int
    secure: bool = False

    @property
    def where(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def refused(self) -> TransportError:
        listener = _LISTENERS[self.transport]
        return TransportError(
            f"connection refused: is the {listener} listener enabled on {self.where}?"
        )

    def error(self, what: str) -> TransportError:
        return TransportError(f"{self.where}: {what}")

    def no_answer(self, seconds: float) -> TransportError:
        """Silence where the gateway answers at once: another protocol on that port."""
        protocol = _PROTOCOLS[self.transport]
        return TransportError(
            f"{self.where}: no {protocol} answer within {seconds:g} s: wrong transport? "
            f"(is it the gateway's {_LISTENERS[self.transport]} listener?)"
        )

    def not_ours(self, data: bytes, detail: str) -> TransportError:
        """Bytes that are not an answer in this protocol."""
        if not self.secure and looks_like_tls(data):
            return self.tls_mismatch()
        protocol = _PROTOCOLS[self.transport]
        article = "an" if protocol.startswith("HTTP") else "a"
        return Misdirected(
            f"{self.where}: not {article} {protocol} answer: wrong transport? ({detail}; "
            f"starts {data[:16]!r})"
        )

    async def closed_before_answer(self, *, received: bytes = b"") -> TransportError:
        """The connection ended before any answer: a TLS listener (it drops a plaintext
        hello without a word: a second connection asks it for a TLS handshake to tell), a
        listener that refused what we sent, or another protocol."""
        if received:
            return self.not_ours(received, "then the connection closed")
        if not self.secure and await _speaks_tls(self):
            return self.tls_mismatch()
        return TransportError(
            f"{self.where}: connection closed before any answer: wrong transport?"
        )

    def tls_mismatch(self) -> TransportError:
        if self.secure:
            return TransportError(
                f"TLS mismatch: {self.where} does not speak TLS (a plaintext listener? "
                f"use {_NO_TLS[self.transport]})"
            )
        return TransportError(
            f"TLS mismatch: {self.where} speaks TLS: use {_USE_TLS[self.transport]}"
            " (and --ca for a private CA)"
        )


async def _speaks_tls(peer: Peer) -> bool:
    """Whether ``peer`` completes a TLS handshake (unverified: this only asks whether the port
    speaks TLS, and sends nothing over it)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with trio.move_on_after(FIRST_ANSWER_TIMEOUT):
        try:
            tcp = await trio.open_tcp_stream(peer.host, peer.port)
        except OSError:
            return False
        tls = trio.SSLStream(tcp, context, server_hostname=peer.host)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError:
            return False
        finally:
            await trio.aclose_forcefully(tls)
        return True
    return False


async def connect(
    peer: Peer,
    *,
    ssl_context: ssl.SSLContext | None,
    step_timeout: float,
    first: bool = True,
) -> trio.abc.Stream:
    """A TCP (or TLS) stream with TCP_NODELAY; every failure becomes a TransportError.

    On the ``first`` connection of a run, silence in the TLS handshake past
    :data:`FIRST_ANSWER_TIMEOUT` means no TLS listener there (see :func:`answer_timeout`)."""
    where = peer.where
    try:
        with trio.fail_after(step_timeout):
            tcp = await trio.open_tcp_stream(peer.host, peer.port)
    except trio.TooSlowError as exc:
        raise peer.error(f"cannot connect: no answer within {step_timeout:g} s") from exc
    except OSError as exc:
        if _refused(exc):
            # The hint is for a first connection; refused later, the gateway went away.
            raise (peer.refused() if first else peer.error("connection refused")) from exc
        raise peer.error(f"cannot connect: {exc.strerror or exc}") from exc
    tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    if ssl_context is None:
        return tcp
    tls = trio.SSLStream(tcp, ssl_context, server_hostname=peer.host, https_compatible=True)
    seconds = answer_timeout(step_timeout, first=first)
    try:
        with trio.fail_after(seconds):
            await tls.do_handshake()
    except trio.TooSlowError as exc:
        await trio.aclose_forcefully(tcp)
        if not first:
            raise peer.error(f"no TLS answer within {seconds:g} s") from exc
        raise TransportError(
            f"TLS mismatch: no TLS answer from {where} within {seconds:g} s "
            f"(not a TLS listener? use {_NO_TLS[peer.transport]})"
        ) from exc
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(tcp)
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLError) and cause.reason in (
            "WRONG_VERSION_NUMBER",
            "RECORD_LAYER_FAILURE",
            "PACKET_LENGTH_TOO_LONG",
            "HTTP_REQUEST",
        ):
            raise peer.tls_mismatch() from exc
        if cause is None or isinstance(cause, ssl.SSLEOFError | ConnectionError):
            raise TransportError(
                f"TLS handshake with {where} failed: the connection closed "
                f"(not a TLS listener? use {_NO_TLS[peer.transport]})"
            ) from exc
        raise TransportError(f"TLS handshake with {where} failed: {cause}") from exc
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return tls
