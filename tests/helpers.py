"""Helpers shared by the tests: file-sink readers and a `serve` subprocess runner."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from trio_gateway.sinks import decode_jsonl_record

REPO = Path(__file__).resolve().parent.parent


def read_payloads(path: Path) -> list[bytes]:
    """Every payload in a JSONL file written by the file sink, in order."""
    if not path.exists():
        return []
    with path.open("rb") as file:
        return [decode_jsonl_record(line)[0] for line in file]


class ServeProcess:
    """``python -m trio_gateway serve ...`` as a subprocess, with its bound ports parsed."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trio_gateway", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )
        self.stderr_lines: list[str] = []
        self.ports: dict[str, list[int]] = {}
        self._wait_ready()

    def _wait_ready(self, timeout: float = 20.0) -> None:
        """Read stderr until the "ready" line, collecting the "listening" lines before it."""
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline().decode()
            if not line:
                raise RuntimeError(f"serve exited early: {''.join(self.stderr_lines)}")
            self.stderr_lines.append(line)
            match = re.search(r"listening: (\w+) on .*:(\d+)$", line.strip())
            if match:
                self.ports.setdefault(match[1], []).append(int(match[2]))
            elif line.rstrip().endswith(": ready"):
                return
        raise TimeoutError("serve did not report ready")

    def port(self, transport: str, index: int = 0) -> int:
        return self.ports[transport][index]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> tuple[int, str]:
        """Send ``sig``, wait, return (exit code, all of stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, "".join(self.stderr_lines) + err.decode()
