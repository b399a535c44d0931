"""Idempotency ids, from the sender's key to the record: the key's checks, the HTTP rules'
ids (one message: the key; NDJSON: ``key:i``), the ingress giving each message its own
origin, the JSON Lines ``"id"``, and the disk queue keeping ids across a restart."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from helpers import detached_ingress

from trio_gateway import Batch, ConfigurationError, Origin
from trio_gateway._wire import MAX_KEY_LENGTH, idempotency_key
from trio_gateway.loadgen._options import check_ids
from trio_gateway.queues import DiskQueue, RingBuffer
from trio_gateway.sinks import decode_jsonl_record, encode_jsonl
from trio_gateway.sources.grpc._services import _key
from trio_gateway.sources.http import BodyKind, IngestRules

HTTP = Origin("http", "http:test", "127.0.0.1:5000", 1.5)


def ids_of(batch: Batch) -> list[str | None]:
    return [message.origin.id for message in batch]


def test_an_origin_has_no_id_unless_given() -> None:
    assert Origin("tcp", "tcp:x", "p", 1.0).id is None
    assert Origin("tcp", "tcp:x", "p", 1.0, "k").id == "k"
    assert Origin("tcp", "tcp:x", "p", 1.0) != Origin("tcp", "tcp:x", "p", 1.0, "k")


@pytest.mark.parametrize(
    ("value", "key"),
    [
        (b"abc-123", "abc-123"),
        (b'"8e03978e-40d5"', "8e03978e-40d5"),  # the IETF draft's structured-field string
        (b"  padded  ", "padded"),
        ("a:b/c", "a:b/c"),
        (b"x" * MAX_KEY_LENGTH, "x" * MAX_KEY_LENGTH),
        (b"", None),
        (b'""', None),
        (b"two words", None),
        (b"tab\there", None),
        ("caf\u00e9", None),
        (b"x" * (MAX_KEY_LENGTH + 1), None),
    ],
)
def test_what_a_key_may_be(value: str | bytes, key: str | None) -> None:
    assert idempotency_key(value) == key


def rules(capacity: int = 100) -> IngestRules:
    ingress, _ = detached_ingress(RingBuffer(capacity), "http")
    return IngestRules(ingress, queue_wait=0)


HEAD = [(b"content-type", b"application/x-ndjson")]


async def test_the_key_names_one_message_or_each_line_by_position() -> None:
    r = rules()
    refusal, kind = r.head(b"POST", b"/ingest", [(b"idempotency-key", b"k1")])
    assert refusal is None and kind == BodyKind(False, "k1")
    assert (await r.ingest(b"one", kind, "peer")).status == 202
    refusal, kind = r.head(b"POST", b"/ingest", [*HEAD, (b"idempotency-key", b'"k2"')])
    assert refusal is None and kind == BodyKind(True, "k2")
    assert (await r.ingest(b'{"a":1}\n\n{"a":2}\n{"a":3}\n', kind, "peer")).status == 202
    _, plain = r.head(b"POST", b"/ingest", HEAD)
    assert plain.key is None
    assert (await r.ingest(b'{"b":1}\n{"b":2}', plain, "peer")).status == 202
    batch = r.ingress.buffer.get_batch_nowait(100)
    assert batch.payloads == [b"one", b'{"a":1}', b'{"a":2}', b'{"a":3}', b'{"b":1}', b'{"b":2}']
    assert ids_of(batch) == ["k1", "k2:0", "k2:1", "k2:2", None, None]
    # Without a key the messages of one read still share one origin (one run).
    assert batch.runs[-1][1] == 2


async def test_a_bad_key_is_refused_with_400_and_counted_before_the_body() -> None:
    r = rules()
    refusal, _ = r.head(b"POST", b"/ingest", [(b"idempotency-key", b"no spaces")])
    assert refusal is not None and refusal.status == 400
    assert b"Idempotency-Key" in refusal.body
    assert r.ingress.counters.rejected["malformed"] == 1
    assert len(r.ingress.buffer) == 0


async def test_a_partial_acceptance_keeps_the_prefix_with_its_ids() -> None:
    r = rules(capacity=2)
    _, kind = r.head(b"POST", b"/ingest", [*HEAD, (b"idempotency-key", b"k")])
    reply = await r.ingest(b"1\n2\n3\n", kind, "peer")
    assert reply.status == 503 and json.loads(reply.body)["accepted"] == 2
    assert ids_of(r.ingress.buffer.get_batch_nowait(10)) == ["k:0", "k:1"]


async def test_ids_stay_with_their_payloads_when_offer_waits_for_room() -> None:
    ingress, _ = detached_ingress(RingBuffer(2), "grpc")
    payloads = [b"p%d" % i for i in range(7)]
    taken: list[Batch] = []

    async def consume() -> None:
        while sum(map(len, taken)) < len(payloads):
            taken.append(await ingress.buffer.get_batch(3))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        assert await ingress.offer(payloads, HTTP, ids=[f"s:{i}" for i in range(7)]) == 7
    messages = [m for batch in taken for m in batch]
    assert [m.payload for m in messages] == payloads
    assert [m.origin.id for m in messages] == [f"s:{i}" for i in range(7)]
    assert all(count == 1 for batch in taken for _, count in batch.runs)


def test_json_lines_carry_the_id_only_when_there_is_one() -> None:
    batch = Batch.of([(b"a", Origin("http", "l", "p", 1.0, "id-1")), (b"b", HTTP), (b"c", HTTP)])
    lines = encode_jsonl(batch).splitlines()
    records = [decode_jsonl_record(line) for line in lines]
    assert [payload for payload, _ in records] == [b"a", b"b", b"c"]
    assert records[0][1]["id"] == "id-1"
    assert "id" not in records[1][1] and "id" not in records[2][1]


async def test_the_disk_queue_keeps_each_id_across_a_restart(tmp_path: Path) -> None:
    with_id = Origin("grpc", "grpc:x", "p", 2.0, "k:7")
    async with DiskQueue(tmp_path) as queue:
        queue.put_many_nowait([b"a"], origin=with_id)
        queue.put_many_nowait([b"b", b"c"], origin=HTTP)
    async with DiskQueue(tmp_path) as again:
        batch = again.take_batch_nowait(10)
        assert batch.payloads == [b"a", b"b", b"c"]
        assert batch.runs == [(with_id, 1), (HTTP, 2)]


async def test_a_queue_written_before_ids_opens_and_keeps_its_messages(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "queue.sqlite3")
    conn.execute(
        "CREATE TABLE runs (id INTEGER PRIMARY KEY, count INTEGER NOT NULL,"
        " nbytes INTEGER NOT NULL, skip INTEGER NOT NULL DEFAULT 0, transport TEXT NOT NULL,"
        " listener TEXT NOT NULL, peer TEXT NOT NULL, received_at REAL NOT NULL,"
        " lengths BLOB NOT NULL, data BLOB NOT NULL)"
    )
    conn.execute(
        "INSERT INTO runs VALUES (1, 1, 3, 0, 'tcp', 'tcp:x', 'p', 1.0, ?, ?)",
        ((3).to_bytes(4, "little"), b"old"),
    )
    conn.commit()
    conn.close()
    async with DiskQueue(tmp_path) as queue:
        assert queue.recovered == 1
        queue.put_many_nowait([b"new"], origin=Origin("http", "h", "p", 2.0, "k"))
        await queue.wait_stored()
    async with DiskQueue(tmp_path) as again:
        batch = again.take_batch_nowait(10)
        assert batch.payloads == [b"old", b"new"]
        assert ids_of(batch) == [None, "k"]


def test_send_ids_must_make_valid_keys() -> None:
    check_ids(None)
    check_ids("run-1")
    for bad in ("", "a b", '"q"', "x" * 200):
        with pytest.raises(ConfigurationError, match="--ids"):
            check_ids(bad)


def test_a_grpc_call_with_a_bad_key_is_invalid_argument() -> None:
    assert _key(SimpleNamespace(idempotency_key=None)) is None  # type: ignore[arg-type]
    assert _key(SimpleNamespace(idempotency_key="k-1")) == "k-1"  # type: ignore[arg-type]
    with pytest.raises(GRPCError) as caught:
        _key(SimpleNamespace(idempotency_key="not a key"))  # type: ignore[arg-type]
    assert caught.value.status == Status.INVALID_ARGUMENT


def test_messages_with_ids_keep_their_origins_when_drop_oldest_evicts() -> None:
    ingress, _ = detached_ingress(RingBuffer(3, policy="drop_oldest"), "grpc")
    buffer = ingress.buffer
    origins = [Origin("grpc", "l", "p", 1.0, f"k:{i}") for i in range(5)]
    assert buffer.put_each_nowait([b"%d" % i for i in range(5)], origins) == 3  # the newest
    batch = buffer.get_batch_nowait(10)
    assert batch.payloads == [b"2", b"3", b"4"]
    assert ids_of(batch) == ["k:2", "k:3", "k:4"]
    # drop_newest takes the prefix that fits, each with its own id
    ingress, _ = detached_ingress(RingBuffer(2, policy="drop_newest"), "grpc")
    assert ingress.buffer.put_each_nowait([b"a", b"b", b"c"], origins[:3]) == 2
    assert ids_of(ingress.buffer.get_batch_nowait(10)) == ["k:0", "k:1"]
