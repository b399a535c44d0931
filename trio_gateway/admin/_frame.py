"""One frame of ``top``: parse a ``/metrics`` scrape, and render two of them (rates are the
difference) as five parts that fit an 80x24 terminal: a header line and four borderless
tables (by transport, by listener, queue, sink). A gateway of named pipelines (its metrics
carry a ``pipeline`` label) gets three instead: by pipeline (rates in and out, drops, its
queue), by listener, and by sink (each pipeline's sinks, a fan-out's branches with their
own queues). No terminal and no I/O here, so a frame is tested like any function
(tests/unit/test_top.py)."""

from __future__ import annotations

import io
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .._errors import ProtocolError

__all__ = ("Scrape", "error_frame", "parse_metrics", "render", "render_text")

P = "trio_gateway_"

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


def _fill(depth: float, capacity: float) -> Table:
    """A queue's fill as a small bar and a percentage."""
    fill = depth / capacity if capacity else 0.0
    bar = Table.grid(padding=(0, 1))
    bar.add_row(ProgressBar(total=100, completed=fill * 100, width=8), f"{fill:4.0%}")
    return bar


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
        table.add_row(
            queue,
            f"{_num(depth)}/{_num(capacity)}",
            _fill(depth, capacity),
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
        size, latency = _batches(r, "sink_batch_seconds", "sink_sent_messages_total", sink=sink)
        table.add_row(
            sink,
            _state(up.get((sink,))),
            _num(r.rate(P + "sink_sent_messages_total", sink=sink)),
            size,
            latency,
            _num(cur.total(P + "sink_failed_total", sink=sink)),
            _num(sent),
        )
    return table


def _batches(r: _Rates, histogram: str, delivered: str, **match: str) -> tuple[str, str]:
    """Messages per batch (the size) and the mean milliseconds a sink took for one, between
    the two scrapes; ``-`` when unknown."""
    cur, previous = r.current, r.previous
    if not r.known or previous is None or not cur.has(P + histogram + "_count"):
        return "-", "-"
    count, total, sent = (
        _increase(previous.total(P + name, **match), cur.total(P + name, **match))
        for name in (histogram + "_count", histogram + "_sum", delivered)
    )
    if not count:
        return "-", "-"
    return _num(sent / count), f"{total / count * 1000:.2f}"


# -- named pipelines -----------------------------------------------------------------------


def _pipeline_names(cur: Scrape) -> list[str]:
    """The pipelines the scrape reports (empty for a single gateway)."""
    return sorted(n for (n,) in cur.by(P + "delivered_messages_total", "pipeline") if n)


def _pipeline_table(r: _Rates, names: Sequence[str]) -> Table:
    cur = r.current
    table = _table(
        "by pipeline",
        ("pipeline", "in/s", "out/s", "dropped/s", "queue", "received", "delivered"),
        ("pipeline",),
        ("pipeline",),
    )
    for name in names:
        depth = cur.total(P + "queue_depth", pipeline=name)
        capacity = cur.total(P + "queue_capacity", pipeline=name)
        table.add_row(
            name,
            _num(r.rate(P + "received_messages_total", pipeline=name)),
            _num(r.rate(P + "delivered_messages_total", pipeline=name)),
            _num(r.rate(P + "dropped_messages_total", pipeline=name)),
            f"{_num(depth)}/{_num(capacity)} {depth / capacity if capacity else 0.0:.0%}",
            _num(cur.total(P + "received_messages_total", pipeline=name)),
            _num(cur.total(P + "delivered_messages_total", pipeline=name)),
        )
    return table


def _pipeline_sink_table(r: _Rates) -> Table:
    """One row per sink of each pipeline: a fan-out's branches (with their own queue), or a
    pipeline's one sink (``queued`` is then the pipeline's queue, shown above)."""
    cur = r.current
    table = _table(
        "by sink",
        ("pipeline/sink", "state", "msg/s", "msg/batch", "ms/batch", "queued", "lost", "sent"),
        ("pipeline/sink",),
        ("pipeline/sink",),
    )
    keys = ("pipeline", "sink")
    branches = cur.by(P + "fanout_delivered_messages_total", *keys)
    branch_up = cur.by(P + "fanout_sink_up", *keys)
    for (pipeline, sink), sent in sorted(branches.items()):
        match = {"pipeline": pipeline, "sink": sink}
        lost = sum(
            cur.total(P + f"fanout_{what}_messages_total", **match)
            for what in ("dropped", "failed", "dead_letter", "refused")
        )
        table.add_row(
            f"{pipeline}/{sink}",
            _state(branch_up.get((pipeline, sink))),
            _num(r.rate(P + "fanout_delivered_messages_total", **match)),
            *_batches(r, "fanout_batch_seconds", "fanout_delivered_messages_total", **match),
            _num(cur.total(P + "fanout_queued_messages", **match)),
            _num(lost),
            _num(sent),
        )
    fanned = {pipeline for pipeline, _ in branches}
    up = cur.by(P + "sink_up", *keys)
    for (pipeline, sink), sent in sorted(cur.by(P + "sink_sent_messages_total", *keys).items()):
        if pipeline in fanned:
            continue  # its sink is the fan-out: the branches' rows are above
        match = {"pipeline": pipeline, "sink": sink}
        lost = sum(
            cur.total(P + "dropped_messages_total", pipeline=pipeline, reason=reason)
            for reason in ("sink_failed", "dead_letter", "refused")
        )
        table.add_row(
            f"{pipeline}/{sink}",
            _state(up.get((pipeline, sink))),
            _num(r.rate(P + "sink_sent_messages_total", **match)),
            *_batches(r, "sink_batch_seconds", "sink_sent_messages_total", **match),
            "-",
            _num(lost),
            _num(sent),
        )
    return table


def _state(up: float | None) -> Text:
    state = "-" if up is None else ("up" if up else "down")
    return Text(state, style="bold red" if state == "down" else "")


def _header(r: _Rates, target: str, *, hint: str = "") -> Text:
    """One line, cut rather than wrapped on a narrow terminal."""
    cur = r.current
    text = Text(f"top {target}  ", style="bold", no_wrap=True, overflow="ellipsis")
    if cur.has(P + "accepting"):
        if cur.total(P + "accepting"):
            text.append("accepting", style="bold green")
        else:
            text.append("not ready", style="bold yellow")
    ups = (*cur.by(P + "sink_up", "sink").values(), *cur.by(P + "fanout_sink_up", "sink").values())
    if any(not v for v in ups):
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
    pipelines = _pipeline_names(current)
    if pipelines:
        return Group(
            _header(r, target, hint=hint),
            _pipeline_table(r, pipelines),
            _listener_table(r),
            _pipeline_sink_table(r),
        )
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


def error_frame(target: str, message: str) -> RenderableType:
    return Panel(Text(message, style="bold red"), title=f"trio_gateway top  {target}")
