"""The ``dms`` command. User mistakes end in one line on stderr and a non-zero exit."""

from __future__ import annotations

import importlib
import sys

import typer

from dms import __version__
from dms.cli.output import error
from dms.errors import DmsError

HELP = "dms: a peer-to-peer device management service for privacy-preserving data mining."

# name: (module in dms.cli, attribute, a group of commands or one command), in the
# order of ``dms --help``.
COMMANDS: dict[str, tuple[str, str, bool]] = {
    "key": ("key", "app", True),
    "cap": ("cap", "app", True),
    "config": ("config", "app", True),
    "mine": ("mine", "app", True),
    "actor": ("actor", "app", True),
    "peers": ("peers", "app", True),
    "init": ("node", "init", False),
    "run": ("node", "run", False),
    "onboard": ("resources", "onboard", False),
    "offboard": ("resources", "offboard", False),
    "benchmark": ("resources", "benchmark", False),
    "resources": ("resources", "resources", False),
    "job": ("jobs", "job_app", True),
    "deploy": ("jobs", "deploy", False),
    "deployment": ("jobs", "deployment_app", True),
    "status": ("status", "status", False),
    "sim": ("sim", "app", True),
    "unlock": ("unlock", "unlock", False),
    "lock": ("unlock", "lock", False),
}


def version() -> None:
    """Print the dms version."""
    typer.echo(__version__)


def build_app(only: str | None = None) -> typer.Typer:
    """The ``dms`` command with every subcommand, or with ``only`` the one asked for:
    each command's module (TenSEAL, SQLAlchemy, libp2p...) loads only when it runs, so
    ``dms key list`` does not pay for ``dms mine``."""
    app = typer.Typer(
        name="dms",
        help=HELP,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    # A group, even with a single command registered (Typer would otherwise run that
    # command directly, without its name).
    app.callback()(lambda: None)
    for name, (module, attribute, group) in COMMANDS.items():
        if only is not None and name != only:
            continue
        found = getattr(importlib.import_module(f"dms.cli.{module}"), attribute)
        if group:
            app.add_typer(found, name=name)
        else:
            app.command(name)(found)
    app.command("version")(version)
    return app


def _asked_for(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names, if it is one (else every command loads, for help
    and for click's own usage errors)."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; click reports usage errors itself, we report ``DmsError``."""
    args = sys.argv[1:] if argv is None else argv
    app = build_app(_asked_for(args))
    try:
        app(args=args, prog_name="dms", standalone_mode=True)
    except DmsError as exc:
        error(str(exc))
        return exc.exit_code
    except OSError as exc:
        if exc.filename is None:
            raise
        # A path the user gave (--out, --keys, DMS_HOME) that cannot be used as asked.
        error(f"{exc.filename}: {exc.strerror or exc}")
        return 1
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        error(str(exc.code))
        return 1
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
