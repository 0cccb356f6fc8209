"""Exponential backoff: the one rule for "try again later, waiting longer each time".

A :class:`Backoff` is the first wait and the most any wait may be; each further
attempt waits ``factor`` times the last. Callers either count attempts
(``delay(attempt)``: attempt 0 waits ``first_s``) or carry the last wait along
(``after(wait_s)``: the wait that follows it). Used by the requester's bid rounds
and reverts, the store retries of ended deployments and released leases, and the
lapse cool-down of a provider.
"""

from __future__ import annotations

from dataclasses import dataclass

_MAX_DOUBLINGS = 64  # past this any first_s > 0 has reached any sane max_s


@dataclass(frozen=True)
class Backoff:
    first_s: float
    max_s: float
    factor: float = 2.0

    def delay(self, attempt: int) -> float:
        """The wait before try ``attempt + 1`` (0-based: attempt 0 waits ``first_s``)."""
        step = min(max(attempt, 0), _MAX_DOUBLINGS)
        return min(self.max_s, self.first_s * self.factor**step)

    def after(self, wait_s: float) -> float:
        """The wait that follows one of ``wait_s``."""
        return min(self.max_s, wait_s * self.factor)
