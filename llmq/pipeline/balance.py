"""Load balancing over backends: preference order by algorithm, and each backend's circuit. Pure, no I/O.

- ``round_robin``: rotate through the usable backends.
- ``least_connections``: fewest in-flight calls (shared across dispatchers) first, heavier weight on ties.
- ``weighted``: smooth weighted round robin by ``weight``.

A backend's circuit opens after ``max_failures`` consecutive failures: it gets no traffic until a health
probe succeeds (half-open: the next real call decides). A 429/503 with Retry-After cools it until then.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class Circuit:
    max_failures: int
    failures: int = 0
    open: bool = False
    cool_until: float = 0.0

    def usable(self, now: float) -> bool:
        return not self.open and now >= self.cool_until

    def success(self) -> None:
        self.failures = 0
        self.open = False

    def failure(self) -> bool:
        """Count a failure; return True when this one opened the circuit."""
        self.failures += 1
        if not self.open and self.failures >= self.max_failures:
            self.open = True
            return True
        return False

    def cool(self, until: float) -> None:
        self.cool_until = max(self.cool_until, until)

    def probe(self, healthy: bool) -> bool:
        """Apply a health probe; return True when it closed an open circuit (half-open)."""
        if healthy and self.open:
            self.open = False
            self.failures = self.max_failures - 1  # half-open: one more failure opens it again
            return True
        return False


@dataclass(frozen=True, slots=True)
class BackendView:
    name: str
    weight: int
    inflight: int


class Balancer:
    """Per-process balancing state (round robin position, weighted round robin credits)."""

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self._next = 0
        self._credit: dict[str, int] = {}

    def order(self, backends: Sequence[BackendView]) -> list[str]:
        """All given backends, most preferred first."""
        if not backends:
            return []
        if self.algorithm == "least_connections":
            return [b.name for b in sorted(backends, key=lambda b: (b.inflight / b.weight, -b.weight))]
        if self.algorithm == "weighted":
            total = sum(b.weight for b in backends)
            for b in backends:
                self._credit[b.name] = self._credit.get(b.name, 0) + b.weight
            best = max(backends, key=lambda b: self._credit[b.name])
            self._credit[best.name] -= total
            rest = [b.name for b in sorted(backends, key=lambda b: -self._credit[b.name]) if b.name != best.name]
            return [best.name, *rest]
        start = self._next % len(backends)
        self._next += 1
        rotated = list(backends[start:]) + list(backends[:start])
        return [b.name for b in rotated]
