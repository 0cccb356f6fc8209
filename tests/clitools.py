"""Running ``dms`` as a user does: subprocesses with their own DMS_HOME."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

PASSPHRASE = "correct horse battery staple"


def env_for(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMS_")}
    env.update(DMS_HOME=str(home), DMS_PASSPHRASE=PASSPHRASE)
    return env


def dms(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dms", *args],
        env=env_for(home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dms_json(home: Path, *args: str) -> Any:
    done = dms(home, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class Daemon:
    def __init__(self, home: Path, *extra: str) -> None:
        self.home = home
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dms",
                "run",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--api-port",
                "0",
                "--json",
                *extra,
            ],
            env=env_for(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read() if self.proc.stderr else "no output"
        self.info = json.loads(line)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as after a crash or power loss."""
        self.proc.kill()
        self.proc.wait(timeout=20)
