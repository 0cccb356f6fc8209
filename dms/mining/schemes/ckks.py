"""CKKS through TenSEAL: parameters by security level, packing, public contexts.

Workers receive ``public_context_bytes()`` only: parameters, public key,
relinearization and (where asked) Galois keys, never the secret key.
Columns are slot-packed: one ciphertext holds up to N/2 records of one
attribute, so work scales with ``a * ceil(n / slots)`` ciphertexts, not n.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tenseal as ts

from dms.mining.errors import MiningError
from dms.mining.levels import LEVELS


@dataclass
class CkksKeys:
    """The data owner's context (holds the secret key)."""

    context: ts.Context
    level: int

    @classmethod
    def generate(cls, level: int = 128, galois: bool = False) -> CkksKeys:
        if level not in LEVELS:
            raise MiningError(f"CKKS security level must be one of {sorted(LEVELS)}, not {level}")
        degree, log_scale, bits = LEVELS[level]
        context = ts.context(ts.SCHEME_TYPE.CKKS, degree, coeff_mod_bit_sizes=bits)
        context.global_scale = 2**log_scale
        context.generate_relin_keys()
        if galois:
            context.generate_galois_keys()
        return cls(context=context, level=level)

    @property
    def slots(self) -> int:
        return LEVELS[self.level][0] // 2

    def public_context_bytes(self) -> bytes:
        """What a worker may hold: no secret key, ever."""
        return self.context.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=self.context.has_galois_keys(),
            save_relin_keys=True,
        )

    def secret_context_bytes(self) -> bytes:
        return self.context.serialize(save_secret_key=True)

    @classmethod
    def from_secret_bytes(cls, raw: bytes, level: int) -> CkksKeys:
        context = ts.context_from(raw)
        if not context.is_private():
            raise MiningError("the CKKS key file holds no secret key")
        return cls(context=context, level=level)

    def encrypt(self, values: np.ndarray) -> ts.CKKSVector:
        return ts.ckks_vector(self.context, np.asarray(values, dtype=np.float64).tolist())

    def encrypt_columns(self, matrix: np.ndarray) -> list[list[bytes]]:
        """n x a -> for each attribute, one serialized ciphertext per chunk of `slots` rows."""
        n = matrix.shape[0]
        return [
            [
                self.encrypt(matrix[i : i + self.slots, j]).serialize()
                for i in range(0, n, self.slots)
            ]
            for j in range(matrix.shape[1])
        ]

    def decrypt(self, ciphertext: bytes | ts.CKKSVector) -> np.ndarray:
        vector = (
            ts.ckks_vector_from(self.context, ciphertext)
            if isinstance(ciphertext, bytes)
            else ciphertext
        )
        return np.array(vector.decrypt(), dtype=np.float64)


def load_public_context(raw: bytes) -> ts.Context:
    """Worker side: refuse any context that carries a secret key."""
    context = ts.context_from(raw)
    if context.is_private():
        raise MiningError("refusing a CKKS context that holds a secret key")
    return context


def chunk_slices(n: int, slots: int) -> list[slice]:
    return [slice(i, min(i + slots, n)) for i in range(0, n, slots)]
