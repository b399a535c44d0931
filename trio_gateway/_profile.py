"""Profiling a whole gateway run: ``serve --profile FILE``.

``FILE.html`` -> a pyinstrument report (a statistical call tree; pyinstrument is optional and
must be installed); any other name -> cProfile statistics (``pstats`` format, the standard
library: read them with :func:`summary` or ``python -m trio_gateway._profile FILE``). The
profile covers the thread that runs Trio, from start to the end of the shutdown ledger; time
spent waiting for the network shows up as the event loop's ``epoll`` wait. See docs/profiling.md.
"""

from __future__ import annotations

import cProfile
import importlib.util
import io
import os
import pstats
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ._errors import ConfigurationError
from ._log import logger

__all__ = ("check_profile_path", "main", "profiled", "summary")

_log = logger.getChild("profile")


def _wants_html(path: Path) -> bool:
    return path.suffix.lower() in (".html", ".htm")


def check_profile_path(path: str | os.PathLike[str], *, key: str = "--profile") -> Path:
    """Validate ``path`` before the run starts: a writable directory, pyinstrument for HTML.

    Raises :class:`ConfigurationError` naming ``key``, so a bad flag fails at once instead of
    after an hour of serving.
    """
    target = Path(path)
    if target.is_dir():
        raise ConfigurationError(key, f"{target} is a directory; give a file name")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigurationError(key, f"directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConfigurationError(key, f"directory {parent} is not writable")
    if _wants_html(target) and importlib.util.find_spec("pyinstrument") is None:
        raise ConfigurationError(
            key,
            "an .html profile needs pyinstrument (pip install pyinstrument); "
            "or give another file name for cProfile statistics",
        )
    return target


@contextmanager
def profiled(path: str | os.PathLike[str], *, interval: float = 0.001) -> Iterator[None]:
    """Profile the block and write the result to ``path`` when it ends, however it ends.

    ``interval`` is pyinstrument's sampling period (ignored by cProfile, which traces every
    call and so slows a hot loop down more than sampling does).

        with profiled("gateway.html"):
            trio.run(serve)
    """
    target = check_profile_path(path)
    if _wants_html(target):
        from pyinstrument import Profiler

        sampler = Profiler(interval=interval, async_mode="disabled")
        sampler.start()
        try:
            yield
        finally:
            sampler.stop()
            target.write_text(sampler.output_html(), encoding="utf-8")
            _log.info("profile written to %s (open it in a browser)", target)
        return
    tracer = cProfile.Profile()
    tracer.enable()
    try:
        yield
    finally:
        tracer.disable()
        tracer.dump_stats(target)
        _log.info(
            "profile written to %s (read it: python -m trio_gateway._profile %s)", target, target
        )


def summary(path: str | os.PathLike[str], *, limit: int = 25, sort: str = "tottime") -> str:
    """The top ``limit`` functions of a cProfile file, by ``sort`` (``tottime``: own time)."""
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.strip_dirs().sort_stats(sort).print_stats(limit)
    return out.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m trio_gateway._profile FILE [N] [SORT]``: print a cProfile file's top."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not 1 <= len(args) <= 3:
        print("usage: python -m trio_gateway._profile FILE [N] [tottime|cumulative]")
        return 2
    limit = int(args[1]) if len(args) > 1 else 25
    sort = args[2] if len(args) > 2 else "tottime"
    print(summary(args[0], limit=limit, sort=sort))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
