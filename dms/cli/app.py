"""The ``dms`` command. User mistakes end in one line on stderr and a non-zero exit."""

from __future__ import annotations

import gc
import importlib
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
import typer.core

from dms import __version__
from dms.cli.examples import epilog
from dms.cli.output import error
from dms.errors import DmsError

INTERRUPTED = 130  # the exit code of a command ended by Ctrl-C (128 + SIGINT)
# True in a process the console entry point (run) started for one command: the command
# may then tune the process for itself (dms run freezes its start heap); a caller of
# main() in its own process (a test) keeps its collector as it was.
OWN_PROCESS = False
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
    "logs": ("node", "logs", False),
    "stop": ("node", "stop", False),
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


def _version_flag(asked: bool) -> None:
    if asked:
        version()
        raise typer.Exit()


def _root(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_version_flag, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """dms: a peer-to-peer device management service for privacy-preserving data mining."""


# What people write for a value (click's words), instead of Typer's Python annotation.
_TYPE_WORDS = {"int": "INTEGER", "float": "FLOAT", "str": "TEXT", "bool": "BOOLEAN"}


def _readable(shown: Callable[[Any, Any], str | None]) -> Callable[[Any, Any], str | None]:
    """Typer shows a value's type as its annotation (``<list[str]>``, ``<int range>``,
    ``<bool>`` on a flag); show INTEGER, PATH, TEXT, and no type on a flag."""

    def display(param: Any, ctx: Any) -> str | None:
        if getattr(param, "is_flag", False):
            return None
        label = shown(param, ctx)
        if label is None or not (label.startswith("<") and ">" in label):
            return label  # a metavar the command chose (DIR)
        inner, _, rest = label[1:].partition(">")
        inner = inner.removeprefix("list[").removesuffix("]").removesuffix(" range")
        return _TYPE_WORDS.get(inner, inner.upper()) + rest

    return display


typer.core.TyperOption.display_type_rich = _readable(typer.core.TyperOption.display_type_rich)  # type: ignore[method-assign]
typer.core.TyperArgument.display_type_rich = _readable(  # type: ignore[method-assign]
    typer.core.TyperArgument.display_type_rich
)


def summary(doc: str | None) -> str | None:
    """A docstring's first paragraph on one line: a group's list of commands keeps the
    docstring's own line breaks (Typer's rich mode), which broke sentences mid-line."""
    if not doc:
        return None
    return " ".join(doc.strip().split("\n\n")[0].split())


def _with_examples(found: typer.Typer, path: str) -> None:
    """Each command of ``found`` (a group named ``path``) ends its help with examples,
    and is listed with its summary on one line."""
    for info in found.registered_commands:
        name = info.name or (info.callback.__name__ if info.callback else "")
        info.epilog = info.epilog or epilog(f"{path} {name}")
        doc = info.help or (info.callback.__doc__ if info.callback else None)
        info.short_help = info.short_help or summary(doc)
    for group in found.registered_groups:  # 'dms mine collab ...'
        if group.typer_instance is not None:
            _with_examples(group.typer_instance, f"{path} {group.name}")
            group.no_args_is_help = True
    found.info.no_args_is_help = True  # 'dms peers' alone lists its commands


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
    app.callback()(_root)
    for name, (module, attribute, group) in COMMANDS.items():
        if only is not None and name != only:
            continue
        found = getattr(importlib.import_module(f"dms.cli.{module}"), attribute)
        if group:
            _with_examples(found, name)
            app.add_typer(found, name=name, no_args_is_help=True)
        else:
            app.command(name, epilog=epilog(name), short_help=summary(found.__doc__))(found)
    app.command("version", epilog=epilog("version"))(version)
    return app


def _asked_for(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names, if it is one (else every command loads, for help
    and for click's own usage errors)."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS or first == "version" else None


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; click reports usage errors itself, we report ``DmsError``."""
    args = sys.argv[1:] if argv is None else argv
    try:
        app = build_app(_asked_for(args))  # imports the command's modules
        app(args=args, prog_name="dms", standalone_mode=True)
    except KeyboardInterrupt:
        # Ctrl-C before the command runs (Typer ends one while it runs with 130 itself,
        # and 'status --watch' with 0): 130, as any interrupted command, no traceback.
        return INTERRUPTED
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
    global OWN_PROCESS
    OWN_PROCESS = True
    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C outside main's own try (as it returns, say): 130
        code = INTERRUPTED
    # The command is done (a node stopped and saved): the interpreter's exit need not
    # search what is left for cycles to free (0.3 s of every daemon's exit).
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
