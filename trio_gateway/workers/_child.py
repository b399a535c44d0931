"""The worker process: read the spec, run one gateway (or the config's named pipelines, each
worker the same ones), report on stderr, stop with the parent.

The supervisor starts ``python -c "from trio_gateway.workers._child import worker_main; ..."``
(see :data:`WORKER_CODE`). The worker reads its spec (one JSON line, see ``_spec.py``) from
stdin, logs as JSON lines on stderr (``_logs.py``), reports ``ready`` once bound and its
``ledger`` at the end (with named pipelines, each pipeline's report beside the total, for
the parent to sum per pipeline), and shuts down cleanly when its stdin ends: the parent holds
that pipe open, so its end means the parent stops or died (even by SIGKILL).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any

import trio

from .._config import build_gateway, build_pipelines
from .._errors import GatewayError
from .._log import logger
from ..tuning import freeze_startup_objects, tune_allocator
from ._logs import JsonLinesHandler, write_line
from ._spec import config_from_jsonable, read_spec

if TYPE_CHECKING:
    from .._config import GatewayConfig
    from .._gateway import Gateway
    from .._pipelines import Pipelines

__all__ = ("WORKER_CODE", "WORKER_ENV", "worker_main")

WORKER_ENV = "TRIO_GATEWAY_WORKER"
"""Set to the worker's index (``0`` .. ``N-1``) in every worker's environment."""

WORKER_CODE = "from trio_gateway.workers._child import worker_main; raise SystemExit(worker_main())"
"""What ``python -c`` runs in a worker process."""

_log = logger.getChild("workers")


def worker_main() -> int:
    """The entry point of one worker process (started by the supervisor)."""
    spec = read_spec()
    sys.path[:] = [str(p) for p in spec["sys_path"]]
    root = logging.getLogger("trio_gateway")
    root.handlers[:] = [JsonLinesHandler()]
    root.setLevel(int(spec["log_level"]))
    root.propagate = False
    try:
        tune_allocator()  # as serve does (see its docstring)
        config = config_from_jsonable(spec["config"])
        if config.pipelines:
            return trio.run(_serve_pipelines, build_pipelines(config, handle_signals=True), config)
        gateway = build_gateway(config, handle_signals=True)
        return trio.run(_serve, gateway)
    except BaseException as exc:
        leaves = _leaves(exc)
        if not all(isinstance(leaf, GatewayError | OSError) for leaf in leaves):
            raise
        _log.error("worker failed: %s", leaves[0])
        return 1


async def _serve(gateway: Gateway) -> int:
    async with trio.open_nursery() as nursery:

        async def run_gateway(task_status: trio.TaskStatus[Any]) -> None:
            await gateway.run(task_status=task_status)
            nursery.cancel_scope.cancel()  # the gateway is done: stop watching stdin

        bound = await nursery.start(run_gateway)
        admin = gateway.service_values[0] if gateway.service_values else None
        freeze_startup_objects()  # as serve does (see its docstring)
        write_line({"event": "ready", "pid": os.getpid(), "bound": bound, "admin": admin})
        nursery.start_soon(_watch_parent, gateway)
    ledger = gateway.ledger
    write_line({"event": "ledger", "ledger": ledger.as_dict()})
    return 0 if ledger.balanced else 1


async def _serve_pipelines(pipelines: Pipelines, config: GatewayConfig) -> int:
    """As :func:`_serve`, for named pipelines: ``ready`` lists the bound addresses of every
    configured source, pipeline after pipeline (the parent's order); ``ledger`` carries each
    pipeline's report."""
    async with trio.open_nursery() as nursery:

        async def run_pipelines(task_status: trio.TaskStatus[Any]) -> None:
            await pipelines.run(task_status=task_status)
            nursery.cancel_scope.cancel()

        bound = await nursery.start(run_pipelines)
        listening = [
            addresses
            for spec in config.pipelines
            for addresses in bound[spec.name][: len(spec.sources)]  # not the routes' ends
        ]
        freeze_startup_objects()  # as serve does (see its docstring)
        write_line(
            {
                "event": "ready",
                "pid": os.getpid(),
                "bound": listening,
                "admin": pipelines.admin_address,
            }
        )
        nursery.start_soon(_watch_parent, pipelines)
    ledger = pipelines.ledger
    reports = {p.name: p.report() for p in pipelines}
    write_line({"event": "ledger", "ledger": ledger.as_dict(), "pipelines": reports})
    return 0 if ledger.balanced else 1


async def _watch_parent(gateway: Gateway | Pipelines) -> None:
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
