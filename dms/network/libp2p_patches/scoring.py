"""A patch to py-libp2p's peer scoring: no upkeep while scores cannot change.

**No score upkeep without scores.** Each heartbeat py-libp2p decays every peer's
score counters, each of every topic, and looks at every mesh for a peer to replace by
a better-scoring one (the score of each mesh peer and each other peer of the topic).
With the score parameters we run (py-libp2p's defaults: every weight 0, every decay
1), the decay multiplies by 1 and every score is 0, so neither ever changes
anything; both are skipped while that holds (:func:`decays_are_identity`,
:func:`scores_are_zero`), and run as before with parameters that weigh or decay.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("dms.network")


def decays_are_identity(params: Any) -> bool:
    """Whether every decay of gossipsub's score parameters is 1: a decay step then
    multiplies every counter by 1 and changes nothing."""
    topic = (
        params.p1_time_in_mesh,
        params.p2_first_message_deliveries,
        params.p3_mesh_message_deliveries,
        params.p4_invalid_messages,
    )
    return all(t.decay == 1.0 for t in topic) and (
        params.p5_behavior_penalty_decay == 1.0 and params.p6_appl_slack_decay == 1.0
    )


def scores_are_zero(params: Any) -> bool:
    """Whether gossipsub's score parameters weigh nothing: every peer's score is then 0
    whatever its counters hold, so no peer scores better than another."""
    topic = (
        params.p1_time_in_mesh,
        params.p2_first_message_deliveries,
        params.p3_mesh_message_deliveries,
        params.p4_invalid_messages,
    )
    return (
        all(t.weight == 0.0 for t in topic)
        and params.p5_behavior_penalty_weight == 0.0
        and (params.app_specific_score_fn is None or params.p6_appl_slack_weight == 0.0)
        and params.p7_ip_colocation_weight == 0.0
    )


# The score parameters ``decays_are_identity`` and ``scores_are_zero`` were written
# against (py-libp2p 0.8.1): a parameter added may decay or weigh and go unread.
SCORE_PARAMS = frozenset(
    {
        "accept_px_threshold",
        "app_specific_score_fn",
        "gossip_threshold",
        "graylist_threshold",
        "p1_time_in_mesh",
        "p2_first_message_deliveries",
        "p3_mesh_message_deliveries",
        "p4_invalid_messages",
        "p5_behavior_penalty_decay",
        "p5_behavior_penalty_threshold",
        "p5_behavior_penalty_weight",
        "p6_appl_slack_decay",
        "p6_appl_slack_weight",
        "p7_ip_colocation_threshold",
        "p7_ip_colocation_weight",
        "publish_threshold",
    }
)
# The names PeerScorer.on_heartbeat may use: its counters and the decays above. A decay
# by anything else (a new parameter, a function) and the patch is not applied.
SCORE_DECAY_NAMES = frozenset(
    {
        "list",
        "keys",
        "params",
        "decay",
        "time_in_mesh",
        "first_message_deliveries",
        "mesh_message_deliveries",
        "invalid_messages",
        "behavior_penalty",
        "app_specific_scores",
        "graft_flood_penalties",
        "iwant_spam_penalties",
        "ihave_spam_penalties",
        "equivocation_penalties",
        "p1_time_in_mesh",
        "p2_first_message_deliveries",
        "p3_mesh_message_deliveries",
        "p4_invalid_messages",
        "p5_behavior_penalty_decay",
        "p6_appl_slack_decay",
    }
)


def score_upkeep_is_shaped() -> bool:
    """Whether py-libp2p's score parameters are the ones ``decays_are_identity`` and
    ``scores_are_zero`` read, and its decay step reads no other."""
    import dataclasses

    from libp2p.pubsub.score import PeerScorer, ScoreParams

    try:
        fields = {f.name for f in dataclasses.fields(ScoreParams)}
        decay = PeerScorer.on_heartbeat
        decay = getattr(decay, "__wrapped__", decay)  # py-libp2p's, once patched
        names = set(decay.__code__.co_names)
    except (AttributeError, TypeError):
        return False
    return fields == SCORE_PARAMS and names <= SCORE_DECAY_NAMES


def no_score_upkeep_without_scores() -> bool:
    from libp2p.pubsub.gossipsub import GossipSub
    from libp2p.pubsub.score import PeerScorer, ScoreParams

    try:
        shaped = (
            score_upkeep_is_shaped()
            and decays_are_identity(ScoreParams())
            and scores_are_zero(ScoreParams())
        )
    except AttributeError:
        shaped = False
    if (
        not shaped
        or not hasattr(PeerScorer, "on_heartbeat")
        or not hasattr(GossipSub, "_maintain_mesh_quality")
    ):
        log.info("py-libp2p's peer scoring changed shape; its heartbeat upkeep is left as it is")
        return False
    decay = PeerScorer.on_heartbeat
    maintain = GossipSub._maintain_mesh_quality

    def decay_unless_identity(self: Any, dt_seconds: float = 1.0) -> None:
        # A function patched in as PeerScorer.on_heartbeat: ``self`` is py-libp2p's.
        if decays_are_identity(self.params):
            return
        decay(self, dt_seconds)

    async def maintain_unless_unscored(router: Any, topic: str) -> None:
        # A function patched in as GossipSub._maintain_mesh_quality.
        scorer = getattr(router, "scorer", None)
        if scorer is not None and scores_are_zero(scorer.params):
            return
        await maintain(router, topic)

    decay_unless_identity.__wrapped__ = decay  # type: ignore[attr-defined]
    PeerScorer.on_heartbeat = decay_unless_identity
    GossipSub._maintain_mesh_quality = maintain_unless_unscored
    return True
