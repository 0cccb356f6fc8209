"""The capability benchmark: fixed workloads, timed, so scores compare across machines.

Each measurement repeats one fixed unit of work (same sizes, same parameters on
every machine) for a short time budget and reports units per second. The CKKS
and Liu figures run the very code the node sells (``dms.mining.schemes``; the
mining package depends on nothing in dms, so this import makes no cycle).
The whole run stays well under 30 s on a 2-core machine; ``progress`` is told
each step's name before it starts.

TenSEAL exposes rotations only inside ``sum``/``dot`` (log2(slots) rotations
each), so ``ckks_rotate_per_s`` is rotate-and-sum steps: sums/s * log2(slots).

Each workload imports NumPy (and the schemes TenSEAL) when it runs: a node that only
reads its registered ``Capability`` loads neither.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import BaseModel, ConfigDict

BENCHMARK_VERSION = 1
STEP_S = 0.4  # time budget per measurement (the default of the benchmark_step_s setting)
_VECTOR = 1 << 18  # elements in the cpu unit of work
_MEMORY_MIB = 64
_DISK_MIB = 64

Progress = Callable[[str, int, int], None]


class Capability(BaseModel):
    """A node's registered capability: what the benchmark measured, and when."""

    model_config = ConfigDict(extra="forbid")

    version: int = BENCHMARK_VERSION
    measured_at: float
    seconds: float
    cores: int
    cpu_single_mops: float  # million elements/s of the fixed numpy kernel, one thread
    cpu_all_mops: float  # the same kernel on every core at once
    memory_gbps: float  # copy bandwidth (read + write)
    disk_write_mbps: float  # written and fsync'ed
    disk_read_mbps: float  # read back after dropping the file from the page cache
    ckks_add_per_s: float
    ckks_mul_per_s: float
    ckks_rotate_per_s: float
    liu_encrypt_per_s: float  # values/s
    liu_add_per_s: float  # values/s

    def scores(self) -> dict[str, float]:
        """The figures bids and the peers table carry."""
        return {
            "cpu_single_mops": self.cpu_single_mops,
            "cpu_all_mops": self.cpu_all_mops,
            "memory_gbps": self.memory_gbps,
            "disk_write_mbps": self.disk_write_mbps,
            "ckks_mul_per_s": self.ckks_mul_per_s,
            "liu_encrypt_per_s": self.liu_encrypt_per_s,
        }


def _rate(unit: Callable[[], object], amount: float = 1.0, budget_s: float = STEP_S) -> float:
    """Units of ``amount`` per second: ``unit`` repeated until the budget is spent."""
    unit()  # warm up: first calls pay for allocation and lazy setup
    count, start = 0, time.perf_counter()
    while True:
        unit()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s:
            return round(count * amount / elapsed, 3)


def _cpu(cores: int, budget_s: float) -> tuple[float, float]:
    import numpy as np  # each workload imports NumPy: a node loads it when it measures

    def kernel(x: np.ndarray, out: np.ndarray) -> None:
        np.sin(x, out=out)
        np.multiply(out, x, out=out)
        np.add(out, 1.0, out=out)

    inputs = [np.linspace(0.0, 1.0, _VECTOR) for _ in range(cores)]
    outputs = [np.empty(_VECTOR) for _ in range(cores)]
    single = _rate(lambda: kernel(inputs[0], outputs[0]), _VECTOR / 1e6, budget_s)
    with ThreadPoolExecutor(cores) as pool:  # numpy ufuncs release the GIL

        def all_cores() -> None:
            list(pool.map(kernel, inputs, outputs))

        every = _rate(all_cores, cores * _VECTOR / 1e6, budget_s)
    return single, every


def _memory(budget_s: float) -> float:
    import numpy as np

    src = np.ones(_MEMORY_MIB * 2**20 // 8)
    dst = np.empty_like(src)
    return _rate(lambda: np.copyto(dst, src), 2 * src.nbytes / 1e9, budget_s)


def _disk(folder: Path) -> tuple[float, float]:
    block = os.urandom(2**20)
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".benchmark-", dir=folder)
    try:
        start = time.perf_counter()
        with os.fdopen(fd, "wb") as out:
            for _ in range(_DISK_MIB):
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        write = _DISK_MIB * 1.048576 / (time.perf_counter() - start)
        with open(name, "rb") as inp:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(inp.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            while inp.read(2**20):
                pass
            read = _DISK_MIB * 1.048576 / (time.perf_counter() - start)
    finally:
        os.unlink(name)
    return round(write, 3), round(read, 3)


def _ckks(budget_s: float) -> tuple[float, float, float]:
    import numpy as np

    from dms.mining.schemes.ckks import CkksKeys

    keys = CkksKeys.generate(128, galois=True)
    values = np.linspace(-0.5, 0.5, keys.slots)
    a, b = keys.encrypt(values), keys.encrypt(values[::-1])
    add = _rate(lambda: a + b, budget_s=budget_s)
    mul = _rate(lambda: a * b, budget_s=budget_s)
    rotate = _rate(lambda: a.sum(), math.log2(keys.slots), budget_s)
    return add, mul, rotate


def _liu(budget_s: float) -> tuple[float, float]:
    import numpy as np

    from dms.mining.schemes.liu import LiuKey, add

    key = LiuKey.generate(128)
    values = np.linspace(-100.0, 100.0, 10_000)
    c = key.encrypt(values)
    return (
        _rate(lambda: key.encrypt(values), values.size, budget_s),
        _rate(lambda: add(c, c), values.size, budget_s),
    )


def run_benchmark(
    folder: Path, progress: Progress | None = None, step_s: float = STEP_S
) -> Capability:
    """Measure this machine; ``folder`` is where the disk test writes (the node's home),
    ``step_s`` the time each measurement takes (the ``benchmark_step_s`` setting)."""
    steps = ["cpu", "memory", "disk", "ckks", "liu"]
    tell = progress or (lambda _name, _i, _n: None)
    started, wall = time.perf_counter(), time.time()
    cores = os.cpu_count() or 1
    tell(steps[0], 0, len(steps))
    single, every = _cpu(cores, step_s)
    tell(steps[1], 1, len(steps))
    memory = _memory(step_s)
    tell(steps[2], 2, len(steps))
    write, read = _disk(folder)
    tell(steps[3], 3, len(steps))
    ckks_add, ckks_mul, ckks_rotate = _ckks(step_s)
    tell(steps[4], 4, len(steps))
    liu_encrypt, liu_add = _liu(step_s)
    tell("done", 5, len(steps))
    return Capability(
        measured_at=wall,
        seconds=round(time.perf_counter() - started, 3),
        cores=cores,
        cpu_single_mops=single,
        cpu_all_mops=every,
        memory_gbps=memory,
        disk_write_mbps=write,
        disk_read_mbps=read,
        ckks_add_per_s=ckks_add,
        ckks_mul_per_s=ckks_mul,
        ckks_rotate_per_s=ckks_rotate,
        liu_encrypt_per_s=liu_encrypt,
        liu_add_per_s=liu_add,
    )
