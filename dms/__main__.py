"""``python -m dms``. Ctrl-C while the command is still loading (before its modules
are in, a second or more on a busy machine) ends it as Ctrl-C ends any command: exit
130, no traceback."""

try:
    from dms.cli.app import run

    run()
except KeyboardInterrupt:
    raise SystemExit(130) from None
