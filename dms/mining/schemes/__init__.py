"""Encryption schemes: Liu (real-valued, fast, not IND-CPA), CKKS (TenSEAL), FDH-OPE."""

from __future__ import annotations

from dms.mining.errors import MiningError
from dms.mining.schemes.ckks import CkksKeys
from dms.mining.schemes.liu import LiuKey

OwnerKeys = CkksKeys | LiuKey


def new_keys(scheme: str, level: int = 128) -> OwnerKeys:
    """Fresh data-owner keys for ``scheme`` at security ``level``."""
    if scheme == "ckks":
        return CkksKeys.generate(level)
    if scheme == "liu":
        return LiuKey.generate(level)
    raise MiningError(f"unknown scheme {scheme!r}: use ckks or liu")
