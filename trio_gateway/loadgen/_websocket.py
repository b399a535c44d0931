"""WebSocket: every message is one binary WebSocket message, framed by the ``websockets``
Sans-I/O :class:`~websockets.client.ClientProtocol` over a Trio stream; every write carries
about 256 KiB of frames (masking uses the package's C speedup), and a reader task answers the
gateway's control frames and waits for its close.

WebSocket has no per-message acknowledgement: the closing handshake is the receipt. When the
gateway answers our close with ``1000``, it has read every message before it (TCP keeps
order), and they count as accepted. When it closes first (``1009`` too big, ``1001``
stopping) the client cannot tell which were read, so the connection's messages are all
reported under ``close <code>``. With ``acks=True`` the client offers the subprotocol
:data:`~trio_gateway._wire.ACK_SUBPROTOCOL` and counts what the gateway's acks say instead
(:class:`_AckTally`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence

import trio
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus, InvalidURI
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Response as WsResponse
from websockets.protocol import State as WsState
from websockets.typing import Subprotocol
from websockets.uri import WebSocketURI, parse_uri

from .._errors import ConfigurationError, ProtocolError, TransportError
from .._wire import ACK_SUBPROTOCOL
from ._connect import Peer, client_ssl_context, connect
from ._options import DEFAULT_TIMEOUT, answer_timeout, check_common, check_retries
from ._resend import RETRYABLE_CLOSES, Resender
from ._run import (
    MAX_REPLY,
    READ_SIZE,
    USER_AGENT,
    Run,
    SendSummary,
    make_payload,
    run_workers,
)

__all__ = ("send_websocket",)

_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class _AckTally:
    """What one connection's acks said (``trio-gateway.ack.v1``, see ``docs/websocket.md``).

    Every ack settles the messages after the previous one's ``acked`` up to its own: accepted,
    except those in its ``refused`` ranges. An ack that does not fit that (numbers going back,
    past what was sent, ranges out of order) is a :class:`ProtocolError`.
    """

    def __init__(self, run: Run, where: str, progress: Callable[[], None]) -> None:
        self.run = run
        self.where = where
        self.progress = progress  # called on every ack (``send --retries`` starts afresh)
        self.acked = 0
        self.sent = 0  # messages handed to the protocol so far

    def _bad(self, data: bytes, why: str) -> ProtocolError:
        return ProtocolError(f"{self.where}: bad ack ({why}): {data[:200]!r}")

    def apply(self, data: bytes) -> None:
        try:
            ack = json.loads(data)
        except ValueError as exc:
            raise self._bad(data, "not JSON") from exc
        if not isinstance(ack, dict):
            raise self._bad(data, "not an object")
        acked, refused = ack.get("acked"), ack.get("refused", [])
        if type(acked) is not int or not self.acked < acked <= self.sent:
            raise self._bad(data, f"acked must be in {self.acked + 1}..{self.sent}")
        if not isinstance(refused, list):
            raise self._bad(data, "refused must be a list")
        after = self.acked  # ranges ascend, disjoint, within (previous acked, acked]
        counts: Counter[str] = Counter()
        for entry in refused:
            if not (
                isinstance(entry, list)
                and len(entry) == 3
                and type(entry[0]) is int
                and type(entry[1]) is int
                and isinstance(entry[2], str)
                and after < entry[0] <= entry[1] <= acked
            ):
                raise self._bad(data, "refused ranges must be [first, last, reason], ascending")
            counts[entry[2]] += entry[1] - entry[0] + 1
            after = entry[1]
        self.run.accept(acked - self.acked - sum(counts.values()))
        for reason, n in counts.items():
            self.run.reject(reason, n)
        self.acked = acked
        self.progress()


class _WsConnection:
    """A client WebSocket on a Trio stream: the protocol object, a writer lock, a reader."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        protocol: ClientProtocol,
        peer: Peer,
        acks: _AckTally | None = None,
    ) -> None:
        self.stream = stream
        self.protocol = protocol
        self.peer = peer
        self.acks = acks
        self.lock = trio.Lock()
        self.closed = trio.Event()
        self.lost: BaseException | None = None

    async def flush(self) -> None:
        """Write what the protocol has queued (``b""`` means: half-close, if we can)."""
        async with self.lock:
            writes = self.protocol.data_to_send()
            data = b"".join(writes)
            if data:
                await self.stream.send_all(data)
            if writes and not writes[-1] and isinstance(self.stream, trio.abc.HalfCloseableStream):
                await self.stream.send_eof()

    async def handshake(self, token: str | None) -> WsResponse:
        protocol = self.protocol
        request = protocol.connect()
        request.headers["User-Agent"] = USER_AGENT
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"
        protocol.send_request(request)
        await self.flush()
        received = b""
        while True:
            data = await self.stream.receive_some(READ_SIZE)
            if data:
                received += data[: max(0, 16 - len(received))]
                protocol.receive_data(data)
            else:
                protocol.receive_eof()
            for event in protocol.events_received():
                if isinstance(event, WsResponse):
                    return event
            if not received:
                raise await self.peer.closed_before_answer()
            if protocol.handshake_exc is not None:  # not an HTTP answer at all
                raise self.peer.not_ours(received, str(protocol.handshake_exc))
            if not data:
                raise await self.peer.closed_before_answer(received=received)

    async def read_until_closed(self) -> None:
        """Feed the protocol (it answers pings and the close frame) until the closing
        handshake is complete or the connection ends.

        The close frames are the receipt; the TCP close is not waited for. (Over TLS the
        gateway cannot half-close: it waits for our end of the connection instead.)"""
        protocol = self.protocol
        try:
            while protocol.state is not WsState.CLOSED:
                try:
                    data = await self.stream.receive_some(READ_SIZE)
                except _BROKEN as exc:
                    self.lost = exc
                    data = b""
                if data:
                    protocol.receive_data(data)
                else:
                    protocol.receive_eof()
                events = protocol.events_received()  # pings and the close are handled
                if self.acks is not None:  # the server sends no messages but acks
                    for event in events:
                        if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                            self.acks.apply(bytes(event.data))
                try:
                    await self.flush()
                except _BROKEN as exc:
                    self.lost = self.lost or exc
                if not data or (protocol.close_rcvd is not None and protocol.close_sent):
                    return
        finally:
            self.closed.set()


