"""A patch to py-libp2p's pubsub: subscriptions repeated to every new stream.

**Subscriptions repeated to every new pubsub stream.** A node tells a peer
its topics once, in the hello on its own stream to that peer, and later
subscriptions only to peers whose outbound queue exists at that moment. A
subscription made while a peer is being registered reaches it by neither
path, and a peer that re-opens its stream to us (after its old one died) has
forgotten our topics, while our stream to it, still open, will not say them
again. Either way the two never meet on the topic. So whenever a peer opens a
pubsub stream to us, we send it our current topics once we can write to it.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

log = logging.getLogger("dms.network")


# How long a new pubsub stream's peer may take to become writable for us.
SUBSCRIPTION_REPEAT_WAIT_S = 30.0


async def tell_topics_when_writable(
    pubsub: Any, peer_id: Any, wait_s: float = SUBSCRIPTION_REPEAT_WAIT_S
) -> None:
    """Push our topics to ``peer_id`` once pubsub can write to it (within ``wait_s``)."""
    try:
        await pubsub.wait_for_peer(peer_id, wait_s)
    except trio.TooSlowError:
        # Never registered (gone, or refused). py-libp2p leaves the event it waited on
        # in ``_peer_added_events`` for good; drop it unless another task still waits.
        events = getattr(pubsub, "_peer_added_events", {})
        event = events.get(peer_id)
        if event is not None and not event.statistics().tasks_waiting:
            del events[peer_id]
        return
    except Exception:
        return
    queue = getattr(pubsub, "peer_queues", {}).get(peer_id)
    if queue is None or not pubsub.topic_ids:
        return
    if not queue.push(pubsub.get_hello_packet()):
        log.debug("subscriptions not repeated to %s: its queue is full", peer_id)


def ended_with_pubsub(err: Exception, running: bool) -> bool:
    """Whether ``err``, raised by pubsub's stream reader, says only that the pubsub
    stopped under it: trio's "Nursery is closed to new arrivals" (its task nursery
    closed), or a ``LifecycleError`` once its manager no longer runs."""
    from libp2p.tools.anyio_service.exceptions import LifecycleError

    if isinstance(err, LifecycleError):
        return not running
    return isinstance(err, RuntimeError) and "closed to new arrivals" in str(err)


def repeat_subscriptions_to_new_streams() -> bool:
    from libp2p.pubsub.pubsub import Pubsub

    needed = ("continuously_read_stream", "wait_for_peer", "get_hello_packet")
    if not all(hasattr(Pubsub, n) for n in needed):
        log.info("py-libp2p's pubsub changed shape; subscriptions are announced as before")
        return False
    from libp2p.tools.anyio_service.exceptions import LifecycleError

    read_stream = Pubsub.continuously_read_stream

    async def read_stream_and_tell_topics(self: Any, stream: Any) -> None:
        try:
            if self.manager.is_running:
                self.manager.run_task(tell_topics_when_writable, self, stream.muxed_conn.peer_id)
            await read_stream(self, stream)
        except (RuntimeError, LifecycleError) as err:
            # A stream opened or a message read while the node stops: pubsub's task
            # nursery is already closed (trio's RuntimeError, while the manager still
            # says it runs), or the manager has finished (its LifecycleError);
            # py-libp2p's handler raised either into the swarm's log as a traceback on
            # every such stop. The stream ends with the pubsub. Any other error,
            # stopping or not, is raised.
            if not ended_with_pubsub(err, self.manager.is_running):
                raise
            log.debug("pubsub stream from %s ended with the node: %s", stream, err)

    Pubsub.continuously_read_stream = read_stream_and_tell_topics
    return True
