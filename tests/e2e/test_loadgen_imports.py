"""``trio_gateway.loadgen`` (the ``send`` client) imports no server: no source, no hypercorn,
no NATS, no metrics; and its light part (what ``send --help`` reads) no network library.

Each check runs in a fresh interpreter with the ``trio_gateway`` package entered without its
``__init__`` (which re-exports the whole public API, servers included), so what is measured is
the load generator's own import closure.
"""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO

PROBE = """
import json, sys, types
package = types.ModuleType("trio_gateway")
package.__path__ = [sys.argv[1]]
sys.modules["trio_gateway"] = package
import trio_gateway.loadgen as loadgen
light = sorted(sys.modules)
loadgen.send  # every transport
print(json.dumps({"light": light, "full": sorted(sys.modules)}))
"""
SERVERS = ("trio_gateway.sources", "trio_gateway.sinks", "trio_gateway.admin")
SERVER_LIBRARIES = ("hypercorn", "nats", "prometheus_client", "rich", "grpclib.server")
NETWORK_LIBRARIES = ("trio", "h2", "h11", "websockets", "google.protobuf", "grpclib")


def _loaded() -> dict[str, list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO / "trio_gateway")],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        timeout=60,
    )
    modules: dict[str, list[str]] = json.loads(done.stdout)
    return modules


def _within(modules: list[str], prefixes: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)]


def test_the_load_generator_imports_no_server_and_help_no_network_library() -> None:
    loaded = _loaded()
    assert _within(loaded["full"], SERVERS + SERVER_LIBRARIES) == []
    assert "trio_gateway.loadgen._grpc" in loaded["full"]  # the probe did load every transport
    assert _within(loaded["light"], NETWORK_LIBRARIES) == []
