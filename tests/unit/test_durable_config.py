"""The durability keys of the configuration: the disk queue, ``ack`` and the dead letter."""

from __future__ import annotations

from pathlib import Path

import pytest

from trio_gateway import ConfigurationError, FileSink
from trio_gateway._config import build_gateway, config_from_mapping
from trio_gateway._config._describe import describe
from trio_gateway.queues import DiskQueue


def test_disk_queue_ack_and_dead_letter_from_a_mapping(tmp_path: Path) -> None:
    config = config_from_mapping(
        {
            "queue": {
                "kind": "disk",
                "dir": str(tmp_path),
                "fsync": "always",
                "max_bytes": 1 << 20,
            },
            "sink": {"url": "null", "dead_letter": str(tmp_path / "dead.jsonl")},
            "sources": [{"transport": "http", "listen": "127.0.0.1:0", "ack": "delivered"}],
        }
    )
    gateway = build_gateway(config)
    assert isinstance(gateway.queue, DiskQueue)
    assert gateway.queue.fsync == "always" and gateway.queue.max_bytes == 1 << 20
    assert list(gateway.acks.values()) == ["delivered"]
    assert gateway.dead_letter is not None and isinstance(gateway.dead_letter.sink, FileSink)
    text = describe(config)
    assert "ack=delivered" in text and "dead letter" in text and "fsync always" in text


@pytest.mark.parametrize(
    ("mapping", "key"),
    [
        ({"queue": {"kind": "disk"}}, "queue.dir"),
        ({"queue": {"kind": "ring", "dir": "/tmp/x"}}, "queue.dir"),
        ({"queue": {"kind": "disk", "dir": "/tmp/x", "fsync": "never"}}, "queue.fsync"),
        ({"sources": [{"transport": "tcp", "ack": "delivered"}]}, "tcp.ack"),
        ({"sources": [{"transport": "http", "ack": "eventually"}]}, "http.ack"),
        ({"queue": {"kind": "disk", "dir": "/tmp/x"}, "gateway": {"workers": 2}}, "workers"),
    ],
)
def test_bad_durability_settings_name_their_key(mapping: dict[str, object], key: str) -> None:
    base: dict[str, object] = {"sources": [{"transport": "http"}], "sink": {"url": "null"}}
    with pytest.raises(ConfigurationError, match=key):
        build_gateway(config_from_mapping({**base, **mapping}))
