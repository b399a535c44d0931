"""An asyncio event loop in a thread of its own, and the one bridge from Trio into it.

nats-py, the official NATS client, is asyncio only. The NATS sink and source of the package
ran it on such a loop before they got their own client on Trio (docs/sinks.md, "Why its own
NATS client, and what it costs"); the benches keep both old versions for comparison
(bench/_nats_py_sink.py, bench/_nats_py_source.py), on this loop: owned for its lifetime
(started when it opens, stopped and joined when it closes), a call crosses from Trio once, as
one coroutine, and its result comes back once through ``TrioToken.run_sync_soon``, with no
worker thread held while waiting.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import trio

from trio_gateway._errors import GatewayError

__all__ = ("AsyncioThread",)

_T = TypeVar("_T")


class AsyncioThread:
    """An asyncio event loop running in a thread of its own, and the one bridge into it.

    :meth:`run` hands a coroutine to the loop and sleeps in Trio (no worker thread) until the
    loop finishes it; cancelling the Trio side cancels the asyncio task.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        # A plain selector loop, whatever the event loop policy (trio-asyncio replaces
        # asyncio.new_event_loop with one that refuses to run inside Trio).
        loop = asyncio.SelectorEventLoop()

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_forever()
                # Stopped: cancel what is left (nats-py's reader, flusher, pinger tasks).
                tasks = asyncio.all_tasks(loop)
                for task in tasks:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

        self._loop = loop
        # A daemon only so that an interpreter exit without aclose() cannot hang on it;
        # aclose() stops and joins it.
        self._thread = threading.Thread(target=main, name=self._name, daemon=True)
        self._thread.start()

    async def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        loop = self._loop
        if loop is None or not self.running:
            coroutine.close()
            raise GatewayError("the asyncio loop is not running")
        token = trio.lowlevel.current_trio_token()
        finished = trio.Event()
        started: list[asyncio.Task[_T]] = []

        def wake(_: asyncio.Task[_T]) -> None:
            try:
                token.run_sync_soon(finished.set)
            except trio.RunFinishedError:
                pass

        def start() -> None:  # on the loop's thread
            task = loop.create_task(coroutine)
            task.add_done_callback(wake)
            started.append(task)

        # A task and a done callback, not run_coroutine_threadsafe's concurrent future
        # chained to it: one thread-safe hand-over each way (a crossing: 108 -> 91 us of CPU,
        # the medians of 8 interleaved runs on the loaded 2-core machine).
        loop.call_soon_threadsafe(start)
        try:
            await finished.wait()
        except BaseException:
            # Runs after start() (the loop runs its callbacks in order): the task exists.
            try:
                loop.call_soon_threadsafe(lambda: started[0].cancel())
            except RuntimeError:  # the loop is closed already: nothing left to cancel
                pass
            raise
        task = started[0]
        if task.cancelled():  # the loop is stopping: an error, not asyncio's BaseException
            raise GatewayError("the asyncio loop stopped during the call")
        return task.result()

    async def stop(self) -> None:
        """Stop the loop and join the thread (bound it with a cancel scope: it is abandoned)."""
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:  # already closed
            pass
        await trio.to_thread.run_sync(thread.join, abandon_on_cancel=True)
