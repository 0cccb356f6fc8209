"""Resource ledger transitions per second on SQLite, against a bare SQLite baseline.

``lock_commit_release_per_s``: one caller runs lock -> commit -> release cycles;
each step is one ledger transition (one ``BEGIN IMMEDIATE`` transaction).
``concurrent_lock_per_s``: 4 threads ask for small leases at once against a pool
they run dry; every lock decision (granted, or refused because the pool is
full, after which the thread releases its oldest lease) is one transaction and
counts. ``concurrent_transitions_per_s`` adds those releases. ``oversubscriptions``
counts every moment an auditor thread saw locked + allocated exceed onboarded
(must be 0).
The baseline, measured in the same run on the same kind of file, is a bare
``sqlite3`` write transaction (BEGIN IMMEDIATE, one INSERT, COMMIT) with the
same pragmas: the floor any transactional ledger on SQLite pays.
Prints one JSON line with --json.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

from dms.resources import ResourceError, ResourceLedger, Resources
from dms.store import open_database

SMALL = Resources(cpu_milli=100, ram_mib=64)


def bare_sqlite_tx_per_s(path: Path, n: int) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    start = time.perf_counter()
    for i in range(n):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (v) VALUES (?)", (str(i),))
        conn.execute("COMMIT")
    rate = n / (time.perf_counter() - start)
    conn.close()
    return rate


def sequential(ledger: ResourceLedger, cycles: int) -> float:
    start = time.perf_counter()
    for _ in range(cycles):
        lease = ledger.lock(SMALL, lease_s=30)
        ledger.commit(lease.id)
        ledger.release(lease.id)
    return 3 * cycles / (time.perf_counter() - start)


def concurrent(
    ledger: ResourceLedger, per_thread: int, threads: int = 4
) -> tuple[float, float, int, int]:
    """Lock decisions/s and transitions/s over all threads, oversubscriptions seen,
    locks refused (pool full)."""
    stop = threading.Event()
    oversubscriptions = 0
    refused = [0] * threads
    done = [0] * threads
    released = [0] * threads

    def audit() -> None:
        nonlocal oversubscriptions
        while not stop.is_set():
            if ledger.pools().violations():
                oversubscriptions += 1
            time.sleep(0.005)

    def work(index: int) -> None:
        held: list[str] = []
        for _ in range(per_thread):
            try:
                held.append(ledger.lock(SMALL, lease_s=30).id)
                done[index] += 1
            except ResourceError:
                refused[index] += 1
                if held:
                    ledger.release(held.pop(0))  # give back the oldest and go on
                    released[index] += 1

    auditor = threading.Thread(target=audit)
    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    auditor.start()
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    stop.set()
    auditor.join()
    if ledger.pools().violations():
        oversubscriptions += 1
    decisions = sum(done) + sum(refused)
    return (
        decisions / elapsed,
        (decisions + sum(released)) / elapsed,
        oversubscriptions,
        sum(refused),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=1000, help="sequential cycles")
    parser.add_argument("--locks", type=int, default=500, help="locks per thread")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        baseline = bare_sqlite_tx_per_s(Path(folder) / "bare.db", 3 * args.cycles)
        db = open_database(f"sqlite:///{folder}/dms.db")
        ledger = ResourceLedger(db)
        # Room for 20 small leases: the 4 threads run the pool dry and must be refused.
        ledger.onboard(Resources(cpu=2, ram=8, disk=1))
        sequential(ledger, 20)  # warm up
        seq = sequential(ledger, args.cycles)
        conc, transitions, oversubscriptions, refused = concurrent(ledger, args.locks)
        db.close()

    figures = {
        "bench": "resources",
        "lock_commit_release_per_s": round(seq, 1),
        "concurrent_lock_per_s": round(conc, 1),
        "concurrent_transitions_per_s": round(transitions, 1),
        "oversubscriptions": oversubscriptions,
        "refused_when_full": refused,
        "bare_sqlite_tx_per_s": round(baseline, 1),
        "ratio_to_bare": round(baseline / seq, 2),
        "threads": 4,
        "cycles": args.cycles,
    }
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:>26}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
