"""The one error type a user sees.

A :class:`DmsError` carries a one-line message meant for a person; the CLI
prints it as ``error: <message>`` and exits non-zero, never with a traceback.
Anything else that escapes is a bug and keeps its traceback.
"""

# pydantic's error type for a key the model does not have (``extra="forbid"``): said at
# the key's line, not its value's (``dms.yamlfile.LinedYaml.line(key=True)``), in a job
# or scenario file and in an executor's params (``ExecutorError.key``).
EXTRA_KEY = "extra_forbidden"


class DmsError(Exception):
    """A user-facing failure with a one-line explanation."""

    exit_code: int = 1
    code: str = "invalid"  # the error code a behaviour replies with when this escapes it

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
