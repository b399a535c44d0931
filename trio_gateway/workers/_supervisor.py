"""The supervising parent of ``serve --workers N``: start, watch, restart and stop the workers.

A Trio program in its own right (see the package docstring for the whole picture): it
reserves the ports (``_ports.py``), starts each worker with its spec on stdin, reads the
worker's stderr for its log records and events and relays its stdout (``_pipes.py``,
``_logs.py``), restarts a worker that died (``_restart.py``), scrapes every worker's metrics
into one aggregate (``_metrics.py``, served by ``_admin.py``), forwards stop signals, and
sums the workers' ledgers (``_ledgers.py``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import typing
from collections.abc import Mapping
from contextlib import suppress
from typing import Any, Literal

import trio

from .._config import GatewayConfig, build_gateway, build_pipelines, parse_hostport
from .._errors import ConfigurationError, TransportError
from .._ledger import Ledger
from .._log import RateLimitedLogger, logger
from ..admin._scrape import MetricsClient
from ._admin import SupervisorAdmin
from ._child import WORKER_CODE, WORKER_ENV
from ._ledgers import WorkersLedger, ledger_from_event, sum_ledgers, sum_reports
from ._logs import read_line
from ._metrics import MetricsAggregate, Samples, ledger_from_samples
from ._pipes import MAX_STDOUT_PENDING, WholeLines, pump
from ._ports import reserve_ports
from ._restart import RestartPolicy, WorkerError
from ._runs import Run, Slot
from ._spec import config_to_jsonable, encode_spec

__all__ = ("Supervisor", "serve_workers")

_log = logger.getChild("workers")
_scrape_errors = RateLimitedLogger(_log)

State = Literal["created", "starting", "running", "stopping", "stopped"]


class Supervisor:
    """Runs ``config.workers`` worker processes that share the configured ports (see the package).

    Use it from a Trio program (the ``serve --workers N`` command does)::

        supervisor = Supervisor(config, handle_signals=True)
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(supervisor.run)  # once every worker is up
            ...
            supervisor.shutdown()                         # or SIGTERM / SIGINT
        print(supervisor.ledger.to_json())

    :meth:`run` returns the combined :class:`WorkersLedger`; it raises :class:`WorkerError`
    (after stopping the others and computing the ledger) if it gave up on a failing worker.
    """

    def __init__(
        self,
        config: GatewayConfig,
        *,
        workers: int | None = None,
        restart: RestartPolicy | None = None,
        handle_signals: bool = False,
        scrape_interval: float = 1.0,
        stop_timeout: float | None = None,
        python: str | None = None,
    ) -> None:
        count = workers if workers is not None else config.workers
        if count < 1:
            raise ConfigurationError("gateway.workers", "must be at least 1")
        if not hasattr(socket, "SO_REUSEPORT"):
            raise ConfigurationError(
                "gateway.workers", "several workers need SO_REUSEPORT (Linux, BSD, macOS)"
            )
        if scrape_interval <= 0:
            raise ConfigurationError("workers.scrape_interval", "must be positive")
        if not config.sources and not config.pipelines:
            raise ConfigurationError("sources", "no source configured")
        self.config = config
        self.workers = count
        self.restart = restart or RestartPolicy()
        self.handle_signals = handle_signals
        self.scrape_interval = scrape_interval
        self.stop_timeout = (
            stop_timeout
            if stop_timeout is not None
            else config.grace_period + config.drain_timeout + 5.0
        )
        self.python = python or sys.executable
        self.slots = [Slot(i) for i in range(count)]
        self.metrics = MetricsAggregate()
        self.state: State = "created"
        self.failure: str | None = None
        self.bound: list[list[tuple[str, int]]] = []
        """The addresses the workers listen on (one list per source), once running."""
        self.admin: SupervisorAdmin | None = None
        if config.admin and config.admin != "off":
            host, port = parse_hostport(config.admin, key="admin.listen")
            self.admin = SupervisorAdmin(host, port)
        self._stopping = trio.Event()
        self._all_ready = trio.Event()
        self._stdout_lock = trio.Lock()
        self._stdout_broken = False
        self._spec_config: dict[str, Any] = {}
        self._final: WorkersLedger | None = None

    # -- control --------------------------------------------------------------------------

    def shutdown(self, signum: int = signal.SIGTERM) -> None:
        """Stop: forward ``signum`` to every running worker (idempotent)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self.state in ("created", "starting", "running"):
            self.state = "stopping"
        # A worker still starting has no signal handler yet; it gets its stdin closed
        # (see _stop_when_asked) and stops as soon as it is up.
        self._signal_workers(signum, ready_only=True)

    def abort(self, signum: int = signal.SIGINT) -> None:
        """Forward a second signal: the workers stop at once (what is left is abandoned)."""
        self.shutdown(signum)
        self._signal_workers(signum, ready_only=False)

    def _signal_workers(self, signum: int, *, ready_only: bool) -> None:
        for slot in self.slots:
            run = slot.run
            if run is not None and run.process.returncode is None and (run.ready or not ready_only):
                with suppress(ProcessLookupError):
                    run.process.send_signal(signum)
                run.signalled = True

    @property
    def accepting(self) -> bool:
        """True while running, not stopping, and every worker is up (what ``/readyz`` says)."""
        return (
            self.state == "running"
            and not self._stopping.is_set()
            and all(s.run is not None and s.run.ready for s in self.slots)
        )

    @property
    def ledger(self) -> WorkersLedger:
        """The combined ledger (final once :meth:`run` has finished; an estimate before)."""
        if self._final is not None:
            return self._final
        ledgers: list[Ledger] = []
        crashed = 0
        for slot in self.slots:
            ledgers += slot.ledgers
            crashed += slot.crashed
            if slot.run is not None and slot.run.samples is not None:
                ledgers.append(ledger_from_samples(slot.run.samples))
        return WorkersLedger(
            sum_ledgers(ledgers),
            workers=self.workers,
            restarts=sum(s.restarts for s in self.slots),
            crashed=crashed,
        )

    @property
    def pipeline_reports(self) -> dict[str, dict[str, Any]]:
        """With named pipelines: each pipeline's report summed over the worker runs that left
        a ledger (a run that crashed counts in :attr:`ledger` only, from its metrics)."""
        return {
            spec.name: sum_reports(
                runs[spec.name] for slot in self.slots for runs in slot.reports if spec.name in runs
            )
            for spec in self.config.pipelines
        }

    def live_samples(self) -> dict[int, Samples]:
        return {
            slot.index: slot.run.samples
            for slot in self.slots
            if slot.run is not None and slot.run.samples is not None
        }

    # -- running --------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> WorkersLedger:
        """Start the workers, keep them running until :meth:`shutdown`, return the ledger."""
        if self.state != "created":
            raise RuntimeError("a Supervisor runs once; create a new one")
        self.state = "starting"
        holds: list[trio.socket.SocketType] = []
        udp_holds: list[trio.socket.SocketType] = []
        try:
            worker_config = await reserve_ports(self.config, holds, udp_holds)
            # Every source must take reuse_port, and so on.
            if worker_config.pipelines:
                build_pipelines(worker_config)
            else:
                build_gateway(worker_config)
            self._spec_config = config_to_jsonable(worker_config)
            async with trio.open_nursery() as root:
                if self.handle_signals:
                    root.start_soon(self._watch_signals)
                if self.admin is not None:
                    await root.start(self.admin.run, self)
                root.start_soon(self._scrape_loop)
                async with trio.open_nursery() as keepers:
                    for slot in self.slots:
                        keepers.start_soon(self._keep, slot)
                    await _first_of(self._all_ready.wait, self._stopping.wait)
                    for sock in udp_holds:  # it would take a share of the datagrams
                        sock.close()
                    if self.failure is None:
                        if not self._stopping.is_set():
                            self.state = "running"
                        task_status.started(self.bound)
                root.cancel_scope.cancel()
        finally:
            for sock in holds + udp_holds:
                sock.close()
            self.state = "stopped"
            self._final = self.ledger
        if self.failure is not None:
            raise WorkerError(self.failure)
        return self._final

    def _spec_for(self, slot: Slot) -> bytes:
        return encode_spec(
            slot.index,
            self._spec_config,
            sys_path=list(sys.path),
            log_level=logging.getLogger("trio_gateway").getEffectiveLevel(),
        )

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self._stopping.is_set():
                    _log.warning(
                        "%s: stopping %d workers (again to stop at once)", name, self.workers
                    )
                    self.shutdown(signum)
                else:
                    _log.warning("%s: workers stop at once", name)
                    self.abort(signum)

    async def _keep(self, slot: Slot) -> None:
        """Keep worker ``slot`` running until the gateway stops; restart it with backoff."""
        policy = self.restart
        while not self._stopping.is_set():
            run = await self._run_once(slot)
            if self._stopping.is_set():
                return
            now = trio.current_time()
            slot.failures.append(now)
            while slot.failures and slot.failures[0] < now - policy.window:
                slot.failures.popleft()
            why = run.describe_exit() if run is not None else "could not start"
            if len(slot.failures) >= policy.max_failures:
                self.failure = (
                    f"worker {slot.index} failed {len(slot.failures)} times within "
                    f"{policy.window:g} s (last: {why}); giving up"
                )
                _log.error("%s", self.failure)
                self.shutdown(signal.SIGTERM)
                return
            delay = policy.delay(len(slot.failures))
            _log.warning("worker %d ended (%s); restarting in %.1f s", slot.index, why, delay)
            with trio.move_on_after(delay):
                await self._stopping.wait()

    async def _run_once(self, slot: Slot) -> Run | None:
        spec = self._spec_for(slot)
        try:
            process = await trio.lowlevel.open_process(
                [self.python, "-c", WORKER_CODE, f"--worker={slot.index}"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**os.environ, WORKER_ENV: str(slot.index)},
                process_group=0,  # a terminal's Ctrl-C reaches the parent only
            )
        except OSError as exc:
            _log.error("worker %d: cannot start %s: %s", slot.index, self.python, exc)
            return None
        run = Run(slot.index, process)
        slot.run = run
        slot.runs += 1
        _log.info("worker %d started: pid %d", slot.index, process.pid)
        assert process.stdin is not None
        try:
            async with trio.open_nursery() as io:
                io.start_soon(self._read_stderr, run, slot)
                io.start_soon(self._relay_stdout, run)
                io.start_soon(self._stop_when_asked, run)
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await process.stdin.send_all(spec)
                await process.wait()
                # The pipes end with the process (unless it left a child holding them).
                with trio.move_on_after(self.stop_timeout):
                    await run.stderr_done.wait()
                    await run.stdout_done.wait()
                io.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:  # cancelled from outside: stop, bounded
                    self.shutdown()
                    await self._terminate(run, slot)
                for pipe in (process.stdin, process.stdout, process.stderr):
                    if pipe is not None:
                        await pipe.aclose()
                self._retire(run, slot)
        return run

    async def _terminate(self, run: Run, slot: Slot) -> None:
        """The supervisor was cancelled: let this worker flush (bounded), then kill it."""
        stdin = run.process.stdin
        if not run.signalled and stdin is not None:  # see _stop_when_asked
            await stdin.aclose()
        with trio.move_on_after(self.stop_timeout):
            if not run.stderr_done.is_set():
                await self._read_stderr(run, slot)
            await run.process.wait()
        if run.process.returncode is None:
            run.process.kill()
            await run.process.wait()

    def _retire(self, run: Run, slot: Slot) -> None:
        was_ready = run.ready
        run.ended = True
        run.ready = False
        if slot.run is run:
            slot.run = None
        if run.samples is not None:
            self.metrics.retire(slot.index, run.samples)
        if run.ledger is not None:
            slot.ledgers.append(run.ledger)
        else:
            slot.crashed += 1
            slot.ledgers.append(ledger_from_samples(run.samples or {}))
            if was_ready:
                _log.warning(
                    "worker %d (pid %d) left no ledger (%s): its counts come from the last scrape",
                    slot.index,
                    run.process.pid,
                    run.describe_exit(),
                )
        level = logging.INFO if self._stopping.is_set() else logging.WARNING
        _log.log(
            level, "worker %d (pid %d) exited: %s", slot.index, run.process.pid, run.describe_exit()
        )

    async def _stop_when_asked(self, run: Run) -> None:
        await self._stopping.wait()
        stdin = run.process.stdin
        if not run.signalled and stdin is not None:
            # Not up yet when the stop came, so no signal (it may have no handler yet): the
            # end of its stdin stops it as soon as it is up. Never both: a worker that saw
            # one would take the other for a second signal and stop at once.
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stdin.aclose()
        await trio.sleep(self.stop_timeout)
        _log.warning(
            "worker %d (pid %d) still running %.0f s after stop; killing it",
            run.worker,
            run.process.pid,
            self.stop_timeout,
        )
        run.process.kill()

    async def _read_stderr(self, run: Run, slot: Slot) -> None:
        assert run.process.stderr is not None

        async def on_line(line: bytes) -> None:
            event = read_line(line, slot.log)
            if event is not None:
                self._on_event(run, slot, event)

        await pump(run.process.stderr, run.stderr, on_line)
        run.stderr_done.set()

    def _on_event(self, run: Run, slot: Slot, entry: Mapping[str, Any]) -> None:
        event = entry["event"]
        try:
            if event == "ready":
                admin = entry.get("admin")
                run.admin = (str(admin[0]), int(admin[1])) if admin else None
                run.bound = [
                    [(str(h), int(p)) for h, p in addresses] for addresses in entry["bound"]
                ]
                run.ready = True
                if not self.bound:
                    self.bound = run.bound
                again = slot.ever_ready
                slot.ever_ready = True
                _log.info(
                    "worker %d %s: pid %d",
                    slot.index,
                    "ready again" if again else "ready",
                    run.process.pid,
                )
                if all(s.ever_ready for s in self.slots):
                    self._all_ready.set()
            elif event == "ledger":
                run.ledger = ledger_from_event(entry["ledger"])
                if isinstance(entry.get("pipelines"), dict):
                    slot.reports.append(entry["pipelines"])
                _log.info("worker %d ledger: %s", slot.index, json.dumps(entry["ledger"]))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            slot.log.warning("bad %r event from the worker: %r", event, exc)

    async def _relay_stdout(self, run: Run) -> None:
        """The worker's stdout (the stdout sink) to ours, in whole lines."""
        assert run.process.stdout is not None
        await pump(run.process.stdout, WholeLines(MAX_STDOUT_PENDING), self._write_stdout)
        run.stdout_done.set()

    async def _write_stdout(self, data: bytes) -> None:
        if self._stdout_broken:
            return  # keep draining the worker's pipe so it never blocks on it
        async with self._stdout_lock:
            try:
                await trio.to_thread.run_sync(_write_stdout_blocking, data)
            except OSError as exc:
                self._stdout_broken = True
                _log.error("stdout: %s; the workers' output is discarded from now on", exc)

    async def _scrape_loop(self) -> None:
        # One client for the supervisor's life: a kept-alive connection per worker.
        async with MetricsClient(max_connections=self.workers) as scraper:
            while True:
                async with trio.open_nursery() as nursery:
                    for slot in self.slots:
                        run = slot.run
                        if run is not None and run.ready and run.admin is not None:
                            nursery.start_soon(self._scrape, scraper, run)
                await trio.sleep(self.scrape_interval)

    async def _scrape(self, scraper: MetricsClient, run: Run) -> None:
        assert run.admin is not None
        try:
            text = await scraper.fetch(*run.admin)
            samples = self.metrics.parse(run.worker, text)
        except (TransportError, ValueError) as exc:
            if not run.ended and not self._stopping.is_set():  # its admin closes at the end
                _scrape_errors.warning("worker %d: metrics: %s", run.worker, exc)
            return
        if not run.ended:
            run.samples = samples


