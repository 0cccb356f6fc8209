"""Why a collaboration refused a message or stopped."""

from __future__ import annotations

from dms.mining.errors import MiningError


class Refused(MiningError):
    """A message that breaks the protocol (wrong collaboration, round, shape, signature,
    a replay): it is not used, and ``reason`` says why. ``sender`` names who sent it
    when the message says so."""

    def __init__(self, reason: str, sender: str | None = None) -> None:
        super().__init__(f"{sender}: {reason}" if sender else reason)
        self.reason = reason
        self.sender = sender


class CollabFailed(MiningError):
    """The collaboration cannot go on (fewer owners than the threshold, a secret that
    does not rebuild); ``reason`` names the round and who dropped."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
