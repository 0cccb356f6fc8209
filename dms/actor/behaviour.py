"""Behaviours: named handlers with the capability they require.

Declared on an actor class with :func:`behaviour`, or at run time with
``Actor.register``. The path is also the capability name (as in NuNet's DMS):
a ``public`` behaviour is open to every signed sender; any other one passes
the capability policy of the node (see ``dms.actor.policy``).

A broadcast (an envelope with a topic and no destination) runs only a behaviour
declared for that topic (``topic=``); any other one is refused with
``not_for_topic``, so a broadcast cannot make every subscriber run a unicast
behaviour.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from pydantic import BaseModel

BEHAVIOUR_ATTR = "__dms_behaviour__"


@dataclass(frozen=True)
class Behaviour:
    path: str
    handler: Callable[..., Any]
    public: bool = False
    payload: type[BaseModel] | None = None
    data: bool = False  # may carry up to max_data_bytes; control ones are capped lower
    capability: str | None = None  # defaults to the path
    topic: str | None = None  # the topic whose broadcasts may run it (None: unicast only)

    @property
    def required_capability(self) -> str:
        return self.capability or self.path


def behaviour(
    path: str,
    *,
    public: bool = False,
    payload: type[BaseModel] | None = None,
    data: bool = False,
    capability: str | None = None,
    topic: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark an actor method as the handler of ``path``; ``topic``: broadcasts on that
    topic may run it too (it stays open to direct envelopes as its capability says)."""

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        setattr(
            fn,
            BEHAVIOUR_ATTR,
            Behaviour(
                path=path,
                handler=fn,
                public=public,
                payload=payload,
                data=data,
                capability=capability,
                topic=topic,
            ),
        )
        return fn

    return mark


def declared_behaviours(cls: type) -> dict[str, Behaviour]:
    """The behaviours ``cls`` and its bases declare, by path (a new dict each call)."""
    return dict(_declared(cls))


@cache
def _declared(cls: type) -> dict[str, Behaviour]:
    # Read once per class: a node starts an actor for every job, and this walk of every
    # attribute of every base took more than the rest of an actor's set-up.
    found: dict[str, Behaviour] = {}
    for klass in reversed(cls.__mro__):
        for value in vars(klass).values():
            spec = getattr(value, BEHAVIOUR_ATTR, None)
            if isinstance(spec, Behaviour):
                found[spec.path] = spec
    return found
