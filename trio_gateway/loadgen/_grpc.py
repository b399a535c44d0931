"""gRPC: the gateway's own ``trio_gateway.v1.Gateway`` service (``Send``, ``Stream``,
``StreamAcked``) over :mod:`._h2`, with the generated message classes of
``trio_gateway/_proto``; statuses and timeouts use grpclib's codecs."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager

import trio

from .._errors import ConfigurationError, TransportError
from .._proto import gateway_pb2
from .._wire import GRPC_METHODS, IDEMPOTENCY_KEY
from ._connect import Misdirected, Peer
from ._h2 import CONNECTION_LOST, GrpcCall, H2Client, grpc_connection, grpc_frame
from ._options import DEFAULT_TIMEOUT, GRPC_MODES, check_common, check_ids, check_retries
from ._resend import Resender
from ._run import Run, SendSummary, make_payload, run_workers

__all__ = ("send_grpc",)


async def _finish(call: GrpcCall, peer: Peer, step_timeout: float) -> tuple[str, list[bytes]]:
    """Wait for the end of the call: its status and every reply not read yet."""
    replies: list[bytes] = []
    try:
        with trio.fail_after(step_timeout):
            while batch := await call.recv_batch():
                replies += batch
    except trio.TooSlowError as exc:
        raise peer.error(f"no answer within {step_timeout:g} s") from exc
    assert call.status is not None
    return call.status, replies


async def send_grpc(
    host: str,
    port: int,
    *,
    count: int,
    size: int,
    mode: str = "unary",
    concurrency: int = 1,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    rate: float | None = None,
    step_timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[int], None] | None = None,
    ids: str | None = None,
    retries: int = 0,
) -> SendSummary:
    """Send ``count`` messages to the gateway's ``trio_gateway.v1.Gateway`` service.

    ``mode``: ``unary`` (one ``Send`` call per message; its status is the answer), ``stream``
    (one ``Stream`` call per connection; the final ``Ack`` counts accepted and rejected) or
    ``bidi`` (one ``StreamAcked`` call per connection; an ``Ack`` per message). Each message's
    ``sequence`` is its number in the run. TLS when ``ssl_context`` is given (ALPN ``h2``).

    With ``ids``, message ``n`` gets the id ``{ids}:{n}``: a ``Send`` call carries the
    metadata ``idempotency-key: {ids}:{n}``, a stream ``idempotency-key: {ids}`` (the gateway
    adds each message's ``sequence``). Running the same command again resends every message
    with the same id.

    With ``retries``, a call refused ``UNAVAILABLE`` and the messages of a connection lost
    before their acknowledgement (a ``Send`` unanswered, a stream's messages no ``Ack``
    covered) are sent again, with the same ``sequence``, on a new connection after a backoff
    (``_resend``), up to ``retries`` times in a row without progress.
    """
    check_common(count, size, concurrency, step_timeout, rate)
    check_ids(ids)
    check_retries(retries)
    if mode not in GRPC_MODES:
        raise ConfigurationError("--mode", f"must be one of {', '.join(GRPC_MODES)}")
    if ssl_context is not None:
        ssl_context.set_alpn_protocols(["h2"])
    peer = Peer("grpc", host, port, secure=ssl_context is not None)
    run = Run(count, size, rate=rate, progress=progress, progress_on_write=mode == "stream")
    message = gateway_pb2.Message

    def frames(seqs: Iterable[int]) -> bytes:
        return b"".join(
            grpc_frame(message(payload=make_payload(size, seq), sequence=seq)) for seq in seqs
        )

    def failed(call: GrpcCall) -> TransportError | None:
        """The connection's failure, or the endpoint's not being gRPC, as the run's error."""
        if call.status == CONNECTION_LOST:
            return TransportError(call.detail)
        if call.status is not None and call.status.startswith("HTTP "):
            return Misdirected(
                f"{peer.where}: answered {call.status} ({call.detail}): wrong transport? "
                "(is it the gateway's gRPC listener?)"
            )
        return None

    @asynccontextmanager
    async def connection(resender: Resender) -> AsyncIterator[H2Client]:
        """A connection that has answered: the run has reached the gateway (again, after a
        lost connection: a reconnect)."""
        async with grpc_connection(
            peer, ssl_context=ssl_context, step_timeout=step_timeout, first=not run.reached
        ) as conn:
            run.reached = True
            resender.connected()
            yield conn

    async def unary() -> None:
        resender = Resender(run, retries)
        seqs = run.claim(1)
        again: bool | None = None  # sent before: after UNAVAILABLE (False), a loss (True)
        try:
            while seqs:
                try:
                    async with connection(resender) as conn:
                        while seqs and not conn.terminated:
                            if again is None:
                                await run.pace(seqs.start)
                            else:
                                resender.resending(1, after_loss=again)
                            metadata = (
                                () if ids is None else ((IDEMPOTENCY_KEY, f"{ids}:{seqs.start}"),)
                            )
                            call = conn.open_call(
                                GRPC_METHODS["unary"],
                                token=token,
                                step_timeout=step_timeout,
                                metadata=metadata,
                            )
                            try:
                                with trio.fail_after(step_timeout):
                                    await call.send(frames(seqs), end=True)
                            except trio.TooSlowError as exc:
                                raise peer.error(f"no progress for {step_timeout:g} s") from exc
                            status, replies = await _finish(call, peer, step_timeout)
                            if error := failed(call):
                                raise error
                            if status == "UNAVAILABLE" and conn.terminated:
                                break  # refused by a GOAWAY: resend on a new connection
                            if status == "UNAVAILABLE" and await resender.refused(1):
                                again = False
                                continue
                            run.wrote(1)
                            accepted = status == "OK" and bool(replies)
                            if accepted:
                                accepted = gateway_pb2.Ack.FromString(replies[0]).accepted
                            run.accept(1 if accepted else 0)
                            reason = status if status != "OK" else "not accepted"
                            run.reject(reason, 0 if accepted else 1)
                            resender.progress()
                            again = None
                            seqs = run.claim(1)
                except TransportError as exc:
                    if not await resender.lost(exc, len(seqs)):
                        raise
                    again = True
        except TransportError as exc:
            run.gone(exc, written=0, unsent=len(seqs))

    async def streaming(acked: bool) -> None:
        """One call per connection. With ``retries``, a lost call's unacknowledged messages
        go first on the next (in ``stream`` mode every message of the call: only its final
        ``Ack`` settles them)."""
        per_write = run.chunk()
        resender = Resender(run, retries)
        seqs = run.claim(per_write)
        again: list[int] = []  # sent on a lost call, unacknowledged: to send first
        pending: dict[int, None] = {}  # handed to this call, unacknowledged (in order)

        async def read_acks(call: GrpcCall) -> None:
            while batch := await call.recv_batch():
                for data in batch:
                    ack = gateway_pb2.Ack.FromString(data)
                    if ack.sequence not in pending:
                        continue  # settled already
                    del pending[ack.sequence]
                    resender.progress()
                    if ack.accepted:
                        run.accept(1)
                    else:
                        run.reject(ack.reason or "not accepted", 1)

        async def write(call: GrpcCall, chunk: Sequence[int]) -> bool:
            """Hand ``chunk`` to the call (unacknowledged from then on); False if it is over."""
            pending.update(dict.fromkeys(chunk))
            with trio.fail_after(step_timeout):
                return await call.send(frames(chunk))

        async def one_call() -> tuple[str, list[bytes]]:
            nonlocal seqs
            async with connection(resender) as conn:
                call = conn.open_call(
                    GRPC_METHODS["bidi" if acked else "stream"],
                    token=token,
                    step_timeout=step_timeout,
                    metadata=() if ids is None else ((IDEMPOTENCY_KEY, ids),),
                )
                async with trio.open_nursery() as nursery:
                    if acked:
                        nursery.start_soon(read_acks, call)
                    try:
                        while again or seqs:
                            fresh = not again  # else first what a lost call left
                            if fresh:
                                await run.pace(seqs.start)
                                chunk: Sequence[int] = seqs
                                seqs = range(0)
                                run.wrote(len(chunk))
                            else:
                                chunk = resender.take_again(again, per_write)
                            if not await write(call, chunk):
                                break
                            if not (seqs or again):  # the next messages of the run
                                seqs = run.claim(per_write)
                        else:
                            with trio.fail_after(step_timeout):
                                await call.send(b"", end=True)
                    except trio.TooSlowError as exc:
                        raise peer.error(f"no progress for {step_timeout:g} s") from exc
                    try:
                        with trio.fail_after(step_timeout):
                            await call.done.wait()
                    except trio.TooSlowError as exc:
                        raise peer.error(f"no answer within {step_timeout:g} s") from exc
                status, replies = await _finish(call, peer, step_timeout)
                if error := failed(call):
                    raise error
                return status, replies

        while seqs or again:
            try:
                status, replies = await one_call()
            except TransportError as exc:
                unsettled = len(pending) + len(again)
                if not await resender.lost(exc, unsettled):
                    run.gone(exc, written=unsettled, unsent=len(seqs))
                    return
                again[:0] = pending
                pending.clear()
                continue
            unsettled = len(pending) + len(again)
            if status == "OK" and not acked and replies:
                ack = gateway_pb2.Ack.FromString(replies[-1])
                run.accept(ack.accepted_count)
                run.reject("dropped", ack.rejected_count)
                unsettled = max(0, unsettled - ack.accepted_count - ack.rejected_count)
            elif status == "UNAVAILABLE" and await resender.refused(unsettled):
                again[:0] = pending
                pending.clear()
                continue
            reason = "no ack" if status == "OK" else status
            run.reject(reason, unsettled)
            pending.clear()
            again.clear()
            run.reject_unsent(reason, len(seqs))
            if status != "OK":
                run.stop(status)
            return

    if mode == "unary":
        await run_workers(concurrency, unary)
    else:
        acked = mode == "bidi"
        await run_workers(concurrency, lambda: streaming(acked))
    return run.summary()
