"""``python -m trio_gateway top --admin HOST:PORT``: a live terminal view of a running gateway.

It scrapes the admin endpoint's ``/metrics`` every ``--interval`` seconds, parses it with
prometheus-client's text parser and shows rates (from the difference between two scrapes) per
transport and listener, the queue's depth and drops, and the sink. :func:`render` builds one
frame from two scrapes without a terminal, so it is tested like any function; ``--once`` prints
one frame (two scrapes ``--interval`` apart) and exits, for scripts.

The live view fits an 80x24 terminal (one header line, four borderless tables, names cut
with an ellipsis rather than wrapped), quits on ``q`` (or Ctrl-C), and exits 1 when the
endpoint has been unreachable for ``UNREACHABLE_GRACE`` seconds (or three intervals, if
longer) in a row: at start, a gateway still starting gets that long; later, a restart
shorter than that is ridden out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import trio
from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .._errors import ConfigurationError, ProtocolError, TransportError
from ._scrape import fetch_metrics
from ._server import DEFAULT_ADMIN

__all__ = (
    "Scrape",
    "fetch_metrics",
    "main",
    "parse_metrics",
    "render",
    "render_text",
    "run_top",
)

P = "trio_gateway_"
UNREACHABLE_GRACE = 5.0
"""Seconds the live view keeps retrying an unreachable endpoint before it exits 1."""

Labels = frozenset[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Scrape:
    """One parsed ``/metrics`` response: sample name -> {label set: value}, and when."""

    at: float
    """``time.monotonic()`` when the response arrived."""
    samples: Mapping[str, Mapping[Labels, float]] = field(default_factory=dict)

    def total(self, name: str, **match: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``match``."""
        want = set(match.items())
        return sum(v for labels, v in self.samples.get(name, {}).items() if want <= labels)

    def has(self, name: str) -> bool:
        return name in self.samples

    def by(self, name: str, *keys: str) -> dict[tuple[str, ...], float]:
        """Sum of ``name`` grouped by the values of the labels ``keys``."""
        out: dict[tuple[str, ...], float] = defaultdict(float)
        for labels, v in self.samples.get(name, {}).items():
            d = dict(labels)
            out[tuple(d.get(k, "") for k in keys)] += v
        return dict(out)


def parse_metrics(text: str, *, at: float | None = None) -> Scrape:
    """Parse Prometheus text format (prometheus-client's parser) into a :class:`Scrape`."""
    samples: dict[str, dict[Labels, float]] = defaultdict(dict)
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[sample.name][frozenset(sample.labels.items())] = sample.value
    except ValueError as exc:
        raise ProtocolError(f"not Prometheus text format: {exc}") from exc
    return Scrape(time.monotonic() if at is None else at, dict(samples))


# -- rendering -----------------------------------------------------------------------------


def _increase(previous: float, current: float) -> float:
    # A counter that went down was reset (the gateway restarted): count from zero.
    return current if current < previous else current - previous


class _Rates:
    def __init__(self, previous: Scrape | None, current: Scrape) -> None:
        self.previous = previous
        self.current = current
        self.seconds = current.at - previous.at if previous is not None else 0.0

    @property
    def known(self) -> bool:
        return self.previous is not None and self.seconds > 0

    def rate(self, name: str, **match: str) -> float | None:
        if not self.known:
            return None
        assert self.previous is not None
        before = self.previous.total(name, **match)
        return _increase(before, self.current.total(name, **match)) / self.seconds

    def rate_by(self, name: str, *keys: str) -> dict[tuple[str, ...], float | None]:
        now = self.current.by(name, *keys)
        if not self.known:
            return dict.fromkeys(now)
        assert self.previous is not None
        before = self.previous.by(name, *keys)
        return {k: _increase(before.get(k, 0.0), v) / self.seconds for k, v in now.items()}


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:,.1f}{suffix}{unit}"
    if value and abs(value) < 10 and value != int(value):
        return f"{value:.1f}{unit}"
    return f"{value:,.0f}{unit}"


