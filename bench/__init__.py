"""trio_gateway's benchmarks: programs that print tables and write charts, never tests.

Run them from the repository root, as modules (``bench/http.py`` and ``bench/grpc.py`` are
named like the standard library's ``http`` and grpcio's ``grpc``, so running a file directly
would shadow those):

* ``python -m bench`` (:mod:`bench.run`): the talk's two tables, every transport beside its
  asyncio peer, with charts; writes docs/benchmarks.md, docs/img/ and bench/results/.
  ``--quick`` runs every case briefly (under two minutes), ``--smoke`` a subset.
* ``python -m bench.tcp``, ``bench.http``, ``bench.ws``, ``bench.grpc``: deeper looks at one
  transport (more peers, other clients).
* ``python -m bench.profile ROW``: where the server's CPU goes in one case of ``python -m
  bench`` (cProfile, microseconds per message by area and by function).
* ``python -m bench.queues``: ns per put + get for the four queues.
* ``python -m bench.jsonl``: the cost of the JSON Lines encoding of the file sink.
"""
