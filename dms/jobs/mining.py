"""The ``mining`` executor: the worker side of encrypted mining, driven by the data owner.

It is interactive. The allocation stays running while the owner's mining
session invokes ``/dms/allocation/session`` with one operation at a time
(``specs/mining.md``, "Placed on other nodes"):

    start   the opening message (ClusterStart / KnnStart) -> builds the worker
    step    an optional ClusterUpdate -> applies it, computes the next round
    query   a KnnQuery -> the encrypted distances
    run     plaintext kmeans / knn placed as they are (the worker sees the data)
    finish  the session is over: the executor returns and the allocation completes

The parameters are small and say what the worker must expect. Everything it
receives is checked against them: a context at another security level, a
context that holds a secret key, or rows, attributes or clusters other than
announced are refused with a reason, before any work.
"""

from __future__ import annotations

import tempfile
import threading
import time
from typing import Any, Literal

import msgpack
import numpy as np
import tenseal.sealapi as seal
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dms.jobs.base import ExecutorError, InteractiveExecutor, Log, register_executor
from dms.mining import Distance, MiningError
from dms.mining.blind_kmeans import (
    BLIND_LOG_SCALE,
    BlindClusterStart,
    BlindClusterUpdate,
    BlindClusterWorker,
)
from dms.mining.blind_knn import BlindKnnQuery, BlindKnnStart, BlindKnnWorker
from dms.mining.classification import KnnDistances, KnnQuery, KnnStart, KnnWorker
from dms.mining.clustering import ClusterStart, ClusterUpdate, ClusterWorker
from dms.mining.local import resolve_protocol
from dms.mining.placed import PlainJob, PlainResult
from dms.mining.plain import kmeans, knn
from dms.mining.schemes.ckks import LEVELS, load_public_context
from dms.mining.wire import decode, encode

MIB = 1024 * 1024
BASE_BYTES = 96 * MIB  # the interpreter, TenSEAL and numpy, before any data
CONTEXT_BYTES = {128: 24 * MIB, 192: 96 * MIB, 256: 384 * MIB}  # keys in memory
LIU_COMPONENTS = {128: 3, 192: 4, 256: 6}
KNN_BLOCK = 8  # queries per CKKS query block (KnnOwner.query_blocks)
MAX_ROUNDS = 10_000  # rounds a blind k-means start may announce (max_iterations' bound)
ANSWER_SLACK = 1.25  # an answer's bound over what the shape allows
DEFAULT_MAX_ITERATIONS_BOUND = 10_000  # rounds a plaintext run may take (MiningSettings' bound)

Algorithm = Literal["kmeans", "skmeans", "dbskmeans", "knn", "sknn"]
PLAINTEXT = ("kmeans", "knn")


