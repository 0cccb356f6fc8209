"""Defaults a caller shows before anything runs (``dms mine --help``).

Kept apart from the code that uses them so that reading them loads neither NumPy nor
TenSEAL.
"""

DEFAULT_VERIFY_FRACTION = 0.05  # records checked in the clear per shard and round
DEFAULT_MIN_ERROR = 0.015  # k-means: converged once the centroids move less
DEFAULT_MAX_ITERATIONS = 10
