"""The allowed import directions inside trio_gateway, as one table, checked by parsing imports.

Each row of ``LAYERS`` is a *unit*: a top-level module (``_gateway``), a subpackage with
everything below it (``sources``), or a deeper part that has stricter rules than its package
(a sans-IO protocol module inside ``sources``). A module belongs to the longest row that is a
prefix of its dotted name. Importing within one's own unit is always allowed; importing another
unit must be listed. A module that belongs to no row fails with "add a row": adding a package
means adding a row here, which is where its place in the design gets decided.

Imports under ``if TYPE_CHECKING:`` are checked against ``typing``, so a unit can name another's
types without loading it (admin names the ``Gateway`` it reports on). ``sans_io`` units import
no I/O library at all (trio, socket, ssl, asyncio, selectors): they are fed bytes and tested
with bytes alone.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "trio_gateway"
IO_MODULES = ("trio", "socket", "ssl", "asyncio", "selectors")


@dataclass(frozen=True)
class Layer:
    imports: frozenset[str] = frozenset()
    """Other units this one may import at run time."""
    typing: frozenset[str] = frozenset()
    """Other units this one may import only for type checking."""
    sans_io: bool = False


def layer(*imports: str, typing: tuple[str, ...] = (), sans_io: bool = False) -> Layer:
    return Layer(frozenset(imports), frozenset(typing), sans_io)


LAYERS: dict[str, Layer] = {
    # foundations: data types and bookkeeping, no I/O of their own
    "_errors": layer(),
    "_log": layer(),
    # newline frames still in their chunk: what the TCP source, the ring and a Batch share
    "_frames": layer(),
    "_message": layer("_frames"),
    "_histogram": layer(),
    "_ledger": layer("_histogram"),
    "_tls": layer("_errors"),
    "_proto": layer(),  # generated protobuf code
    "_names": layer(),  # one spelling rule for enum-like values
    "_secrets": layer(),  # redaction for printouts
    "tuning": layer(),  # the process's allocator (glibc mallopt)
    # what both ends of the wire agree on (the servers and the `send` client)
    "_wire": layer("_errors", sans_io=True),
    # HTTP/1.1 requests, sans-IO (llhttp through httptools), and the one server driver around
    # it on a Trio stream: the HTTP source and the admin endpoint
    "_http1": layer("_errors", sans_io=True),
    "_h11server": layer("_errors", "_http1"),
    # framing: pure, knows nothing of the package but its errors
    "codecs": layer("_errors", sans_io=True),
    # queues: know nothing of messages' origins, sources or sinks
    "queues": layer("_errors", "_frames", "_names", "queues._disk"),
    # the disk queue stores each run's origin beside its payloads, so it knows what one is
    "queues._disk": layer("_errors", "_names", "_log", "_message", "queues", "queues._sqlite"),
    "queues._sqlite": layer("_log", "_message"),
    # positions and delivery receipts: what the pump settles and an ack=delivered source awaits
    "_receipts": layer(),
    "_buffer": layer("_frames", "_message", "_receipts", "queues"),
    # the memory budget: one account that connections and the pump charge what they hold to
    "_budget": layer("_errors"),
    "_ingress": layer("_budget", "_buffer", "_ledger", "_message", "_receipts", "queues"),
    # the edges: a source reaches the queue only through its Ingress; sources and sinks never
    # import each other
    "sources": layer(
        "_budget",
        "_errors",
        "_h11server",
        "_http1",
        "_ingress",
        "_log",
        "_frames",
        "_message",
        "_proto",
        "_tls",
        "_wire",
        "codecs",
        "sources._http2",
        "sources.grpc._calls",
        "sources.grpc._events",
        "sources.grpc._limits",
        "sources.grpc._protocol",
        "sources.http._h2answers",
        # the NATS client the NATS sink had first (the NATS source shares it)
        "sinks._nats_conn",
        "sinks._nats_protocol",
        "sinks._nats_url",
    ),
    # the server side of HTTP/2, sans-IO: fed bytes, tested with bytes alone; under the gRPC
    # server and the HTTP source's HTTP/2 path (their Trio I/O is around it)
    "sources._http2": layer(sans_io=True),
    # the HTTP source's HTTP/2 answers and their writer: the HTTP/2 layer and the stream, no
    # ingress, budget or queue (those are the reading half's, sources.http._h2)
    "sources.http._h2answers": layer("sources", "sources._http2"),
    # the gRPC server's sans-IO gRPC layer on it; the Trio I/O (sources.grpc._connection,
    # _stream, _server) is around it
    "sources.grpc._limits": layer(sans_io=True),
    "sources.grpc._calls": layer(
        "_errors", "codecs", typing=("sources.grpc._protocol",), sans_io=True
    ),
    # what the gRPC layer reports: the events it returns and the error it raises
    "sources.grpc._events": layer("_errors", "sources.grpc._calls", sans_io=True),
    "sources.grpc._protocol": layer(
        "_wire",
        "sources._http2",
        "sources.grpc._calls",
        "sources.grpc._events",
        "sources.grpc._limits",
        sans_io=True,
    ),
    "sinks": layer(
        "_errors",
        "_frames",
        "_log",
        "_message",
        "_secrets",
        "codecs",
        "sinks._nats_conn",
        "sinks._nats_protocol",
        "sinks._nats_url",
    ),
    # the NATS client, beside the sink that had it first and shared with the NATS source:
    # the protocol (sans-IO), the URL and its credentials, a connection on a Trio socket
    "sinks._nats_protocol": layer(sans_io=True),
    "sinks._nats_url": layer("_errors", "_secrets"),
    "sinks._nats_auth": layer("sinks._nats_protocol", "sinks._nats_url"),
    "sinks._nats_conn": layer(
        "_log", "sinks._nats_auth", "sinks._nats_protocol", "sinks._nats_url"
    ),
    # sending a batch under the retry policy (the pump and each fan-out branch)
    "_retry": layer("_errors", "_log"),
    # SIGINT/SIGTERM -> shutdown, then abort (a gateway alone, or pipelines)
    "_signals": layer(),
    # the one place that wires sources, queue, pump and sinks together
    "_gateway": layer(
        "_budget",
        "_buffer",
        "_errors",
        "_ingress",
        "_ledger",
        "_log",
        "_pump",
        "_retry",
        "_signals",
        "queues",
        "sinks",
        "sources",
    ),
    # the gateway's batch loop (queue -> processors -> sink), a mixin of Gateway
    "_pump": layer(
        "_budget", "_buffer", "_errors", "_ledger", "_log", "_message", "_retry", "queues", "sinks"
    ),
    # fan-out (a sink per branch queue) and named pipelines, built from gateways
    "_fanout": layer(
        "_errors", "_gateway", "_histogram", "_log", "_message", "_retry", "queues", "sinks"
    ),
    # routing between pipelines: a sink that is another pipeline's source
    "_routing": layer("_errors", "_ingress", "_message", "sinks", "sources"),
    "_pipelines": layer(
        "_errors",
        "_fanout",
        "_gateway",
        "_ledger",
        "_log",
        "_message",
        "_pipelines_metrics",
        "_routing",
        "_signals",
        "queues",
        "sinks",
        typing=("admin", "sources"),
    ),
    "_pipelines_metrics": layer("admin", typing=("_pipelines",)),
    # admin serves any gateway Service; it names Gateway's type only
    "admin": layer("_errors", "_h11server", "_histogram", "_log", "_wire", typing=("_gateway",)),
    # building a gateway from TOML and flags
    "_config": layer(
        "_errors",
        "_gateway",
        "_names",
        "_secrets",
        "_wire",
        "admin",
        "queues",
        "sinks",
        "sources",
        typing=("_config._pipelines",),
    ),
    # named pipelines from a config, of the same parts: the one builder that knows routes
    # between pipelines and fan-out
    "_config._pipelines": layer(
        "_config", "_errors", "_fanout", "_gateway", "_pipelines", "_routing", "sinks"
    ),
    # several worker processes, each running a configured gateway
    "workers": layer(
        "_buffer",
        "_config",
        "_errors",
        "_gateway",
        "_ledger",
        "_log",
        "admin",
        "tuning",
        typing=("_pipelines",),
    ),
    # the `send` load generator: a client, so no server module (sources, sinks, gateway, admin)
    "loadgen": layer("_errors", "_proto", "_tls", "_wire", "codecs"),
    "_profile": layer("_errors", "_log"),
    # the command line, and the only module that imports it
    "_cli": layer(
        "_config",
        "_errors",
        "_log",
        "_profile",
        "admin",
        "loadgen",
        "queues",
        "tuning",
        "workers",
        typing=("_ledger", "sinks"),
    ),
    "__main__": layer("_cli"),
    # the test kit drives gateways and sources the way a user's tests do
    "testing": layer(
        "_errors", "_gateway", "_ingress", "_ledger", "_message", "queues", "sinks", "sources"
    ),
    # the public API re-exports; "" is trio_gateway/__init__.py
    "": layer(
        "_buffer",
        "_errors",
        "_fanout",
        "_gateway",
        "_ingress",
        "_ledger",
        "_message",
        "_pipelines",
        "_routing",
        "queues",
        "sinks",
        "sources",
    ),
}
"""unit -> what it may import. Dotted names are relative to ``trio_gateway``."""

SERVER_UNITS = {"sources", "sinks", "_gateway", "admin", "workers", "_config"}


def unit_of(module: str) -> str | None:
    """The longest row that ``module`` (relative dotted name, "" for the package) belongs to."""
    best: str | None = None
    for name in LAYERS:
        inside = module == name or (name == "" and module == "") or module.startswith(name + ".")
        if inside and (best is None or len(name) > len(best)):
            best = name
    return best


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[tuple[str, bool, int]]:
    """(absolute module imported, under TYPE_CHECKING, line) for every import in ``path``."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(sub) for stmt in node.body for sub in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)]
                prefix = "trio_gateway" + "".join("." + part for part in base)
                if node.module:
                    names = [f"{prefix}.{node.module}"]
                else:  # from . import x: x may be a module
                    names = [f"{prefix}.{alias.name}" for alias in node.names]
            elif node.module:
                names = [node.module]
        found += [(name, id(node) in typing_only, node.lineno) for name in names]
    return found


