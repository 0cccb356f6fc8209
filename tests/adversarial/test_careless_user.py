"""Item 7 of issue 17: two everyday mistakes, each a clear refusal (run as a user does).

Before: a second ``dms run`` on one home ran beside the first and removed its
``api.json`` when it exited (the CLI then lost the running node); a second node
on a listen port already in use started without a word (py-libp2p listens with
SO_REUSEPORT, so the kernel shared the port's connections between both); and
``dms config show`` printed the files even while the daemon ran with other flags.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clitools import Daemon, dms, dms_json, free_ports, init_home_quick


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    one = tmp_path / "one"
    init_home_quick(one)
    yield one


def one_line_error(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_second_run_on_the_same_home_names_the_running_pid(home: Path) -> None:
    first = Daemon(home)
    try:
        second = dms(home, "run", "--listen", "/ip4/127.0.0.1/tcp/0", "--api-port", "0", timeout=40)
        assert second.returncode != 0
        line = one_line_error(second.stderr)
        assert "already running" in line and f"pid {first.proc.pid}" in line
        # The first node and its api.json are untouched: the CLI still finds it.
        recorded = json.loads((home / "api.json").read_text())
        assert recorded["pid"] == first.proc.pid
        assert dms_json(home, "peers", "self")["peer_id"] == first.info["peer_id"]
    finally:
        assert first.stop() == 0


def test_a_killed_node_leaves_no_lock_behind(home: Path) -> None:
    crashed = Daemon(home)
    crashed.kill()  # no clean-up: the kernel drops the lock with the process
    again = Daemon(home)
    try:
        assert dms_json(home, "peers", "self")["peer_id"] == again.info["peer_id"]
    finally:
        assert again.stop() == 0


def test_a_listen_address_in_use_is_a_one_line_error(home: Path, tmp_path: Path) -> None:
    other = tmp_path / "two"
    init_home_quick(other)
    address = f"/ip4/127.0.0.1/tcp/{free_ports()[0]}"
    first = Daemon(home, "--listen", address)
    try:
        second = dms(other, "run", "--listen", address, "--api-port", "0", timeout=40)
        assert second.returncode != 0
        line = one_line_error(second.stderr)
        assert "already in use" in line and address in line
    finally:
        assert first.stop() == 0


def test_config_show_while_the_node_runs_shows_its_flags(home: Path) -> None:
    files_only = dms_json(home, "config", "show")
    assert files_only["daemon"] is None and files_only["api_port"] == 9999
    node = Daemon(home, "--bootstrap", "/ip4/127.0.0.1/tcp/9/p2p/" + STRANGER)
    try:
        shown = dms_json(home, "config", "show")
        assert shown["daemon"]["pid"] == node.proc.pid
        assert shown["listen"] == ["/ip4/127.0.0.1/tcp/0"]  # the flag, not the file
        assert shown["bootstrap"] == ["/ip4/127.0.0.1/tcp/9/p2p/" + STRANGER]
        assert shown["api_port"] == json.loads((home / "api.json").read_text())["port"]
        assert shown["passphrase"] == "********"
        plain = dms(home, "config", "show")
        assert plain.returncode == 0 and f"pid {node.proc.pid}" in plain.stdout
    finally:
        assert node.stop() == 0


STRANGER = "12D3KooWPFKFJf9NhYrEDsrqM231jX1rszkZD59mazCQymVR7w7A"
