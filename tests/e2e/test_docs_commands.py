"""Every command of README.md, docs/tutorial.md, docs/cli.md and the examples' READMEs, run
as written.

A page is walked top to bottom, as a newcomer at one terminal would: each block below, in
order, with the environment the page itself sets up. A documented command that breaks fails
this test, so the docs cannot drift from the program again.

What runs (the fence's info string decides):

* ```` ```sh ````, ```` ```bash ````: every command (a line with its backslash continuations;
  blank lines and ``#`` comments skipped) runs with that shell (``sh`` is POSIX ``sh``, so a
  bashism in an ``sh`` block fails) and must exit 0;
* ```` ```python ````: the block runs as a script with ``python`` and must exit 0;
* any other fence (``text``, ``console``, ``json``, ``toml``, ...) is output or illustration
  and never runs. Every fence names its language, so that choice is always made.

Two markers, an HTML comment on the line right before a block (invisible on GitHub):

* ``<!-- not run: REASON -->`` skips the block (set-up that builds a venv, the test suite
  itself, a host that does not exist here). The reason is required; keep them rare.
* ``<!-- file: PATH -->``: the block is the content of PATH, relative to the page's working
  directory; the test writes it there and runs nothing.

Long-running commands (``trio_gateway serve`` and ``top``, unless ``--once`` or ``--help``,
and a ``nats-server`` an example needs) start in the background. ``serve`` counts as started
once it logs ``ready``, ``top`` once it draws a frame, ``nats-server`` once it says ``Server is
ready``; then the page goes on against them. A ``serve`` runs until the page starts another
one, or ends: then it gets SIGINT (the tutorial's Ctrl-C) and must exit 0 (its ledger
balanced). A ``top`` is stopped the same way, before the gateways; a ``nats-server`` after
them.

Environment: each page runs in its own temporary directory holding a copy of ``docs/examples``
(an example's README starts in its own directory, as it says) and ``.venv``, a symlink to the
environment running this test (``sys.prefix``), so ``.venv/bin/python`` and
``. .venv/bin/activate`` are this test's interpreter; ``PATH`` starts with the directory of
``sys.executable``, so a bare ``python`` is too. What a command exports, a ``cd`` and an
activation carry over to the next command (the test saves ``env`` and ``pwd`` after each), as
in one terminal.

Ports: the pages use the ports they show (7000, 9100, ...). Where the machine allows an
unprivileged network namespace (``unshare -rn``, util-linux), each page runs in its own,
where every port is free and nothing else listens; elsewhere those ports must be free on the
host, or the page is skipped, naming the busy port. A page that uses PostgreSQL on its usual
Unix socket (``host=/var/run/postgresql``, user ``postgres``) gets the suite's PostgreSQL
server there: its namespace also has a mount namespace, with a tmpfs on /run and the
server's socket directory bound on /run/postgresql (the host's /run is left alone). Without
namespaces such a page is skipped.
"""

from __future__ import annotations

import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import REPO

EXAMPLES = (
    "docs/examples/chat/README.md",
    "docs/examples/iot/README.md",
    "docs/examples/logs/README.md",
)
PAGES = ("README.md", "docs/tutorial.md", "docs/cli.md", *EXAMPLES)
SHELLS = {"sh": "sh", "bash": "bash"}
COMMAND_TIMEOUT = 120.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0

_FENCE = re.compile(r"^```(\S*)\s*$")
_MARKER = re.compile(r"^<!--\s*(not run|file):\s*(.+?)\s*-->$")
_LONG_RUNNING = re.compile(r"\btrio[_-]gateway\s+(serve|top)\b|^nats-server\b")
_STOP_ORDER = ("top", "serve", "nats-server")  # what watches first, what is watched last
_POSTGRES_SOCKET = "/var/run/postgresql"
_ASSIGNMENTS = re.compile(r"^((?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*)")
_LOOPBACK_PORT = re.compile(r"127\.0\.0\.1[:/](\d+)")
_DEFAULT_PORTS = {7000, 7001, 9100}  # serve's embedded defaults
_SHELL_STATE = {"_", "SHLVL", "PWD", "OLDPWD"}


@dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    marker: tuple[str, str] | None = None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def read_blocks(page: str) -> list[Block]:
    """The fenced blocks of ``page`` with their marker comments."""
    blocks: list[Block] = []
    lines = (REPO / page).read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            i += 1
        previous = next((ln.strip() for ln in reversed(lines[:start]) if ln.strip()), "")
        marker = _MARKER.match(previous)
        blocks.append(
            Block(
                page,
                start + 1,
                opening.group(1),
                "\n".join(lines[start + 1 : i]) + "\n",
                (marker.group(1), marker.group(2)) if marker else None,
            )
        )
        i += 1
    return blocks


def shell_commands(text: str) -> list[str]:
    """A shell block's commands: one per line, backslash continuations joined, comments and
    blank lines left out."""
    commands: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if "<<" in line:
            raise AssertionError("here-documents are not supported: use <!-- file: PATH -->")
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        commands.append(pending + line)
        pending = ""
    assert not pending, f"a continuation runs off the end of the block: {pending!r}"
    return commands


def is_long_running(command: str) -> bool:
    return bool(_LONG_RUNNING.search(command)) and not re.search(r"--once|--help|\s-h\b", command)


def _tail(path: Path, limit: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-limit:]


def _copy_screen(terminal: int, path: Path) -> None:
    """Copy what a program draws on its pseudo-terminal into ``path`` until it closes."""
    with path.open("ab") as out:
        while True:
            try:
                data = os.read(terminal, 65536)
            except OSError:  # EIO: the program closed its side
                data = b""
            if not data:
                break
            out.write(data)
            out.flush()
    os.close(terminal)


