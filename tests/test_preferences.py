"""Preferences: the node's own policy, from config.toml, with a reason for each refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from dms.config import ConfigError, load_settings
from dms.resources import Preferences
from tests.clitools import dms_json


def test_preferences_come_from_config_toml_and_show_in_config_show(tmp_path: Path) -> None:
    home = tmp_path / "h"
    home.mkdir()
    (home / "config.toml").write_text(
        '[preferences]\nmin_price = 2.5\njob_kinds = ["compute"]\nmax_allocations = 3\n'
    )
    prefs = load_settings(home=home).preferences
    assert prefs.min_price == 2.5 and prefs.job_kinds == ["compute"]
    shown = dms_json(home, "config", "show")
    assert shown["preferences"]["max_allocations"] == 3


def test_an_unknown_preference_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[preferences]\nminprice = 1\n")
    with pytest.raises(ConfigError, match=r"preferences\.minprice"):
        load_settings(home=tmp_path)


def test_each_refusal_has_a_reason() -> None:
    prefs = Preferences(
        min_price=1.0, job_kinds=["compute"], max_allocations=2, deny_dids=["did:key:bad"]
    )
    ok = {"kind": "compute", "requester": "did:key:a", "max_price": 1.0, "allocations": 1}
    assert prefs.refusal(**ok) is None
    assert "deny list" in prefs.refusal(**{**ok, "requester": "did:key:bad"})
    assert "does not run 'mining'" in prefs.refusal(**{**ok, "kind": "mining"})
    assert "minimum is 1" in prefs.refusal(**{**ok, "max_price": 0.5})
    assert "maximum of 2" in prefs.refusal(**{**ok, "allocations": 2})
    only = Preferences(allow_dids=["did:key:a"])
    assert "allow list" in only.refusal(**{**ok, "requester": "did:key:b"})
