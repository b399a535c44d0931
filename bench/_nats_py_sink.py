"""The NATS sink as it was on nats-py: kept for bench comparison only (``--old``), no product path.

Each batch is published with the official nats-py client, counted once acked.

nats-py is an asyncio library. It runs here on its own asyncio event loop in one thread that the
sink owns (started by :meth:`NatsSink.open`, joined by :meth:`NatsSink.aclose`); a batch crosses
from Trio to that loop once, as one coroutine that publishes every message and waits for every
acknowledgement, and its result crosses back once (``TrioToken.run_sync_soon``, no worker thread).
docs/sinks.md gives the measurement behind this choice (bench/nats.py) and the alternative
(trio-asyncio).

Delivery is at-least-once, made exactly-once within JetStream's duplicate window: every message
carries a ``Nats-Msg-Id`` of ``<sink id>.<sequence>``, where the sink id is random per sink
instance and the sequence numbers are allocated once per batch, so a retried batch carries the
same ids (JetStream drops the copies and says so in the ack) while two different messages never
share one. A message that came with its sender's id (:attr:`Origin.id`: ``Idempotency-Key``,
gRPC ``idempotency-key``) carries that id instead, so the sender's own retry of it, even
through another gateway or after a crash, is dropped too.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
from collections import Counter
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from bench._asyncio_thread import AsyncioThread as _LoopThread
from trio_gateway._errors import ConfigurationError, SinkError, SinkUnavailable
from trio_gateway._log import RateLimitedLogger, logger
from trio_gateway._message import Batch, Origin
from trio_gateway.sinks import Sink
from trio_gateway.sinks._nats_url import parse_nats_url

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext

__all__ = ("NatsPySink",)

_log = logger.getChild("sinks.nats")
_T = TypeVar("_T")


def _import_nats() -> Any:
    try:
        import nats
        import nats.js.errors
    except ImportError as exc:
        raise ConfigurationError(
            "sink", f"the nats sink needs nats-py (pip install nats-py): {exc}"
        ) from exc
    return nats


class _ConnectionLost(Exception):
    pass


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class NatsPySink(Sink):
    """Publishes every message of a batch to a JetStream subject; ``send`` returns once all are
    acknowledged (stored, or recognised as duplicates of stored ones).

    ``NatsSink("nats://127.0.0.1:4222/telemetry.in?stream=TELEMETRY&create=true")``. The
    payload is the message body, unchanged; the origin travels in headers (``Gateway-Transport``,
    ``Gateway-Listener``, ``Gateway-Peer``, ``Gateway-Received-At``) unless
    ``origin_headers=False``.

    Failures raise :class:`SinkError` and the gateway's pump retries the batch with backoff:
    the server away (nats-py keeps reconnecting in the background; ``send`` fails fast until it
    is back), an ack missing after ``ack_timeout``, the connection lost mid-batch, a JetStream
    error. Bounds: at most ``max_in_flight`` unacknowledged publishes, ``max_buffer_bytes`` of
    outbound buffer, ``connect_timeout`` per connection attempt.
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 5.0,
        ack_timeout: float = 10.0,
        max_in_flight: int = 4096,
        max_buffer_bytes: int = 8 * 1024 * 1024,
        reconnect_wait: float = 0.5,
        origin_headers: bool = True,
    ) -> None:
        self.target = parse_nats_url(url)
        if connect_timeout <= 0 or ack_timeout <= 0 or reconnect_wait <= 0:
            raise ConfigurationError("sink", "nats sink: timeouts must be positive")
        if max_in_flight < 1 or max_buffer_bytes < 64 * 1024:
            raise ConfigurationError(
                "sink", "nats sink: max_in_flight >= 1 and max_buffer_bytes >= 64 KiB"
            )
        _import_nats()  # a missing nats-py is a configuration error, found before serving
        self.connect_timeout = connect_timeout
        self.ack_timeout = ack_timeout
        self.max_in_flight = max_in_flight
        self.max_buffer_bytes = max_buffer_bytes
        self.reconnect_wait = reconnect_wait
        self.origin_headers = origin_headers
        self.name = f"nats:{','.join(s.removeprefix('nats://') for s in self.target.servers)}/" + (
            self.target.subject
        )
        self.sink_id = secrets.token_urlsafe(12)
        """Prefix of every ``Nats-Msg-Id`` this sink sends (random per sink instance)."""
        self.connects = 0
        self.stored = 0
        """Messages JetStream acknowledged as new."""
        self.duplicates = 0
        """Messages JetStream acknowledged as duplicates (a retried batch's earlier copies)."""
        self.failures: Counter[str] = Counter()
        """Failed batches by reason (``unavailable``, ``connection_lost``, ``ack_timeout``...)."""
        self._loop = _LoopThread(f"trio_gateway {self.name}")
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._lost: asyncio.Future[None] | None = None
        self._closing = False
        self._next_seq = 1
        self._retrying: Batch | None = None
        self._retrying_seq = 0
        self._errors = RateLimitedLogger(_log)

    # -- Trio side ------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect (and create the stream if asked): a server that cannot be reached, refuses
        the credentials or the stream is :class:`SinkUnavailable`."""
        try:
            await self._open()
        except SinkUnavailable:
            raise
        except SinkError as exc:
            cause = str(exc).removeprefix(f"{self.name}: ")
            raise SinkUnavailable(self.name, cause) from exc

    async def _open(self) -> None:
        if not self._loop.running:
            self._loop.start()
        if self._nc is None:
            await self._loop.run(self._connect())
            self.connects += 1

    async def send(self, batch: Batch) -> None:
        if self._nc is None:
            await self._open()
        # A retry of the batch that failed last gets the same sequence numbers, so the same
        # Nats-Msg-Ids; a new batch gets the next ones.
        if batch is not self._retrying:
            self._retrying = batch
            self._retrying_seq = self._next_seq
            self._next_seq += len(batch)
        stored, duplicates = await self._loop.run(
            self._publish(batch.payloads, batch.runs, self._retrying_seq)
        )
        self._retrying = None
        self.stored += stored
        self.duplicates += duplicates

    async def aclose(self) -> None:
        try:
            if self._nc is not None and self._loop.running:
                with trio.move_on_after(self.connect_timeout):
                    await self._loop.run(self._close())
        finally:
            with trio.move_on_after(self.connect_timeout):
                await self._loop.stop()

    # -- asyncio side (runs on the sink's loop thread) -----------------------------------

    async def _connect(self) -> None:
        nats = _import_nats()
        target = self.target
        options: dict[str, Any] = {
            "servers": list(target.servers),
            "name": "trio_gateway",
            "connect_timeout": self.connect_timeout,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": self.reconnect_wait,
            "pending_size": self.max_buffer_bytes,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        if target.user is not None:
            options["user"], options["password"] = target.user, target.password
        if target.token is not None:
            options["token"] = target.token
        if target.creds is not None:
            options["user_credentials"] = target.creds
        if target.tls or target.ca:
            try:
                options["tls"] = ssl.create_default_context(cafile=target.ca)
            except OSError as exc:
                raise SinkError(f"{self.name}: cannot load ca {target.ca!r}: {exc}") from exc
        nc = nats.NATS()
        try:
            # nats-py retries the servers forever (max_reconnect_attempts=-1): bound the
            # first connection here; the pump retries open() with backoff.
            try:
                async with asyncio.timeout(self.connect_timeout * len(target.servers)):
                    await nc.connect(**options)
            except TimeoutError as exc:
                raise SinkError(f"{self.name}: no server answered") from exc
            # The context's timeout is for JetStream API requests (the stream check);
            # publish acks are bounded per batch by ack_timeout.
            js = nc.jetstream(
                timeout=self.connect_timeout, publish_async_max_pending=self.max_in_flight
            )
            if target.create and target.stream is not None:
                await self._ensure_stream(js)
        except BaseException as exc:
            self._closing = True
            try:
                await nc.close()
            finally:
                self._closing = False
            if isinstance(exc, nats.errors.Error | nats.js.errors.Error | OSError):
                raise SinkError(f"{self.name}: connect failed: {exc!r}") from exc
            raise
        self._nc, self._js = nc, js
        _log.info(
            "%s: connected to %s", self.name, nc.connected_url.netloc if nc.connected_url else "?"
        )

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        from nats.js.api import StorageType, StreamConfig
        from nats.js.errors import NotFoundError

        target = self.target
        assert target.stream is not None
        try:
            await js.stream_info(target.stream)
        except NotFoundError:
            await js.add_stream(
                StreamConfig(
                    name=target.stream,
                    subjects=[target.subject],
                    storage=StorageType.FILE if target.storage == "file" else StorageType.MEMORY,
                    num_replicas=target.replicas,
                    duplicate_window=target.duplicate_window,
                )
            )
            _log.info("%s: created stream %s", self.name, target.stream)

    async def _on_error(self, exc: Exception) -> None:
        self._errors.warning("%s: %r", self.name, exc)

    async def _on_disconnected(self) -> None:
        if self._closing:
            return
        self._errors.warning("%s: disconnected; reconnecting in the background", self.name)
        if self._lost is not None and not self._lost.done():
            self._lost.set_exception(_ConnectionLost())

    async def _on_reconnected(self) -> None:
        self.connects += 1
        self._errors.info("%s: reconnected", self.name)

    def _fail(self, reason: str, message: str, cause: BaseException | None = None) -> SinkError:
        self.failures[reason] += 1
        error = SinkError(f"{self.name}: {message}")
        error.__cause__ = cause
        return error

    async def _publish(
        self, payloads: list[bytes], runs: list[tuple[Origin, int]], first_seq: int
    ) -> tuple[int, int]:
        """Publish in order, then wait for every ack; return (stored, duplicates)."""
        import nats.errors
        import nats.js.errors

        nc, js = self._nc, self._js
        assert nc is not None and js is not None
        if not nc.is_connected:
            raise self._fail("unavailable", "server unavailable (reconnecting)")
        target = self.target
        subject, stream = target.subject, target.stream
        lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._lost = lost
        acks: list[asyncio.Future[Any]] = []
        prefix = f"{self.sink_id}."
        seq = first_seq
        start = 0
        gathered: asyncio.Future[list[Any]] | None = None
        try:
            # One deadline for the whole batch; no per-message timer (asyncio.wait_for per
            # publish costs a task each and, by yielding, one socket write per message).
            async with asyncio.timeout(self.ack_timeout):
                for origin, count in runs:
                    base: dict[str, str] = {}
                    if self.origin_headers:
                        base = {
                            "Gateway-Transport": origin.transport,
                            "Gateway-Listener": origin.listener,
                            "Gateway-Peer": origin.peer,
                            "Gateway-Received-At": repr(origin.received_at),
                        }
                    if stream is not None:
                        base["Nats-Expected-Stream"] = stream
                    for payload in payloads[start : start + count]:
                        headers = base.copy()
                        headers["Nats-Msg-Id"] = origin.id or prefix + str(seq)
                        seq += 1
                        # Waits only when max_in_flight publishes are unacknowledged.
                        acks.append(await js.publish_async(subject, payload, headers=headers))
                    start += count
                gathered = asyncio.gather(*acks)
                # Whatever becomes of it (a cancelled gather sets CancelledError as its
                # exception later), it is retrieved: no "never retrieved" noise.
                gathered.add_done_callback(_retrieve)
                done, _ = await asyncio.wait((gathered, lost), return_when=asyncio.FIRST_COMPLETED)
            if gathered not in done:
                raise self._fail("connection_lost", "connection lost before every ack arrived")
            results = gathered.result()  # raises the first failed ack's error
        except TimeoutError as exc:
            missing = sum(1 for ack in acks if not ack.done()) + len(payloads) - len(acks)
            raise self._fail(
                "ack_timeout",
                f"{missing} of {len(payloads)} acks missing after {self.ack_timeout} s",
                exc,
            ) from exc
        except nats.js.errors.NoStreamResponseError as exc:
            raise self._fail(
                "no_stream", f"no JetStream stream takes subject {subject!r}", exc
            ) from exc
        except nats.errors.MaxPayloadError as exc:
            raise self._fail(
                "max_payload",
                f"a message is larger than the server's max_payload ({nc.max_payload} bytes)",
                exc,
            ) from exc
        except nats.js.errors.APIError as exc:
            raise self._fail("jetstream_error", f"JetStream refused a message: {exc}", exc) from exc
        except (nats.errors.Error, OSError) as exc:
            raise self._fail("unavailable", f"publish failed: {exc!r}", exc) from exc
        finally:
            self._lost = None
            if lost.done() and not lost.cancelled():
                lost.exception()  # retrieved: no "never retrieved" warning
            lost.cancel()
            if gathered is not None and not gathered.done():
                gathered.cancel()
            for ack in acks:
                if not ack.done():
                    ack.cancel()  # frees its in-flight slot
                elif not ack.cancelled():
                    ack.exception()
        duplicates = sum(1 for ack in results if ack.duplicate)
        return len(results) - duplicates, duplicates

    async def _close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            self._closing = True
            try:
                await nc.close()
            finally:
                self._closing = False
