"""What a mining job asks, before any data: the owner's settings and the protocol.

Light (pydantic and plain numbers): the node reads a mining request and checks a job's
parameters with them, and loads NumPy and TenSEAL only when it mines
(``dms.mining.placed`` holds the drivers that do).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dms.mining.defaults import (
    DEFAULT_MAX_ITERATIONS,
    DEFAULT_MIN_ERROR,
    DEFAULT_VERIFY_FRACTION,
)
from dms.mining.errors import MiningError

if TYPE_CHECKING:
    from dms.mining.plain import ClusteringParams

Algorithm = Literal["kmeans", "skmeans", "dbskmeans", "knn", "sknn"]
CLUSTERING = ("kmeans", "skmeans", "dbskmeans")
PROTOCOLS = ("blind", "udm")
MAX_SHARDS = 64


def resolve_protocol(algorithm: str, scheme: str, protocol: str | None = None) -> str:
    """``blind`` (the worker sees CKKS ciphertexts and the public context only) is the
    default for CKKS skmeans and sknn; ``udm`` is the reference system's protocol, and
    the only one for Liu and dbskmeans. ``plain`` for the plaintext baselines."""
    if protocol is not None and protocol not in PROTOCOLS:
        raise MiningError(f"unknown protocol {protocol!r}: use blind or udm")
    if algorithm in ("kmeans", "knn"):
        if protocol is not None:
            raise MiningError(f"{algorithm} runs in the clear: a protocol applies to skmeans, sknn")
        return "plain"
    if protocol != "blind":
        return protocol or ("blind" if scheme == "ckks" and algorithm != "dbskmeans" else "udm")
    if algorithm == "dbskmeans":
        raise MiningError(
            "dbskmeans is the reference's double-blind UDM protocol (FDH-OPE); "
            "for k-means where the worker sees only ciphertexts use skmeans --protocol blind"
        )
    if scheme != "ckks":
        raise MiningError(
            "the blind protocol needs CKKS: Liu's scheme is not IND-CPA (about m known "
            "plaintext/ciphertext pairs reveal its key), so a worker holding only Liu "
            "ciphertexts is not blind; use --scheme ckks, or --protocol udm with Liu"
        )
    return "blind"


class MiningSettings(BaseModel):
    """The owner's settings for one job (everything but the data and the keys)."""

    model_config = ConfigDict(extra="forbid")

    algorithm: Algorithm
    scheme: Literal["ckks", "liu", "plain"] = "ckks"
    level: Literal[128, 192, 256] = 128
    k: int = Field(ge=1)
    distance: Literal["euclidean", "manhattan"] = "euclidean"
    min_error: float = Field(default=DEFAULT_MIN_ERROR, ge=0)
    max_iterations: int = Field(default=DEFAULT_MAX_ITERATIONS, ge=1, le=10_000)
    init: Literal["first", "kmeans++"] = "first"
    seed: int | None = None
    shards: int = Field(default=1, ge=1, le=MAX_SHARDS)
    # skmeans / sknn: blind (CKKS: the worker sees only ciphertexts) or udm (the
    # reference's). Unsaid, it is resolved as everywhere (``resolve_protocol``): blind for
    # CKKS skmeans and sknn; udm only for what names a leaky protocol (Liu, dbskmeans);
    # None for the plaintext baselines.
    protocol: Literal["blind", "udm"] | None = None
    # blind: records recomputed in the clear per shard and round (spot checks)
    verify_fraction: float = Field(default=DEFAULT_VERIFY_FRACTION, gt=0, le=1)
    # blind skmeans: "replicate" also runs every shard on a second worker (on another
    # peer) and compares the two answers in full every iteration
    verify: Literal["sample", "replicate"] = "sample"

    @model_validator(mode="after")
    def _resolved(self) -> MiningSettings:
        resolved = resolve_protocol(self.algorithm, self.scheme, self.protocol)
        self.protocol = None if resolved == "plain" else resolved  # type: ignore[assignment]
        if self.verify == "replicate" and (self.algorithm != "skmeans" or not self.blind):
            raise ValueError("--verify replicate is for skmeans with the blind protocol")
        return self

    def clustering(self) -> ClusteringParams:
        """The clustering settings of this job (k-means, SKMeans, DBSKMeans)."""
        from dms.mining.distance import Distance  # NumPy: only where a job runs
        from dms.mining.plain import ClusteringParams

        return ClusteringParams(
            k=self.k,
            distance=Distance.parse(self.distance),
            min_error=self.min_error,
            max_iterations=self.max_iterations,
            init=self.init,
            seed=self.seed,
            level=self.level,
            shards=self.shards,
        )

    @property
    def replicas(self) -> int:
        """Workers per shard."""
        return 2 if self.verify == "replicate" else 1

    @property
    def plaintext(self) -> bool:
        return self.algorithm in ("kmeans", "knn")

    @property
    def blind(self) -> bool:
        return self.protocol == "blind"
