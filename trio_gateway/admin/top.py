"""``python -m trio_gateway top --admin HOST:PORT``: a live terminal view of a running gateway.

It scrapes the admin endpoint's ``/metrics`` every ``--interval`` seconds, parses it with
prometheus-client's text parser and shows rates (from the difference between two scrapes) per
transport and listener, the queue's depth and drops, and the sink. :func:`render` (in
:mod:`._frame`) builds one frame from two scrapes without a terminal, so it is tested like any
function; ``--once`` prints one frame (two scrapes ``--interval`` apart) and exits, for
scripts.

The live view fits an 80x24 terminal (one header line, four borderless tables, names cut
with an ellipsis rather than wrapped), quits on ``q`` (or Ctrl-C), and exits 1 when the
endpoint has been unreachable for ``UNREACHABLE_GRACE`` seconds (or three intervals, if
longer) in a row: at start, a gateway still starting gets that long; later, a restart
shorter than that is ridden out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence

import trio
from rich.console import Console
from rich.live import Live

from .._errors import ConfigurationError, ProtocolError, TransportError
from ._frame import Scrape, error_frame, parse_metrics, render, render_text
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

UNREACHABLE_GRACE = 5.0
"""Seconds the live view keeps retrying an unreachable endpoint before it exits 1."""


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
                    live.update(error_frame(target, message), refresh=True)
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
        except BaseExceptionGroup as group:
            # Ctrl-C lands inside run_top's nursery (the key reader is its task), so it comes
            # out grouped: still a plain quit.
            interrupted, rest = group.split(KeyboardInterrupt)
            if interrupted is not None and rest is None:
                return 0
            raise


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
