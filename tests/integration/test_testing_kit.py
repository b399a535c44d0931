"""The test kit itself: MemorySource, RecordingSink, the gateway handle and the pytest plugin."""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

import trio_gateway.testing
from trio_gateway import (
    ConfigurationError,
    FrameTooLarge,
    Gateway,
    Ingress,
    RingBuffer,
    SinkError,
    Source,
    TcpSource,
)
from trio_gateway.testing import (
    GatewayFactory,
    MemorySource,
    RecordingSink,
    open_gateway,
    start_gateway,
)

REPO = Path(__file__).resolve().parents[2]


# -- the public surface -------------------------------------------------------------------


def test_exported_names() -> None:
    assert trio_gateway.testing.__all__ == (
        "GatewayFactory",
        "GatewayHandle",
        "GatewayStatistics",
        "MemorySource",
        "RecordingSink",
        "open_gateway",
        "start_gateway",
    )
    for name in trio_gateway.testing.__all__:
        obj = getattr(trio_gateway.testing, name)
        assert obj.__module__.startswith("trio_gateway.testing._"), name
        assert inspect.getdoc(obj), f"{name} has no docstring"


def test_plugin_exports_its_fixtures() -> None:
    from trio_gateway.testing import _plugin

    assert _plugin.__all__ == ("gateway_factory", "memory_source", "recording_sink")


def test_importing_the_kit_does_not_import_pytest() -> None:
    code = "import sys, trio_gateway.testing; print('pytest' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "False"


def test_entry_point_names_the_plugin_module(pytestconfig: pytest.Config) -> None:
    (entry_point,) = [
        ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.name == "trio_gateway"
    ]
    assert entry_point.value == "trio_gateway.testing._plugin"
    assert pytestconfig.pluginmanager.has_plugin("trio_gateway")


# -- MemorySource -------------------------------------------------------------------------


async def test_memory_source_needs_a_running_gateway() -> None:
    source = MemorySource("feed")
    with pytest.raises(RuntimeError, match="not running"):
        await source.send(b"x")
    with pytest.raises(RuntimeError, match="not been started"):
        _ = source.counters
    assert source.label == "memory:feed"
    assert not source.running


async def test_memory_source_refuses_sends_once_the_gateway_stopped(
    autojump_clock: MockClock,
) -> None:
    source, sink = MemorySource(), RecordingSink()
    async with open_gateway(Gateway(sources=[source], sink=sink)):
        assert source.running
    with pytest.raises(trio.ClosedResourceError):
        await source.send(b"late")
    with pytest.raises(trio.ClosedResourceError):
        source.send_nowait(b"late")


async def test_memory_source_enforces_max_message_size(autojump_clock: MockClock) -> None:
    source, sink = MemorySource(max_message_size=4), RecordingSink()
    async with open_gateway(Gateway(sources=[source], sink=sink)) as handle:
        with pytest.raises(FrameTooLarge):
            await source.send_many([b"ok", b"too long"])
        assert await source.send(b"fine")
    assert source.counters.rejected == {"oversize": 2}
    assert sink.payloads == [b"fine"]
    assert handle.ledger.received == 1


def test_memory_source_rejects_an_empty_name() -> None:
    with pytest.raises(ConfigurationError, match=r"memory\.name"):
        MemorySource("")


async def test_memory_source_serves_one_gateway_at_a_time(autojump_clock: MockClock) -> None:
    source = MemorySource()
    async with open_gateway(Gateway(sources=[source], sink=RecordingSink())):
        ingress: Any = object()
        with pytest.raises(RuntimeError, match="already serves"):
            await source.run(ingress)
    # Once that gateway stopped, the source can serve another one.
    sink = RecordingSink()
    async with open_gateway(Gateway(sources=[source], sink=sink)):
        await source.send(b"again")
    assert sink.payloads == [b"again"]


