"""Stamps for ``bench/placement.py --placements``: where the slowest placements went.

Put this folder first on ``PYTHONPATH`` and set ``PLACETRACE`` to a folder: every
Python process started with them (the bench's requester and every provider daemon,
which inherit the environment) appends ``PID.jsonl`` there, one JSON list a stamp,
``[start (time.time()), ms, what, thread, extra]``:

- ``gc``: each collection over 0.3 ms and every full one; extra: generation, objects
  freed, ms of the thread's CPU;
- ``bid_request``, ``allocate``, ``revert``: the provider's handlers;
- ``round``, ``bid_reply``, ``close``: the requester's bid rounds;
- ``tx``: each ``Database.transaction``; ``deliver``, ``send``: each frame in and out;
- ``publish``: a gossip publish (heartbeats); ``hbsync.*``: the heartbeat sync's calls
  over 0.5 ms; ``peerbook.remember``.

``bench/tail/slowest.py`` reads them beside the placements file. Bench-only: nothing
here is imported unless ``PLACETRACE`` is set (specs/orchestration.md, "Seventh pass:
the tail")."""

from __future__ import annotations

import os

if os.environ.get("PLACETRACE"):
    import atexit
    import contextlib
    import functools
    import gc
    import importlib.abc
    import importlib.machinery
    import json
    import sys
    import threading
    import time
    from collections.abc import Callable, Iterator
    from typing import Any

    FOLDER = os.environ["PLACETRACE"]
    STAMPS: list[tuple[Any, ...]] = []
    LOCK = threading.Lock()

    def stamp(what: str, start: float, took_s: float, extra: Any = None) -> None:
        thread = threading.current_thread().name
        STAMPS.append((start, round(took_s * 1000, 3), what, thread, extra))

    def flush() -> None:
        with LOCK:
            out = STAMPS[:]
            del STAMPS[: len(out)]  # what was appended meanwhile stays
        if out:
            with open(os.path.join(FOLDER, f"{os.getpid()}.jsonl"), "a") as f:
                f.writelines(json.dumps(s) + "\n" for s in out)

    def flusher() -> None:
        while True:
            time.sleep(0.5)
            flush()

    threading.Thread(target=flusher, daemon=True, name="tail-flush").start()
    atexit.register(flush)

    began = [0.0, 0.0]

    def collected(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            began[:] = [time.time(), time.thread_time()]
            return
        took = time.time() - began[0]
        if took > 0.0003 or info.get("generation") == 2:
            cpu = round((time.thread_time() - began[1]) * 1000, 3)
            stamp("gc", began[0], took, [info.get("generation"), info.get("collected"), cpu])

    gc.callbacks.append(collected)

    def timed(cls: Any, name: str, what: str, least_s: float = 0.0, cm: bool = False) -> None:
        fn = getattr(cls, name)
        if cm:

            @contextlib.contextmanager
            def wrapped_cm(*args: Any, **kw: Any) -> Iterator[Any]:
                t = time.time()
                try:
                    with fn(*args, **kw) as value:
                        yield value
                finally:
                    stamp(what, t, time.time() - t)

            setattr(cls, name, wrapped_cm)
            return

        @functools.wraps(fn)
        def wrapped(*args: Any, **kw: Any) -> Any:
            t = time.time()
            try:
                return fn(*args, **kw)
            finally:
                took = time.time() - t
                if took >= least_s:
                    stamp(what, t, took)

        setattr(cls, name, wrapped)

    def patch(name: str, module: Any) -> None:
        if name == "dms.store.db":
            timed(module.Database, "transaction", "tx", cm=True)
        elif name == "dms.provider.bidding":
            timed(module.Bidding, "_bid_request", "bid_request")
            timed(module.Bidding, "_allocate", "allocate")
            timed(module.Bidding, "revert", "revert")
        elif name == "dms.orchestrator.rounds":
            timed(module.BidRounds, "_round", "round")
            timed(module.BidRounds, "_on_bid_reply", "bid_reply")
            timed(module.BidRounds, "_close", "close")
        elif name == "dms.network.unicast":
            timed(module.Unicast, "_deliver", "deliver")
            timed(module.Unicast, "send", "send")
        elif name == "dms.network.gossip":
            timed(module.Gossip, "publish", "publish")
        elif name == "dms.network.peerbook":
            timed(module.PeerBook, "remember", "peerbook.remember")
        elif name == "dms.node.heartbeat_sync":
            for attr, value in vars(module.HeartbeatSync).items():
                if callable(value) and not attr.startswith("__"):
                    timed(module.HeartbeatSync, attr, f"hbsync.{attr}", least_s=0.0005)

    WANTED = {
        "dms.store.db",
        "dms.provider.bidding",
        "dms.orchestrator.rounds",
        "dms.network.unicast",
        "dms.network.gossip",
        "dms.network.peerbook",
        "dms.node.heartbeat_sync",
    }

    class Patcher(importlib.abc.MetaPathFinder):
        """Patches each wanted module as it is first imported."""

        def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
            if fullname not in WANTED:
                return None
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is None or spec.loader is None:
                return spec
            run: Callable[[Any], None] = spec.loader.exec_module  # type: ignore[attr-defined]

            def exec_module(module: Any) -> None:
                run(module)
                patch(fullname, module)

            spec.loader.exec_module = exec_module  # type: ignore[method-assign]
            return spec

    sys.meta_path.insert(0, Patcher())
