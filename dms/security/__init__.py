"""Keys, DIDs, the encrypted keystore and trust anchors."""

from dms.security.identity import (
    Identity,
    IdentityError,
    did_from_public_key,
    peer_id_from_public_key,
    public_key_from_did,
    public_key_from_peer_id,
    verify_signature,
)
from dms.security.keystore import KeyInfo, Keystore, KeystoreError
from dms.security.trust import TrustAnchors, TrustError, TrustStore

__all__ = [
    "Identity",
    "IdentityError",
    "KeyInfo",
    "Keystore",
    "KeystoreError",
    "TrustAnchors",
    "TrustError",
    "TrustStore",
    "did_from_public_key",
    "peer_id_from_public_key",
    "public_key_from_did",
    "public_key_from_peer_id",
    "verify_signature",
]
