"""``dms cap`` as a user runs it: subprocesses with homes of their own, with and without
a running node."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.clitools import Daemon, dms, dms_json, init_home_quick


@pytest.fixture
def homes(tmp_path: Path) -> tuple[Path, Path, dict, dict]:
    a, b = tmp_path / "a", tmp_path / "b"
    return a, b, init_home_quick(a), init_home_quick(b)


def test_a_private_group_in_two_commands_and_the_rest_of_cap(homes) -> None:  # type: ignore[no-untyped-def]
    a, b, a_init, b_init = homes
    granted = dms(a, "cap", "grant", b_init["node_did"], "--cap", "/dms/deployment",
                  "--expiry", "30d")  # fmt: skip
    assert granted.returncode == 0, granted.stderr
    token = granted.stdout.strip()
    assert token.startswith("dmscap1") and "\n" not in token  # alone on stdout
    assert "dms cap anchor --provide" in granted.stderr
    anchored = dms_json(b, "cap", "anchor", "--provide", token)
    assert anchored["anchored"] == "provide+require"
    assert anchored["aud"] == b_init["node_did"] and anchored["accepts"] == a_init["node_did"]

    on_b = dms_json(b, "cap", "list")
    assert [(t["kind"], t["status"]) for t in on_b["tokens"]] == [("require+provide", "valid")]
    assert on_b["root"] == [b_init["user_did"]] and on_b["deployment_policy"] == "open"
    on_a = dms_json(a, "cap", "list")
    assert [(t["kind"], t["cap"]) for t in on_a["tokens"]] == [("issued", ["/dms/deployment"])]
    token_id = on_a["tokens"][0]["id"]

    # A token for another node is not this node's to show.
    wrong = dms(a, "cap", "anchor", "--provide", token)
    assert wrong.returncode == 1 and "is for " + b_init["node_did"] in wrong.stderr
    # Depth 0: b may use it (and its own actors), not pass it on.
    refused = dms(b, "cap", "delegate", a_init["user_did"], "--cap", "/dms/deployment/request")
    assert refused.returncode == 1 and "depth_exceeded" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    deeper = dms(a, "cap", "grant", b_init["node_did"], "--cap", "/dms", "--depth", "1")
    dms_json(b, "cap", "anchor", "--provide", deeper.stdout.strip(), "--one-way")
    passed = dms_json(b, "cap", "delegate", a_init["user_did"], "--cap", "/dms/node/peers")
    assert passed["chain"] == 2 and passed["iss"] == b_init["node_did"]
    widened = dms(b, "cap", "delegate", a_init["user_did"], "--cap", "/")
    assert widened.returncode == 1 and "covers /" in widened.stderr

    revoked = dms_json(a, "cap", "revoke", token_id[:12])
    assert revoked["revoked"] == token_id and revoked["stored"]
    assert dms_json(a, "cap", "list")["revoked"][0]["id"] == token_id
    removed = dms_json(b, "cap", "remove", token_id[:10])
    assert removed["removed"] == ["require", "provide"]
    assert dms_json(b, "cap", "anchor", "--root", a_init["user_did"])["new"] is True
    assert dms_json(b, "cap", "remove", "--root", a_init["user_did"])["removed"] == ["root"]

    bad = dms(b, "cap", "grant", a_init["node_did"], "--cap", "/x", "--expiry", "soon")
    assert bad.returncode == 1 and "--expiry" in bad.stderr
    assert dms_json(a, "config", "show")["deployment_policy"] == "open"


def test_cap_goes_through_the_running_node(homes) -> None:  # type: ignore[no-untyped-def]
    a, _, _, b_init = homes
    (a / "config.toml").write_text('deployment_policy = "tokens"\n')
    daemon = Daemon(a)
    try:
        token = dms(a, "cap", "grant", b_init["node_did"], "--cap", "/dms/deployment")
        assert token.returncode == 0, token.stderr
        listing = dms_json(a, "cap", "list")
        assert listing["deployment_policy"] == "tokens"
        assert [t["kind"] for t in listing["tokens"]] == ["issued"]
        shown = dms(a, "cap", "list")
        assert shown.returncode == 0 and "tokens" in shown.stdout
        revoked = dms_json(a, "cap", "revoke", listing["tokens"][0]["id"][:8])
        assert revoked["published"] == "/dms/revocation" and revoked["stored"]
        config = dms_json(a, "config", "show")
        assert config["deployment_policy"] == "tokens" and config["daemon"]
    finally:
        assert daemon.stop() == 0
    # The node wrote the file: the CLI reads the same anchors without it.
    assert json.loads((a / "cap" / "dms.json").read_text())["revoke"]