async def test_waiting_send_gets_the_grace_period_then_is_cut_off(
    autojump_clock: MockClock,
) -> None:
    source, sink = MemorySource(), RecordingSink()
    gateway = Gateway(
        sources=[source], sink=sink, queue=RingBuffer(2), grace_period=3.0, drain_timeout=1.0
    )
    results: list[int] = []
    async with open_gateway(gateway) as handle:
        sink.stall()
        await source.send(b"held")
        await sink.wait_stalled()

        async def sender() -> None:
            results.append(await source.send_many([b"1", b"2", b"3", b"4", b"5"]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await trio.testing.wait_all_tasks_blocked()
            assert source.sending == 1
            start = trio.current_time()
            handle.gateway.shutdown()
    assert results == [2]  # two fitted; three were still waiting when the grace period ended
    assert trio.current_time() - start == pytest.approx(3.0 + 1.0)  # grace, then drain
    ledger = handle.ledger
    assert source.counters.abandoned == 3
    assert (ledger.received, ledger.abandoned) == (6, 6)  # 3 cut off + 2 queued + 1 held
    assert ledger.balanced


async def test_waiting_send_that_finishes_within_the_grace_period_is_delivered(
    autojump_clock: MockClock,
) -> None:
    source, sink = MemorySource(), RecordingSink()
    gateway = Gateway(sources=[source], sink=sink, queue=RingBuffer(1), grace_period=10.0)
    results: list[int] = []
    async with open_gateway(gateway) as handle:
        sink.stall()
        await source.send(b"held")
        await sink.wait_stalled()
        await source.send(b"queued")

        async def sender() -> None:
            results.append(await source.send_many([b"a", b"b"]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await trio.testing.wait_all_tasks_blocked()
            handle.gateway.shutdown()
            await trio.sleep(2.0)
            sink.recover()
    assert results == [2]
    assert sink.payloads == [b"held", b"queued", b"a", b"b"]
    assert (handle.ledger.delivered, handle.ledger.abandoned) == (4, 0)


async def test_send_many_of_nothing_is_a_no_op(autojump_clock: MockClock) -> None:
    source = MemorySource()
    async with open_gateway(Gateway(sources=[source], sink=RecordingSink())) as handle:
        assert await source.send_many([]) == 0
        assert source.send_many_nowait([]) == 0
        assert await source.send_or_reject([]) == 0
    assert handle.ledger.received == 0


# -- RecordingSink ------------------------------------------------------------------------


def test_recording_sink_validates_its_options() -> None:
    with pytest.raises(ConfigurationError, match="latency"):
        RecordingSink(latency=-1)
    with pytest.raises(ConfigurationError, match="max_records"):
        RecordingSink(max_records=0)
    with pytest.raises(ValueError, match="times"):
        RecordingSink().fail(times=0)


async def test_recording_sink_faults_switch_on_and_off(autojump_clock: MockClock) -> None:
    from trio_gateway._message import Batch, Origin

    sink = RecordingSink()
    origin = Origin("memory", "memory:t", "p", 0.0)
    batch = Batch.of([(b"1", origin), (b"2", origin)])

    sink.fail(times=2, error=lambda: OSError("down"))
    for _ in range(2):
        with pytest.raises(OSError, match="down"):
            await sink.send(batch)
    await sink.send(batch)
    assert (sink.attempts, sink.failures, sink.count) == (3, 2, 2)

    sink.fail_forever()
    for _ in range(5):
        with pytest.raises(SinkError):
            await sink.send(batch)
    sink.recover()
    await sink.send(batch)
    assert sink.payloads == [b"1", b"2", b"1", b"2"]
    assert sink.batch_sizes == [2, 2]
    assert sink.origins == [origin] * 4

    sink.stall()
    assert sink.stalled
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.send, batch)
        await sink.wait_stalled()
        assert sink.waiting == 1
        await trio.sleep(100)
        assert sink.count == 4
        sink.recover()
    assert (sink.count, sink.waiting, sink.stalled) == (6, 0, False)

    sink.clear()
    assert sink.payloads == []
    assert sink.count == 6


async def test_recording_sink_latency_is_virtual_time(autojump_clock: MockClock) -> None:
    from trio_gateway._message import Batch, Origin

    sink = RecordingSink(latency=2.5)
    start = trio.current_time()
    await sink.send(Batch.of([(b"x", Origin("memory", "m", "p", 0.0))]))
    assert trio.current_time() - start == pytest.approx(2.5)


async def test_recording_sink_keeps_at_most_max_records(autojump_clock: MockClock) -> None:
    source, sink = MemorySource(), RecordingSink(max_records=3)
    async with open_gateway(Gateway(sources=[source], sink=sink)):
        await source.send_many([b"%d" % i for i in range(5)])
        await sink.wait_for(5)
    assert sink.payloads == [b"2", b"3", b"4"]
    assert sink.count == 5


async def test_a_stalled_send_cut_off_at_the_deadline_records_nothing(
    autojump_clock: MockClock,
) -> None:
    source, sink = MemorySource(), RecordingSink()
    async with open_gateway(Gateway(sources=[source], sink=sink, drain_timeout=1.0)) as handle:
        sink.stall()
        await source.send(b"x")
        await sink.wait_stalled()
    assert (sink.count, sink.attempts, sink.opened, sink.closed) == (0, 0, 1, True)
    assert handle.ledger.abandoned == 1


# -- the gateway handle -------------------------------------------------------------------


async def test_handle_reports_real_listeners_and_statistics() -> None:
    sink = RecordingSink()
    tcp = TcpSource(port=0)
    gateway = Gateway(sources=[MemorySource(), tcp], sink=sink)
    with trio.fail_after(10):
        async with open_gateway(gateway) as handle:
            assert handle.bound[0] == []
            with pytest.raises(LookupError):
                handle.address(0)
            host, port = handle.address(1)
            assert (host, port) == tuple(tcp.bound[0])
            assert port != 0
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(b"one\ntwo\nthree\n")
                await sink.wait_for(3)
                stats = handle.statistics()
                assert (stats.state, stats.accepting) == ("running", True)
                assert stats.connections_active == 1
                assert stats.sink_batches >= 1
                assert stats.ledger.delivered == 3
            assert not handle.stopped
    assert handle.stopped
    assert handle.statistics().state == "stopped"
    assert not handle.statistics().accepting
    assert sink.payloads == [b"one", b"two", b"three"]
    assert {o.transport for o in sink.origins} == {"tcp"}


async def test_idle_timeout_of_a_real_listener_runs_in_virtual_time(
    autojump_clock: MockClock,
) -> None:
    sink = RecordingSink()
    gateway = Gateway(sources=[TcpSource(idle_timeout=300.0)], sink=sink)
    async with open_gateway(gateway) as handle:
        stream = await trio.open_tcp_stream(*handle.address())
        async with stream:
            start = trio.current_time()
            with trio.fail_after(1000):
                assert await stream.receive_some(16) == b""  # the gateway closed it
            assert trio.current_time() - start >= 300.0
    assert handle.ledger.rejected == {"idle_timeout": 1}


async def test_open_gateway_re_raises_the_body_error_after_flushing(
    autojump_clock: MockClock,
) -> None:
    source, sink = MemorySource(), RecordingSink(latency=1.0)
    gateway = Gateway(sources=[source], sink=sink, batch_size=1)
    with pytest.raises(ZeroDivisionError):
        async with open_gateway(gateway):
            await source.send_many([b"1", b"2", b"3"])
            1 / 0  # noqa: B018
    assert sink.count == 3
    assert gateway.ledger.balanced
    assert gateway.state == "stopped"


class _BrokenSource(Source):
    transport = "broken"

    async def run(
        self, ingress: Ingress, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        raise OSError("cannot bind")


async def test_start_gateway_propagates_a_failing_source() -> None:
    gateway = Gateway(sources=[_BrokenSource()], sink=RecordingSink())
    with pytest.raises(BaseException) as info:
        async with trio.open_nursery() as nursery:
            await start_gateway(nursery, gateway)
    assert info.group_contains(OSError, match="cannot bind", depth=None) or isinstance(
        info.value, OSError
    )
    assert gateway.state == "stopped"


# -- the fixtures -------------------------------------------------------------------------


async def test_gateway_factory_uses_the_fixtures_by_default(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    first = await gateway_factory()
    other_source, other_sink = MemorySource("other"), RecordingSink("other")
    second = await gateway_factory(sources=[other_source], sink=other_sink, batch_size=7)
    assert first.gateway.sink is recording_sink
    assert first.gateway.sources == (memory_source,)
    assert second.gateway.batch_size == 7
    await memory_source.send(b"to first")
    await other_source.send(b"to second")
    await recording_sink.wait_for(1)
    await other_sink.wait_for(1)
    assert gateway_factory.handles == [first, second]
    # Left running on purpose: the fixture shuts both down and checks their ledgers.


async def test_gateway_factory_without_a_default_sink_says_so() -> None:
    async with trio.open_nursery() as nursery:
        factory = GatewayFactory(nursery, sources=[MemorySource()])
        with pytest.raises(ConfigurationError, match="sink"):
            await factory()
        assert await factory.aclose() == []


# -- the plugin, from the outside ---------------------------------------------------------

_LEAKY = '''
import pytest
from trio_gateway import Ingress
from trio_gateway.testing import MemorySource


class LeakySource(MemorySource):
    """Counts a message it never queues: a bug the ledger check must catch."""

    async def run(self, ingress: Ingress, *, task_status=None) -> None:
        ingress.counters.received += 1
        await super().run(ingress, task_status=task_status)


@pytest.mark.trio
async def test_leaky(gateway_factory):
    await gateway_factory(sources=[LeakySource()])


@pytest.mark.trio
async def test_fine(gateway_factory, memory_source, recording_sink, autojump_clock):
    await gateway_factory()
    await memory_source.send(b"x")
    await recording_sink.wait_for(1)
'''


def _run_pytest(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """pytest in ``directory`` with its own empty config (no trio_mode) and only pytest-trio and
    our plugin loaded explicitly, whether or not the entry point is installed."""
    (directory / "pytest.ini").write_text("[pytest]\n")
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    command = [sys.executable, "-m", "pytest", "-p", "pytest_trio.plugin"]
    command += ["-p", "trio_gateway.testing._plugin", "-p", "no:cacheprovider", "-q", *args]
    return subprocess.run(
        command, cwd=directory, env=env, capture_output=True, text=True, timeout=120
    )


def test_docs_examples_pass_without_trio_mode(tmp_path: Path) -> None:
    examples = sorted((REPO / "docs" / "examples").glob("test_*.py"))
    assert len(examples) >= 3
    for example in examples:
        shutil.copy(example, tmp_path)
    result = _run_pytest(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 passed" in result.stdout


def test_fixture_fails_a_test_whose_ledger_does_not_balance(tmp_path: Path) -> None:
    (tmp_path / "test_leaky.py").write_text(_LEAKY)
    result = _run_pytest(tmp_path, "-rf")
    assert result.returncode == 1, result.stdout + result.stderr
    # pytest-trio tears fixtures down inside the test's run: the check fails the test itself.
    assert "1 failed, 1 passed" in result.stdout
    assert "FAILED test_leaky.py::test_leaky" in result.stdout
    assert "does not balance" in result.stdout


def test_docs_show_the_examples_as_they_are_run() -> None:
    """Every example function shown in docs/testing.md is, verbatim, in docs/examples/."""
    text = (REPO / "docs" / "testing.md").read_text()
    blocks = [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]
    examples = "\n".join(
        path.read_text() for path in sorted((REPO / "docs" / "examples").glob("test_*.py"))
    )
    shown = [block for block in blocks if "def test_" in block]
    assert len(shown) >= 3
    for block in shown:
        assert block.strip() in examples, block
