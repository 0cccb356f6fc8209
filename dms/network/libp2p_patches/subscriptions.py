"""Patches to py-libp2p's pubsub: subscriptions repeated to every new stream, and
messages queued for a peer flushed once it is writable.

**Subscriptions repeated to every new pubsub stream.** A node tells a peer
its topics once, in the hello on its own stream to that peer, and later
subscriptions only to peers whose outbound queue exists at that moment. A
subscription made while a peer is being registered reaches it by neither
path, and a peer that re-opens its stream to us (after its old one died) has
forgotten our topics, while our stream to it, still open, will not say them
again. Either way the two never meet on the topic. So whenever a peer opens a
pubsub stream to us, we send it our current topics once we can write to it.

**Messages queued for a peer flushed once it is writable, with no warning before.**
A peer's subscriptions come on its stream to us, ours to it opening meanwhile;
gossipsub queues what we publish on a topic it has said it is in until our stream
to it is registered (``_pending_messages``), and ``Pubsub._handle_new_peer`` flushes
that queue once it is. py-libp2p also flushes at each subscription of the peer it
learns (``handle_subscription``): one that comes before our stream is registered
finds no stream, keeps the queue for the flush to come, and logged "Cannot flush
pending messages for PEER: no stream available" at WARNING: a heartbeat (or any
message) published in the moment between the peer's first subscription and our
stream's registration, then one warning for each subscription of the peer learnt
in that moment (three topics, three warnings at a join), for nothing lost. That
flush now waits for the peer's stream: nothing is tried, nothing logged; the
registration's flush sends the queue, as it did.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import trio

from dms.network.libp2p_patches.source import all_shipped

log = logging.getLogger("dms.network")

# The sources the flush patch was written against (py-libp2p 0.8.1): the flush keeps the
# queue when the peer has no stream, and the registration flushes once it has one.
FLUSH_SHA256 = "3543c1a7f11f7d9fed4cb700b7213c4621a34b8d4a160b57cbca16445fc4e9af"
HANDLE_NEW_PEER_SHA256 = "80d22935f0fd60346f2c9f17ab7e177747662fb0c36aa0cc054975adb5b0d76e"


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
    read_stream = Pubsub.continuously_read_stream
    if getattr(read_stream, "dms_tells_topics", False):
        return True  # applied already: wrapped again, each stream would tell them twice
    from libp2p.tools.anyio_service.exceptions import LifecycleError

    @functools.wraps(read_stream)
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

    read_stream_and_tell_topics.dms_tells_topics = True  # type: ignore[attr-defined]
    Pubsub.continuously_read_stream = read_stream_and_tell_topics  # type: ignore[method-assign]
    return True


def flush_pending_messages_once_writable() -> bool:
    from libp2p.pubsub.gossipsub import GossipSub
    from libp2p.pubsub.pubsub import Pubsub

    flush = getattr(GossipSub, "flush_pending_messages", None)
    if getattr(flush, "dms_waits_for_stream", False):
        return True  # applied already (its own wrapper is no source it knows)
    shaped = all_shipped((flush, FLUSH_SHA256), (Pubsub._handle_new_peer, HANDLE_NEW_PEER_SHA256))
    if flush is None or not shaped:
        log.info("py-libp2p's pending gossip flush changed shape; it is left as it is")
        return False

    @functools.wraps(flush)
    async def flush_once_writable(self: Any, peer_id: Any) -> None:
        pubsub = self.pubsub
        if pubsub is not None and peer_id not in pubsub.peers:
            # Our stream to it is being registered: that flushes the queue, kept till then.
            return
        await flush(self, peer_id)

    flush_once_writable.dms_waits_for_stream = True  # type: ignore[attr-defined]
    GossipSub.flush_pending_messages = flush_once_writable  # type: ignore[method-assign]
    return True
