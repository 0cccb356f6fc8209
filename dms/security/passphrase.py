"""Where a passphrase comes from, in order: this terminal's agent (``dms unlock``), the
OS keyring (only if this home opted in), then what :mod:`dms.security.keystore` asks
(``DMS_PASSPHRASE``, else a prompt).

A remembered passphrase may not open what it is tried on (a key of another
passphrase, a mining key folder sealed otherwise): that is a note on stderr and the
next source is asked, never an error. Only the last source's refusal is one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from dms.security import agent, osring
from dms.security.sealing import WrongPassphrase

T = TypeVar("T")
Origin = Literal["agent", "keyring", "given"]
Source = Callable[[str, bool], str]
_WHERE = {"agent": "unlocked in this terminal session", "keyring": "in the OS keyring"}


def _to_stderr(message: str) -> None:
    sys.stderr.write(f"note: {message}\n")
    sys.stderr.flush()


@dataclass(frozen=True)
class Candidate:
    value: str
    origin: Origin

    @property
    def remembered(self) -> bool:
        return self.origin != "given"


class PassphraseLookup:
    """A keystore passphrase source (``source(context, confirm) -> str``) that also
    knows to try the next source when a remembered passphrase is refused."""

    def __init__(
        self, home: Path, fallback: Source, notice: Callable[[str], None] = _to_stderr
    ) -> None:
        self.home = Path(home)
        self.fallback = fallback
        self.notice = notice

    def candidates(self, context: str, confirm: bool) -> Iterator[Candidate]:
        """Lazily: the fallback (a prompt, perhaps) is asked only if reached."""
        tried: set[str] = set()
        remembered: list[tuple[Origin, Callable[[Path], str | None]]] = [
            ("agent", agent.lookup),
            ("keyring", osring.fetch),
        ]
        for origin, find in remembered:
            value = find(self.home)
            if value and value not in tried:
                tried.add(value)
                yield Candidate(value, origin)
        yield Candidate(self.fallback(context, confirm), "given")

    def __call__(self, context: str, confirm: bool) -> str:
        """The first passphrase (to seal something new with)."""
        first = next(self.candidates(context, confirm))
        if first.remembered:
            self.notice(f"key '{context}' sealed with the passphrase {_WHERE[first.origin]}")
        return first.value

    def open(self, context: str, attempt: Callable[[str], T]) -> T:
        """``attempt(passphrase)`` with each source in turn until one is not refused."""
        for candidate in self.candidates(context, False):
            try:
                return attempt(candidate.value)
            except WrongPassphrase:
                if not candidate.remembered:
                    raise
                self.notice(
                    f"the passphrase {_WHERE[candidate.origin]} does not open key '{context}'; "
                    "asking for it"
                )
        raise AssertionError("the last candidate either opens or raises")  # pragma: no cover


def open_with(source: Source, context: str, attempt: Callable[[str], T]) -> T:
    """``attempt`` with a passphrase from ``source``: every source, in turn, for a
    lookup; the one passphrase for a plain function (tests, ``dms sim``'s homes)."""
    if isinstance(source, PassphraseLookup):
        return source.open(context, attempt)
    return attempt(source(context, False))