def _ws_outcome(
    protocol: ClientProtocol, lost: BaseException | None, peer: Peer, step_timeout: float
) -> str | None:
    """``None`` for a clean close we started and the server confirmed; else the server's
    close code as the reason. No close frame at all is a failure of the connection."""
    received = protocol.close_rcvd
    if received is None:
        if lost is not None or protocol.state is WsState.CLOSED:
            raise peer.error(f"connection lost without a close frame: {lost}")
        raise peer.error(f"no close frame within {step_timeout:g} s")
    if protocol.close_rcvd_then_sent or received.code != CloseCode.NORMAL_CLOSURE:
        return f"close {received.code}"
    return None


def _refusal(response: WsResponse, failure: Exception) -> tuple[str, str | None]:
    """(the reason to count the run's messages under, the run's error if it is one).

    ``401``/``403`` (a bad token or origin) and ``429``/``503`` (too many connections) are the
    gateway's refusals: counted. Any other status means no WebSocket endpoint there (a wrong
    path: ``404``)."""
    if not isinstance(failure, InvalidStatus):
        return f"handshake failed: {failure}", None
    status = response.status_code
    if status in (401, 403, 429, 503):
        return str(status), None
    return str(status), f"the WebSocket handshake was refused with {status} (wrong path?)"


async def send_websocket(
    url: str,
    *,
    count: int,
    size: int,
    concurrency: int = 1,
    token: str | None = None,
    cafile: str | None = None,
    rate: float | None = None,
    step_timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[int], None] | None = None,
    acks: bool = False,
    retries: int = 0,
) -> SendSummary:
    """Send ``count`` binary messages to ``url`` (``ws://`` or ``wss://``) on ``concurrency``
    connections, then close each cleanly and wait for the gateway's close (the receipt).

    ``acks``: ask for acknowledgements (subprotocol ``trio-gateway.ack.v1``) and count what
    they say; a gateway that does not select it is a :class:`ProtocolError`. A handshake
    refused with a status other than ``401``/``403``/``429``/``503`` (a ``404``: a wrong
    path) is a :class:`TransportError`: no message reached a WebSocket endpoint.

    With ``retries``, a handshake refused ``429``/``503``, a close ``1001``/``1012``/``1013``
    and a lost connection are tried again after a backoff (``_resend``), up to ``retries``
    times in a row without progress; what the lost connection left unacknowledged is sent
    first on the next: with ``acks``, the messages after its last ack; without, all of its
    messages, since only a clean close settles them (at-least-once, either way)."""
    check_common(count, size, concurrency, step_timeout, rate)
    check_retries(retries)
    try:
        wsuri: WebSocketURI = parse_uri(url)
    except InvalidURI as exc:
        raise ConfigurationError("--ws", f"not a ws:// or wss:// URL: {url!r}") from exc
    if cafile is not None and not wsuri.secure:
        raise ConfigurationError("--ca", "needs a wss:// URL")
    context = client_ssl_context(cafile, alpn=["http/1.1"]) if wsuri.secure else None
    peer = Peer("ws", wsuri.host, wsuri.port, wsuri.secure)
    run = Run(count, size, rate=rate, progress=progress, progress_on_write=not acks)
    per_write = run.chunk()
    subprotocols = [Subprotocol(ACK_SUBPROTOCOL)] if acks else None

    async def open_connection(resender: Resender) -> _WsConnection | str:
        """Connect and shake hands; the refusal's reason when the handshake was refused."""
        first = not run.reached
        stream = await connect(peer, ssl_context=context, step_timeout=step_timeout, first=first)
        tally = _AckTally(run, peer.where, resender.progress) if acks else None
        connection = _WsConnection(
            stream,
            ClientProtocol(wsuri, subprotocols=subprotocols, max_size=MAX_REPLY),
            peer,
            tally,
        )
        protocol = connection.protocol
        try:
            with trio.fail_after(answer_timeout(step_timeout, first=first)):
                response = await connection.handshake(token)
        except trio.TooSlowError as exc:
            await trio.aclose_forcefully(stream)
            if first:
                raise peer.no_answer(answer_timeout(step_timeout, first=True)) from exc
            raise peer.error(f"no handshake answer within {step_timeout:g} s") from exc
        except _BROKEN as exc:
            await trio.aclose_forcefully(stream)
            raise await peer.closed_before_answer() from exc
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        failure = protocol.handshake_exc
        if failure is not None:
            await trio.aclose_forcefully(stream)
            reason, error = _refusal(response, failure)
            if error is not None and not run.reached:
                raise peer.error(error)
            return reason
        run.reached = True
        resender.connected()
        if acks and protocol.subprotocol != ACK_SUBPROTOCOL:
            await trio.aclose_forcefully(stream)
            raise ProtocolError(
                f"{peer.where}: the gateway did not select {ACK_SUBPROTOCOL} (no acks there)"
            )
        return connection

    async def worker() -> None:
        """Connections one after another while the gateway goes away and ``retries`` allow;
        what one leaves unacknowledged goes first on the next."""
        resender = Resender(run, retries)
        seqs = run.claim(per_write)
        again: list[int] = []  # sent on a lost connection, unacknowledged: to send first
        while seqs or again:
            order: list[int] = []  # this connection's messages as sent (the acks count them)
            tally: _AckTally | None = None
            try:
                connection = await open_connection(resender)
                if isinstance(connection, str):  # the handshake was refused
                    if connection in ("429", "503") and await resender.refused(
                        len(again) + len(seqs)
                    ):
                        continue
                    run.reject(connection, len(again))
                    run.reject_unsent(connection, len(seqs))
                    run.stop(connection)
                    return
                tally = connection.acks
                async with connection.stream:
                    seqs, stalled = await exchange(connection, seqs, again, order, resender)
                if stalled is not None:
                    raise stalled
                outcome = _ws_outcome(connection.protocol, connection.lost, peer, step_timeout)
            except TransportError as exc:
                unsettled = order[0 if tally is None else tally.acked :] + again
                if not await resender.lost(exc, len(unsettled)):
                    run.gone(exc, written=len(unsettled), unsent=len(seqs))
                    return
                again[:] = unsettled
                continue
            # Sent, but no ack covered it (with acks), or all of it (without: only a clean
            # close settles a connection's messages).
            unsettled = order[0 if tally is None else tally.acked :] + again
            if outcome is None:
                if tally is None:
                    run.accept(len(unsettled))  # the gateway read every message before our close
                else:  # none, normally: the last ack precedes the gateway's close
                    run.reject("unacknowledged", len(unsettled))
                return
            code = int(outcome.removeprefix("close "))
            gone = peer.error(f"the gateway closed the connection ({outcome})")
            if code in RETRYABLE_CLOSES and await resender.lost(gone, len(unsettled)):
                again[:] = unsettled
                continue
            run.reject(outcome, len(unsettled))
            run.reject_unsent(outcome, len(seqs))
            run.stop(outcome)
            return

    async def exchange(
        connection: _WsConnection,
        seqs: range,
        again: list[int],
        order: list[int],
        resender: Resender,
    ) -> tuple[range, TransportError | None]:
        """Send ``again`` (emptied as it goes), then ``seqs`` and what the run gives next, and
        close; ``order`` gets every message handed to the connection. Returns what was claimed
        but not sent (the gateway closed first), and the error if a write made no progress
        within ``step_timeout`` (the connection is then given up at once)."""
        protocol, tally = connection.protocol, connection.acks
        stalled: TransportError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.read_until_closed)
            try:
                while (again or seqs) and protocol.state is WsState.OPEN:
                    fresh = not again
                    if fresh:
                        await run.pace(seqs.start)
                        if protocol.state is not WsState.OPEN:
                            break  # the gateway closed while we waited
                        chunk: Sequence[int] = seqs
                        seqs = range(0)
                        run.wrote(len(chunk))
                    else:
                        chunk = resender.take_again(again, per_write)
                    order.extend(chunk)
                    for seq in chunk:
                        protocol.send_binary(make_payload(size, seq))
                    if tally is not None:
                        tally.sent += len(chunk)
                    with trio.fail_after(step_timeout):
                        await connection.flush()
                    if not (seqs or again):  # the next messages of the run
                        seqs = run.claim(per_write)
                if protocol.state is WsState.OPEN:
                    protocol.send_close(CloseCode.NORMAL_CLOSURE)
                    with trio.fail_after(step_timeout):
                        await connection.flush()
            except trio.TooSlowError as exc:
                stalled = peer.error(f"no progress for {step_timeout:g} s")
                stalled.__cause__ = exc
            except _BROKEN as exc:
                connection.lost = connection.lost or exc
            if stalled is None:  # wait for the server's close frame (or the connection's end)
                with trio.move_on_after(step_timeout):
                    await connection.closed.wait()
            nursery.cancel_scope.cancel()
        return seqs, stalled

    await run_workers(concurrency, worker)
    return run.summary()
