"""The README's "Mining on other nodes" section, run as written: its fenced blocks,
in order, in one shell, against real daemons (HOME is a temporary folder, so
``~/.dms-*`` lands there; its fixed ports are swapped for free ones, since other
tests may hold those). About a minute: three (shortened) benchmarks, four daemons, one job."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.clitools import BENCHMARK_STEP_S, free_ports

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Mining on other nodes"


def section_blocks(readme: str, heading: str) -> list[str]:
    """The ```sh blocks between ``heading`` and the next heading (of any level: a
    subsection is another story, with commands of its own)."""
    lines = readme[readme.index(heading) :].splitlines()[1:]
    blocks: list[str] = []
    block: list[str] | None = None
    for line in lines:
        if block is not None:
            if line.startswith("```"):
                blocks.append("\n".join(block) + "\n")
                block = None
            else:
                block.append(line)
        elif line.startswith("```sh"):
            block = []
        elif line.startswith("#"):
            break
    return blocks


def stop_every_node(home_root: Path) -> None:
    """By each node's own pid (api.json): nothing outlives the test."""
    for api in home_root.glob(".dms-*/api.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            os.kill(json.loads(api.read_text())["pid"], signal.SIGTERM)


@pytest.mark.readme
def test_the_three_provider_section_runs_as_written(tmp_path: Path) -> None:
    blocks = section_blocks((ROOT / "README.md").read_text(), SECTION)
    assert len(blocks) >= 3, "the section lost its commands"
    script = "\n".join(blocks)
    fixed = sorted(set(re.findall(r"\b(4\d\d\d|99\d\d)\b", script)))
    assert fixed, "no ports found to swap"
    for old, new in zip(fixed, free_ports(len(fixed)), strict=True):
        script = re.sub(rf"\b{old}\b", str(new), script)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMS_")}
    env.update(
        HOME=str(tmp_path),
        DMS_BENCHMARK_STEP_S=BENCHMARK_STEP_S,  # as in every test but test_onboarding's
        COLUMNS="80",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    try:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        stop_every_node(tmp_path)
    said = done.stdout + done.stderr
    assert done.returncode == 0, said
    assert "Traceback" not in said, said
    result = json.loads((tmp_path / "out" / "placed" / "result.json").read_text())
    placed = {shard["peer_id"] for shard in result["placement"]}
    assert len(placed) == 2, result["placement"]  # two providers, the third a spare
    assert said.count("dms node running in the background") == 4, said
    assert said.count("dms node stopped") == 4, said
    assert not list(tmp_path.glob(".dms-*/api.json")), "a node still runs"
