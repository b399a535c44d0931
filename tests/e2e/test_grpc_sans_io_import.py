"""The gRPC server's sans-IO layer, and the HTTP/2 one under it, load in a fresh interpreter
where trio cannot be imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "trio_gateway"
SANS_IO = ("grpc._protocol", "grpc._calls", "grpc._limits", "_http2")  # as test_grpc_protocol


def test_the_protocol_layer_loads_with_trio_blocked() -> None:
    """Import the sans-IO modules in a fresh interpreter where ``import trio`` fails (the
    package ``__init__`` files, which wire everything, are skipped)."""
    script = f"""
import sys, types
sys.modules["trio"] = None
for name, path in [("trio_gateway", {str(PACKAGE)!r}),
                   ("trio_gateway.sources", {str(PACKAGE / "sources")!r}),
                   ("trio_gateway.sources.grpc", {str(PACKAGE / "sources" / "grpc")!r})]:
    module = types.ModuleType(name)
    module.__path__ = [path]
    sys.modules[name] = module
import importlib
for name in {SANS_IO!r}:
    importlib.import_module("trio_gateway.sources." + name)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr
