"""The NATS source as it was on nats-py: kept for bench comparison only (``python -m
bench.nats_source``), no product path. The package's NATS source now speaks NATS itself on
Trio (trio_gateway/sources/nats.py); this one ran nats-py on an asyncio loop thread of its own.

The rest of this docstring is the one it had.

The NATS source: messages back out of a broker into the gateway, from a subject or a
JetStream consumer (nats-py on an asyncio loop thread owned by the source).

``NatsSource("nats://127.0.0.1:4222/chat.>")`` subscribes to a subject (wildcards allowed;
``queue_group`` shares the messages between gateways). Core NATS has no backpressure: the
messages wait in a buffer of ``max_pending`` (the source takes them in batches of up to
``batch``); past it, the newest are refused and counted (``rejected{reason="slow_consumer"}``),
which is what the NATS server would do to a slow subscriber anyway.

``NatsSource("nats://127.0.0.1:4222/telemetry.in", stream="TELEMETRY", consumer="gateway")``
pulls from a durable JetStream consumer instead: ``batch`` messages are fetched only once the
previous ones are in the gateway's queue (under ``block``, a full queue stops the fetching:
real backpressure). When a fetched message is acknowledged is the source's ``ack`` mode (the
``ack`` key of its sources table, ``Gateway(ack=...)``), as for the listeners:

* ``"queued"`` (the default, as for every source): once it is in the gateway's queue. The next
  batch is fetched while the sink works; a message that the sink then fails to deliver (its
  retries spent, refused, a processor error) or that a crash loses is not delivered again.
* ``"delivered"``: once the sink has confirmed it (the pump settles each batch after its send,
  ``_receipts.py``); a message whose delivery failed is negatively acknowledged
  (``nak``), and JetStream delivers it again after ``redelivery_delay`` seconds, as often as
  the consumer's ``max_deliver`` allows (unlimited unless the consumer says otherwise):
  at-least-once to the destination. A fetch waits until the previous batch is confirmed, so
  one batch is in flight: ``batch`` / (the sink's time per batch) bounds the rate.

What was fetched but not acknowledged either way (the gateway stopped, crashed) is delivered
again by JetStream after the consumer's ``ack_wait``. A core subscription has no acks, so
``"delivered"`` is refused for it (:class:`ConfigurationError` at start).

The origin of each message: transport ``nats``, the listener's label
(``nats:HOST:PORT/SUBJECT``), the message's **subject** as its peer (so a processor can route
by subject: a chat room, a device), and the time the batch was taken.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

import trio

from bench._asyncio_thread import AsyncioThread
from trio_gateway._errors import ConfigurationError, TransportError
from trio_gateway._ingress import Ingress
from trio_gateway._log import RateLimitedLogger, logger
from trio_gateway._message import Origin
from trio_gateway.sources._base import Source
from trio_gateway.sources._options import DEFAULT_MAX_MESSAGE_SIZE

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg

__all__ = ("NatsPySource",)

_log = logger.getChild("sources.nats")
_errors = RateLimitedLogger(_log)
_FETCH_WAIT = 1.0
"""Seconds one JetStream fetch waits for messages before asking again."""


def _parse(url: str) -> tuple[list[str], str, str | None, str]:
    """``nats://[USER:PASS@|TOKEN@]HOST[:PORT][,HOST...]/SUBJECT`` -> (servers, subject,
    user[:password] or token, the first host:port)."""
    parts = urlsplit(url)
    if parts.scheme not in ("nats", "tls"):
        raise ConfigurationError("nats.url", f"expected nats://HOST:PORT/SUBJECT, got {url!r}")
    auth, at, hosts = parts.netloc.rpartition("@")
    subject = unquote(parts.path.lstrip("/"))
    if not hosts or not subject or " " in subject:
        raise ConfigurationError("nats.url", f"needs a host and a subject: {url!r}")
    if parse_qsl(parts.query):
        raise ConfigurationError("nats.url", "options go beside the url (stream = ...)")
    servers = [f"{parts.scheme}://{h if ':' in h else h + ':4222'}" for h in hosts.split(",")]
    first = hosts.split(",")[0]
    return servers, subject, unquote(auth) if at else None, first


class NatsPySource(Source):
    """Subscribes to a NATS subject or pulls from a JetStream consumer (module docstring)."""

    transport = "nats"

    def __init__(
        self,
        url: str,
        *,
        queue_group: str | None = None,
        stream: str | None = None,
        consumer: str | None = None,
        batch: int = 256,
        max_pending: int = 65_536,
        connect_timeout: float = 5.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        redelivery_delay: float = 1.0,
    ) -> None:
        servers, subject, auth, first = _parse(url)
        host, _, port = first.rpartition(":") if ":" in first else (first, ":", "4222")
        super().__init__(host, int(port), max_message_size=max_message_size)
        if (stream is None) != (consumer is None):
            raise ConfigurationError("nats.consumer", "a JetStream pull needs stream and consumer")
        if queue_group is not None and stream is not None:
            raise ConfigurationError("nats.queue_group", "a JetStream consumer is shared already")
        if batch < 1 or max_pending < batch or connect_timeout <= 0 or redelivery_delay < 0:
            raise ConfigurationError(
                "nats",
                "need batch >= 1, max_pending >= batch, connect_timeout > 0, redelivery_delay >= 0",
            )
        self.url = url
        self.servers = servers
        self.subject = subject
        self.queue_group = queue_group
        self.stream = stream
        self.consumer = consumer
        self.batch = batch
        self.max_pending = max_pending
        self.connect_timeout = connect_timeout
        self.redelivery_delay = redelivery_delay
        self._auth = auth
        self._nc: NatsClient | None = None
        self._pull: Any = None
        # A core subscription's messages, appended by nats-py's callback on the loop thread
        # and taken by the Trio side (deque's append and popleft are atomic); the Trio side
        # sets _waiting before it sleeps on _arrived, and the callback wakes it once.
        self._pending: deque[Msg] = deque()
        self._arrived = trio.Event()
        self._waiting = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._refused = 0  # bumped on the loop thread; reported from Trio as a difference
        self._refused_reported = 0
        self.acked = 0
        """JetStream messages acknowledged (once queued, or once delivered: the ``ack`` mode)."""
        self.nacked = 0
        """JetStream messages negatively acknowledged under ``ack="delivered"`` (their delivery
        failed; JetStream delivers them again)."""

    @property
    def label(self) -> str:
        return f"nats:{self.host}:{self.port}/{self.subject}"

    # -- Trio side --------------------------------------------------------------------------

    async def run(
        self, ingress: Ingress, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        if ingress.ack == "delivered" and self.stream is None:
            raise ConfigurationError(
                "nats.ack", "delivered needs a JetStream consumer (stream and consumer)"
            )
        self._token = trio.lowlevel.current_trio_token()
        loop = AsyncioThread(f"trio_gateway {self.label}")
        loop.start()
        try:
            try:
                # nats-py keeps trying every server; the first subscription gets a deadline.
                with trio.fail_after(2 * self.connect_timeout):
                    await loop.run(self._connect())
            except trio.TooSlowError as exc:
                raise TransportError(
                    f"{self.label}: cannot subscribe: no server answered in "
                    f"{2 * self.connect_timeout:g} s"
                ) from exc
            except Exception as exc:
                raise TransportError(f"{self.label}: cannot subscribe: {exc}") from exc
            self.bound = [(self.host, self.port)]
            task_status.started(self.bound)
            ingress.connection_opened()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._take_all, loop, ingress)
                    await ingress.wait_stopping()
                    nursery.cancel_scope.cancel()
            finally:
                ingress.connection_closed()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self.connect_timeout):
                if self._nc is not None:
                    try:
                        await loop.run(self._close())
                    except Exception as exc:
                        _log.debug("%s: close: %r", self.label, exc)
                await loop.stop()

    async def _take_all(self, loop: AsyncioThread, ingress: Ingress) -> None:
        """Take batches from NATS and offer them, one crossing into asyncio per batch. Under
        ``ack="delivered"`` each offer returns once the sink has answered for its messages,
        with how many of them, from the first, were delivered: the rest are nak'ed."""
        confirm = ingress.ack == "delivered"
        limit = self.max_message_size
        while True:
            if self._pull is not None:
                messages = await loop.run(self._fetch())
            else:
                messages = await self._take_pending()
            if not messages:
                continue
            received_at = time.time()
            failed: list[Msg] = []
            start = 0
            # One offer per run of messages on the same subject (the origin's peer).
            for end in range(1, len(messages) + 1):
                if end == len(messages) or messages[end].subject != messages[start].subject:
                    origin = Origin("nats", self.label, messages[start].subject, received_at)
                    run = messages[start:end]
                    if any(len(m.data) > limit for m in run):
                        fitting = [m for m in run if len(m.data) <= limit]
                        ingress.reject("oversize", len(run) - len(fitting))
                        run = fitting  # acked: it would be as large every time
                    if run:
                        done = await ingress.offer([m.data for m in run], origin)
                        if confirm:
                            failed += run[done:]
                    start = end
            refused = self._refused - self._refused_reported
            if refused:
                self._refused_reported += refused
                ingress.reject("slow_consumer", refused)
            if self.stream is not None:
                await loop.run(self._ack(messages, failed))
                self.acked += len(messages) - len(failed)
                self.nacked += len(failed)

    # -- asyncio side (the source's loop thread) ----------------------------------------------

    async def _connect(self) -> None:

        import nats

        options: dict[str, Any] = {
            "servers": self.servers,
            "name": "trio_gateway source",
            "connect_timeout": self.connect_timeout,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "error_cb": self._on_error,
        }
        if self._auth is not None:
            user, colon, password = self._auth.partition(":")
            if colon:
                options |= {"user": user, "password": password}
            else:
                options["token"] = self._auth
        self._nc = await nats.connect(**options)
        if self.stream is not None:
            js = self._nc.jetstream()
            self._pull = await js.pull_subscribe(
                self.subject, durable=self.consumer, stream=self.stream
            )
        else:
            await self._nc.subscribe(self.subject, queue=self.queue_group or "", cb=self._on_msg)

    async def _on_error(self, exc: Exception) -> None:
        _errors.warning("%s: %r (nats-py reconnects)", self.label, exc)

    async def _on_msg(self, msg: Msg) -> None:
        if len(self._pending) >= self.max_pending:
            self._refused += 1
            return
        self._pending.append(msg)
        if self._waiting:
            # One wake-up of the Trio side per burst, not one per message: a crossing per
            # message cost ~240 us of CPU at 1,000 msg/s (bench/chat_relay.py).
            self._waiting = False
            assert self._token is not None
            try:
                self._token.run_sync_soon(self._arrived.set)
            except trio.RunFinishedError:
                pass

    async def _take_pending(self) -> list[Msg]:
        """Up to ``batch`` of the core subscription's messages, waiting for the first."""
        pending = self._pending
        while not pending:
            self._arrived = trio.Event()
            self._waiting = True  # before the check: a message appended after it wakes us
            if pending:
                self._waiting = False
                break
            await self._arrived.wait()
        return [pending.popleft() for _ in range(min(self.batch, len(pending)))]

    async def _fetch(self) -> list[Msg]:
        import nats.errors

        try:
            batch: list[Msg] = await self._pull.fetch(self.batch, timeout=_FETCH_WAIT)
            return batch
        except nats.errors.TimeoutError:
            return []

    async def _ack(self, messages: list[Msg], failed: list[Msg]) -> None:
        again = {id(message) for message in failed}
        for message in messages:
            # Each a publish to the message's reply subject: buffered, not waited for.
            if id(message) in again:
                await message.nak(delay=self.redelivery_delay or None)
            else:
                await message.ack()
        assert self._nc is not None
        await self._nc.flush(timeout=max(1, round(self.connect_timeout)))

    async def _close(self) -> None:
        if self._nc is not None:
            nc, self._nc = self._nc, None
            if not nc.is_closed:
                await nc.drain()
