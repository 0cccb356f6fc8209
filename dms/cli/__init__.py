"""The ``dms`` command line.

:func:`run` is the installed ``dms`` script's entry point: it loads the command's
modules itself, so a Ctrl-C while they load (a second or more on a busy machine) ends
the command as Ctrl-C ends any: exit 130, no traceback. This module imports nothing.
"""


def run() -> None:
    """Load the command line and run it (the ``dms`` script; ``python -m dms``)."""
    try:
        from dms.cli.app import run as run_loaded

        run_loaded()
    except KeyboardInterrupt:  # app.run catches its own; this is before or after it
        raise SystemExit(130) from None
