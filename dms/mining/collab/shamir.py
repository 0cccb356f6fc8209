"""Shamir secret sharing of 32-byte seeds over the prime field of 2^521 - 1.

Any ``threshold`` shares give the secret back; fewer give no information about
it. A share is the point ``(x, f(x))``; ``x`` is the holder's 1-based position
in the collaboration's list of owners, so it travels implicitly.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

from dms.mining.errors import MiningError

PRIME = 2**521 - 1
SECRET_BYTES = 32
SHARE_BYTES = 66  # ceil(521 / 8)


def split(secret: bytes, holders: Iterable[int], threshold: int) -> dict[int, bytes]:
    """Shares of ``secret`` for each holder position (>= 1); any ``threshold`` recover it."""
    if len(secret) != SECRET_BYTES:
        raise MiningError(f"a shared secret is {SECRET_BYTES} bytes, not {len(secret)}")
    xs = list(holders)
    if threshold < 1 or threshold > len(xs):
        raise MiningError(f"threshold {threshold} with {len(xs)} share holders")
    if len(set(xs)) != len(xs) or min(xs) < 1:
        raise MiningError("share holders must be distinct positive positions")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out: dict[int, bytes] = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        out[x] = y.to_bytes(SHARE_BYTES, "big")
    return out


def lagrange_at_zero(xs: Iterable[int]) -> dict[int, int]:
    """The weights that turn shares at ``xs`` into the value at 0 (computed once per set)."""
    points = list(xs)
    weights: dict[int, int] = {}
    for i in points:
        num, den = 1, 1
        for j in points:
            if j != i:
                num = num * j % PRIME
                den = den * (j - i) % PRIME
        weights[i] = num * pow(den, -1, PRIME) % PRIME
    return weights


def combine(shares: Mapping[int, bytes], weights: Mapping[int, int] | None = None) -> bytes:
    """The secret from exactly the shares given (pass ``weights`` to reuse them across secrets)."""
    if not shares:
        raise MiningError("no shares to combine")
    if weights is None:
        weights = lagrange_at_zero(shares)
    value = 0
    for x, raw in shares.items():
        if len(raw) != SHARE_BYTES:
            raise MiningError(f"a share is {SHARE_BYTES} bytes, not {len(raw)}")
        value = (value + weights[x] * int.from_bytes(raw, "big")) % PRIME
    if value >= 1 << (8 * SECRET_BYTES):
        raise MiningError("the shares do not combine to a 32-byte secret (a share is wrong)")
    return value.to_bytes(SECRET_BYTES, "big")