def _bytes(value: float | None) -> str:
    return "-" if value is None else _num(value, "B")


def _table(
    title: str, headers: Sequence[str], left: Sequence[str], wide: Sequence[str] = ()
) -> Table:
    """A borderless table (title, header, rule, rows): four of them fit 24 lines. Cells never
    wrap; the ``wide`` columns (names, reasons) share what room is left and are cut with an
    ellipsis."""
    table = Table(
        title=title,
        title_justify="left",
        title_style="bold",
        expand=True,
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1),
    )
    for header in headers:
        table.add_column(
            header,
            justify="left" if header in left else "right",
            no_wrap=True,
            overflow="ellipsis",
            ratio=1 if header in wide else None,
        )
    return table


def _transport_table(r: _Rates) -> Table:
    cur = r.current
    table = _table(
        "by transport",
        ("transport", "msg/s", "bytes/s", "rejected/s", "received", "rejected", "conns"),
        ("transport",),
        ("transport",),
    )
    received = cur.by(P + "received_messages_total", "transport")
    for (transport,) in sorted(received):
        table.add_row(
            transport,
            _num(r.rate(P + "received_messages_total", transport=transport)),
            _bytes(r.rate(P + "received_bytes_total", transport=transport)),
            _num(r.rate(P + "rejected_messages_total", transport=transport)),
            _num(received[(transport,)]),
            _num(cur.total(P + "rejected_messages_total", transport=transport)),
            _num(cur.total(P + "connections_active", transport=transport)),
        )
    return table


def _listener_table(r: _Rates) -> Table:
    cur = r.current
    table = _table(
        "by listener",
        ("listener", "msg/s", "bytes/s", "received", "rejected (by reason)", "conns"),
        ("listener", "rejected (by reason)"),
        ("listener", "rejected (by reason)"),
    )
    keys = ("transport", "listener")
    received = cur.by(P + "received_messages_total", *keys)
    rates = r.rate_by(P + "received_messages_total", *keys)
    byte_rates = r.rate_by(P + "received_bytes_total", *keys)
    rejected = cur.by(P + "rejected_messages_total", "listener", "reason")
    active = cur.by(P + "connections_active", *keys)
    for key in sorted(received):
        reasons = ", ".join(
            f"{reason} {_num(n)}"
            for (listener, reason), n in sorted(rejected.items())
            if listener == key[1] and n
        )
        table.add_row(
            key[1],
            _num(rates.get(key)),
            _bytes(byte_rates.get(key)),
            _num(received[key]),
            reasons or "-",
            _num(active.get(key, 0.0)),
        )
    return table


def _queue_panel(r: _Rates) -> Table:
    cur = r.current
    table = _table(
        "queue",
        ("queue", "depth", "fill", "blocked", "dropped/s", "dropped (by reason)"),
        ("queue", "fill", "dropped (by reason)"),
        ("dropped (by reason)",),
    )
    drops = cur.by(P + "dropped_messages_total", "reason")
    drop_rate = r.rate(P + "dropped_messages_total")
    reasons = ", ".join(f"{reason} {_num(n)}" for (reason,), n in sorted(drops.items()) if n)
    for (queue,), depth in sorted(cur.by(P + "queue_depth", "queue").items()):
        capacity = cur.total(P + "queue_capacity", queue=queue)
        fill = depth / capacity if capacity else 0.0
        bar = Table.grid(padding=(0, 1))
        bar.add_row(ProgressBar(total=100, completed=fill * 100, width=8), f"{fill:4.0%}")
        table.add_row(
            queue,
            f"{_num(depth)}/{_num(capacity)}",
            bar,
            _num(cur.total(P + "queue_blocked_producers", queue=queue)),
            _num(drop_rate),
            reasons or "-",
        )
    return table


