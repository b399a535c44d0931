"""Worker processes on one machine: ``serve --workers N``.

One Trio process uses one core. :class:`Supervisor` runs N worker processes, each a complete
gateway (its own queue, pump and sink), that share every listening port with ``SO_REUSEPORT``:
the kernel spreads TCP connections (HTTP, WebSocket and gRPC included) and UDP senders across
them. The supervising parent is a Trio program too:

* **Ports.** Before starting a worker, the parent binds each source's address itself, with
  ``SO_REUSEPORT``: a port in use fails there, once, with a clear error; port 0 becomes a
  concrete port that every worker then binds. The parent keeps its TCP socket bound (never
  listening, so the kernel never hands it a connection) for its whole life, which keeps the
  port reserved while a worker restarts. A bound UDP socket would get its share of datagrams,
  so the parent closes that one once every worker is up, before it reports the port.
* **Workers.** ``python -c "...worker_main()"`` per worker, in a process group of its own (a
  Ctrl-C at the terminal reaches the parent only, which forwards it once). The resolved
  configuration goes to the worker as one JSON line on its stdin; the pipe then stays open, and
  its end (the parent died, even by SIGKILL) makes the worker shut down cleanly. The worker's
  stderr carries JSON lines: its log records and two events, ``ready`` (bound addresses, the
  private admin port) and ``ledger`` (its shutdown ledger). Its stdout (the stdout sink) is
  relayed to the parent's stdout in whole lines, so two workers never interleave mid-line.
* **Restarts.** A worker that exits while the gateway is not stopping is started again after
  an exponential backoff (:class:`RestartPolicy`); one that fails ``max_failures`` times within
  ``window`` seconds makes the parent give up: it stops the others, prints the combined ledger
  and exits non-zero (:class:`WorkerError`).
* **Shutdown.** SIGTERM/SIGINT to the parent is forwarded to every worker, which runs its own
  cancellation-safe flush; a second signal is forwarded too (the workers stop at once). The
  parent waits (bounded by ``stop_timeout``, then SIGKILL) and prints one combined ledger: the
  sum of the workers' ledgers, plus ``workers``, ``restarts`` and ``crashed``.
* **Metrics.** Each worker serves its admin endpoint on a private loopback port; the parent
  scrapes them every ``scrape_interval`` seconds and serves the sum on the configured admin
  address (counters and histograms of an exited worker are kept, so sums never go backwards;
  ``process_*`` metrics keep a ``worker`` label instead of being summed). ``/readyz`` is 200
  while every worker is up and accepting.

See docs/workers.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import typing
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeAlias, TypeVar, cast

import trio
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from ._buffer import tune_allocator
from ._config import GatewayConfig, build_gateway, parse_hostport
from ._errors import ConfigurationError, GatewayError, TransportError
from ._ledger import Ledger
from ._log import RateLimitedLogger, logger
from .admin import AdminServer
from .admin._scrape import fetch_metrics as scrape_metrics

if typing.TYPE_CHECKING:
    from ._gateway import Gateway

__all__ = (
    "WORKER_ENV",
    "RestartPolicy",
    "Supervisor",
    "WorkerError",
    "WorkersLedger",
    "serve_workers",
    "worker_main",
)

WORKER_ENV = "TRIO_GATEWAY_WORKER"
"""Set to the worker's index (``0`` .. ``N-1``) in every worker's environment."""

_log = logger.getChild("workers")
_scrape_errors = RateLimitedLogger(_log)

_WORKER_CODE = "from trio_gateway._workers import worker_main; raise SystemExit(worker_main())"
_MAX_SPEC = 16 << 20
"""Bound on the configuration line a worker reads from its stdin."""
_MAX_STDERR_LINE = 256 * 1024
"""A longer line on a worker's stderr is cut (and marked) rather than buffered."""
_MAX_STDOUT_PENDING = 16 << 20
"""Bound on a partial stdout line held by the relay; past it the piece is passed on as is."""
_MAX_METRICS_BODY = 16 << 20
_PIPE_READ = 256 * 1024
_SCRAPE_TIMEOUT = 5.0

