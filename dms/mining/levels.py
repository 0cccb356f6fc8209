"""CKKS parameters by security level, as plain numbers.

What checks a job's shape before any work (the ``mining`` executor's params at bid
time, a public context's parts) reads them here, so it loads neither NumPy nor
TenSEAL (``dms.mining.schemes.ckks`` makes the contexts from them).
"""

# level -> (poly modulus degree N, log2 scale, coefficient modulus bit sizes)
LEVELS: dict[int, tuple[int, int, list[int]]] = {
    128: (8192, 40, [60, 40, 40, 60]),
    192: (16384, 40, [60, 40, 40, 40, 60]),
    256: (32768, 40, [60, 40, 40, 40, 60]),
}
# Values handed to CKKS are scaled by the data owner into [-1, 1]: with a 2^40
# scale and a 60-bit first prime, magnitudes up to 2^19 are safe, and products
# of two scaled values stay below 1.

BLIND_CHAIN = [60, 50, 60]  # one multiplicative level: all the blind protocols need
BLIND_LOG_SCALE = 50