def _sink_panel(r: _Rates) -> Table:
    cur = r.current
    table = _table(
        "sink",
        ("sink", "state", "msg/s", "msg/batch", "ms/batch", "failed", "delivered"),
        ("sink",),
        ("sink",),
    )
    up = cur.by(P + "sink_up", "sink")
    for (sink,), sent in sorted(cur.by(P + "sink_sent_messages_total", "sink").items()):
        size = latency = "-"
        if r.known and cur.has(P + "sink_batch_seconds_count"):
            assert r.previous is not None
            count = _increase(
                r.previous.total(P + "sink_batch_seconds_count", sink=sink),
                cur.total(P + "sink_batch_seconds_count", sink=sink),
            )
            total = _increase(
                r.previous.total(P + "sink_batch_seconds_sum", sink=sink),
                cur.total(P + "sink_batch_seconds_sum", sink=sink),
            )
            delivered = _increase(r.previous.total(P + "sink_sent_messages_total", sink=sink), sent)
            if count:
                # Messages per batch (the size), and the mean time the sink took for one.
                size = _num(delivered / count)
                latency = f"{total / count * 1000:.2f}"
        state = "-" if (sink,) not in up else ("up" if up[(sink,)] else "down")
        table.add_row(
            sink,
            Text(state, style="bold red" if state == "down" else ""),
            _num(r.rate(P + "sink_sent_messages_total", sink=sink)),
            size,
            latency,
            _num(cur.total(P + "sink_failed_total", sink=sink)),
            _num(sent),
        )
    return table


def _header(r: _Rates, target: str, *, hint: str = "") -> Text:
    """One line, cut rather than wrapped on a narrow terminal."""
    cur = r.current
    text = Text(f"top {target}  ", style="bold", no_wrap=True, overflow="ellipsis")
    if cur.has(P + "accepting"):
        if cur.total(P + "accepting"):
            text.append("accepting", style="bold green")
        else:
            text.append("not ready", style="bold yellow")
    if cur.has(P + "sink_up") and any(not v for v in cur.by(P + "sink_up", "sink").values()):
        text.append("  sink down", style="bold red")
    cpu = r.rate("process_cpu_seconds_total") if cur.has("process_cpu_seconds_total") else None
    if cpu is not None:
        text.append(f"  cpu {cpu:.0%}")
    if cur.has("process_resident_memory_bytes"):
        text.append(f"  rss {_bytes(cur.total('process_resident_memory_bytes'))}")
    text.append(f"  rates over {r.seconds:.1f} s" if r.known else "  (rates after 2 scrapes)")
    if hint:
        text.append(f"  {hint}", style="dim")
    return text


def render(
    previous: Scrape | None, current: Scrape, *, target: str = "", hint: str = ""
) -> RenderableType:
    """One frame: rates are the difference between ``previous`` and ``current``."""
    r = _Rates(previous, current)
    return Group(
        _header(r, target, hint=hint),
        _transport_table(r),
        _listener_table(r),
        _queue_panel(r),
        _sink_panel(r),
    )


def render_text(
    previous: Scrape | None, current: Scrape, *, target: str = "", width: int = 120
) -> str:
    """:func:`render` as plain text (no colours), as ``--once`` prints it."""
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=False, color_system=None)
    console.print(render(previous, current, target=target))
    return out.getvalue()


def _error_frame(target: str, message: str) -> RenderableType:
    return Panel(Text(message, style="bold red"), title=f"trio_gateway top  {target}")


# -- scraping ------------------------------------------------------------------------------


@contextlib.contextmanager
def _keys_from(fd: int | None) -> Iterator[int | None]:
    """Single key presses from the terminal ``fd`` (cbreak mode: no Enter needed, no echo),
    restored on the way out; None when there is no terminal to read."""
    if fd is None or not os.isatty(fd):
        yield None
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _quit_on_q(fd: int, scope: trio.CancelScope) -> None:
    while True:
        await trio.lowlevel.wait_readable(fd)
        pressed = os.read(fd, 64)
        if not pressed or b"q" in pressed.lower():
            scope.cancel()
            return


