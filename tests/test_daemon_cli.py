"""``dms init``, ``dms run`` and the behaviour CLI, as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clitools import Daemon, dms, dms_json, init_home_quick
from tests.conftest import wait_for

STRANGER = "12D3KooWPFKFJf9NhYrEDsrqM231jX1rszkZD59mazCQymVR7w7A"


@pytest.fixture
def homes(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    one, two = tmp_path / "one", tmp_path / "two"
    for home in (one, two):
        init_home_quick(home)
    yield one, two


def test_init_is_idempotent(tmp_path: Path) -> None:
    home = tmp_path / "h"
    first = dms_json(home, "init")
    again = dms_json(home, "init")
    assert first["created"] == ["dms", "user"] and first["root_anchored"] is True
    assert again["created"] == [] and again["root_anchored"] is False
    assert first["peer_id"] == again["peer_id"] and first["user_did"] == again["user_did"]


def test_run_without_keys_says_to_init(tmp_path: Path) -> None:
    done = dms(tmp_path / "empty", "run", "--api-port", "0")
    assert done.returncode != 0
    assert "dms init" in done.stderr and "Traceback" not in done.stderr


def test_daemon_logs_libp2p_warnings_with_time_and_source(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """py-libp2p's warnings (a peer's DHT stream failing, ...) are part of the node's
    log, not bare lines on stderr with no time or source."""
    import libp2p  # noqa: F401  (its import detaches the libp2p logger)

    from dms.cli.node import configure_daemon_logging

    monkeypatch.delenv("LIBP2P_DEBUG", raising=False)
    monkeypatch.setattr(logging.getLogger("libp2p"), "propagate", False)
    configure_daemon_logging("INFO")
    logging.getLogger("libp2p.kad_dht.kad_dht").warning("Failed to read DHT message")
    assert "libp2p.kad_dht.kad_dht" in [r.name for r in caplog.records]


def test_cli_without_a_running_node_is_a_clear_error(homes: tuple[Path, Path]) -> None:
    done = dms(homes[0], "peers", "list")
    assert done.returncode != 0
    assert "no node is running" in done.stderr and "dms run" in done.stderr


def test_two_daemons_peers_ping_and_remote_invoke(homes: tuple[Path, Path]) -> None:
    one, two = homes
    first = Daemon(one)
    second = None
    try:
        addr = first.info["addrs"][0]
        assert addr.endswith(f"/p2p/{first.info['peer_id']}")
        second = Daemon(two, "--bootstrap", addr)

        # /health on the recorded loopback port names this home's node (30 s: the answer
        # is the test's; the node may be busy with the second daemon's arrival).
        port = json.loads((one / "api.json").read_text())["port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as response:
            health = json.load(response)
        assert health["peer_id"] == first.info["peer_id"] and health["status"] == "running"
        assert {"node_id", "did", "version", "uptime_s"} <= set(health)

        wait_for(
            lambda: any(
                p["peer_id"] == first.info["peer_id"] for p in dms_json(two, "peers", "list")
            ),
            timeout=30,
            what="the second daemon to list the first",
        )
        pong = dms_json(two, "peers", "ping", first.info["peer_id"])
        assert pong["peer_id"] == first.info["peer_id"] and pong["rtt_ms"] > 0
        me = dms_json(two, "peers", "self")
        assert me["peer_id"] == second.info["peer_id"]

        hello = dms_json(two, "actor", "cmd", "/public/hello", "--dest", first.info["did"])
        assert hello["peer_id"] == first.info["peer_id"]

        first_id = first.info["peer_id"]
        sent = dms_json(two, "actor", "broadcast", "/dms/broadcast", "message=hi from two")
        assert sent == {"published": "/dms/broadcast"}
        wait_for(
            lambda: any(
                h["message"] == "hi from two"
                for h in dms_json(two, "actor", "cmd", "/public/hellos", "--dest", first_id)
            ),
            timeout=30,
            what="the broadcast at the first node",
        )

        # The first node does not trust the second node's user: a clear refusal.
        denied = dms(two, "actor", "cmd", "/dms/node/peers/list", "--dest", first.info["peer_id"])
        assert denied.returncode != 0 and "forbidden" in denied.stderr

        # It ends by itself, with the reason (dms() raises after its own 60 s).
        lost = dms(two, "actor", "cmd", "/public/hello", "--dest", STRANGER, "--timeout", "4")
        assert lost.returncode != 0
        assert "unreachable" in lost.stderr and STRANGER in lost.stderr
        assert "Traceback" not in lost.stderr + denied.stderr

        bad = dms(two, "actor", "cmd", "/public/hello", "--payload", "{not json")
        assert bad.returncode != 0 and "--payload is not JSON" in bad.stderr
    finally:
        codes = [d.stop() for d in (second, first) if d is not None]
    assert codes == [0, 0] if second else [0]
    assert not (one / "api.json").exists()


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--bootstrap", "/ip4/nope"),
        ("--listen", "not-a-multiaddr"),
        # no peer named: it was ignored at every redial, and the node never joined
        ("--bootstrap", "/ip4/127.0.0.1/tcp/4001"),
        # no protocol at all ('--bootstrap "$UNSET"'): it was an IndexError's traceback
        ("--bootstrap", ""),
    ],
)
def test_run_with_a_bad_address_is_a_one_line_error(
    homes: tuple[Path, Path], flag: str, value: str
) -> None:
    done = dms(homes[0], "run", "--api-port", "0", flag, value, timeout=30)
    assert done.returncode != 0
    assert f"bad {flag.removeprefix('--')}" in done.stderr and value in done.stderr
    if "/tcp/" in value or not value:
        assert "does not end in /p2p/<peer id>" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_daemon_keeps_its_start_heap_out_of_full_collections(homes: tuple[Path, Path]) -> None:
    """dms run freezes the heap it started with (specs/orchestration.md, "Seventh pass:
    the tail"): its metrics show the objects frozen; a node run by a caller of main()
    in its own process (this test's) leaves its collector alone."""
    import gc

    from prometheus_client.parser import text_string_to_metric_families

    from dms.node.api import TOKEN_HEADER, token_file

    one = homes[0]
    daemon = Daemon(one)
    try:
        port = json.loads((one / "api.json").read_text())["port"]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/metrics",
            headers={TOKEN_HEADER: token_file(one).read_text().strip()},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
    finally:
        assert daemon.stop() == 0
    samples = {
        s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
    }
    assert samples["dms_gc_frozen_objects"] > 10_000  # a started node's modules and objects
    assert "dms_gc_collections_total" in samples
    assert gc.get_freeze_count() == 0
