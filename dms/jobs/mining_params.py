"""What a ``mining`` allocation is asked to do, and what is checked before any work.

Its parameters (checked at bid time, by the requester and by every bidder), the bounds
of the messages and answers that travel (``count_objects``), and a public CKKS
context's parts, read before it is fetched or loaded. Light: pydantic and MessagePack,
no NumPy, and TenSEAL only to read a context's encryption parameters. The worker's
computation is ``dms.jobs.mining_worker``, loaded by the executor (``dms.jobs.mining``)
when a session starts: a node loads NumPy and TenSEAL when it mines, not when it starts.
"""

from __future__ import annotations

import tempfile
from typing import Any, Literal, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dms.errors import EXTRA_KEY
from dms.jobs.base import ExecutorError
from dms.mining.levels import BLIND_CHAIN, LEVELS
from dms.mining.settings import resolve_protocol
from dms.mining.wire import decode

M = TypeVar("M", bound=BaseModel)

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


def decode_message(kind: type[M], body: bytes) -> M:
    """A peer's ``body`` as a ``kind`` message, or an :class:`ExecutorError` naming what
    is wrong in one line (a mining worker's and a collaboration's messages alike)."""
    try:
        return decode(kind, body)
    except Exception as exc:
        first = str(exc).splitlines()[0][:200]
        raise ExecutorError(f"not a valid {kind.__name__}: {first}") from None


def parse_params(params: dict[str, Any]) -> MiningParams:
    try:
        return MiningParams.model_validate(params)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "params"
        message = err["msg"].removeprefix("Value error, ")
        field = f"params.{where}" if where != "params" else "params"
        raise ExecutorError(
            f"mining params: {where}: {message}", field=field, key=err["type"] == EXTRA_KEY
        ) from None


# ---- the provider's checks on a public context, before it is fetched or loaded ------------

PARAMS_MAX_BYTES = 512  # a serialized chain of encryption parameters (85 bytes at 128)


def _chains(level: int) -> list[list[int]]:
    return [LEVELS[level][2], BLIND_CHAIN]


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
    import tenseal.sealapi as seal  # here: only a node handed a context loads TenSEAL

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
