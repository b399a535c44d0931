"""TCP and UDP: frames written as fast as the socket takes them. Neither protocol answers, so
their summaries have no accepted count; TCP's end-of-stream handshake is the only receipt."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable

import trio

from .._errors import ConfigurationError
from ..codecs import encode_length_prefixed, encode_newline
from ._connect import Peer, connect
from ._options import DEFAULT_TIMEOUT, check_common
from ._run import READ_SIZE, Run, SendSummary

__all__ = ("MAX_DATAGRAM", "send_tcp", "send_udp")

MAX_DATAGRAM = 65_507
"""The largest UDP payload over IPv4."""


async def send_tcp(
    host: str,
    port: int,
    *,
    count: int,
    size: int,
    framing: str = "newline",
    rate: float | None = None,
    progress: Callable[[int], None] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    step_timeout: float = DEFAULT_TIMEOUT,
) -> SendSummary:
    """Send ``count`` messages of ``size`` bytes over one connection, in large writes.

    At the end the client half-closes and waits for the gateway to close its side: by then
    the gateway has read everything. (TLS cannot half-close: the client closes after writing.)
    A connection the gateway ends mid-run (it stopped, or refused a frame: see ``framing``)
    ends the run with a summary of what was written and why it stopped.
    """
    check_common(count, size, 1, step_timeout, rate)
    encode = {"newline": encode_newline, "length": encode_length_prefixed}.get(framing)
    if encode is None:
        raise ConfigurationError("--framing", f"must be newline or length, got {framing!r}")
    peer = Peer("tcp", host, port, secure=ssl_context is not None)
    stream = await connect(peer, ssl_context=ssl_context, step_timeout=step_timeout)
    run = Run(count, size, rate=rate, progress=progress, progress_on_write=True)
    per_chunk = run.chunk()
    try:
        async with stream:
            while seqs := run.claim(per_chunk):
                await run.pace(seqs.start)
                with trio.fail_after(step_timeout):
                    await stream.send_all(encode(run.payloads(seqs)))
                run.wrote(len(seqs))
            if isinstance(stream, trio.abc.HalfCloseableStream):
                with trio.fail_after(step_timeout):
                    await stream.send_eof()
                    # The server closes its side once it has read everything we sent.
                    while await stream.receive_some(READ_SIZE):
                        pass
    except trio.TooSlowError as exc:
        raise peer.error(f"no progress for {step_timeout:g} s") from exc
    except (trio.BrokenResourceError, OSError) as exc:
        run.error = (
            f"{peer.where} closed the connection ({exc.__cause__ or exc}): the gateway "
            f"stopped, or refused a frame (is its framing {framing}? its max message size "
            f"at least {size}?)"
        )
    return run.summary(answers=False)


async def send_udp(
    host: str,
    port: int,
    *,
    count: int,
    size: int,
    rate: float | None = None,
    progress: Callable[[int], None] | None = None,
    step_timeout: float = DEFAULT_TIMEOUT,
) -> SendSummary:
    """Send ``count`` datagrams of ``size`` bytes (UDP gives no delivery report).

    The one sign of a missing listener is the ICMP "port unreachable" that the kernel reports
    on a later send: the run then stops, and its summary says so.
    """
    check_common(count, size, 1, step_timeout, rate)
    if size > MAX_DATAGRAM:
        raise ConfigurationError("--size", f"a UDP datagram carries at most {MAX_DATAGRAM} bytes")
    peer = Peer("udp", host, port)
    try:
        with trio.fail_after(step_timeout):
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (OSError, trio.TooSlowError) as exc:
        raise peer.error(f"cannot resolve {host!r}: {exc}") from exc
    family, _, _, _, address = infos[0]
    run = Run(count, size, rate=rate, progress=progress, progress_on_write=True)
    with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
        await sock.connect(address)
        try:
            while seqs := run.claim(1):
                await run.pace(seqs.start)
                with trio.fail_after(step_timeout):
                    await sock.send(run.payloads(seqs)[0])
                run.wrote(1)
        except trio.TooSlowError as exc:
            raise peer.error(f"no progress for {step_timeout:g} s") from exc
        except ConnectionRefusedError:
            run.error = str(peer.refused())
        except OSError as exc:
            run.error = f"{peer.where}: {exc.strerror or exc}"
    return run.summary(answers=False)
