"""A job's events as ``--follow`` prints them: each once, and a bid round that only
repeats an earlier one (a queued job retrying with the same outcome) not at all, nor
the states it goes through again (``state: bidding``, ``state: queued`` at each retry).

A waiting job retries its bid round every few seconds; printing each retry filled the
terminal with the same two lines. :class:`~dms.cli.waiting.Waiting` says, every few
seconds, why the job waits; the events say what changed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

ROUND = re.compile(r"^round \d+: ")
STATE = "state: "


class EventFeed:
    """Call :meth:`lines` with the job's latest events (the node keeps the newest few
    hundred); it returns the ones to print, stamped. ``skip`` hides events said
    elsewhere."""

    def __init__(self, skip: Callable[[str], bool] = lambda _: False) -> None:
        self.skip = skip
        self._seen: set[tuple[float, str]] = set()
        self._rounds: set[str] = set()  # what a round said, without its number
        self._states: set[str] = set()  # states said since the last other line printed

    def lines(self, events: list[dict[str, Any]]) -> list[str]:
        out = []
        current = set()
        for event in events:
            what = event["what"]
            key = (event["at"], what)
            current.add(key)
            if key in self._seen or self.skip(what):
                continue
            numbered = ROUND.match(what)
            if numbered:
                said = what[numbered.end() :]
                if said in self._rounds:
                    continue
                self._rounds.add(said)
            if what.startswith(STATE):
                if what in self._states:
                    continue
                self._states.add(what)
            else:
                self._states.clear()
            stamp = time.strftime("%H:%M:%S", time.localtime(event["at"]))
            out.append(f"{stamp}  {what}")
        # Events that left the node's window do not come back: remember only the window.
        self._seen = current
        return out
