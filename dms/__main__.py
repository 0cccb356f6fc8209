"""``python -m dms``: as the installed ``dms`` script (:func:`dms.cli.run`)."""

try:
    from dms.cli import run
except KeyboardInterrupt:  # before even that tiny module is in
    raise SystemExit(130) from None

run()
