"""Idle streams: an inbound stream that carries nothing for ``idle_s`` is reset.

:class:`IdleWatch` watches the actor streams (no frame for ``stream_idle_s``) and,
for :class:`~dms.network.protocolstreams.ProtocolStreams`, py-libp2p's protocols'
(no byte either way for ``protocol_idle_s``); a stream marks itself active with
:meth:`Watched.touch`. The budgets' shared terms, and the others:
``dms.network.budgets``.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from dms.network.budgets import Budget

log = logging.getLogger("dms.network")


class Watched:
    """One watched stream: ``touch()`` on every frame (an attribute store, nothing more)."""

    __slots__ = ("active", "quiet", "reset")

    def __init__(self, reset: Callable[[], Awaitable[None]]) -> None:
        self.active = True
        self.quiet = 0
        self.reset = reset

    def touch(self) -> None:
        self.active = True


@dataclass
class IdleWatch:
    """Resets streams that went ``idle_s`` without a frame (checked every ``idle_s / 2``;
    ``what``: what a stream must carry to be active, for the log)."""

    idle_s: float
    refusals: Counter[str]
    what: str = "frame"
    _watched: set[Watched] = field(default_factory=set)

    def watch(self, reset: Callable[[], Awaitable[None]]) -> Watched:
        handle = Watched(reset)
        self._watched.add(handle)
        return handle

    def forget(self, handle: Watched) -> None:
        self._watched.discard(handle)

    def __len__(self) -> int:
        return len(self._watched)

    async def run(self) -> None:
        while True:
            await trio.sleep(self.idle_s / 2)
            for handle in list(self._watched):
                if handle.active:
                    handle.active, handle.quiet = False, 0
                    continue
                handle.quiet += 1
                if handle.quiet >= 2:
                    self._watched.discard(handle)
                    self.refusals[Budget.STREAM_IDLE] += 1
                    log.info(
                        "an inbound stream reset: stream_idle (no %s for %g s)",
                        self.what,
                        self.idle_s,
                    )
                    with contextlib.suppress(Exception):
                        await handle.reset()
