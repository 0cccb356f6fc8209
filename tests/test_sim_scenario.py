"""Scenario files (dms sim run): every mistake names its field and its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from dms.sim.scenario import ScenarioError, load_scenario, parse_rate, parse_scenario

EXAMPLES = sorted(Path("examples/sim").glob("*.yaml"))
IRIS = Path("examples/iris-features.csv").resolve()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_scenario_loads(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.nodes and scenario.timeline


def test_relative_paths_are_read_from_the_scenarios_folder() -> None:
    scenario = load_scenario(Path("examples/sim/quickstart.yaml"))
    mine = next(s.mine for s in scenario.timeline if s.mine is not None)
    assert mine.data == str(IRIS)


BAD = [
    ("nodes: [{name: owner, count: 0}]", "nodes.0.count (line 1)", "greater than or equal to 1"),
    (
        "nodes:\n  - name: p\n    onboard: {cpu: lots, ram: 1, disk: 1}\n",
        "nodes.0.onboard.cpu (line 3)",
        "'lots' is not a number",
    ),
    (
        "nodes: [{name: a}]\ntimeline:\n  - kill: b\n",
        "timeline.0.kill.node (line 3)",
        "no node 'b'",
    ),
    (
        "nodes: [{name: a}]\ntimeline:\n  - {kill: a, heal: true}\n",
        "timeline.0 (line 3)",
        "a step takes one of",
    ),
    (
        "nodes: [{name: a}]\ntimeline:\n  - wait: {job: nope}\n",
        "timeline.0.wait.job (line 3)",
        "no job 'nope' before this step",
    ),
    (
        "nodes: [{name: a}, {name: b}]\ntimeline:\n  - partition: [[a], [b, a]]\n",
        "timeline.0.partition.1.1 (line 3)",
        "a is on both sides",
    ),
    (
        "nodes: [{name: a}, {name: b}]\ntimeline:\n"
        "  - link: {between: [a, b], bandwidth: 3 parsecs}\n",
        "timeline.0.link.bandwidth (line 3)",
        "not a rate",
    ),
    (
        "nodes: [{name: a}]\ntimeline:\n  - deploy: {name: d, job: missing.yaml}\n",
        "timeline.0.deploy.job (line 3)",
        "no such file",
    ),
    (
        "nodes: [{name: a}]\ntimeline:\n  - mine: {name: m, algorithm: sknn, k: 3, data: x.csv}\n",
        "timeline.0.mine (line 3)",
        "sknn takes 'train' and 'test'",
    ),
    (
        "nodes: [{name: a}, {name: a}]",
        "nodes (line 1)",
        "node names must be unique: a",
    ),
    ("nodes: [{name: a}]\nexpect: {placement_p50: 3}\n", "expect.placement_p50", "Extra inputs"),
    # An unknown key with a block under it: the key's line, not the block's (said line 4).
    (
        "nodes: [{name: a}]\nexpect:\n  placement_p50:\n    - 3\n",
        "expect.placement_p50 (line 3)",
        "Extra inputs",
    ),
    ("nodes: [a, b", "(line 1)", "not valid YAML"),
]


@pytest.mark.parametrize(("text", "where", "what"), BAD)
def test_a_bad_scenario_names_the_field_and_the_line(text: str, where: str, what: str) -> None:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(text, "s.yaml", Path("."))
    message = str(caught.value)
    assert message.startswith("s.yaml")
    assert where in message and what in message
    assert "\n" not in message


def test_memory_mode_refuses_mining_and_says_why() -> None:
    mine = f"{{name: m, algorithm: skmeans, k: 3, data: {IRIS}}}"
    text = f"mode: memory\nnodes: [{{name: a}}]\ntimeline:\n  - mine: {mine}\n"
    with pytest.raises(ScenarioError, match=r"timeline.0.mine \(line 4\): mining needs libp2p"):
        parse_scenario(text, "s.yaml")
    # The same file in threads mode is fine, and --mode overrides the file's mode.
    assert parse_scenario(text, "s.yaml", mode="threads").mode == "threads"


def test_rates_take_the_units_people_write() -> None:
    assert parse_rate("1MB/s") == 1e6
    assert parse_rate("512KiB/s") == 512 * 1024
    assert parse_rate("10Mbit/s") == 10e6 / 8
    assert parse_rate(2000) == 2000.0
    for bad in ("fast", "0MB/s", "1 MB"):
        with pytest.raises(ValueError):
            parse_rate(bad)
