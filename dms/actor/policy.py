"""The capability stage of the receive pipeline.

For now (tokens are verified by the capability issue): a public behaviour is
open to all; any other one needs the signer to be an actor of this node (the
node itself or a child it spawned) or a DID anchored as root in the node's
trust store. Tokens in ``Envelope.caps`` are carried but not yet honoured.
"""

from __future__ import annotations

from collections.abc import Callable

from dms.actor.behaviour import Behaviour
from dms.actor.codes import ErrorCode, Refusal
from dms.actor.envelope import Envelope
from dms.security.trust import TrustStore


class CapabilityPolicy:
    def __init__(self, trust: TrustStore, is_local: Callable[[bytes], bool]) -> None:
        self.trust = trust
        self._is_local = is_local

    def authorize(self, envelope: Envelope, spec: Behaviour) -> None:
        if spec.public:
            return
        signer = envelope.signer
        if self._is_local(signer) or self.trust.is_root(signer):
            return
        raise Refusal(
            ErrorCode.FORBIDDEN,
            f"{envelope.sender.did} lacks capability {spec.required_capability}",
        )
