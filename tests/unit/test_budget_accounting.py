"""The memory budget: its accounting, a connection's share, waiting for room, and how the
configuration sets it (``limits.max_memory``, ``--max-memory``)."""

from __future__ import annotations

import argparse

import pytest
import trio
from trio.testing import MockClock

from trio_gateway import ConfigurationError, Gateway, RingBuffer, TcpSource
from trio_gateway._budget import DEFAULT_MAX_MEMORY, MemoryBudget
from trio_gateway._config import build_gateway, config_from_mapping
from trio_gateway._config._describe import describe
from trio_gateway._config._flags import add_serve_arguments, config_from_args
from trio_gateway._config._schema import DEFAULT_MAX_MEMORY as SCHEMA_DEFAULT
from trio_gateway.testing import MemorySource, RecordingSink

MiB = 1 << 20


def test_the_budget_splits_into_the_queue_and_the_held_pool() -> None:
    budget = MemoryBudget(64 * MiB)
    assert (budget.queue_bytes, budget.pool, budget.connection_share) == (
        32 * MiB,
        32 * MiB,
        2 * MiB,
    )
    explicit = MemoryBudget(64 * MiB, queue_bytes=16 * MiB)
    assert (explicit.pool, explicit.connection_share) == (48 * MiB, 3 * MiB)
    assert DEFAULT_MAX_MEMORY == SCHEMA_DEFAULT == 256 * MiB
    with pytest.raises(ConfigurationError) as error:
        MemoryBudget(64 * MiB, queue_bytes=64 * MiB)
    assert error.value.key == "queue.max_bytes"
    with pytest.raises(ConfigurationError) as error:
        MemoryBudget(0)
    assert error.value.key == "limits.max_memory"


def test_a_connection_holds_at_most_its_share_and_the_pool_at_most_the_budget() -> None:
    budget = MemoryBudget(64 * MiB)  # pool 32 MiB, share 2 MiB
    first = budget.connection()
    assert first.hold_nowait(2 * MiB)
    assert not first.hold_nowait(2 * MiB + 1)  # past its share: refused, nothing changed
    assert first.held == budget.held == 2 * MiB
    others = [budget.connection() for _ in range(15)]
    assert all(share.hold_nowait(2 * MiB) for share in others)  # the pool is full now
    late = budget.connection()
    assert not late.hold_nowait(1)
    assert first.hold_nowait(MiB)  # shrinking always works
    assert late.hold_nowait(MiB)
    with first:
        pass  # leaving the block releases all of it
    assert first.held == 0 and budget.held == 31 * MiB
    assert budget.statistics().peak == 32 * MiB


def test_statistics_split_what_is_held_into_connections_and_the_batch() -> None:
    budget = MemoryBudget(64 * MiB)
    share = budget.connection()
    share.hold_nowait(3000)
    budget.charge(500)  # the pump's batch
    stats = budget.statistics()
    assert (stats.held, stats.connections, stats.batch) == (3500, 3000, 500)
    share.hold_nowait(1000)
    budget.release(500)
    share.close()
    stats = budget.statistics()
    assert (stats.held, stats.connections, stats.batch, stats.peak) == (0, 0, 0, 3500)
    budget.charge(budget.pool // 2)
    assert not budget.crowded  # half taken: stream connections still charge their reads
    budget.charge(1)
    assert budget.crowded


async def test_hold_waits_for_room_and_wakes_on_release(autojump_clock: MockClock) -> None:
    budget = MemoryBudget(64 * MiB)
    budget.charge(budget.pool)  # the pump's batch in hand fills the pool
    share = budget.connection()
    waited: list[bool] = []

    async def reader() -> None:
        await share.hold(MiB)
        waited.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert not waited and budget.statistics().waiting == 1
        budget.release(MiB)  # the batch was delivered
    assert waited == [True] and share.held == MiB
    budget.release(budget.pool - MiB)  # the rest of the batch
    with trio.fail_after(0.001):  # virtual time: it must not wait at all
        await share.hold(10 * MiB)  # clamped to its share: room at once
    assert share.held == budget.connection_share


def test_sources_must_fit_two_messages_in_a_connections_share() -> None:
    with pytest.raises(ConfigurationError) as error:
        Gateway(
            sources=[TcpSource(max_message_size=2 * MiB)],
            sink=RecordingSink(),
            max_memory=64 * MiB,
        )
    assert error.value.key == "limits.max_memory"
    assert "tcp.max_message_size = 2097152" in error.value.message


def test_the_default_queue_is_bounded_in_bytes_by_half_the_budget() -> None:
    gateway = Gateway(sources=[MemorySource()], sink=RecordingSink(), max_memory=64 * MiB)
    assert gateway.queue.max_bytes == 32 * MiB
    mine = Gateway(sources=[MemorySource()], sink=RecordingSink(), queue=RingBuffer(10))
    assert mine.queue.max_bytes is None and mine.budget.queue_bytes == DEFAULT_MAX_MEMORY // 2


@pytest.mark.parametrize(
    ("value", "expected"), [(1 << 26, 1 << 26), ("512MiB", 512 * MiB), ("1GiB", 1 << 30)]
)
def test_limits_max_memory_in_toml(value: object, expected: int) -> None:
    config = config_from_mapping({"limits": {"max_memory": value}, "sink": {"url": "null"}})
    assert config.max_memory == expected
    gateway = build_gateway(config.with_default_sources())
    assert gateway.budget.max_memory == expected and gateway.queue.max_bytes == expected // 2


def test_the_channel_queue_counts_items_only_and_gets_no_byte_bound() -> None:
    config = config_from_mapping({"queue": {"kind": "channel"}, "sink": {"url": "null"}})
    gateway = build_gateway(config.with_default_sources())
    assert gateway.queue.max_bytes is None


@pytest.mark.parametrize(
    ("limits", "key"),
    [
        ({"max_memory": "lots"}, "limits.max_memory"),
        ({"max_memory": 0}, "limits.max_memory"),
        ({"max_memory": True}, "limits.max_memory"),
        ({"max_mem": 1}, "limits.max_mem"),
    ],
)
def test_bad_limits_name_their_key(limits: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        config_from_mapping({"limits": limits})
    assert error.value.key == key


def test_max_memory_flag_overrides_the_file_and_sets_the_queues_share() -> None:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    config = config_from_args(parser.parse_args(["--max-memory", "64MiB", "--sink", "null"]))
    assert config.max_memory == 64 * MiB
    assert "memory budget 64 MiB, the queue's share 32 MiB" in describe(config)
    with pytest.raises(ConfigurationError) as error:
        config_from_args(parser.parse_args(["--max-memory", "64MB"]))
    assert error.value.key == "--max-memory"