class Namespace:
    """A private network namespace (user + net, unprivileged) that commands are run in."""

    _HOLDER = (
        "import fcntl, socket, struct, sys\n"
        "s = socket.socket()\n"  # bring the namespace's loopback up (SIOCGIFFLAGS, SIOCSIFFLAGS)
        "flags = struct.unpack('16sH', fcntl.ioctl(s, 0x8913, struct.pack('16sH', b'lo', 0)))[1]\n"
        "fcntl.ioctl(s, 0x8914, struct.pack('16sH', b'lo', flags | 1))\n"
        "if len(sys.argv) > 1:\n"  # a private /run holding the given PostgreSQL socket directory
        "    import os, subprocess\n"
        "    run = os.path.realpath('/run')\n"
        "    subprocess.run(['mount', '-t', 'tmpfs', 'tmpfs', run], check=True)\n"
        "    os.mkdir(run + '/postgresql')\n"
        "    subprocess.run(['mount', '--bind', sys.argv[1], run + '/postgresql'], check=True)\n"
        "print('up', flush=True)\n"
        "sys.stdin.read()\n"
    )

    def __init__(self, postgres_socket: Path | None = None) -> None:
        self.mounts = postgres_socket is not None
        unshare = ["unshare", "--user", "--map-root-user", "--net", *(["--mount"] * self.mounts)]
        self.holder = subprocess.Popen(
            [*unshare, sys.executable, "-c", self._HOLDER, *([str(postgres_socket)] * self.mounts)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != "up":
            self.close()
            raise OSError(self.holder.stderr.read() if self.holder.stderr else "unshare failed")

    def prefix(self) -> list[str]:
        namespaces = ["-U", "-n", *(["-m"] * self.mounts)]
        return ["nsenter", "--preserve-credentials", *namespaces, "-t", str(self.holder.pid)]

    def close(self) -> None:
        if self.holder.stdin is not None:
            self.holder.stdin.close()
        try:
            self.holder.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.holder.kill()
            self.holder.wait()

    @classmethod
    def open(cls, postgres_socket: Path | None = None) -> Namespace | None:
        if not (shutil.which("unshare") and shutil.which("nsenter")):
            return None
        try:
            return cls(postgres_socket)
        except OSError:
            return None


@dataclass
class Background:
    command: str
    block: Block
    kind: str  # serve | top | nats-server
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path


@dataclass
class Terminal:
    """One page's terminal: working directory, environment, background processes."""

    directory: Path
    namespace: Namespace | None
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = field(init=False)
    running: list[Background] = field(default_factory=list)
    counter: int = 0

    def __post_init__(self) -> None:
        self.cwd = self.directory
        self.logs = self.directory.parent / f"{self.directory.name}-logs"
        self.logs.mkdir()

    def _argv(self, shell: str, script: str) -> list[str]:
        # Entering a mount namespace moves to its root: nsenter goes back to the directory.
        prefix = [*self.namespace.prefix(), f"--wd={self.cwd}"] if self.namespace else []
        return [*prefix, shell, "-c", script]

    def _next(self, suffix: str) -> Path:
        self.counter += 1
        return self.logs / f"{self.counter:03d}.{suffix}"

    def run(self, shell: str, command: str, block: Block) -> None:
        if is_long_running(command):
            self.start(shell, command, block)
            return
        env_file, pwd_file = self._next("env"), self._next("pwd")
        script = f'{command}\n__rc=$?\nenv -0 > "{env_file}"\npwd > "{pwd_file}"\nexit $__rc\n'
        try:
            done = subprocess.run(
                self._argv(shell, script),
                cwd=self.cwd,
                env=self.env,
                capture_output=True,
                timeout=COMMAND_TIMEOUT,
            )
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{block.where}: `{command}` did not end in time") from exc
        if done.returncode != 0:
            raise AssertionError(
                f"{block.where}: `{command}` exited {done.returncode}\n"
                f"stdout: {done.stdout.decode(errors='replace')[-2000:]}\n"
                f"stderr: {done.stderr.decode(errors='replace')[-2000:]}"
                + "".join(f"\n[{b.kind}] stderr: {_tail(b.stderr)}" for b in self.running)
            )
        if env_file.exists():
            pairs = (item.split("=", 1) for item in env_file.read_text().split("\0") if item)
            self.env = {k: v for k, v in pairs if k not in _SHELL_STATE}
            self.cwd = Path(pwd_file.read_text().strip())

    def start(self, shell: str, command: str, block: Block) -> None:
        assert not re.search(r"&&|\|\||;|\|", command), (
            f"{block.where}: a long-running command must stand alone: `{command}`"
        )
        words = command.split()
        kind = "serve" if "serve" in words else "nats-server" if "nats-server" in words else "top"
        # A new gateway replaces the last one; `top` watching it is quit first, as a reader
        # does (left running, it would give up on the gone endpoint and exit 1 if the next
        # gateway took longer than its grace to come up, as on a loaded machine).
        stopping = {kind, "top"} if kind == "serve" else {kind}
        for earlier in sorted(
            (b for b in self.running if b.kind in stopping), key=lambda b: b.kind != "top"
        ):
            self.stop(earlier)
        assignments = _ASSIGNMENTS.match(command)
        cut = assignments.end() if assignments else 0
        script = f"{command[:cut]}exec {command[cut:]}"  # SIGINT reaches the program itself
        stdout, stderr = self._next("out"), self._next("err")
        screen = None
        if kind == "top":  # a terminal, as `top` expects (it draws nothing into a pipe)
            terminal, screen = pty.openpty()
            threading.Thread(target=_copy_screen, args=(terminal, stdout), daemon=True).start()
        with stdout.open("ab") as out, stderr.open("wb") as err:
            process = subprocess.Popen(
                self._argv(shell, script),
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out if screen is None else screen,
                stderr=err,
            )
        if screen is not None:
            os.close(screen)
        background = Background(command, block, kind, process, stdout, stderr)
        self.running.append(background)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._started(background):
            if process.poll() is not None or time.monotonic() > deadline:
                self.running.remove(background)
                process.kill()
                process.wait()
                raise AssertionError(
                    f"{block.where}: `{command}` did not start (exit {process.returncode})\n"
                    f"stdout: {_tail(stdout)}\nstderr: {_tail(stderr)}"
                )
            time.sleep(0.05)

    @staticmethod
    def _started(background: Background) -> bool:
        if background.kind == "serve":
            return bool(re.search(r"\bready$", _tail(background.stderr), re.MULTILINE))
        if background.kind == "nats-server":
            return "Server is ready" in _tail(background.stderr)
        return background.stdout.stat().st_size > 0

    def stop(self, background: Background) -> None:
        """Ctrl-C, as the reader would press it; the program must end cleanly (exit 0)."""
        self.running.remove(background)
        process = background.process
        process.send_signal(signal.SIGINT)
        try:
            returncode = process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(
                f"{background.block.where}: `{background.command}` ignored Ctrl-C\n"
                f"stderr: {_tail(background.stderr)}"
            ) from None
        assert returncode == 0, (
            f"{background.block.where}: `{background.command}` exited {returncode} on Ctrl-C\n"
            f"stderr: {_tail(background.stderr)}"
        )

    def close(self, *, check: bool) -> None:
        """Stop every background program: ``top``, then the gateways, then their servers."""
        for background in sorted(self.running, key=lambda b: _STOP_ORDER.index(b.kind)):
            if check:
                self.stop(background)
            else:
                self.running.remove(background)
                background.process.kill()
                background.process.wait()


def _busy_ports(page: str) -> list[int]:
    ports = {int(p) for p in _LOOPBACK_PORT.findall((REPO / page).read_text())} | _DEFAULT_PORTS
    busy = []
    for port in sorted(ports):
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    busy.append(port)
                    break
    return busy


def _uses_postgres(page: str) -> bool:
    return f"host={_POSTGRES_SOCKET}" in (REPO / page).read_text()


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> Iterator[Namespace | None]:
    postgres_socket = None
    if _uses_postgres(request.getfixturevalue("page")):
        postgres = request.getfixturevalue("postgres")
        # Its socket directory is private to the server's user; the page's commands run as
        # another (the namespace's root is not root over the host's files).
        postgres.directory.chmod(0o755)
        postgres_socket = postgres.directory
    ns = Namespace.open(postgres_socket)
    yield ns
    if ns is not None:
        ns.close()


def _page_directory(tmp_path: Path) -> Path:
    directory = tmp_path / "page"
    shutil.copytree(REPO / "docs" / "examples", directory / "docs" / "examples")
    if sys.prefix != sys.base_prefix:  # a venv: the whole of it, so its pyvenv.cfg is found
        (directory / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    else:
        (directory / ".venv" / "bin").mkdir(parents=True)
        (directory / ".venv" / "bin" / "python").symlink_to(sys.executable)
    return directory


@pytest.mark.slow  # 15 to 70 s in all: every page starts real gateways
@pytest.mark.parametrize("page", PAGES)
def test_every_documented_command_runs_as_written(
    page: str, tmp_path: Path, namespace: Namespace | None
) -> None:
    if namespace is None and _uses_postgres(page):
        pytest.skip(f"no namespaces here to put PostgreSQL at {_POSTGRES_SOCKET} for {page}")
    if namespace is None and (busy := _busy_ports(page)):
        pytest.skip(f"no network namespace here, and port(s) {busy} of {page} are in use")
    directory = _page_directory(tmp_path)
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("VIRTUAL_ENV", None)
    terminal = Terminal(directory, namespace, env)
    if page in EXAMPLES:
        terminal.cwd = directory / Path(page).parent
    ran = 0
    try:
        for block in read_blocks(page):
            if block.marker and block.marker[0] == "not run":
                continue
            if block.marker and block.marker[0] == "file":
                target = terminal.cwd / block.marker[1]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(block.text)
                continue
            if block.language in SHELLS:
                for command in shell_commands(block.text):
                    terminal.run(SHELLS[block.language], command, block)
                    ran += 1
            elif block.language == "python":
                script = terminal.logs / f"block-{block.line}.py"
                script.write_text(block.text)
                terminal.run("sh", f'python "{script}"', block)
                ran += 1
    except BaseException:
        terminal.close(check=False)
        raise
    terminal.close(check=True)
    assert ran, f"{page}: no command ran"


# -- the conventions themselves ---------------------------------------------------------------


def test_blocks_and_markers_are_read_as_documented() -> None:
    """The parser sees what the module docstring promises, so a page cannot slip past it."""
    for page in PAGES:
        for block in read_blocks(page):
            assert block.language, f"{block.where}: name the fence's language (text for output)"
            if block.marker is None:
                continue
            kind, value = block.marker
            assert value, f"{block.where}: a marker needs a reason or a path"
            if kind == "not run":
                assert block.language in (*SHELLS, "python"), (
                    f"{block.where}: only a command block can be marked not run"
                )
    assert shell_commands("# c\n\nfirst \\\n  --flag\nsecond\n") == ["first --flag", "second"]
    assert is_long_running("PYTHONPATH=x .venv/bin/python -m trio_gateway serve --tcp :1")
    assert is_long_running("python -m trio_gateway top --admin 127.0.0.1:9100")
    assert not is_long_running("python -m trio_gateway top --admin 127.0.0.1:9100 --once")
    assert not is_long_running("python -m trio_gateway send --tcp 127.0.0.1:7000")
    assert is_long_running("nats-server -js -sd nats-store")