T = TypeVar("T")
SampleKey: TypeAlias = tuple[str, tuple[tuple[str, str], ...]]
"""(sample name, sorted label pairs)"""
Samples: TypeAlias = dict[str, dict[SampleKey, float]]
"""family name -> sample -> value"""
_COUNTER_TYPES = frozenset({"counter", "histogram", "summary", "gaugehistogram"})
_PER_WORKER_PREFIX = "process_"


class WorkerError(GatewayError):
    """The supervisor gave up: a worker kept failing (see :class:`RestartPolicy`)."""


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How a worker that died is restarted: exponential backoff, then giving up.

    The n-th failure of a worker within ``window`` seconds is followed by a delay of
    ``initial * multiplier ** (n - 1)`` seconds (at most ``maximum``); at ``max_failures``
    failures within ``window`` the supervisor gives up and stops the gateway.
    """

    initial: float = 0.2
    maximum: float = 10.0
    multiplier: float = 2.0
    max_failures: int = 5
    window: float = 60.0

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial or self.multiplier < 1:
            raise ConfigurationError("restart", "need 0 < initial <= maximum and multiplier >= 1")
        if self.max_failures < 1:
            raise ConfigurationError("restart.max_failures", "must be at least 1")
        if self.window <= 0:
            raise ConfigurationError("restart.window", "must be positive")

    def delay(self, failures: int) -> float:
        """Seconds to wait before restarting after ``failures`` recent failures (1-based)."""
        return min(self.maximum, self.initial * self.multiplier ** (failures - 1))


@dataclass(frozen=True, slots=True)
class WorkersLedger:
    """The combined shutdown ledger: the sum of the workers' ledgers.

    ``crashed`` counts worker runs that ended without a ledger of their own (killed, or
    crashed); their part comes from the last metrics scrape, what they had not delivered then
    counts as abandoned, and what they received after that scrape is in no count.
    """

    ledger: Ledger
    workers: int
    restarts: int
    crashed: int

    @property
    def balanced(self) -> bool:
        return self.ledger.balanced

    def as_dict(self) -> dict[str, object]:
        return {
            **self.ledger.as_dict(),
            "workers": self.workers,
            "restarts": self.restarts,
            "crashed": self.crashed,
        }

    def to_json(self) -> str:
        return json.dumps({"ledger": self.as_dict()})


# -- the configuration a worker gets --------------------------------------------------------


def config_to_jsonable(config: GatewayConfig) -> dict[str, Any]:
    """A :class:`GatewayConfig` as plain JSON-able data (see :func:`config_from_jsonable`)."""
    return dataclasses.asdict(config)


def config_from_jsonable(data: Mapping[str, Any]) -> GatewayConfig:
    return _rebuild(GatewayConfig, data)


def _rebuild(cls: type[T], data: Mapping[str, Any]) -> T:
    """Rebuild a (nested) frozen config dataclass from :func:`dataclasses.asdict` output."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for item in dataclasses.fields(cast(Any, cls)):
        if item.name not in data:
            continue
        value = data[item.name]
        hint = hints[item.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            value = _rebuild(hint, value)
        elif typing.get_origin(hint) is tuple:
            (inner, *_) = typing.get_args(hint) or (object,)
            if isinstance(inner, type) and dataclasses.is_dataclass(inner):
                value = tuple(_rebuild(inner, v) for v in value)
            else:
                value = tuple(value)
        kwargs[item.name] = value
    return cls(**kwargs)


# -- the worker side ------------------------------------------------------------------------

_stderr_lock = threading.Lock()


def _write_line(entry: Mapping[str, object]) -> None:
    line = json.dumps(entry, default=str) + "\n"
    with _stderr_lock:
        sys.stderr.write(line)
        sys.stderr.flush()


class _JsonLinesHandler(logging.Handler):
    """A worker's log records, one JSON line each on stderr, for the parent to re-log."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry: dict[str, object] = {
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
            }
            if record.exc_info:
                entry["exc"] = logging.Formatter().formatException(record.exc_info)
            _write_line({"log": entry})
        except Exception:
            self.handleError(record)


def _read_spec() -> dict[str, Any]:
    """The one JSON line the parent writes on the worker's stdin (read unbuffered)."""
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = os.read(0, 65536)
        if not chunk:
            break
        data += chunk
        if len(data) > _MAX_SPEC:
            raise ConfigurationError("worker", "configuration line too long")
    spec = json.loads(data)
    if not isinstance(spec, dict):
        raise ConfigurationError("worker", "configuration line is not an object")
    return spec


def worker_main() -> int:
    """The entry point of one worker process (started by :class:`Supervisor`)."""
    spec = _read_spec()
    sys.path[:] = [str(p) for p in spec["sys_path"]]
    root = logging.getLogger("trio_gateway")
    root.handlers[:] = [_JsonLinesHandler()]
    root.setLevel(int(spec["log_level"]))
    root.propagate = False
    try:
        tune_allocator()  # as serve does (see its docstring)
        gateway = build_gateway(config_from_jsonable(spec["config"]), handle_signals=True)
        return trio.run(_worker_serve, gateway)
    except BaseException as exc:
        leaves = _leaves(exc)
        if not all(isinstance(leaf, GatewayError | OSError) for leaf in leaves):
            raise
        _log.error("worker failed: %s", leaves[0])
        return 1


async def _worker_serve(gateway: Gateway) -> int:
    async with trio.open_nursery() as nursery:

        async def run_gateway(task_status: trio.TaskStatus[Any]) -> None:
            await gateway.run(task_status=task_status)
            nursery.cancel_scope.cancel()  # the gateway is done: stop watching stdin

        bound = await nursery.start(run_gateway)
        admin = gateway.service_values[0] if gateway.service_values else None
        _write_line({"event": "ready", "pid": os.getpid(), "bound": bound, "admin": admin})
        nursery.start_soon(_watch_parent, gateway)
    ledger = gateway.ledger
    _write_line({"event": "ledger", "ledger": ledger.as_dict()})
    return 0 if ledger.balanced else 1


async def _watch_parent(gateway: Gateway) -> None:
    """The parent holds our stdin open: its end (a clean stop, or the parent died) = stop."""
    async with trio.lowlevel.FdStream(os.dup(0)) as stdin:
        while await stdin.receive_some(4096):
            pass
    if gateway.accepting:  # else the signal the parent forwarded is already being handled
        _log.info("stdin closed (the supervisor stops or went away): shutting down")
    gateway.shutdown()


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


# -- metrics across workers -----------------------------------------------------------------


class MetricsAggregate:
    """Sums the workers' ``/metrics`` into one view that stays correct across restarts.

    * Counters and histograms are summed over the workers; when a worker run ends, its last
      scraped values are kept (``retire``) and added to its successors', so a sum never goes
      backwards (Prometheus would read a drop as a counter reset).
    * Gauges are summed over the running workers only (queue depth and capacity, connections).
    * ``process_*`` families are per process: they get a ``worker`` label instead of a sum.
    """

    def __init__(self) -> None:
        self.meta: dict[str, tuple[str, str]] = {}
        """family name -> (type, help), in first-seen order."""
        self.retired: dict[int, Samples] = {}

    def parse(self, worker: int, text: str) -> Samples:
        """One worker's exposition text -> samples (raises ValueError if malformed)."""
        samples: Samples = {}
        for family in text_string_to_metric_families(text):
            self.meta.setdefault(family.name, (family.type, family.documentation))
            per_worker = family.name.startswith(_PER_WORKER_PREFIX)
            values = samples.setdefault(family.name, {})
            for sample in family.samples:
                labels = dict(sample.labels)
                if per_worker:
                    labels["worker"] = str(worker)
                key = (sample.name, tuple(sorted(labels.items())))
                values[key] = values.get(key, 0.0) + sample.value
        return samples

    def retire(self, worker: int, samples: Samples) -> None:
        """A worker run ended: keep its counters (not its gauges) in the totals."""
        kept = self.retired.setdefault(worker, {})
        for name, values in samples.items():
            if self.meta.get(name, ("gauge", ""))[0] not in _COUNTER_TYPES:
                continue
            target = kept.setdefault(name, {})
            for key, value in values.items():
                target[key] = target.get(key, 0.0) + value

    def worker_total(self, worker: int, live: Samples | None, family: str) -> float:
        """One worker's sum of every sample of a counter ``family`` (retired runs included)."""
        total = sum(self.retired.get(worker, {}).get(family, {}).values())
        if live is not None:
            total += sum(live.get(family, {}).values())
        return total

    def combine(self, live: Mapping[int, Samples]) -> dict[str, dict[SampleKey, float]]:
        """Retired counters + every running worker's samples, summed per sample."""
        totals: dict[str, dict[SampleKey, float]] = {name: {} for name in self.meta}
        for source in (*self.retired.values(), *live.values()):
            for name, values in source.items():
                target = totals.setdefault(name, {})
                for key, value in values.items():
                    target[key] = target.get(key, 0.0) + value
        return totals

    def metrics(self, live: Mapping[int, Samples]) -> Iterator[Metric]:
        """The combined families, ready for a collector to yield."""
        for name, values in self.combine(live).items():
            if not values:
                continue
            kind, documentation = self.meta.get(name, ("unknown", ""))
            family = Metric(name, documentation, kind)
            for (sample, labels), value in values.items():
                family.add_sample(sample, dict(labels), value)
            yield family


def ledger_from_samples(samples: Samples) -> Ledger:
    """What a worker's metrics say about its messages (for a worker that left no ledger)."""

    def by_label(family: str, label: str) -> Counter[str]:
        out: Counter[str] = Counter()
        for (sample, labels), value in samples.get(family, {}).items():
            if sample.endswith("_total"):
                out[dict(labels).get(label, "")] += int(value)
        return out

    received = sum(by_label("trio_gateway_received_messages", "transport").values())
    delivered = sum(by_label("trio_gateway_delivered_messages", "").values())
    dropped = dict(by_label("trio_gateway_dropped_messages", "reason"))
    rejected = {k: v for k, v in by_label("trio_gateway_rejected_messages", "reason").items() if v}
    abandoned = max(received - delivered - sum(dropped.values()), 0)
    return Ledger(received, delivered, dropped, abandoned, rejected)


def sum_ledgers(ledgers: Iterable[Ledger]) -> Ledger:
    received = delivered = abandoned = 0
    dropped: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    for ledger in ledgers:
        received += ledger.received
        delivered += ledger.delivered
        abandoned += ledger.abandoned
        dropped.update(ledger.dropped)
        rejected.update(ledger.rejected)
    for reason in ("drop_newest", "drop_oldest", "filtered", "processor_error", "sink_failed"):
        dropped.setdefault(reason, 0)
    return Ledger(received, delivered, dict(dropped), abandoned, dict(rejected))


def _ledger_from_event(data: Mapping[str, Any]) -> Ledger:
    return Ledger(
        received=int(data["received"]),
        delivered=int(data["delivered"]),
        dropped={str(k): int(v) for k, v in dict(data["dropped"]).items()},
        abandoned=int(data["abandoned"]),
        rejected={str(k): int(v) for k, v in dict(data["rejected"]).items()},
    )


async def fetch_metrics(address: tuple[str, int]) -> str:
    """GET ``/metrics`` from a worker's admin endpoint (bounded in time and size)."""
    host, port = address
    return await scrape_metrics(host, port, max_size=_MAX_METRICS_BODY, time_limit=_SCRAPE_TIMEOUT)


# -- the supervising parent -----------------------------------------------------------------


class _Lines:
    """Splits a byte stream into lines, each bounded (a longer one is cut and marked)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending = bytearray()
        self.discarding = False

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        self.pending += data
        lines: list[bytes] = []
        while True:
            end = self.pending.find(b"\n")
            if end < 0:
                break
            line = bytes(self.pending[:end])
            del self.pending[: end + 1]
            if self.discarding:
                self.discarding = False
                continue
            lines.append(line)
        if len(self.pending) > self.limit:
            if not self.discarding:
                lines.append(bytes(self.pending[: self.limit]) + b" [line cut]")
            self.discarding = True
            self.pending.clear()
        return lines

    def close(self) -> list[bytes]:
        rest, self.pending = bytes(self.pending), bytearray()
        return [rest] if rest and not self.discarding else []


class _Run:
    """One run of one worker: a process from start to exit."""

    def __init__(self, worker: int, process: trio.Process) -> None:
        self.worker = worker
        self.process = process
        self.ready = False
        self.admin: tuple[str, int] | None = None
        self.bound: list[list[tuple[str, int]]] = []
        self.ledger: Ledger | None = None
        self.samples: Samples | None = None
        self.ended = False
        self.signalled = False
        """Whether a stop signal was forwarded to it (else its stdin is closed to stop it)."""
        self.stderr = _Lines(_MAX_STDERR_LINE)
        self.stderr_done = trio.Event()
        self.stdout_done = trio.Event()

    def describe_exit(self) -> str:
        code = self.process.returncode
        if code is None:
            return "running"
        if code < 0:
            with suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
        return f"exit status {code}"


class _Slot:
    """Worker number ``index``: its current run and what its past runs left."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.run: _Run | None = None
        self.runs = 0
        self.ever_ready = False
        self.failures: deque[float] = deque()
        self.ledgers: list[Ledger] = []
        self.crashed = 0
        self.log = RateLimitedLogger(logging.getLogger(f"trio_gateway.worker.{index}"), burst=100)

    @property
    def restarts(self) -> int:
        return max(self.runs - 1, 0)


State = Literal["created", "starting", "running", "stopping", "stopped"]


class Supervisor:
    """Runs ``config.workers`` worker processes that share the configured ports (see module doc).

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
        if not config.sources:
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
        self.slots = [_Slot(i) for i in range(count)]
        self.metrics = MetricsAggregate()
        self.state: State = "created"
        self.failure: str | None = None
        self.bound: list[list[tuple[str, int]]] = []
        """The addresses the workers listen on (one list per source), once running."""
        self.admin: _SupervisorAdmin | None = None
        if config.admin and config.admin != "off":
            host, port = parse_hostport(config.admin, key="admin.listen")
            self.admin = _SupervisorAdmin(host, port)
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
            worker_config = await self._reserve_ports(holds, udp_holds)
            build_gateway(worker_config)  # every source must take reuse_port, and so on
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

    async def _reserve_ports(
        self, holds: list[trio.socket.SocketType], udp_holds: list[trio.socket.SocketType]
    ) -> GatewayConfig:
        """Bind every source's address with SO_REUSEPORT: errors surface here, once, and port 0
        becomes the concrete port all workers bind."""
        sources = []
        for source in self.config.sources:
            if source.options.get("reuse_port") is False:
                raise ConfigurationError(
                    f"{source.key}.reuse_port", "must be true (or unset) with several workers"
                )
            udp = source.transport == "udp"
            kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
            where = f"{source.host}:{source.port}"
            try:
                infos = await trio.socket.getaddrinfo(
                    source.host, source.port, type=kind, flags=socket.AI_PASSIVE
                )
                family, type_, proto, _, address = infos[0]
                sock = trio.socket.socket(family, type_, proto)
                (udp_holds if udp else holds).append(sock)
                if not udp:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(address)
            except OSError as exc:
                raise TransportError(
                    f"{source.key}: cannot listen on {where}: {exc.strerror or exc}"
                ) from exc
            port = sock.getsockname()[1]
            options = {**source.options, "reuse_port": True}
            sources.append(replace(source, port=port, options=options))
        changes: dict[str, Any] = {"sources": tuple(sources), "admin": "127.0.0.1:0"}
        if any(f.name == "workers" for f in dataclasses.fields(GatewayConfig)):
            changes["workers"] = 1
        return replace(self.config, **changes)

    def _spec_for(self, slot: _Slot) -> bytes:
        spec = {
            "worker": slot.index,
            "config": self._spec_config,
            "sys_path": sys.path,
            "log_level": logging.getLogger("trio_gateway").getEffectiveLevel(),
        }
        try:
            return json.dumps(spec).encode() + b"\n"
        except (TypeError, ValueError) as exc:
            raise ConfigurationError("sources", f"cannot pass to the workers: {exc}") from exc

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

    async def _keep(self, slot: _Slot) -> None:
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

    async def _run_once(self, slot: _Slot) -> _Run | None:
        spec = self._spec_for(slot)
        try:
            process = await trio.lowlevel.open_process(
                [self.python, "-c", _WORKER_CODE, f"--worker={slot.index}"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**os.environ, WORKER_ENV: str(slot.index)},
                process_group=0,  # a terminal's Ctrl-C reaches the parent only
            )
        except OSError as exc:
            _log.error("worker %d: cannot start %s: %s", slot.index, self.python, exc)
            return None
        run = _Run(slot.index, process)
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

    async def _terminate(self, run: _Run, slot: _Slot) -> None:
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

    def _retire(self, run: _Run, slot: _Slot) -> None:
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

    async def _stop_when_asked(self, run: _Run) -> None:
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

    async def _read_stderr(self, run: _Run, slot: _Slot) -> None:
        stream = run.process.stderr
        assert stream is not None
        while True:
            try:
                data = await stream.receive_some(_PIPE_READ)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                break
            for line in run.stderr.feed(data):
                self._on_line(run, slot, line)
        for line in run.stderr.close():
            self._on_line(run, slot, line)
        run.stderr_done.set()

    def _on_line(self, run: _Run, slot: _Slot, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        if text.startswith("{"):
            try:
                entry = json.loads(text)
            except ValueError:
                entry = None
            if isinstance(entry, dict):
                if "event" in entry:
                    self._on_event(run, slot, entry)
                    return
                record = entry.get("log")
                if isinstance(record, dict):
                    level = logging.getLevelName(str(record.get("level", "INFO")))
                    name = str(record.get("logger", "")).removeprefix("trio_gateway.")
                    message = str(record.get("message", ""))
                    if record.get("exc"):
                        message = f"{message}\n{record['exc']}"
                    slot.log.log(
                        level if isinstance(level, int) else logging.INFO, "%s: %s", name, message
                    )
                    return
        if text:  # anything else a worker writes (a traceback, a warning)
            slot.log.warning("%s", text)

    def _on_event(self, run: _Run, slot: _Slot, entry: Mapping[str, Any]) -> None:
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
                run.ledger = _ledger_from_event(entry["ledger"])
                _log.info("worker %d ledger: %s", slot.index, json.dumps(entry["ledger"]))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            slot.log.warning("bad %r event from the worker: %r", event, exc)

    async def _relay_stdout(self, run: _Run) -> None:
        """The worker's stdout (the stdout sink) to ours, in whole lines."""
        stream = run.process.stdout
        assert stream is not None
        pending = bytearray()
        while True:
            try:
                data = await stream.receive_some(_PIPE_READ)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                break
            pending += data
            cut = pending.rfind(b"\n") + 1
            if not cut:
                if len(pending) < _MAX_STDOUT_PENDING:
                    continue
                cut = len(pending)
            chunk = bytes(pending[:cut])
            del pending[:cut]
            await self._write_stdout(chunk)
        if pending:
            await self._write_stdout(bytes(pending))
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
        while True:
            async with trio.open_nursery() as nursery:
                for slot in self.slots:
                    run = slot.run
                    if run is not None and run.ready and run.admin is not None:
                        nursery.start_soon(self._scrape, run)
            await trio.sleep(self.scrape_interval)

    async def _scrape(self, run: _Run) -> None:
        assert run.admin is not None
        try:
            text = await fetch_metrics(run.admin)
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


# -- the parent's admin endpoint ------------------------------------------------------------


class _SupervisorCollector(Collector):
    """The workers' metrics summed (see :class:`MetricsAggregate`), plus the supervisor's."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self._process = ProcessCollector(registry=None)

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        supervisor = self.supervisor
        live = supervisor.live_samples()
        own_process = {m.name: m for m in self._process.collect()}
        for family in supervisor.metrics.metrics(live):
            if family.name == "trio_gateway_accepting":
                family = Metric(family.name, family.documentation, "gauge")
                family.add_sample(family.name, {}, 1.0 if supervisor.accepting else 0.0)
            mine = own_process.pop(family.name, None)
            if mine is not None:
                for sample in mine.samples:
                    family.add_sample(
                        sample.name, {**sample.labels, "worker": "supervisor"}, sample.value
                    )
            yield family
        for mine in own_process.values():
            family = Metric(mine.name, mine.documentation, mine.type)
            for sample in mine.samples:
                family.add_sample(
                    sample.name, {**sample.labels, "worker": "supervisor"}, sample.value
                )
            yield family
        yield from self._workers(live)

    def _workers(self, live: Mapping[int, Samples]) -> Iterator[Metric]:
        supervisor = self.supervisor
        prefix = "trio_gateway_worker"
        yield GaugeMetricFamily(
            "trio_gateway_workers", "Worker processes configured.", value=supervisor.workers
        )
        up = GaugeMetricFamily(
            f"{prefix}_up", "1 while the worker runs and is ready.", labels=["worker"]
        )
        restarts = CounterMetricFamily(
            f"{prefix}_restarts",
            "Times the worker was started again after it ended.",
            labels=["worker"],
        )
        received = CounterMetricFamily(
            f"{prefix}_received_messages",
            "Messages this worker received (how the kernel spreads the load).",
            labels=["worker"],
        )
        connections = CounterMetricFamily(
            f"{prefix}_connections", "Connections this worker accepted.", labels=["worker"]
        )
        for slot in supervisor.slots:
            name = [str(slot.index)]
            run = slot.run
            up.add_metric(name, 1 if run is not None and run.ready else 0)
            restarts.add_metric(name, slot.restarts)
            samples = live.get(slot.index)
            metrics = supervisor.metrics
            received.add_metric(
                name, metrics.worker_total(slot.index, samples, "trio_gateway_received_messages")
            )
            connections.add_metric(
                name, metrics.worker_total(slot.index, samples, "trio_gateway_connections")
            )
        yield from (up, restarts, received, connections)


class _SupervisorAdmin(AdminServer):
    """The admin endpoint of the parent: the same server, over the supervisor's collector."""

    async def run(  # type: ignore[override]
        self,
        supervisor: Supervisor,
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_SupervisorCollector(supervisor))
        # /readyz and /metrics read ``accepting`` and ``state``, which a Supervisor has too.
        await self.serve(
            cast("Gateway", supervisor), registry, what=" (all workers)", task_status=task_status
        )


# -- the command -----------------------------------------------------------------------------


async def serve_workers(config: GatewayConfig) -> int:
    """``serve --workers N``: run the supervisor, log the addresses, print the combined ledger."""
    supervisor = Supervisor(config, handle_signals=True)
    try:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(supervisor.run)
            if supervisor.state == "running":  # else stopped by a signal before all were up
                for source, addresses in zip(config.sources, bound, strict=True):
                    for host, port in addresses:
                        logger.info("listening: %s on %s:%d", source.transport, host, port)
                logger.info("ready")
    finally:
        if supervisor.state == "stopped" and any(slot.runs for slot in supervisor.slots):
            print(supervisor.ledger.to_json(), file=sys.stderr, flush=True)
    return 0 if supervisor.ledger.balanced else 1
