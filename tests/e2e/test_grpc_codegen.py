"""The shipped gRPC code: as protos/gen_protos.py generates it, and no grpcio at run time."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO


def test_shipped_generated_code_matches_the_protos() -> None:
    done = subprocess.run(
        [sys.executable, "protos/gen_protos.py", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_the_source_does_not_import_grpcio_at_runtime() -> None:
    code = (
        "import sys, trio_gateway.sources.grpc as g; g.GrpcSource();"
        "print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith(('grpc.', 'grpc_'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
