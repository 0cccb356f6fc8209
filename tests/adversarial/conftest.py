"""Fixtures the adversarial tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dms.sim.adversary import BarePeer


@pytest.fixture
def bare_peers() -> Iterator[list[BarePeer]]:
    """The bare hosts a test makes (it appends each one), all closed when it ends."""
    made: list[BarePeer] = []
    yield made
    BarePeer.close_all(made)
