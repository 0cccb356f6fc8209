"""Configuration precedence and the `dms key` / `dms config` commands, run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dms.cli.app import main
from dms.config import ConfigError, load_settings


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dms", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def test_env_overrides_file_overrides_default(
    dms_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dms_home.mkdir(parents=True)
    (dms_home / "config.toml").write_text("api_port = 7000\nmax_ttl_s = 60\n")
    assert load_settings().api_port == 7000
    monkeypatch.setenv("DMS_API_PORT", "7001")
    settings = load_settings()
    assert (settings.api_port, settings.max_ttl_s, settings.invoke_timeout_s) == (7001, 60, 10)


@pytest.mark.parametrize(
    "content, message",
    [
        ("api_port = [", "not valid TOML"),
        ("api_port = 'x'", "api_port"),
        ("nonsense = 1", "nonsense"),
        ("passphrase = 'hunter2'", "a passphrase never goes in a file"),
    ],
)
def test_bad_config_file_is_a_clean_error(dms_home: Path, content: str, message: str) -> None:
    dms_home.mkdir(parents=True)
    (dms_home / "config.toml").write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_settings()


def test_config_show_masks_secrets(dms_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["passphrase"] == "********"
    assert "correct horse" not in json.dumps(shown)
    assert shown["home"] == str(dms_home)


def test_config_show_masks_a_database_password(
    dms_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DMS_DB_URL", "postgresql+psycopg://dms:s3cret@db.example:5432/dms")
    assert main(["config", "show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert "s3cret" not in json.dumps(shown)
    assert (
        shown["db_url"]
        == shown["database_url"]
        == ("postgresql+psycopg://dms:********@db.example:5432/dms")
    )


def test_key_commands_in_a_temp_home(dms_home: Path) -> None:
    created = run_cli("key", "new", "dms", "--json")
    assert created.returncode == 0, created.stderr
    did = json.loads(created.stdout)["did"]
    assert run_cli("key", "new", "user").returncode == 0

    shown = run_cli("key", "did", "dms")
    assert shown.stdout.strip() == did
    listed = json.loads(run_cli("key", "list", "--json").stdout)
    assert sorted(k["context"] for k in listed) == ["dms", "user"]
    assert (dms_home / "key" / "dms.json").exists()


def test_key_list_keeps_identifiers_whole_in_a_narrow_terminal(dms_home: Path) -> None:
    """A DID is copied from the table into the next command: it must never be
    wrapped; columns that do not fit are left out, and the user is told."""
    for context in ("dms", "user"):
        assert run_cli("key", "new", context).returncode == 0
    dids = {k["did"] for k in json.loads(run_cli("key", "list", "--json").stdout)}

    narrow = run_cli("key", "list", env={"COLUMNS": "80"})
    assert narrow.returncode == 0, narrow.stderr
    assert all(did in narrow.stdout for did in dids)
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 80
    assert "not shown" in narrow.stdout and "--json" in narrow.stdout

    wide = run_cli("key", "list", env={"COLUMNS": "200"})
    assert all(did in wide.stdout for did in dids)
    assert "peer id" in wide.stdout and "not shown" not in wide.stdout


@pytest.mark.parametrize(
    "args, env, message",
    [
        (("key", "did", "user"), {}, "no key 'user'"),
        (("key", "new", "Bad Name"), {}, "invalid key context"),
        (("config", "show"), {"DMS_API_PORT": "many"}, "api_port"),
    ],
)
def test_user_mistakes_are_one_line_errors(
    dms_home: Path, args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    result = run_cli(*args, env=env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_no_passphrase_without_terminal_is_a_clean_error(dms_home: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DMS_PASSPHRASE"}
    result = subprocess.run(
        [sys.executable, "-m", "dms", "key", "new", "dms"],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    assert result.returncode != 0
    assert "DMS_PASSPHRASE" in result.stderr and "Traceback" not in result.stderr


def test_wrong_passphrase_from_cli_layer(dms_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dms.security import Keystore, KeystoreError

    assert run_cli("key", "new", "dms").returncode == 0
    monkeypatch.setenv("DMS_PASSPHRASE", "not it")
    with pytest.raises(KeystoreError, match="wrong passphrase"):
        Keystore(dms_home).load("dms")


def test_the_gossip_budget_is_set_in_config_toml(dms_home: Path) -> None:
    from dms.node.daemon import network_settings

    dms_home.mkdir(parents=True)
    (dms_home / "config.toml").write_text(
        "gossip_messages_per_peer_per_s = 20\ngossip_burst_per_peer = 40\n"
    )
    gossip = network_settings(load_settings()).gossip
    assert (gossip.max_messages_per_peer_per_s, gossip.message_burst_per_peer) == (20, 40)
    (dms_home / "config.toml").write_text("gossip_burst_per_peer = 0\n")
    with pytest.raises(ConfigError, match="gossip_burst_per_peer"):
        load_settings()
