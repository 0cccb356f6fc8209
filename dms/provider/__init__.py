"""The provider's side of a node (a role of :class:`dms.node.node.NodeActor`): what it
onboards (``onboarding``), the bids it makes (``bidder``), the bid requests,
commits, allocations and reverts it answers (``bidding``), the bids it sent
(``bidindex``), and the requesters it refuses for a while (``lapses``). The
requester's side is ``dms.orchestrator``.
"""