class MiningParams(BaseModel):
    """What a mining allocation will be asked to do; small, and checked at bid time."""

    model_config = ConfigDict(extra="forbid")

    algorithm: Algorithm
    scheme: Literal["ckks", "liu", "plain"] = "ckks"
    level: Literal[128, 192, 256] = 128
    k: int = Field(ge=1, le=100_000)
    n: int = Field(ge=1, le=50_000_000, description="records (training rows for k-NN) here")
    a: int = Field(ge=1, le=1_000_000, description="attributes per record")
    queries: int = Field(default=0, ge=0, le=10_000_000, description="k-NN queries")
    distance: Literal["euclidean", "manhattan"] = "euclidean"
    # Unsaid: resolved as everywhere (``resolve_protocol``): blind for CKKS skmeans and
    # sknn (the worker sees only ciphertexts); udm, the leaky reference protocol, only
    # where the job names it or names Liu or dbskmeans (and for plaintext jobs, unused).
    protocol: Literal["udm", "blind"] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> MiningParams:
        if self.protocol is None:
            blind = resolve_protocol(self.algorithm, self.scheme) == "blind"
            self.protocol = "blind" if blind else "udm"
        if self.protocol == "blind" and self.scheme == "ckks":
            # Only padded sizes travel: records up to whole ciphertexts, queries up to
            # whole blocks, which is all the worker's work and messages depend on.
            slots = LEVELS[self.level][0] // 2
            self.n = -(-self.n // slots) * slots
            self.queries = -(-self.queries // KNN_BLOCK) * KNN_BLOCK
        plain = self.algorithm in PLAINTEXT
        if plain != (self.scheme == "plain"):
            want = "plain" if plain else "ckks or liu"
            raise ValueError(f"{self.algorithm} runs with scheme {want}, not {self.scheme}")
        if self.protocol == "blind" and (
            self.scheme != "ckks" or self.algorithm not in ("skmeans", "sknn")
        ):
            raise ValueError("the blind protocol is for skmeans and sknn with CKKS")
        if self.algorithm in ("kmeans", "skmeans", "dbskmeans") and self.k > self.n:
            raise ValueError(f"k = {self.k} clusters for {self.n} records")
        return self

    def estimated_bytes(self) -> int:
        """Peak memory of the worker, from the sizes alone (a generous estimate)."""
        n, a, k = self.n, self.a, self.k
        if self.scheme == "ckks":
            degree, _, bits = LEVELS[self.level]
            ciphertext = 2 * degree * (len(bits) - 1) * 8
            slots = degree // 2
            if self.algorithm == "sknn":
                rows = max(1, min(slots // a, n))
                blocks = -(-n // rows)
                held = blocks + KNN_BLOCK * blocks * 2  # training blocks + one answer, twice
            else:
                held = 2 * a * -(-n // slots)  # columns + weighted copies
            data = held * ciphertext + CONTEXT_BYTES[self.level]
        elif self.scheme == "liu":
            m = LIU_COMPONENTS[self.level]
            data = 2 * n * a * m * 8
            if self.algorithm == "sknn":
                data += 2 * min(n, 4_000_000) * a * m * 8  # one block of differences
        else:
            data = 3 * n * a * 8
        if self.algorithm in ("skmeans", "dbskmeans", "kmeans") and self.protocol == "udm":
            data += 3 * n * k * a * 8  # U, its update, and a copy while decoding
        return BASE_BYTES + data

    # ---- what one answer of the worker may hold (the owner checks before it fetches) ----

    def _ciphertexts(self) -> tuple[int, int]:
        """(bytes of one ciphertext at most, ciphertexts one answer holds at most)."""
        degree, _, bits = LEVELS[self.level]
        slots = degree // 2
        n, a, k = self.n, self.a, self.k
        chunks = -(-n // slots)
        per = a if self.distance == "manhattan" else 1  # Manhattan: one per attribute
        if self.algorithm == "sknn" and self.protocol == "blind":
            count = KNN_BLOCK * per * chunks  # a block of queries' distances
        elif self.algorithm == "sknn":
            rows = max(1, min(slots // a, n))
            count = KNN_BLOCK * a * -(-n // rows)
        elif self.protocol == "blind":  # distances (k x chunks), or the sums (k x a)
            count = max(k * per * chunks, k * a)
        else:  # weighted columns
            count = a * chunks
        # a ciphertext at the data level, uncompressed: none the worker returns is larger
        return 2 * degree * (len(bits) - 1) * 8 + 1024, count

    def answer_bytes(self) -> int:
        """The most bytes one honest answer can hold, from the (padded) shape alone,
        with room to spare: a larger answer is refused before it is fetched."""
        n, a, k = self.n, self.a, self.k
        if self.scheme == "ckks":
            size, count = self._ciphertexts()
            data = size * count + 9 * n  # + the labels (udm)
        elif self.scheme == "liu":
            m = LIU_COMPONENTS[self.level]
            if self.algorithm == "sknn":
                data = max(KNN_BLOCK * n * a, 4_000_000) * m * 8
            else:
                data = 9 * n + k * a * m * 8
        else:  # plaintext: labels (k-NN's may be strings), centroids, changes
            data = 72 * (n + self.queries) + 9 * k * a + 9 * DEFAULT_MAX_ITERATIONS_BOUND
        return int(ANSWER_SLACK * data) + MIB

    def answer_objects(self) -> int:
        """The most MessagePack objects one honest answer holds: its ciphertexts and
        labels, a few per array. Decoding more would cost the owner memory for nothing."""
        count = self._ciphertexts()[1] if self.scheme == "ckks" else 0
        return 1024 + 4 * (self.n + self.queries + count)

    def message_objects(self) -> int:
        """The most MessagePack objects one honest message of the owner holds (an opening
        message, an update, a query block, a plaintext job): its ciphertexts, labels and
        rows, a few per array. The worker counts before it decodes."""
        degree = LEVELS[self.level][0]
        slots = degree // 2
        n, a, k = self.n, self.a, self.k
        chunks = -(-n // slots)
        blocks = -(-n // max(1, min(slots // a, n)))
        ciphertexts = a * chunks + k * a + k * chunks + KNN_BLOCK * a + blocks
        return 1024 + 4 * (n + self.queries + ciphertexts)

    def step_work(self) -> float:
        """A step's work in CKKS multiplications at level 128 (the benchmark's unit,
        ``ckks_mul_per_s``), from the shape: what a step deadline is made of."""
        if self.scheme == "ckks":
            degree = LEVELS[self.level][0]
            return float(self._ciphertexts()[1]) * (degree / 8192) ** 2
        # Liu and plaintext: numpy over n.k.a values (and a whole run for plaintext)
        rounds = DEFAULT_MAX_ITERATIONS_BOUND if self.scheme == "plain" else 1
        queries = max(self.queries, 1) if self.algorithm in ("knn", "sknn") else self.k
        return self.n * self.a * queries * LIU_COMPONENTS[self.level] * rounds / 10_000


def count_objects(raw: bytes, limit: int) -> int:
    """How many MessagePack objects ``raw`` holds, read without building any; more than
    ``limit`` (or a truncated or reserved encoding) is a ``ValueError`` at once. An answer
    built to blow up on decoding (millions of empty maps) is refused for what it costs
    to walk up to ``limit``, never for what it would cost to decode."""
    view = memoryview(raw)
    pos, pending, count, end = 0, 1, 0, len(raw)
    while pending:
        if pos >= end:
            raise ValueError("a truncated MessagePack value")
        pending -= 1
        count += 1
        if count > limit:
            raise ValueError(f"more than {limit} MessagePack objects")
        b = view[pos]
        pos += 1
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            continue
        if 0x80 <= b <= 0x8F:
            pending += 2 * (b & 0x0F)
        elif 0x90 <= b <= 0x9F:
            pending += b & 0x0F
        elif 0xA0 <= b <= 0xBF:
            pos += b & 0x1F
        elif b in _LENGTHS:  # bin, str, ext: a length, then that many bytes
            width, extra = _LENGTHS[b]
            pos += width + extra + int.from_bytes(view[pos : pos + width], "big")
        elif b in _FIXED:
            pos += _FIXED[b]
        elif b in _CONTAINERS:  # array16/32, map16/32
            width, per = _CONTAINERS[b]
            pending += per * int.from_bytes(view[pos : pos + width], "big")
            pos += width
        else:
            raise ValueError(f"a reserved MessagePack byte 0x{b:02x}")
    if pos > end:
        raise ValueError("a truncated MessagePack value")
    return count


# type byte -> (length width, bytes before the data); (payload width); (count width, per item)
_LENGTHS = {0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),
            0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0)}  # fmt: skip
_FIXED = {0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4,
          0xD3: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17}  # fmt: skip
_CONTAINERS = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}


def parse_params(params: dict[str, Any]) -> MiningParams:
    try:
        return MiningParams.model_validate(params)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "params"
        message = err["msg"].removeprefix("Value error, ")
        field = f"params.{where}" if where != "params" else "params"
        raise ExecutorError(f"mining params: {where}: {message}", field=field) from None


class _Ops:
    """The worker's state for one session; one operation at a time (the allocation's
    session thread), never on the allocation's mailbox."""

    def __init__(self, params: MiningParams) -> None:
        self.params = params
        self.cluster: ClusterWorker | BlindClusterWorker | None = None
        self.classify: KnnWorker | BlindKnnWorker | None = None
        self.rounds = 0
        self.queries = 0

    def start(self, body: bytes) -> bytes:
        p = self.params
        blind = p.protocol == "blind"
        if p.algorithm in ("skmeans", "dbskmeans") and blind:
            blind_start = _decode(BlindClusterStart, body)
            self._check_blind_start(blind_start, p.k)
            self.cluster = BlindClusterWorker(blind_start)
        elif p.algorithm in ("skmeans", "dbskmeans"):
            start = _decode(ClusterStart, body)
            self._check_cluster_start(start)
            self.cluster = ClusterWorker(start)
        elif p.algorithm == "sknn" and blind:
            knn_start = _decode(BlindKnnStart, body)
            self._check_blind_start(knn_start, None)
            self.classify = BlindKnnWorker(knn_start)
        elif p.algorithm == "sknn":
            udm_start = _decode(KnnStart, body)
            self._check_knn_start(udm_start)
            self.classify = KnnWorker(udm_start)
        else:
            raise ExecutorError(f"{p.algorithm} takes 'run', not 'start'")
        return b""

    def step(self, body: bytes) -> bytes:
        if self.cluster is None:
            raise ExecutorError("no clustering session started here")
        if body:
            if isinstance(self.cluster, BlindClusterWorker):
                self.cluster.update(_decode(BlindClusterUpdate, body))
            else:
                update = _decode(ClusterUpdate, body)
                self._check_update(update)
                self.cluster.update(update)
        self.rounds += 1
        return encode(self.cluster.round())

    def query(self, body: bytes) -> bytes:
        if self.classify is None:
            raise ExecutorError("no k-NN session started here")
        if isinstance(self.classify, BlindKnnWorker):
            blind = _decode(BlindKnnQuery, body)
            self.queries += len(blind.queries)
            return encode(self.classify.distances(blind))
        message = _decode(KnnQuery, body)
        count = len(message.replicated or []) or (
            message.queries.shape[0] if message.queries else 0
        )
        if count == 0 or count > max(KNN_BLOCK, 4_000_000 // max(self.params.n * self.params.a, 1)):
            raise ExecutorError(f"a query block of {count} queries is out of range")
        if message.queries is not None and message.queries.shape[1:2] != [self.params.a]:
            raise ExecutorError("query rows do not have the announced attributes")
        self.queries += count
        answer: KnnDistances = self.classify.distances(message)
        return encode(answer)

    def run(self, body: bytes) -> bytes:
        """Plaintext baselines placed as they are: the worker sees the data."""
        p = self.params
        job = _decode(PlainJob, body)
        data = job.data.array()
        if data.shape != (p.n, p.a):
            raise ExecutorError(f"data of shape {data.shape}, announced ({p.n}, {p.a})")
        distance = Distance.parse(p.distance)
        if p.algorithm == "kmeans":
            outcome = kmeans(data, job.clustering(p.k, distance))
            self.rounds = outcome.iterations
            return encode(
                PlainResult(
                    labels=outcome.labels.tolist(),
                    iterations=outcome.iterations,
                    converged=outcome.converged,
                    centroids=outcome.centroids.tolist(),
                    changes=list(outcome.changes),
                )
            )
        if job.test is None or job.labels is None:
            raise ExecutorError("knn needs training labels and test rows")
        test = job.test.array()
        if test.ndim != 2 or test.shape[1] != p.a or len(job.labels) != p.n:
            raise ExecutorError("test rows or labels do not match the announced sizes")
        predictions = knn(data, job.labels, test, p.k, distance=distance)
        self.queries = len(predictions)
        return encode(PlainResult(labels=list(predictions)))

    # ---- checks on what arrives ----------------------------------------------------

    def _check_context(self, raw: bytes | None) -> None:
        """A public CKKS context at the announced level: its ring degree, and a scale the
        level's chain allows (the udm chain's, or the blind protocol's one-level chain).
        Its parts are read first (``inspect_context``), before SEAL loads any key."""
        if raw is None:
            raise ExecutorError("a CKKS job needs a public context")
        inspect_context(raw, self.params.level)
        try:
            context = load_public_context(raw)
        except MiningError as exc:
            raise ExecutorError(str(exc)) from None
        except Exception as exc:
            raise ExecutorError(f"not a CKKS context: {type(exc).__name__}") from None
        degree, log_scale, _ = LEVELS[self.params.level]
        scales = {2.0**log_scale, 2.0**BLIND_LOG_SCALE}
        got = context.data.seal_context().key_context_data().parms().poly_modulus_degree()
        if got != degree or context.global_scale not in scales:
            raise ExecutorError(
                f"the context has N = {got} and scale 2^{np.log2(context.global_scale):g}; "
                f"level {self.params.level} announced N = {degree}, scale 2^{log_scale}"
            )

    def _check_blind_start(self, start: BlindClusterStart | BlindKnnStart, k: int | None) -> None:
        p = self.params
        self._check_context(start.context)
        slots = LEVELS[p.level][0] // 2
        chunks = -(-p.n // slots)
        if str(start.distance) != p.distance or (k is not None and start.k != k):  # type: ignore[union-attr]
            raise ExecutorError("the start message does not match the announced job")
        if start.attributes != p.a or start.slots != slots or start.chunks != chunks:
            raise ExecutorError(
                f"the start announces {start.attributes} attributes in {start.chunks} chunks "
                f"of {start.slots} slots; the job announced {p.a}, {chunks}, {slots}"
            )
        if len(start.columns) != p.a or any(len(c) != chunks for c in start.columns):
            raise ExecutorError("packed columns do not hold the announced records")
        if isinstance(start, BlindClusterStart) and not 1 <= start.rounds <= MAX_ROUNDS:
            raise ExecutorError(f"{start.rounds} rounds announced: 1 to {MAX_ROUNDS} allowed")

    def _check_cluster_start(self, start: ClusterStart) -> None:
        p = self.params
        if (start.algorithm, start.scheme, str(start.distance), start.k) != (
            p.algorithm,
            p.scheme,
            p.distance,
            p.k,
        ):
            raise ExecutorError("the start message does not match the announced job")
        if start.udm.shape != [p.n, p.k, p.a]:
            raise ExecutorError(f"U has shape {start.udm.shape}, announced {[p.n, p.k, p.a]}")
        if p.scheme == "ckks":
            self._check_context(start.context)
            slots = LEVELS[p.level][0] // 2
            if start.columns is None or len(start.columns) != p.a:
                raise ExecutorError("a CKKS start needs one packed column per attribute")
            if any(len(column) != -(-p.n // slots) for column in start.columns):
                raise ExecutorError("packed columns do not hold the announced records")
        else:
            m = LIU_COMPONENTS[p.level]
            if start.data is None or start.data.shape != [p.n, p.a, m]:
                raise ExecutorError("Liu data does not have the announced shape")
            if start.centroids is None or start.centroids.shape != [p.k, p.a, m]:
                raise ExecutorError("Liu centroids do not have the announced shape")

    def _check_knn_start(self, start: KnnStart) -> None:
        p = self.params
        if (start.scheme, str(start.distance), start.k) != (p.scheme, p.distance, p.k):
            raise ExecutorError("the start message does not match the announced job")
        if start.labels and len(start.labels) != p.n:
            raise ExecutorError("labels do not match the announced training rows")
        if p.scheme == "ckks":
            self._check_context(start.context)
            rows = max(1, min((LEVELS[p.level][0] // 2) // p.a, p.n))
            if start.blocks is None or len(start.blocks) != -(-p.n // rows):
                raise ExecutorError("packed training rows do not hold the announced records")
        else:
            m = LIU_COMPONENTS[p.level]
            if start.train is None or start.train.shape != [p.n, p.a, m]:
                raise ExecutorError("Liu training rows do not have the announced shape")

    def _check_update(self, update: ClusterUpdate) -> None:
        p = self.params
        if update.shift is not None and update.shift.shape != [p.k, p.a]:
            raise ExecutorError("the shift does not have the announced shape")
        if update.udm is not None and update.udm.shape != [p.n, p.k, p.a]:
            raise ExecutorError("the new U does not have the announced shape")


# ---- the provider's checks on a public context, before it is fetched or loaded ------------

BLIND_BITS = [60, 50, 60]  # the blind protocols' chain (``blind_keys``), at every level
PARAMS_MAX_BYTES = 512  # a serialized chain of encryption parameters (85 bytes at 128)


def _chains(level: int) -> list[list[int]]:
    return [LEVELS[level][2], BLIND_BITS]


def max_context_bytes(level: int) -> int:
    """The largest public context (public and relinearization keys, no Galois keys) a
    job of ``level`` can need: its keys uncompressed at the longest chain, + 10 %.
    Measured: 1.86, 5.59 and 12.3 MB at 128, 192, 256; the bounds 2.4, 7.3, 14.5 MB."""
    degree = LEVELS[level][0]
    primes = max(len(c) for c in _chains(level))
    return int(1.1 * 2 * degree * primes * 8 * primes) + 64 * 1024


def admit_context(size: int, level: int, ram_bytes: int | None) -> None:
    """The declared size of a public context, against the job's level and the lease's
    RAM: checked before a byte of it is fetched (``MiningSession.admit``)."""
    limit = max_context_bytes(level)
    if size > limit:
        raise ExecutorError(
            f"the public context declares {size / MIB:.1f} MiB; a level-{level} job's is "
            f"at most {limit / MIB:.1f} MiB (no Galois keys): refused before fetching it"
        )
    if ram_bytes is not None and size > ram_bytes:
        raise ExecutorError(
            f"the public context declares {size / MIB:.1f} MiB, more than the lease's "
            f"{ram_bytes / MIB:.0f} MiB of memory: refused before fetching it"
        )


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ExecutorError("the public context is not a TenSEAL context (a bad varint)")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _proto(buf: memoryview) -> dict[int, memoryview | int]:
    """A protobuf message's fields (the last of each number), as views: nothing copied."""
    fields: dict[int, memoryview | int] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, kind = key >> 3, key & 7
        if kind == 0:
            fields[number], pos = _varint(buf, pos)
        elif kind == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise ExecutorError("the public context is truncated")
            fields[number], pos = buf[pos : pos + size], pos + size
        elif kind in (1, 5):
            pos += 8 if kind == 1 else 4
        else:
            raise ExecutorError(f"the public context is not a TenSEAL context (wire type {kind})")
    return fields


def _encryption_parameters(blob: memoryview) -> tuple[int, list[int]]:
    """(N, bit sizes of the chain) from SEAL's serialized parameters (a few dozen bytes,
    bounded before SEAL decompresses them)."""
    if len(blob) > PARAMS_MAX_BYTES:
        raise ExecutorError(
            f"the context's encryption parameters take {len(blob)} bytes, at most "
            f"{PARAMS_MAX_BYTES} expected"
        )
    with tempfile.NamedTemporaryFile(prefix="dms-params-") as fh:
        fh.write(blob)
        fh.flush()
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        try:
            parms.load(fh.name)
        except Exception as exc:
            raise ExecutorError(f"the context's encryption parameters: {exc}") from None
    bits = [m.bit_count() for m in parms.coeff_modulus()]
    return parms.poly_modulus_degree(), bits


def inspect_context(raw: bytes, level: int) -> None:
    """A public context's parts, read before SEAL loads any key: no secret key, no
    Galois keys (no mining job rotates), the ring degree and the chain of ``level``
    (the reference chain or the blind one), and keys no larger than that chain's."""
    top = _proto(memoryview(raw))
    private = top.get(3)
    if isinstance(private, memoryview) and isinstance(_proto(private).get(1), memoryview):
        raise ExecutorError("refusing a CKKS context that holds a secret key")
    public, params = top.get(2), top.get(1)
    if not isinstance(public, memoryview) or not isinstance(params, memoryview):
        raise ExecutorError("the public context lacks its parameters or public part")
    keys = _proto(public)
    galois = keys.get(5)
    if isinstance(galois, memoryview) and len(galois):
        raise ExecutorError(
            f"the public context holds Galois keys ({len(galois) / MIB:.1f} MiB): no mining "
            "job rotates, refused before loading it"
        )
    degree, bits = _encryption_parameters(params)
    want = LEVELS[level][0]
    if degree != want or bits not in _chains(level):
        raise ExecutorError(
            f"the context has N = {degree} and a chain of {bits} bits; level {level} "
            f"announced N = {want} and {' or '.join(str(c) for c in _chains(level))}"
        )
    key_bytes = 2 * degree * len(bits) * 8 + 4096  # one key, uncompressed
    for number, name, count in ((1, "public key", 1), (4, "relinearization keys", len(bits))):
        blob = keys.get(number)
        size = len(blob) if isinstance(blob, memoryview) else 0
        if size > count * key_bytes:
            raise ExecutorError(
                f"the context's {name} take {size} bytes; N = {degree} with {len(bits)} "
                f"primes needs at most {count * key_bytes}"
            )


def split_context(start: bytes) -> tuple[bytes, bytes | None]:
    """An opening message without its public context, and the context apart: shipped
    as a parcel of its own, its chunks are shared by every shard on one node."""
    message = msgpack.unpackb(start, raw=False)
    if not isinstance(message, dict) or not isinstance(message.get("context"), bytes):
        return start, None
    context = message.pop("context")
    return msgpack.packb(message, use_bin_type=True), context


def join_context(body: bytes, context: bytes) -> bytes:
    """Put a context shipped apart back into its opening message."""
    try:
        message = msgpack.unpackb(body, raw=False)
    except Exception:
        raise ExecutorError("the opening message is not MessagePack") from None
    if not isinstance(message, dict):
        raise ExecutorError("an opening message with a context must be a map")
    message["context"] = context
    return msgpack.packb(message, use_bin_type=True)


def _decode(kind: type[BaseModel], body: bytes) -> Any:
    try:
        return decode(kind, body)
    except Exception as exc:
        first = str(exc).splitlines()[0][:200]
        raise ExecutorError(f"not a valid {kind.__name__}: {first}") from None


OPS = ("start", "step", "query", "run", "finish")


class MiningSession:
    """One allocation's worker: operations in, answers out, until ``finish`` or stop."""

    def __init__(self, params: MiningParams, log: Log) -> None:
        self.params = params
        self._ops = _Ops(params)
        self._log = log
        self.finished = threading.Event()
        self.compute_s = 0.0
        self.cpu_s = 0.0

    def admit(self, op: str, size: int, context_size: int | None, ram_bytes: int | None) -> None:
        """Declared sizes, before anything is fetched: a context only with a CKKS start,
        within what the job's level needs; the whole call within the lease's memory."""
        if context_size is not None:
            if op != "start" or self.params.scheme != "ckks":
                raise ExecutorError(f"a context comes only with a CKKS job's start, not {op!r}")
            admit_context(context_size, self.params.level, ram_bytes)
        total = size + (context_size or 0)
        if ram_bytes is not None and total > ram_bytes:
            raise ExecutorError(
                f"a '{op}' of {total / MIB:.1f} MiB, more than the lease's "
                f"{ram_bytes / MIB:.0f} MiB of memory: refused before fetching it"
            )

    def check_body(self, body: bytes) -> None:
        """An operation's body, fetched, before anything decodes it: no more MessagePack
        objects than the job's shape holds (a hostile owner's decode bomb is refused for
        what walking it costs, not for what decoding it would)."""
        if not body:
            return
        try:
            count_objects(body, self.params.message_objects())
        except ValueError as exc:
            raise ExecutorError(f"the owner's message: {exc}") from None

    def call(self, op: str, body: bytes) -> bytes:
        if op not in OPS:
            raise ExecutorError(f"unknown session operation {op!r} (known: {', '.join(OPS)})")
        if self.finished.is_set():
            raise ExecutorError("the session has finished")
        if op == "finish":
            self.finished.set()
            return b""
        began, cpu = time.perf_counter(), time.thread_time()
        try:
            out: bytes = getattr(self._ops, op)(body)
        except MiningError as exc:
            raise ExecutorError(str(exc)) from None
        finally:
            self.compute_s += time.perf_counter() - began
            self.cpu_s += time.thread_time() - cpu
        if op == "step":
            self._log(f"round {self._ops.rounds} computed")
        elif op in ("start", "run"):
            self._log(f"{op}: {len(body) / MIB:.1f} MiB received")
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "rounds": self._ops.rounds,
            "queries": self._ops.queries,
            "compute_s": round(self.compute_s, 3),
            "cpu_s": round(self.cpu_s, 3),
        }


@register_executor
class MiningExecutor(InteractiveExecutor[MiningSession]):
    kind = "mining"
    role = "job"

    def params(self, params: dict[str, Any]) -> MiningParams:
        return parse_params(params)

    def session(self, params: dict[str, Any], log: Log) -> MiningSession:
        return MiningSession(parse_params(params), log)