async def run_top(
    host: str,
    port: int,
    *,
    interval: float = 1.0,
    once: bool = False,
    console: Console | None = None,
    frames: int | None = None,
    keys: int | None = None,
    unreachable_grace: float | None = None,
) -> int:
    """Scrape every ``interval`` seconds and draw; ``once``: one frame and exit.

    ``frames`` stops after that many redraws (for tests). ``keys``: a terminal file
    descriptor to read ``q`` from. Returns an exit status: 1 when the endpoint could not be
    reached (``once``), or stayed unreachable for ``unreachable_grace`` seconds (by default
    :data:`UNREACHABLE_GRACE` or three intervals, whichever is longer), else 0.
    """
    console = console or Console()
    target = f"{host}:{port}"
    if once:
        try:
            first = parse_metrics(await fetch_metrics(host, port))
            await trio.sleep(interval)
            second = parse_metrics(await fetch_metrics(host, port))
        except (TransportError, ProtocolError) as exc:
            console.print(f"trio_gateway top: {exc}", style="red")
            return 1
        console.print(render(first, second, target=target))
        return 0
    grace = max(UNREACHABLE_GRACE, 3 * interval) if unreachable_grace is None else unreachable_grace
    hint = "q quit" if keys is not None else "Ctrl-C quit"
    previous: Scrape | None = None
    drawn = 0
    failing_since: float | None = None
    failure = ""
    gave_up = False
    with (
        Live(console=console, auto_refresh=False, transient=False) as live,
        trio.CancelScope() as quit_scope,
    ):
        async with trio.open_nursery() as nursery:
            if keys is not None:
                nursery.start_soon(_quit_on_q, keys, quit_scope)
            while frames is None or drawn < frames:
                deadline = trio.current_time() + interval
                try:
                    current = parse_metrics(await fetch_metrics(host, port))
                except (TransportError, ProtocolError) as exc:
                    now = trio.current_time()
                    failing_since = now if failing_since is None else failing_since
                    failure = str(exc)
                    left = grace - (now - failing_since)
                    if left <= 0:
                        gave_up = True
                        break
                    message = f"{exc}; retrying for {left:.0f} s more  ({hint})"
                    live.update(_error_frame(target, message), refresh=True)
                    previous = None
                else:
                    failing_since = None
                    live.update(render(previous, current, target=target, hint=hint), refresh=True)
                    previous = current
                drawn += 1
                await trio.sleep_until(deadline)
            nursery.cancel_scope.cancel()
    if gave_up:
        console.print(
            f"trio_gateway top: {failure} (unreachable for {grace:g} s)",
            style="red",
            soft_wrap=True,
        )
        return 1
    return 0


def _parse_admin(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError("--admin", f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``top`` flags, for the CLI's subparser."""
    parser.add_argument(
        "--admin",
        default=DEFAULT_ADMIN,
        metavar="HOST:PORT",
        help=f"the gateway's admin endpoint (default {DEFAULT_ADMIN})",
    )
    parser.add_argument(
        "--interval", type=float, default=1.0, metavar="SECONDS", help="time between scrapes (1)"
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="print one frame (two scrapes --interval apart) and exit",
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``top`` from parsed :func:`add_arguments` flags (raises ConfigurationError)."""
    host, port = _parse_admin(args.admin)
    if args.interval <= 0:
        raise ConfigurationError("--interval", "must be positive")
    with _keys_from(None if args.once else _stdin_fd()) as keys:
        try:
            return trio.run(
                lambda: run_top(host, port, interval=args.interval, once=args.once, keys=keys)
            )
        except KeyboardInterrupt:
            return 0


def _stdin_fd() -> int | None:
    try:
        return sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):  # no stdin, or not a real file
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """``top`` as a standalone command: ``python -m trio_gateway.admin.top --admin H:P``."""
    parser = argparse.ArgumentParser(prog="trio_gateway top", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except ConfigurationError as exc:
        print(f"trio_gateway top: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
