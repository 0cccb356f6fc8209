"""``compute``: the built-in test workload. It sleeps or keeps one core busy for a
bounded time, then returns a small result; ``fail`` makes it fail with that message
(for failure handling tests)."""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dms.errors import EXTRA_KEY
from dms.jobs.base import ExecutorError, Log, register_executor
from dms.resources import Resources


class ComputeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["sleep", "cpu"] = "sleep"
    seconds: float = Field(default=0.0, ge=0, le=3600)
    fail: str | None = Field(default=None, max_length=512)


@register_executor
class ComputeExecutor:
    kind = "compute"

    def _params(self, params: dict[str, Any]) -> ComputeParams:
        try:
            return ComputeParams.model_validate(params)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ExecutorError(
                f"compute params: {where}: {err['msg']}",
                field=f"params.{where}",
                key=err["type"] == EXTRA_KEY,
            ) from None

    def check(self, params: dict[str, Any], resources: Resources | None = None) -> None:
        self._params(params)

    def run(self, params: dict[str, Any], stop: threading.Event, log: Log) -> Any:
        p = self._params(params)
        log(f"compute: {p.mode} for {p.seconds:g} s")
        started = time.monotonic()
        rounds = 0
        if p.mode == "sleep":
            stop.wait(p.seconds)
        else:
            digest = b"dms"
            while time.monotonic() - started < p.seconds and not stop.is_set():
                for _ in range(1000):
                    digest = hashlib.sha256(digest).digest()
                rounds += 1
        if stop.is_set():
            raise ExecutorError("stopped")
        if p.fail:
            raise ExecutorError(p.fail)
        elapsed = round(time.monotonic() - started, 3)
        log(f"compute: done in {elapsed:g} s")
        return {"mode": p.mode, "seconds": elapsed, "rounds": rounds}
