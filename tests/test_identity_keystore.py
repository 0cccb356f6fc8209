"""Identities, DIDs and the encrypted keystore."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from dms.security import (
    Identity,
    IdentityError,
    Keystore,
    KeystoreError,
    TrustStore,
    public_key_from_did,
    public_key_from_peer_id,
)


def fixed(passphrase: str):  # type: ignore[no-untyped-def]
    return lambda context, confirm: passphrase


def test_did_and_peer_id_come_from_one_key() -> None:
    ident = Identity.generate()
    assert ident.did.startswith("did:key:z6Mk")
    assert ident.peer_id.startswith("12D3KooW")
    assert public_key_from_did(ident.did) == ident.public_key
    assert public_key_from_peer_id(ident.peer_id) == ident.public_key


def test_peer_id_matches_py_libp2p() -> None:
    from libp2p.crypto.ed25519 import Ed25519PrivateKey
    from libp2p.peer.id import ID

    ident = Identity.generate()
    libp2p_key = Ed25519PrivateKey.from_bytes(ident.private_bytes())
    assert libp2p_key.get_public_key().to_bytes() == ident.public_key
    assert ID.from_pubkey(libp2p_key.get_public_key()).to_base58() == ident.peer_id


def test_a_peer_id_of_any_key_type_is_one_and_a_mistyped_one_is_not() -> None:
    """dms peers ping refused a secp256k1 peer's '16Uiu2...' id as 'not a peer id' (it
    checked for an Ed25519 key), a py-libp2p host dms peers connect had just reached."""
    from libp2p.crypto.ed25519 import create_new_key_pair as ed25519
    from libp2p.crypto.rsa import create_new_key_pair as rsa
    from libp2p.crypto.secp256k1 import create_new_key_pair as secp256k1
    from libp2p.peer.id import ID

    from dms.security.identity import is_peer_id

    ids = [ID.from_pubkey(make().public_key).to_base58() for make in (ed25519, secp256k1)]
    ids.append(ID.from_pubkey(rsa(1024).public_key).to_base58())
    assert [i[:2] for i in ids] == ["12", "16", "Qm"], ids
    assert all(is_peer_id(i) for i in ids), ids
    for bad in ("garbage", "", ids[0][:-1], ids[2] + "1", "0OIl", "1" * 46):
        assert not is_peer_id(bad), bad


@pytest.mark.parametrize("bad", ["did:web:example.com", "did:key:zzzz", "did:key:z" + "1" * 46])
def test_bad_dids_are_refused(bad: str) -> None:
    with pytest.raises(IdentityError):
        public_key_from_did(bad)


def test_key_file_holds_no_plaintext_key(tmp_path: Path) -> None:
    store = Keystore(tmp_path, fixed("pw"))
    ident = Identity.generate()
    store.new("dms", ident)
    raw = (tmp_path / "key" / "dms.json").read_bytes()
    secret = ident.private_bytes()
    for form in (
        secret,
        secret.hex().encode(),
        base64.b64encode(secret),
        base64.b64encode(secret).rstrip(b"="),
    ):
        assert form not in raw
    assert (tmp_path / "key" / "dms.json").stat().st_mode & 0o077 == 0
    assert store.load("dms").private_bytes() == secret


def test_wrong_passphrase_is_a_clean_error(tmp_path: Path) -> None:
    Keystore(tmp_path, fixed("right")).new("user")
    with pytest.raises(KeystoreError, match="wrong passphrase for key 'user'"):
        Keystore(tmp_path, fixed("wrong")).load("user")


def test_corrupted_and_swapped_files_are_refused(tmp_path: Path) -> None:
    store = Keystore(tmp_path, fixed("pw"))
    store.new("dms")
    path = tmp_path / "key" / "dms.json"
    doc = json.loads(path.read_text())

    path.write_text("{not json")
    with pytest.raises(KeystoreError, match="corrupted"):
        store.load("dms")

    other = Identity.generate()  # a public part swapped in keeps names consistent...
    doc.update(public_key=other.public_key.hex(), did=other.did, peer_id=other.peer_id)
    path.write_text(json.dumps(doc))
    with pytest.raises(KeystoreError, match=r"wrong passphrase|altered"):
        store.load("dms")  # ...but the ciphertext is bound to the original key


def test_missing_context_and_bad_names(tmp_path: Path) -> None:
    store = Keystore(tmp_path, fixed("pw"))
    with pytest.raises(KeystoreError, match=r"no key 'user'.*dms key new user"):
        store.load("user")
    with pytest.raises(KeystoreError, match="invalid key context"):
        store.new("../evil")


def test_existing_key_is_never_overwritten(tmp_path: Path) -> None:
    store = Keystore(tmp_path, fixed("pw"))
    first = store.new("dms")
    with pytest.raises(KeystoreError, match="already exists"):
        store.new("dms")
    assert store.info("dms").did == first.did


def test_trust_store_persists_roots(tmp_path: Path) -> None:
    ident = Identity.generate()
    store = TrustStore.for_context(tmp_path, "dms")
    assert store.anchor_root(ident.did) is True
    assert store.anchor_root(ident.did) is False
    again = TrustStore.for_context(tmp_path, "dms")
    assert again.is_root(ident.public_key)
    assert not again.is_root(Identity.generate().public_key)
