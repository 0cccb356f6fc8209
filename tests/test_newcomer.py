"""What a newcomer meets (issue 27): a fresh home and a lone ``dms run``, the commands
and mistakes of the README through the real entry point, at 80 columns. No traceback,
one precise line per mistake, nothing cut."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clitools import Daemon, dms, env_for

ROOT = Path(__file__).resolve().parent.parent
IRIS = ROOT / "examples" / "iris-features.csv"


def at_80(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = env_for(home)
    env.update(COLUMNS="80", LINES="50")
    return subprocess.run(
        [sys.executable, "-m", "dms", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def clean(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert all(len(line) <= 80 for line in done.stdout.splitlines()), done.stdout


@pytest.fixture(scope="module")
def lone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A fresh home running its node: no peer, no deployment yet."""
    home = tmp_path_factory.mktemp("lone") / "home"
    assert dms(home, "init").returncode == 0
    daemon = Daemon(home)
    try:
        yield daemon
    finally:
        daemon.stop()


def test_empty_tables_say_so_instead_of_a_traceback(lone: Daemon) -> None:
    for args in (["deployment", "list"], ["peers", "list"]):
        done = at_80(lone.home, *args)
        clean(done)
        assert done.returncode == 0, (args, done.stderr)
        assert "(none yet)" in done.stdout
