"""Worker processes on one machine: ``serve --workers N``.

One Trio process uses one core. :class:`Supervisor` runs N worker processes, each a complete
gateway (its own queue, pump and sink; with named pipelines, every pipeline, routes kept
inside the worker), that share every listening port with ``SO_REUSEPORT``:
the kernel spreads TCP connections (HTTP, WebSocket and gRPC included) and UDP senders across
them. The supervising parent is a Trio program too:

* **Ports** (``_ports.py``). Before starting a worker, the parent binds each source's address
  itself, with ``SO_REUSEPORT``: a port in use fails there, once, with a clear error; port 0
  becomes a concrete port that every worker then binds. The parent keeps its TCP socket bound
  (never listening, so the kernel never hands it a connection) for its whole life, which keeps
  the port reserved while a worker restarts. A bound UDP socket would get its share of
  datagrams, so the parent closes that one once every worker is up, before it reports the port.
* **Workers** (``_child.py``). ``python -c "...worker_main()"`` per worker, in a process group
  of its own (a Ctrl-C at the terminal reaches the parent only, which forwards it once). The
  resolved configuration goes to the worker as one JSON line on its stdin (``_spec.py``); the
  pipe then stays open, and its end (the parent died, even by SIGKILL) makes the worker shut
  down cleanly. The worker's stderr carries JSON lines (``_logs.py``): its log records and two
  events, ``ready`` (bound addresses, the private admin port) and ``ledger`` (its shutdown
  ledger). Its stdout (the stdout sink) is relayed to the parent's stdout in whole lines, so
  two workers never interleave mid-line (``_pipes.py``: one read loop for both pipes).
* **Restarts** (``_restart.py``). A worker that exits while the gateway is not stopping is
  started again after an exponential backoff (:class:`RestartPolicy`); one that fails
  ``max_failures`` times within ``window`` seconds makes the parent give up: it stops the
  others, prints the combined ledger and exits non-zero (:class:`WorkerError`).
* **Shutdown** (``_supervisor.py``, ``_ledgers.py``). SIGTERM/SIGINT to the parent is
  forwarded to every worker, which runs its own cancellation-safe flush; a second signal is
  forwarded too (the workers stop at once). The parent waits (bounded by ``stop_timeout``,
  then SIGKILL) and prints one combined ledger: the sum of the workers' ledgers, plus
  ``workers``, ``restarts`` and ``crashed`` (with named pipelines, first each pipeline's
  report summed over the workers).
* **Metrics** (``_metrics.py``, ``_admin.py``). Each worker serves its admin endpoint on a
  private loopback port; the parent scrapes them every ``scrape_interval`` seconds and serves
  the sum on the configured admin address (counters and histograms of an exited worker are
  kept, so sums never go backwards; ``process_*`` metrics keep a ``worker`` label instead of
  being summed). ``/readyz`` is 200 while every worker is up and accepting.

See docs/workers.md.
"""

from ._child import WORKER_ENV as WORKER_ENV
from ._ledgers import WorkersLedger as WorkersLedger
from ._restart import RestartPolicy as RestartPolicy
from ._restart import WorkerError as WorkerError
from ._supervisor import Supervisor as Supervisor
from ._supervisor import serve_workers as serve_workers

__all__ = (
    "WORKER_ENV",
    "RestartPolicy",
    "Supervisor",
    "WorkerError",
    "WorkersLedger",
    "serve_workers",
)
