"""The revert outbox: which answers acknowledge a revert, and which send it again.

The provider here is scripted (it answers each attempt from a list, and its
timers move a clock on instead of waiting): what is under test is the
requester's outbox alone; the real-node paths are in test_adversarial_leases.py
and test_store_failures.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from dms.actor import ErrorCode, Outcome, RemoteError
from dms.orchestrator import reverts
from dms.orchestrator.reverts import Reverts
from dms.security import Identity
from dms.store import STORE_REFUSED

PEER = Identity.generate().peer_id
NOT_HANDLED = [
    ErrorCode.TIMEOUT.value,
    ErrorCode.UNREACHABLE.value,
    ErrorCode.RATE_LIMITED.value,
    ErrorCode.OUTBOX_FULL.value,
    STORE_REFUSED,
    # The provider's node actor was stopping: the revert waited in its queue, unhandled.
    ErrorCode.STOPPED.value,
    # Refused on the envelope's times before the behaviour ran (a queue delay, clocks
    # apart): a retry is a fresh envelope.
    ErrorCode.EXPIRED.value,
    ErrorCode.CLOCK_SKEW.value,
    ErrorCode.EXPIRY_TOO_FAR.value,
]


class ScriptedProvider:
    """Answers the n-th revert with ``answers[n]`` (the last one from then on; an
    error code, or None for ``released``). Also the outbox's messenger and clock:
    a timer runs at once and moves the clock on by its delay."""

    def __init__(self) -> None:
        self.answers: list[str | None] = [None]
        self.attempts = 0
        self.delays: list[float] = []
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def invoke(
        self,
        to: Any,
        behaviour: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        on_reply: Callable[[Outcome], None] | None = None,
    ) -> None:
        code = self.answers[min(self.attempts, len(self.answers) - 1)]
        self.attempts += 1
        assert on_reply is not None
        if code is None:
            on_reply(Outcome(result={"released": 1}))
        else:
            on_reply(Outcome(error=RemoteError(code, f"{code} (scripted)")))

    def call_later(self, delay_s: float, fn: Callable[[], Any]) -> None:
        self.delays.append(delay_s)
        self.now += delay_s
        fn()


@pytest.fixture
def provider(monkeypatch: pytest.MonkeyPatch) -> ScriptedProvider:
    scripted = ScriptedProvider()
    monkeypatch.setattr(reverts, "time", scripted)
    return scripted


def counts(outbox: Reverts) -> tuple[int, int, int]:
    return outbox.pending, outbox.acknowledged, outbox.abandoned


@pytest.mark.parametrize("code", NOT_HANDLED)
def test_an_answer_that_says_the_revert_was_not_handled_sends_it_again(
    provider: ScriptedProvider, code: str
) -> None:
    provider.answers = [code, code, None]
    outbox = Reverts(provider)  # type: ignore[arg-type]
    outbox.send(PEER, {"deployment": "d1"})
    assert provider.attempts == 3
    assert provider.delays == [1.0, 2.0]
    assert counts(outbox) == (0, 1, 0)


@pytest.mark.parametrize(
    "code", [ErrorCode.FORBIDDEN.value, ErrorCode.BAD_PAYLOAD.value, ErrorCode.HANDLER_ERROR.value]
)
def test_a_refusal_the_provider_handled_acknowledges_the_revert(
    provider: ScriptedProvider, code: str
) -> None:
    provider.answers = [code]
    outbox = Reverts(provider)  # type: ignore[arg-type]
    outbox.send(PEER, {"deployment": "d1"})
    assert provider.attempts == 1
    assert counts(outbox) == (0, 1, 0)


def test_a_revert_never_handled_is_given_up_after_the_horizon(
    provider: ScriptedProvider,
) -> None:
    provider.answers = [ErrorCode.RATE_LIMITED.value]
    outbox = Reverts(provider, horizon_s=60.0)  # type: ignore[arg-type]
    outbox.send(PEER, {"deployment": "d1"})
    # After 1 + 2 + 4 + 8 + 16 s, the next wait (30 s) would end past the 60 s horizon.
    assert provider.delays == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert provider.attempts == 6
    assert counts(outbox) == (0, 0, 1)


def test_clocks_apart_expire_every_retry_until_the_horizon_said_once_per_peer(
    provider: ScriptedProvider, caplog: pytest.LogCaptureFixture
) -> None:
    # The provider's clock is ahead: every fresh envelope arrives expired. The outbox
    # sends it again only until its horizon and warns once per peer, not per attempt.
    provider.answers = [ErrorCode.EXPIRED.value]
    outbox = Reverts(provider, horizon_s=60.0)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="dms.orchestrator"):
        outbox.send(PEER, {"deployment": "d1"})
        outbox.send(PEER, {"deployment": "d2"})
    assert provider.attempts == 12
    assert counts(outbox) == (0, 0, 2)
    untimely = [r for r in caplog.records if "envelope's times" in r.getMessage()]
    assert len(untimely) == 1 and "expired" in untimely[0].getMessage()
    # Still unsaid until the peer acknowledges one; a later expiry is said again.
    provider.answers, provider.attempts = [ErrorCode.EXPIRED.value, None], 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dms.orchestrator"):
        outbox.send(PEER, {"deployment": "d3"})
        assert not caplog.records
        provider.answers, provider.attempts = [ErrorCode.EXPIRED.value, None], 0
        outbox.send(PEER, {"deployment": "d4"})
    assert counts(outbox) == (0, 2, 2)
    assert sum("envelope's times" in r.getMessage() for r in caplog.records) == 1