def relative(name: str) -> str | None:
    """``trio_gateway.sources.tcp`` -> ``sources.tcp``; None outside the package."""
    if name == "trio_gateway":
        return ""
    if name.startswith("trio_gateway."):
        return name.removeprefix("trio_gateway.")
    return None


def violations(root: Path = PACKAGE) -> list[str]:
    """Every import in the package at ``root`` that ``LAYERS`` does not allow."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        where = f"trio_gateway/{path.relative_to(root)}"
        unit = unit_of(module)
        if unit is None:
            problems.append(
                f"{where}: trio_gateway.{module} is in no row of LAYERS in "
                "tests/unit/test_layering.py: add a row saying what it may import"
            )
            continue
        rules = LAYERS[unit]
        for name, typing_only, line in imports_of(path, root):
            target = relative(name)
            if target is None:
                if rules.sans_io and name.split(".")[0] in IO_MODULES:
                    problems.append(f"{where}:{line}: {unit!r} is sans-IO but imports {name}")
                continue
            target_unit = unit_of(target)
            if target_unit is None or target_unit == unit:
                continue  # unknown targets are reported as modules of their own
            allowed = rules.imports | (rules.typing if typing_only else frozenset())
            if target_unit not in allowed:
                kind = "for typing " if typing_only else ""
                problems.append(
                    f"{where}:{line}: {unit or 'trio_gateway'!r} may not import {kind}"
                    f"{target_unit!r} (trio_gateway.{target}); LAYERS allows {sorted(allowed)}"
                )
    return problems


def test_every_import_follows_the_layers() -> None:
    problems = violations()
    assert not problems, "\n".join(problems)


# The design's rules, checked on the table itself, so a new row cannot quietly break them.


def test_codecs_import_nothing_of_the_package_but_its_errors() -> None:
    assert LAYERS["codecs"].imports == {"_errors"} and LAYERS["codecs"].sans_io


def test_queues_know_nothing_of_sources_or_sinks() -> None:
    for unit in ("queues", "_buffer", "_ingress"):
        assert not LAYERS[unit].imports & {"sources", "sinks", "_gateway"}, unit


def test_sources_and_sinks_never_import_each_other() -> None:
    assert "sinks" not in LAYERS["sources"].imports
    assert "sources" not in LAYERS["sinks"].imports


def test_only_the_gateway_and_its_builders_wire_sources_to_sinks() -> None:
    wiring = {unit for unit, rules in LAYERS.items() if {"sources", "sinks"} <= rules.imports}
    # _routing wires one pipeline's sink to another pipeline's source, nothing else.
    assert wiring == {"", "_gateway", "_config", "_routing", "testing"}


def test_admin_depends_on_the_gateway_only_for_types() -> None:
    assert "_gateway" not in LAYERS["admin"].imports
    assert LAYERS["admin"].typing == {"_gateway"}


def test_the_load_generator_imports_no_server_module() -> None:
    assert not LAYERS["loadgen"].imports & SERVER_UNITS


def test_only_main_imports_the_cli() -> None:
    assert [unit for unit, rules in LAYERS.items() if "_cli" in rules.imports] == ["__main__"]


def test_no_unit_depends_on_the_test_kit() -> None:
    for unit, rules in LAYERS.items():
        assert "testing" not in rules.imports | rules.typing, unit


def test_the_table_catches_what_it_forbids(tmp_path: Path) -> None:
    """A rule that cannot fail is worse than none: the checker flags a forbidden edge, a
    sans-IO module importing trio, and a module in no row."""
    fake = tmp_path / "trio_gateway"
    (fake / "sinks").mkdir(parents=True)
    (fake / "codecs").mkdir()
    (fake / "newthing").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "sinks" / "__init__.py").write_text("from ..sources import tcp\n")
    (fake / "codecs" / "__init__.py").write_text("import trio\nfrom .._errors import X\n")
    (fake / "newthing" / "__init__.py").write_text("")
    (fake / "admin.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ._gateway import G\n"
    )
    problems = violations(fake)
    assert len(problems) == 3, problems
    codecs, newthing, sinks = problems  # in path order
    assert "'codecs' is sans-IO but imports trio" in codecs
    assert "trio_gateway.newthing is in no row" in newthing and "add a row" in newthing
    assert "'sinks' may not import 'sources'" in sinks
