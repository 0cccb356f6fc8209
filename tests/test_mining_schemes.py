"""Property tests for the schemes: round trips and homomorphic identities."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dms.mining.schemes.ckks import CkksKeys
from dms.mining.schemes.fdhope import OpeKey
from dms.mining.schemes.liu import LEVELS, LiuKey, add, scale, subtract

LIU = {level: LiuKey.generate(level) for level in LEVELS}
CKKS = CkksKeys.generate(128)

reals = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
vectors = arrays(np.float64, st.integers(1, 30), elements=reals)


def close(a: np.ndarray, b: np.ndarray, rel: float, floor: float = 1e-6) -> bool:
    return bool(np.all(np.abs(a - b) <= rel * np.maximum(np.abs(b), floor)))


@settings(max_examples=150, deadline=None)
@given(vectors, st.sampled_from(sorted(LEVELS)))
def test_liu_round_trip(values: np.ndarray, level: int) -> None:
    key = LIU[level]
    cipher = key.encrypt(values)
    assert cipher.shape == (*values.shape, key.m)
    assert close(key.decrypt(cipher), values, 1e-6)


@settings(max_examples=150, deadline=None)
@given(vectors, st.data())
def test_liu_add_and_scalar_multiply_are_homomorphic(
    values: np.ndarray, data: st.DataObject
) -> None:
    key = LIU[128]
    other = data.draw(arrays(np.float64, values.shape, elements=reals))
    factor = data.draw(st.floats(min_value=-1e3, max_value=1e3, allow_nan=False))
    a, b = key.encrypt(values), key.encrypt(other)
    tolerance = 1e-6 * (np.abs(values) + np.abs(other) + 1.0)
    assert np.all(np.abs(key.decrypt(add(a, b)) - (values + other)) <= tolerance)
    assert np.all(np.abs(key.decrypt(subtract(a, b)) - (values - other)) <= tolerance)
    expected = values * factor
    assert np.all(np.abs(key.decrypt(scale(a, factor)) - expected) <= 1e-6 * (np.abs(expected) + 1))


def test_liu_ciphertexts_are_randomized() -> None:
    key = LIU[128]
    assert not np.array_equal(key.encrypt(np.ones(4)), key.encrypt(np.ones(4)))


# CKKS precision at level 128 (scale 2^40) on values scaled into [-1, 1], as the owner does.
CKKS_ABS_ERROR = 1e-6


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, st.integers(1, 64), elements=st.floats(-1, 1)), st.floats(-1, 1))
def test_ckks_round_trip_and_operations(values: np.ndarray, factor: float) -> None:
    vector = CKKS.encrypt(values)
    assert np.max(np.abs(CKKS.decrypt(vector) - values)) <= CKKS_ABS_ERROR
    assert np.max(np.abs(CKKS.decrypt(vector + vector) - 2 * values)) <= 2 * CKKS_ABS_ERROR
    assert np.max(np.abs(CKKS.decrypt(vector * factor) - values * factor)) <= CKKS_ABS_ERROR
    assert np.max(np.abs(CKKS.decrypt(vector * vector) - values**2)) <= CKKS_ABS_ERROR


def test_ckks_public_context_cannot_decrypt() -> None:
    import tenseal as ts

    from dms.mining.schemes.ckks import load_public_context

    public = load_public_context(CKKS.public_context_bytes())
    assert not public.is_private()
    vector = ts.ckks_vector_from(public, CKKS.encrypt(np.ones(3)).serialize())
    with pytest.raises(ValueError):
        vector.decrypt()
    with pytest.raises(ValueError, match="secret key"):
        load_public_context(CKKS.secret_context_bytes())


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, st.integers(2, 200), elements=st.floats(-1e4, 1e4)))
def test_fdhope_preserves_order_of_magnitudes_and_sign(values: np.ndarray) -> None:
    key = OpeKey.generate(values)
    cipher = key.encrypt(values)
    assert np.array_equal(np.sign(cipher), np.sign(values))
    order = np.argsort(np.abs(values), kind="stable")
    magnitudes, ciphers = np.abs(values)[order], np.abs(cipher)[order]
    strictly = np.diff(magnitudes) > 1e-6
    assert np.all(np.diff(ciphers)[strictly] > 0)


@pytest.mark.parametrize("level", [128, 192, 256])
def test_udm_skmeans_at_every_security_level_equals_plain_kmeans(level: int) -> None:
    """A product by a plaintext (the worker's weights) decrypts to the product at every
    level: at 256 the scale was 2^60 over 50-bit primes, and every
    weighted column came back 2^10 too large (wrong centroids, or the owner's
    checks refusing every honest answer)."""
    from pathlib import Path

    from dms.mining import run_clustering
    from dms.mining.data import read_table
    from dms.mining.plain import ClusteringParams
    from dms.mining.schemes import new_keys

    iris = read_table(Path("examples/iris-features.csv").resolve()).features
    keys = new_keys("ckks", level)
    plain = run_clustering("kmeans", iris, ClusteringParams(3))
    udm = run_clustering("skmeans", iris, ClusteringParams(3), keys=keys, protocol="udm")
    assert udm.labels == plain.labels
    assert np.allclose(udm.centroids, plain.centroids, atol=1e-4)
