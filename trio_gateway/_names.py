"""The one spelling rule for enum-like values (policies, queue kinds, framings, modes, ...).

Every such value is *shown* in its snake_case form (``drop_oldest``, ``locked_ring``): the
form of the Python API, the ledger and the ``/metrics`` labels. Every place that *reads* one
(the Python API, command-line flags, TOML keys) also accepts the hyphenated form
(``drop-oldest``), so what a shell user types by habit works too. This module imports nothing,
so the command line can use it without loading the servers.
"""

from __future__ import annotations

__all__ = ("canonical",)


def canonical(value: str) -> str:
    """``value`` in the shown form: ``"drop-oldest"`` -> ``"drop_oldest"``."""
    return value.replace("-", "_")
