"""The mining library's error types (``dms.mining`` imports nothing else from ``dms``)."""


class MiningError(ValueError):
    """Bad input or parameters, with a one-line message meant for a person."""


class WorkerMisbehaved(MiningError):
    """A worker's answer broke the protocol: malformed, replayed or recomputed wrong.

    Raised by the owner side before it decrypts anything from that answer. The
    mining session catches it, drops the worker, excludes it for this job and
    places its shard again. ``reason`` is one line for a person; ``shard`` names
    the shard whose worker answered (``None`` where the caller knows it better).
    """

    def __init__(self, reason: str, shard: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.shard = shard
