"""Private groups and revocations on real nodes (libp2p on loopback).

Nodes run with ``deployment_policy = "tokens"``. Joining a group is what the two
commands do: ``dms cap grant DID --cap /dms/deployment --expiry 30d`` on one node
(a token from its key, recorded as issued) and ``dms cap anchor --provide TOKEN``
on the other (shown from then on, and its issuer's chains accepted).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from dms.actor import RemoteError
from dms.jobs.spec import DeploymentSpec
from dms.node.client import root_handle
from dms.node.daemon import Node
from dms.orchestrator.messages import REQUEST
from dms.orchestrator.states import DEPLOYMENT
from dms.resources import Resources
from dms.security.tokens import grant, revoke
from dms.sim.cluster import LocalCluster
from tests.conftest import wait_for

DAY = 86400.0
TERMINAL = DEPLOYMENT.terminal


def owner(node: Node, behaviour: str, payload: Any = None, timeout: float = 10) -> Any:
    """As the node's owner (what the CLI sends through the local API)."""
    assert node.node is not None
    return node.node.ask(node.node.handle, behaviour, payload, timeout=timeout)


def join(founder: Node, member: Node, *, one_way: bool = False) -> bytes:
    """The two commands: grant on the founder, anchor --provide on the member."""
    token = grant(founder.identity, member.identity.public_key, ["/dms/deployment"],
                  expires_in_s=30 * DAY)  # fmt: skip
    owner(founder, "/dms/cap/anchor", {"issued": token.raw})
    answer = owner(member, "/dms/cap/anchor", {"provide": token.raw, "one_way": one_way})
    assert answer["anchored"] == ("provide" if one_way else "provide+require")
    return token.raw


def job(deadline_s: float = 20) -> dict[str, Any]:
    return DeploymentSpec.model_validate(
        {
            "name": "group",
            "deadline_s": deadline_s,
            "allocations": [
                {
                    "name": "w",
                    "executor": "compute",
                    "count": 1,
                    "resources": {"cpu": "500m", "ram": "64MiB"},
                    "params": {"seconds": 0.2},
                }
            ],
        }
    ).model_dump(mode="json")


def finished(node: Node, deployment_id: str, timeout: float) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def done() -> bool:
        found.update(owner(node, "/dms/node/deployment/status", {"id": deployment_id}))
        return found["state"] in TERMINAL

    wait_for(done, timeout, f"deployment {deployment_id} to end")
    return found


def knows(node: Node, others: list[Node]) -> bool:
    for other in others:
        record = node.peer_table.get(other.peer_id)
        # A heartbeat from before the onboarding shows zeros (a dict, not empty).
        if record is None or record.heartbeat is None or not record.heartbeat.onboarded.get("cpu"):
            return False
    return True


@pytest.fixture
def net(cluster: LocalCluster) -> LocalCluster:
    cluster.settings.update(heartbeat_s=1.0, orphan_s=3.0, deployment_policy="tokens")
    return cluster


def test_two_nodes_form_a_private_group_and_a_third_is_refused(net: LocalCluster) -> None:
    a, b, c = net.add(), net.add(), net.add()
    for node in (a, b, c):
        assert node.ledger is not None and node.system is not None
        node.ledger.onboard(Resources(cpu=2, ram=4, disk=4))
        assert node.system.deployment_policy == "tokens"
    net.wait_linked()
    wait_for(lambda: all(knows(n, [m for m in (a, b, c) if m is not n]) for n in (a, b, c)),
             30, "every node to know the others' resources")  # fmt: skip

    join(a, b)  # the two commands

    placed_by_a = owner(a, "/dms/node/deployment/new", {"spec": job()})["id"]
    placed_by_b = owner(b, "/dms/node/deployment/new", {"spec": job()})["id"]
    # Both members' refusals must come within its deadline: 15 s, not 6 (round trips on
    # a loaded machine, and a pause of a few seconds, left a member's reason missing).
    refused = owner(c, "/dms/node/deployment/new", {"spec": job(deadline_s=15)})["id"]
    on_b = finished(a, placed_by_a, 30)
    on_a = finished(b, placed_by_b, 30)
    assert on_b["state"] == "completed", on_b["events"]
    assert on_b["slots"][0]["peer_id"] == b.peer_id
    assert on_a["state"] == "completed", on_a["events"]
    assert on_a["slots"][0]["peer_id"] == a.peer_id

    outsider = finished(c, refused, 30)
    assert outsider["state"] == "failed"
    manifest = owner(c, "/dms/node/deployment/manifest", {"id": refused})
    reasons = manifest["slots"][0]["reasons"]
    for member in (a, b):
        reason = reasons.get(member.peer_id, "")
        assert reason.startswith("forbidden: "), reasons
        assert "lacks capability /dms/deployment/request: unanchored:" in reason
    # A's own requests to C were refused too (C holds no token from A), with a reason.
    asked_c = owner(a, "/dms/node/deployment/manifest", {"id": placed_by_a})["slots"][0]
    assert "unanchored" in asked_c["reasons"].get(c.peer_id, "unanchored")
    assert a.system is not None and a.system.refusals["forbidden"] >= 1


def test_a_revocation_reaches_every_node_of_the_group(net: LocalCluster) -> None:
    nodes = [net.add() for _ in range(5)]
    founder, members = nodes[0], nodes[1:]
    outsider = net.add()
    net.wait_linked()
    for member in members:
        join(founder, member)
    token = join(founder, outsider, one_way=True)  # the token to revoke
    probe = {
        "deployment_id": "probe",
        "slots": [{"slot": "w", "executor": "compute", "resources": {"cpu": "100m"}}],
        "lease_s": 5,
    }
    assert outsider.node is not None

    def ask(node: Node, caps: list[bytes] | None = None) -> str:
        """A bid request from the outsider: it carries its token by itself, or ``caps``
        (a holder that ignores the revocation and shows the token anyway)."""
        me = outsider.node
        assert me is not None and outsider.system is not None
        # 30 s, not 5: the answer is the test's, a deadline on a loaded machine is not
        # (the first request to a node may wait for a dial and its handshake).
        env = me.envelope(REQUEST, probe, to=root_handle(node.peer_id), ttl_s=30,
                          expect_reply=True)  # fmt: skip
        if caps is not None:
            env = env.model_copy(update={"caps": caps})
        try:
            outsider.system.invoke_frame(me.seal(env), env, 30).result(35)
        except RemoteError as err:
            return err.rule or err.code
        return "ok"

    assert [ask(n) for n in nodes] == ["ok"] * 5

    assert founder.system is not None
    chain = founder.system.trust.verifier.verify(token)
    answer = owner(founder, "/dms/cap/revoke", {"revocation": revoke(founder.identity, chain).raw})
    assert answer["revoked"] == chain.token.id.hex() and answer["stored"]
    started = time.monotonic()

    def everywhere() -> bool:
        return all(n.system is not None and n.system.trust.is_revoked(chain.token.id)
                   for n in nodes)  # fmt: skip

    wait_for(everywhere, 30, "every node of the group to hold the revocation")
    took = time.monotonic() - started
    assert [ask(n, [token]) for n in nodes] == ["revoked"] * 5
    print(f"revocation enforced by all 5 nodes after {took:.3f} s")
    # The holder heard it too, and no longer shows the token.
    assert ask(founder) == "no_token"
