"""The mining library's one error type (``dms.mining`` imports nothing else from ``dms``)."""


class MiningError(ValueError):
    """Bad input or parameters, with a one-line message meant for a person."""
