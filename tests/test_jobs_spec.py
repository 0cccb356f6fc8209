"""Job files: errors name the field and the line; the CLI says so in one line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from dms.jobs.spec import JobSpecError, load_spec, parse_spec
from dms.orchestrator.messages import Bid, Offer
from dms.orchestrator.selection import Candidate, RoundRobin, select
from tests.clitools import dms

GOOD = """\
name: demo
strategy: two-choices
allocations:
  - name: w
    executor: compute
    count: 2
    resources: {cpu: 500m, ram: 256MiB}
    params: {seconds: 1}
"""


def test_a_good_file_expands_counts_into_named_slots() -> None:
    spec = parse_spec(GOOD)
    assert [name for name, _ in spec.slots()] == ["w.0", "w.1"]
    assert spec.allocations[0].resources.cpu_milli == 500


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("500m", "lots"), "allocations.0.resources (line 7): cpu: 'lots' is not a number"),
        (("two-choices", "best"), "strategy (line 2): Input should be 'score'"),
        (("count: 2", "count: 0"), "allocations.0.count (line 6): Input should be greater"),
        (("params", "parms"), "allocations.0.parms (line 8): Extra inputs are not permitted"),
        (("name: w", "name: 'w x'"), "allocations.0.name (line 4): String should match"),
        (("{cpu: 500m, ram: 256MiB}", "{cpu: 0}"), "(line 7): an allocation needs some cpu"),
        # An unknown key with a block under it: the key's line, not the block's (said 9).
        (
            ("    params:", "    colour:\n      shade: blue\n    params:"),
            "allocations.0.colour (line 8): Extra inputs are not permitted",
        ),
    ],
)
def test_errors_name_the_field_and_line(change: tuple[str, str], expected: str) -> None:
    with pytest.raises(JobSpecError) as err:
        parse_spec(GOOD.replace(*change), "job.yaml")
    assert expected in str(err.value)


def test_json_files_and_broken_files(tmp_path: Path) -> None:
    good = tmp_path / "job.json"
    good.write_text(json.dumps({"allocations": [{"name": "a", "executor": "compute",
                                                 "resources": {"cpu": 1}}]}))  # fmt: skip
    assert load_spec(good).allocations[0].resources.cpu_milli == 1000
    broken = tmp_path / "broken.yaml"
    broken.write_text("allocations: [\n")
    with pytest.raises(JobSpecError, match=r"broken.yaml \(line 2\): not valid YAML or JSON"):
        load_spec(broken)
    with pytest.raises(JobSpecError, match="no such file"):
        load_spec(tmp_path / "missing.yaml")


def test_dms_job_validate(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(GOOD)
    bad.write_text(GOOD.replace("count: 2", "count: -1"))
    done = dms(tmp_path, "job", "validate", str(good), "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["valid"] is True
    done = dms(tmp_path, "job", "validate", str(bad))
    assert done.returncode == 1 and "allocations.0.count (line 6)" in done.stderr
    assert "Traceback" not in done.stderr and done.stderr.strip().count("\n") == 0


def test_dms_job_validate_lists_every_problem_and_says_so_in_json(tmp_path: Path) -> None:
    """A misspelt key and a wrong strategy: validate names both (it said 'Field required
    (and 1 more)'), and --json says {"valid": false} with them (it printed nothing). The
    misspelt key is said at its own line (3), not its list's (4: pointing past it)."""
    bad, empty = tmp_path / "bad.yaml", tmp_path / "empty.yaml"
    bad.write_text(GOOD.replace("allocations:", "allocatoins:").replace("two-choices", "best"))
    empty.write_text("")
    done = dms(tmp_path, "job", "validate", str(bad), "--json")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    answer = json.loads(done.stdout)
    assert answer["valid"] is False and len(answer["errors"]) == 3, answer
    said = done.stderr.splitlines()
    assert len(said) == 3 and all(line.startswith(f"error: {bad}: ") for line in said), said
    for problem in ("allocations (line 1): Field required", "strategy (line 2): Input should",
                    "allocatoins (line 3): Extra inputs are not permitted"):  # fmt: skip
        assert any(problem in line for line in answer["errors"]), (problem, answer)
        assert any(problem in line for line in said), (problem, said)
    done = dms(tmp_path, "job", "validate", str(empty), "--json")
    assert json.loads(done.stdout) == {
        "valid": False,
        "errors": [f"{empty}: expected a mapping with 'allocations', got an empty file"],
    }


def test_dms_deploy_lists_every_problem_of_its_job_file_as_validate_does(tmp_path: Path) -> None:
    """``dms deploy`` of a file with three mistakes named the first "(and 2 more)", and
    the user ran ``dms job validate`` to see the others; it lists them as validate does,
    --json too, before it asks any node (none runs here)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("allocations:", "allocatoins:").replace("two-choices", "best"))
    checked = dms(tmp_path, "job", "validate", str(bad), "--json")
    for args in (["deploy", str(bad)], ["deploy", str(bad), "--follow"]):
        done = dms(tmp_path, *args)
        assert done.returncode == 1 and not done.stdout and "Traceback" not in done.stderr, done
        assert done.stderr == checked.stderr and "more)" not in done.stderr, done.stderr
        assert len(done.stderr.splitlines()) == 3, done.stderr
    done = dms(tmp_path, "deploy", str(bad), "--json")
    assert done.returncode == 1 and json.loads(done.stdout) == json.loads(checked.stdout)
    assert json.loads(done.stdout)["valid"] is False and done.stderr == checked.stderr


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("seconds: 1", "secnds: 1"),
         "allocations.0.params.secnds (line 8): allocation 'w': compute params: secnds: Extra"),
        (("seconds: 1", "seconds: -1"), "allocations.0.params.seconds (line 8): allocation 'w'"),
        (("executor: compute", "executor: comptue"),
         "allocations.0.executor (line 5): allocation 'w': unknown executor 'comptue' (known: "),
        (("executor: compute", "executor: mining"),
         "allocations.0.params.algorithm (line 8): allocation 'w': mining params: algorithm: "),
    ],
)  # fmt: skip
def test_params_the_executor_rejects_fail_at_validate(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    with pytest.raises(JobSpecError) as err:
        parse_spec(GOOD.replace(*change), "job.yaml")
    assert str(err.value).startswith(f"job.yaml: {expected}")
    job = tmp_path / "job.yaml"
    job.write_text(GOOD.replace(*change))
    done = dms(tmp_path, "job", "validate", str(job))
    assert done.returncode == 1 and expected in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("executor", "params"),
    [
        ("compute", ["seconds: 1"]),
        ("mining", ["algorithm: skmeans", "scheme: ckks", "k: 3", "n: 50", "a: 8"]),
    ],
)
def test_an_unknown_param_with_a_block_under_it_is_said_at_its_key(
    executor: str, params: list[str]
) -> None:
    """A misspelt param, the commonest unknown key of a job file, with a block under it:
    said at the key's line (9), as every other unknown key is, not at the block's (10:
    c0b6dc6 left the executors' params out)."""
    block = "".join(f"\n      {line}" for line in ["colour:", "  shade: blue", *params])
    job = GOOD.replace("executor: compute", f"executor: {executor}")
    job = job.replace(" {seconds: 1}", block)
    with pytest.raises(JobSpecError) as err:
        parse_spec(job, "job.yaml")
    said = str(err.value)
    assert said.startswith("job.yaml: allocations.0.params.colour (line 9): "), said
    assert said.endswith("colour: Extra inputs are not permitted"), said


def test_a_mining_job_too_large_for_its_ram_fails_at_validate_naming_the_ram() -> None:
    params = "{algorithm: skmeans, scheme: ckks, k: 3, n: 5000000, a: 8}"
    job = GOOD.replace("executor: compute", "executor: mining").replace("{seconds: 1}", params)
    with pytest.raises(
        JobSpecError,
        match=r"allocations.0.resources.ram \(line 7\): allocation "
        r"'w': this job needs about \d+ MiB of memory; the lease holds 256 MiB",
    ):
        parse_spec(job, "job.yaml")  # fmt: skip


def _bid(peer: str, free_cpu: float, price: float = 0.0, cpu_score: float = 0.0) -> Candidate:
    bid = Bid(
        deployment_id="d",
        peer_id=peer,
        did="did:key:x",
        price=price,
        scores={"cpu_single_mops": cpu_score} if cpu_score else {},
        free={"cpu": free_cpu, "ram_gib": 1, "disk_gib": 1, "gpu": 0},
        onboarded={"cpu": 4, "ram_gib": 1, "disk_gib": 1, "gpu": 0},
    )
    return Candidate(bid, Offer(slot="w", lease_id=f"lease-{peer}", price=price, expires_at=0))


@pytest.mark.parametrize("strategy", ["score", "round-robin", "first-offer", "random"])
def test_a_peer_that_offered_a_slot_twice_wins_it_with_the_winners_reason(strategy: str) -> None:
    """A provider that answered one bid request twice (a worker slot's deployment read
    'worker.2: chose EAKjhBsL (lost: tied at 0.317, lower peer id wins)'): its second
    offer lost, and that loss was the reason written for the peer, who had won."""
    first = _bid("a", 1.0)
    second = Candidate(first.bid, Offer(slot="w", lease_id="lease-a-2", price=0.0, expires_at=0))
    decision = select(strategy, {"w": [first, second]}, random.Random(1), RoundRobin())
    assert decision.winners["w"].peer_id == "a"
    assert decision.reasons[("a", "w")].startswith("won: "), decision.reasons


def test_score_prefers_free_capacity_speed_and_low_price_deterministically() -> None:
    offers = {"w": [_bid("b", 1.0), _bid("a", 3.0), _bid("c", 3.0, price=5.0)]}
    decision = select("score", offers, random.Random(1), RoundRobin())
    assert decision.winners["w"].peer_id == "a"
    assert decision.reasons[("b", "w")].startswith("lost: score")
    tie = {"w": [_bid("z", 2.0), _bid("y", 2.0)]}
    assert select("score", tie, random.Random(), RoundRobin()).winners["w"].peer_id == "y"
    faster = {"w": [_bid("a", 2.0, cpu_score=50), _bid("b", 2.0, cpu_score=100)]}
    assert select("score", faster, random.Random(), RoundRobin()).winners["w"].peer_id == "b"


def test_round_robin_cycles_and_two_choices_takes_the_freer_of_the_pair() -> None:
    cursor = RoundRobin()
    offers = {"w": [_bid("a", 1), _bid("b", 1), _bid("c", 1)]}
    picks = [select("round-robin", offers, random.Random(), cursor).winners["w"].peer_id
             for _ in range(4)]  # fmt: skip
    assert picks == ["a", "b", "c", "a"]
    pair = {"w": [_bid("a", 0.5), _bid("b", 3.5)]}
    assert select("two-choices", pair, random.Random(3), cursor).winners["w"].peer_id == "b"
