"""When a worker that died is started again, and when the supervisor gives up."""

from __future__ import annotations

from dataclasses import dataclass

from .._errors import ConfigurationError, GatewayError

__all__ = ("RestartPolicy", "WorkerError")


class WorkerError(GatewayError):
    """The supervisor gave up: a worker kept failing (see :class:`RestartPolicy`)."""


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How a worker that died is restarted: exponential backoff, then giving up.

    The n-th failure of a worker within ``window`` seconds is followed by a delay of
    ``initial * multiplier ** (n - 1)`` seconds (at most ``maximum``); at ``max_failures``
    failures within ``window`` the supervisor gives up and stops the gateway.
    """

    initial: float = 0.2
    maximum: float = 10.0
    multiplier: float = 2.0
    max_failures: int = 5
    window: float = 60.0

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial or self.multiplier < 1:
            raise ConfigurationError("restart", "need 0 < initial <= maximum and multiplier >= 1")
        if self.max_failures < 1:
            raise ConfigurationError("restart.max_failures", "must be at least 1")
        if self.window <= 0:
            raise ConfigurationError("restart.window", "must be positive")

    def delay(self, failures: int) -> float:
        """Seconds to wait before restarting after ``failures`` recent failures (1-based)."""
        return min(self.maximum, self.initial * self.multiplier ** (failures - 1))
