"""Item 2 of issue 17: broadcasts reach only broadcast behaviours, and ask no reply.

A hostile peer publishes on the topics every node subscribes to. Before the
rule, a broadcast ran any behaviour it named on every subscriber (a unicast
behaviour included) and every subscriber answered its ``reply_to``: one message
in, N replies out, to whomever the broadcast named.
"""

from __future__ import annotations

import pytest

from dms.actor import ErrorCode
from dms.node.daemon import Node
from dms.node.node import BROADCAST_TOPIC
from dms.sim.cluster import LocalCluster
from tests.adversarial.hostile import envelope, frame_of, publish, until_refused
from tests.conftest import wait_for


@pytest.fixture
def pair(cluster: LocalCluster) -> tuple[Node, Node]:
    victim, attacker = cluster.start(2)
    cluster.wait_linked()
    return attacker, victim


def hellos(victim: Node) -> list[str]:
    assert victim.node is not None
    return [h["message"] for h in victim.node.ask(victim.node.handle, "/public/hellos")]


def test_a_broadcast_that_asks_for_a_reply_is_refused(pair: tuple[Node, Node]) -> None:
    attacker, victim = pair

    def attempt() -> None:
        env = envelope(
            attacker,
            "/broadcast/hello",
            {"message": "answer me"},
            topic=BROADCAST_TOPIC,
            expect_reply=True,
        )
        publish(attacker, BROADCAST_TOPIC, frame_of(attacker, env))

    until_refused(victim, ErrorCode.BROADCAST_REPLY, attempt, "broadcast_reply at the victim")
    assert "answer me" not in hellos(victim)  # the behaviour never ran


def test_a_broadcast_runs_only_a_behaviour_declared_for_its_topic(
    pair: tuple[Node, Node],
) -> None:
    attacker, victim = pair

    def unicast_behaviour() -> None:
        env = envelope(attacker, "/public/status", topic=BROADCAST_TOPIC)
        publish(attacker, BROADCAST_TOPIC, frame_of(attacker, env))

    until_refused(victim, ErrorCode.NOT_FOR_TOPIC, unicast_behaviour, "not_for_topic (status)")

    # A broadcast behaviour, but on another topic than the one it was declared for.
    def other_topic() -> None:
        env = envelope(
            attacker, "/broadcast/hello", {"message": "wrong topic"}, topic="/dms/heartbeat"
        )
        publish(attacker, "/dms/heartbeat", frame_of(attacker, env))

    until_refused(victim, ErrorCode.NOT_FOR_TOPIC, other_topic, "not_for_topic (topic)")
    assert "wrong topic" not in hellos(victim)

    # The declared behaviour on its own topic still runs.
    def honest() -> None:
        env = envelope(attacker, "/broadcast/hello", {"message": "hi"}, topic=BROADCAST_TOPIC)
        publish(attacker, BROADCAST_TOPIC, frame_of(attacker, env))

    honest()
    wait_for(lambda: "hi" in hellos(victim) or honest(), timeout=30, what="the honest hello")