def _write_stdout_blocking(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


async def _first_of(*waits: typing.Callable[[], typing.Awaitable[object]]) -> None:
    """Return as soon as one of ``waits`` returns."""
    async with trio.open_nursery() as nursery:

        async def one(wait: typing.Callable[[], typing.Awaitable[object]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        for wait in waits:
            nursery.start_soon(one, wait)


async def serve_workers(config: GatewayConfig) -> int:
    """``serve --workers N``: run the supervisor, log the addresses, print the combined ledger."""
    supervisor = Supervisor(config, handle_signals=True)
    try:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(supervisor.run)
            if supervisor.state == "running":  # else stopped by a signal before all were up
                sources = [("", s) for s in config.sources] + [
                    (f"pipeline {p.name} ", s) for p in config.pipelines for s in p.sources
                ]
                for (where, source), addresses in zip(sources, bound, strict=True):
                    for host, port in addresses:
                        logger.info("%slistening: %s on %s:%d", where, source.transport, host, port)
                logger.info("ready")
    finally:
        if supervisor.state == "stopped" and any(slot.runs for slot in supervisor.slots):
            for name, report in supervisor.pipeline_reports.items():
                print(json.dumps({"pipeline": name, **report}), file=sys.stderr, flush=True)
            print(supervisor.ledger.to_json(), file=sys.stderr, flush=True)
    # serve's exit statuses (docs/cli.md): 1 unbalanced, 3 stopped with messages abandoned.
    combined = supervisor.ledger
    if not combined.balanced:
        return 1
    return 3 if combined.ledger.abandoned else 0
