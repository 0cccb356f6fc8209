"""The ``dms`` command line."""
