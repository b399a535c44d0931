"""A gateway inside your own Trio program.

The README shows this file; tests/e2e/test_docs_examples.py runs it.
"""

import trio

from trio_gateway import Gateway, Message, RingBuffer, StdoutSink, TcpSource


def errors_only(message: Message) -> bytes | None:
    """A processor: pass error records on, filter out the rest (counted as filtered)."""
    return message.payload if b'"level":"error"' in message.payload else None


async def main() -> None:
    gateway = Gateway(
        sources=[TcpSource("127.0.0.1", 0)],  # port 0: the OS picks one
        queue=RingBuffer(10_000, policy="drop_oldest"),
        processor=errors_only,
        sink=StdoutSink(),  # JSON Lines on stdout
    )
    async with trio.open_nursery() as nursery:
        [[address]] = await nursery.start(gateway.run)  # returns once listening
        async with await trio.open_tcp_stream(*address) as client:
            await client.send_all(b'{"level":"info"}\n{"level":"error","msg":"disk full"}\n')
        gateway.shutdown()  # close listeners, drain the queue, flush the sink
    print(gateway.ledger.to_json())  # received == delivered + dropped + abandoned


if __name__ == "__main__":
    trio.run(main)
