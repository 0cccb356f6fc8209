"""Job specs: a deployment of one or more allocations, loaded from YAML or JSON.

A mistake in a file is a :class:`JobSpecError` that names the field and the
line it is on (``allocations.0.resources.cpu (line 7): ...``): the file is
read by ``dms.yamlfile``, which keeps each value's line, and JSON is
read the same way (JSON is YAML for this purpose). A file that parses is then
checked as every provider will check it: each allocation's executor must exist
and accept its params within its resources (``executor_problems``), so a typo
in ``params`` fails here, not after a deployment has asked the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dms.errors import DmsError
from dms.jobs.executors import ExecutorError, check_allocation
from dms.resources import Resources
from dms.yamlfile import EXTRA_KEY, LinedYaml, parse_lined

Strategy = Literal["score", "round-robin", "two-choices", "random", "first-offer"]
STRATEGIES: tuple[str, ...] = ("score", "round-robin", "two-choices", "random", "first-offer")
MAX_SLOTS = 256
# The longest a deployment may take to be running: a placed mining job's timeout_s (dms
# mine --timeout, checked by the CLI before it sends the job) and a collaboration's are
# its deadline.
MAX_DEADLINE_S = 7 * 24 * 3600


class JobSpecError(DmsError):
    """A job file that cannot be used, with the field and line at fault: the first
    problem in the message, every one in ``problems`` (``dms job validate`` lists them)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class Constraints(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_peers: list[str] = Field(default_factory=list, description="only these peer ids")
    exclude_peers: list[str] = Field(default_factory=list, description="never these peer ids")
    labels: list[str] = Field(default_factory=list, description="labels a node must have")
    min_scores: dict[str, float] = Field(
        default_factory=dict, description="lowest benchmark scores accepted, by name"
    )
    max_price: float | None = Field(default=None, ge=0, description="most the job pays")


class AllocationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    executor: str = Field(min_length=1, max_length=64)
    resources: Resources
    count: int = Field(default=1, ge=1, le=MAX_SLOTS)
    params: dict[str, Any] = Field(default_factory=dict)
    constraints: Constraints = Field(default_factory=Constraints)

    @field_validator("resources")
    @classmethod
    def _some(cls, value: Resources) -> Resources:
        if value.is_zero():
            raise ValueError("an allocation needs some cpu, ram or disk")
        return value


class DeploymentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="deployment", min_length=1, max_length=128)
    allocations: list[AllocationSpec] = Field(min_length=1)
    strategy: Strategy = "score"
    deadline_s: float = Field(default=60.0, gt=0, le=MAX_DEADLINE_S, description="to be running")
    bid_window_s: float = Field(default=0.25, gt=0, le=30, description="longest wait for bids")
    lease_s: float = Field(default=10.0, gt=0, le=600, description="how long a bid holds")
    distinct_peers: bool = Field(
        default=False, description="each allocation on a peer of its own, when enough bid"
    )

    @field_validator("allocations")
    @classmethod
    def _unique(cls, value: list[AllocationSpec]) -> list[AllocationSpec]:
        names = [a.name for a in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"allocation names must be unique: {', '.join(duplicates)}")
        if sum(a.count for a in value) > MAX_SLOTS:
            raise ValueError(f"at most {MAX_SLOTS} allocations in all")
        return value

    def slots(self) -> list[tuple[str, AllocationSpec]]:
        """Each allocation repeated ``count`` times, named ``name`` or ``name.i``."""
        out = []
        for spec in self.allocations:
            if spec.count == 1:
                out.append((spec.name, spec))
            else:
                out.extend((f"{spec.name}.{i}", spec) for i in range(spec.count))
        return out


class JobProblem(NamedTuple):
    """A problem of a job file (a field, or an allocation its executor refuses): where
    (``allocations.0.params.secnds``) and why."""

    loc: tuple[int | str, ...]
    message: str
    key: bool = False  # the key at ``loc`` is the problem (unknown): said at its line

    @property
    def field(self) -> str:
        return ".".join(str(p) for p in self.loc)

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def executor_problems(spec: DeploymentSpec) -> list[JobProblem]:
    """Each allocation whose executor is unknown here, or rejects its params (within its
    resources): a job no retry would place, caught before anything is asked of a peer."""
    problems = []
    for i, alloc in enumerate(spec.allocations):
        try:
            check_allocation(alloc.executor, alloc.params, alloc.resources)
        except ExecutorError as exc:
            parts = (exc.field or "params").split(".")
            loc = ("allocations", i, *(int(p) if p.isdigit() else p for p in parts))
            problems.append(JobProblem(loc, f"allocation {alloc.name!r}: {exc.message}", exc.key))
    return problems


def parse_spec(text: str, source: str = "job file") -> DeploymentSpec:
    doc = parse_lined(text, source, JobSpecError)
    data = doc.data
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise JobSpecError(f"{source}: expected a mapping with 'allocations', got {got}")
    try:
        spec = DeploymentSpec.model_validate(data)
    except ValidationError as exc:
        found = [
            JobProblem(
                tuple(p for p in e["loc"] if not str(p).startswith("function-")),
                e["msg"].removeprefix("Value error, "),
                key=e["type"] == EXTRA_KEY,
            )
            for e in exc.errors()
        ]
        raise _spec_error(doc, found) from None
    problems = executor_problems(spec)
    if problems:
        raise _spec_error(doc, problems)
    return spec


def _spec_error(doc: LinedYaml, problems: list[JobProblem]) -> JobSpecError:
    first = problems[0]
    return JobSpecError(
        doc.message(first.loc, first.message, len(problems) - 1, first.key),
        [doc.message(p.loc, p.message, key=p.key) for p in problems],
    )


def load_spec(path: Path) -> DeploymentSpec:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise JobSpecError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobSpecError(f"{path}: cannot read: {exc}") from None
    return parse_spec(text, str(path))
