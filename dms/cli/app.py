"""The ``dms`` command. User mistakes end in one line on stderr and a non-zero exit."""

from __future__ import annotations

import sys

import typer

from dms import __version__
from dms.cli import (
    actor,
    cap,
    config,
    jobs,
    key,
    mine,
    node,
    peers,
    resources,
    sim,
    status,
    unlock,
)
from dms.cli.output import error
from dms.errors import DmsError

app = typer.Typer(
    name="dms",
    help="dms: a peer-to-peer device management service for privacy-preserving data mining.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(key.app, name="key")
app.add_typer(cap.app, name="cap")
app.add_typer(config.app, name="config")
app.add_typer(mine.app, name="mine")
app.add_typer(actor.app, name="actor")
app.add_typer(peers.app, name="peers")
app.command("init")(node.init)
app.command("run")(node.run)
app.command("onboard")(resources.onboard)
app.command("offboard")(resources.offboard)
app.command("benchmark")(resources.benchmark)
app.command("resources")(resources.resources)
app.add_typer(jobs.job_app, name="job")
app.command("deploy")(jobs.deploy)
app.add_typer(jobs.deployment_app, name="deployment")
app.command("status")(status.status)
app.add_typer(sim.app, name="sim")
app.command("unlock")(unlock.unlock)
app.command("lock")(unlock.lock)


@app.command("version")
def version() -> None:
    """Print the dms version."""
    typer.echo(__version__)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; click reports usage errors itself, we report ``DmsError``."""
    try:
        app(args=argv, standalone_mode=True)
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
