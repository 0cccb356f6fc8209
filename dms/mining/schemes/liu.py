"""Liu's symmetric scheme over the reals, vectorized with numpy.

A scalar v becomes m float64 components (see ``specs/mining.md``). Decryption
is a fixed linear functional, so ciphertexts add and scale homomorphically.
It is obfuscation, not IND-CPA encryption: about m known plaintext/ciphertext
pairs reveal the key. Keys are drawn with ``secrets``; the per-encryption
randomness comes from a numpy generator seeded from ``secrets``.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

import numpy as np

from dms.mining.errors import MiningError

LEVELS: dict[int, tuple[int, int]] = {128: (3, 15), 192: (4, 16), 256: (6, 15)}


@dataclass(frozen=True)
class LiuKey:
    k: np.ndarray  # m integers (held as float64: exact below 2^53)
    s: np.ndarray
    t: np.ndarray
    level: int

    @property
    def m(self) -> int:
        return int(self.k.shape[0])

    @classmethod
    def generate(cls, level: int = 128) -> LiuKey:
        if level not in LEVELS:
            raise MiningError(f"Liu security level must be one of {sorted(LEVELS)}, not {level}")
        m, bits = LEVELS[level]

        def draw() -> np.ndarray:
            # Top bit set: every component has exactly `bits` bits, never 0.
            return np.array(
                [secrets.randbits(bits - 1) | (1 << (bits - 1)) for _ in range(m)], dtype=np.float64
            )

        return cls(k=draw(), s=draw(), t=draw(), level=level)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "level": self.level,
                "k": [int(x) for x in self.k],
                "s": [int(x) for x in self.s],
                "t": [int(x) for x in self.t],
            }
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> LiuKey:
        doc = json.loads(raw)
        return cls(
            k=np.array(doc["k"], dtype=np.float64),
            s=np.array(doc["s"], dtype=np.float64),
            t=np.array(doc["t"], dtype=np.float64),
            level=int(doc["level"]),
        )

    def encrypt(self, values: np.ndarray, decimals: int | None = None) -> np.ndarray:
        """Any array of reals -> the same shape plus a trailing axis of m components."""
        v = np.asarray(values, dtype=np.float64)
        if decimals is not None:
            v = np.round(v, decimals)
        m = self.m
        rng = np.random.default_rng(secrets.randbits(128))
        r = rng.uniform(0.0, 1.0, size=(*v.shape, m))
        r_last = r[..., m - 1]
        c = np.empty((*v.shape, m), dtype=np.float64)
        v_ = v[..., None]
        # i = 1..m-1 (0-based 0..m-2): k_i*t_i*v + s_i*r_m + k_i*(r_i - r_{i-1}), with
        # r_0 := r_{m-1} for the first component, so the r terms telescope to zero.
        previous = np.concatenate([r[..., m - 2 : m - 1], r[..., 0 : m - 2]], axis=-1)
        head = slice(0, m - 1)
        c[..., head] = (
            self.k[head] * self.t[head] * v_
            + self.s[head] * r_last[..., None]
            + self.k[head] * (r[..., head] - previous)
        )
        c[..., m - 1] = (self.k[m - 1] + self.s[m - 1] + self.t[m - 1]) * r_last
        return c

    def decrypt(self, ciphertext: np.ndarray) -> np.ndarray:
        c = np.asarray(ciphertext, dtype=np.float64)
        m = self.m
        if c.shape[-1] != m:
            raise MiningError(f"ciphertext has {c.shape[-1]} components, key expects {m}")
        r_last = c[..., m - 1] / (self.k[m - 1] + self.s[m - 1] + self.t[m - 1])
        head = slice(0, m - 1)
        total = ((c[..., head] - r_last[..., None] * self.s[head]) / self.k[head]).sum(axis=-1)
        return total / self.t[head].sum()


# Homomorphic operations need no key: they are plain array arithmetic.
def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


def subtract(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a - b


def scale(a: np.ndarray, factor: float | np.ndarray) -> np.ndarray:
    return a * np.asarray(factor, dtype=np.float64)[..., None]
