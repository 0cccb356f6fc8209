"""Scenario files: a simulated network's nodes, a timeline of what happens to it, and
what is expected at the end (``dms sim run FILE``; ``specs/sim.md``).

A scenario is YAML or JSON. A mistake names the field and its line, as job files
do (``dms.jobs.spec``): ``quick.yaml: timeline.2.kill (line 14): no node or
group 'provider-9'``. Paths (job files, CSV data) are relative to the scenario's
own folder, and are read when the file is loaded, so a missing file is reported
before any node starts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dms.errors import DmsError
from dms.jobs.spec import DeploymentSpec, JobSpecError, Strategy, load_spec
from dms.mining.settings import CLUSTERING, MiningSettings
from dms.resources import Preferences
from dms.resources.amounts import parse_cpu, parse_size
from dms.yamlfile import EXTRA_KEY, data_loc, parse_lined

Mode = Literal["threads", "processes", "memory", "netns"]
MODES: tuple[str, ...] = ("threads", "processes", "memory", "netns")
MAX_NETNS_NODES = 40  # netns mode: two namespaces and a dms process a NATed node
NAME = r"^[a-z][a-z0-9_]*(-[a-z0-9_]+)*$"
MAX_NODES = 2000
MINING_NEEDS_LIBP2P = (
    "mining needs libp2p (its data travels as chunks on a stream protocol of their own): "
    "use mode threads or processes"
)
KIND_NAMES = {"mine": "a mining job", "collab": "a collaboration"}
# The node actions a step can take, in the order they are documented.
ACTIONS = (
    "deploy",
    "mine",
    "collab",
    "wait",
    "kill",
    "restart",
    "onboard",
    "offboard",
    "partition",
    "link",
    "heal",
)


class ScenarioError(DmsError):
    """A scenario file that cannot be used, with the field and line at fault."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Amounts(_Model):
    """What a node contributes, as ``dms onboard`` takes it."""

    cpu: str | float
    ram: str | float
    disk: str | float
    price: float = Field(default=0.0, ge=0)

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, value: str | float) -> str | float:
        if parse_cpu(value) <= 0:
            raise ValueError("must be more than zero")
        return value

    @field_validator("ram", "disk")
    @classmethod
    def _size(cls, value: str | float) -> str | float:
        if parse_size(value) <= 0:
            raise ValueError("must be more than zero")
        return value

    def request(self) -> dict[str, Any]:
        return {"cpu": self.cpu, "ram": self.ram, "disk": self.disk, "price": self.price}


class NodeGroup(_Model):
    """``count`` nodes alike: ``name`` alone, or ``name-1`` .. ``name-<count>``."""

    name: str = Field(pattern=NAME, max_length=32)
    count: int = Field(default=1, ge=1, le=MAX_NODES)
    onboard: Amounts | None = Field(default=None, description="none: takes no work")
    labels: list[str] = Field(default_factory=list, max_length=64)
    preferences: Preferences = Field(default_factory=Preferences)
    public: bool = Field(
        default=False,
        description="netns mode: on the public network (a relay, the bootstrap); "
        "else behind a NAT of its own. Other modes ignore it",
    )

    def node_names(self) -> list[str]:
        if self.count == 1:
            return [self.name]
        return [f"{self.name}-{i}" for i in range(1, self.count + 1)]


class NodeSettings(_Model):
    """Settings every node of the scenario runs with (``dms.config.Settings``)."""

    heartbeat_s: float | None = Field(default=None, ge=0.1, le=300)
    heartbeat_budget_per_s: float | None = Field(default=None, gt=0, le=100)
    orphan_s: float = Field(default=15.0, gt=0, le=3600)
    invoke_timeout_s: float = Field(default=10.0, gt=0, le=600)


class Target(_Model):
    """A node by name, or the node running a worker of a mining job."""

    node: str | None = None
    worker_of: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _short(cls, value: Any) -> Any:
        return {"node": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one(self) -> Target:
        if (self.node is None) == (self.worker_of is None):
            raise ValueError("name a node, or give 'worker_of: <mining job>'")
        return self

    def describe(self) -> str:
        return self.node or f"the worker of {self.worker_of}"


class Deploy(_Model):
    """Place a job file (``dms deploy``), ``count`` times."""

    name: str = Field(pattern=NAME, max_length=32)
    job: str | None = Field(default=None, description="a job file, relative to the scenario")
    spec: DeploymentSpec | None = Field(default=None, description="the job, inline")
    from_: str | None = Field(default=None, alias="from", description="default: first node")
    count: int = Field(default=1, ge=1, le=10_000)
    concurrent: bool = Field(
        default=False,
        description="all at once, and the timeline goes on at once; else each job waits "
        "until the one before it runs, and the step until the last one runs",
    )

    @model_validator(mode="after")
    def _one(self) -> Deploy:
        if (self.job is None) == (self.spec is None):
            raise ValueError("give a job file ('job') or the job inline ('spec')")
        return self

    def job_names(self) -> list[str]:
        if self.count == 1:
            return [self.name]
        return [f"{self.name}.{i}" for i in range(1, self.count + 1)]


class Mine(MiningSettings):
    """``dms mine`` without ``--local``: a mining job placed on other nodes."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=NAME, max_length=32)
    from_: str | None = Field(default=None, alias="from", description="default: first node")
    data: str | None = Field(default=None, description="CSV of records (k-means)")
    train: str | None = Field(default=None, description="CSV of training rows (k-NN)")
    test: str | None = Field(default=None, description="CSV of queries (k-NN)")
    label_column: str | None = None
    strategy: Strategy = "score"
    timeout_s: float = Field(default=120.0, gt=0, le=24 * 3600)
    cpu: float = Field(default=1.0, gt=0, le=256)

    @model_validator(mode="after")
    def _inputs(self) -> Mine:
        if self.algorithm in CLUSTERING:
            if self.data is None or self.train or self.test:
                raise ValueError(f"{self.algorithm} takes 'data' (a CSV of records)")
        elif self.train is None or self.test is None or self.data:
            raise ValueError(f"{self.algorithm} takes 'train' and 'test' (CSV files)")
        return self

    def settings(self) -> MiningSettings:
        fields = MiningSettings.model_fields
        return MiningSettings.model_validate({k: getattr(self, k) for k in fields})

    def request(self) -> dict[str, Any]:
        """The ``/dms/node/mining/new`` payload."""
        return {
            "settings": self.settings().model_dump(),
            "data": self.data,
            "train": self.train,
            "test": self.test,
            "label_column": self.label_column,
            "strategy": self.strategy,
            "timeout_s": self.timeout_s,
            "cpu": self.cpu,
        }


class Blobs(_Model):
    """Generated rows: ``rows`` of ``attributes`` around ``centers`` Gaussian centres."""

    rows: int = Field(ge=2, le=10_000_000)
    attributes: int = Field(ge=1, le=1000)
    centers: int = Field(ge=1, le=1000)
    seed: int = 0
    std: float = Field(default=1.0, gt=0)


class Collab(_Model):
    """``dms mine collab``: several owners' joint k-means by secure aggregation. The rows
    (``data``, a CSV, or generated ``blobs``) are split in contiguous parts, one per
    owner in order, each written where only that owner's node reads it; the first owner
    proposes, the others join; the aggregator is placed by the bid rounds."""

    name: str = Field(pattern=NAME, max_length=32)
    owners: list[str] = Field(min_length=1, description="groups or nodes; the first proposes")
    data: str | None = Field(default=None, description="CSV of the union's rows")
    blobs: Blobs | None = None
    k: int = Field(ge=1, le=1000)
    rounds: int = Field(default=10, ge=1, le=1000)
    threshold: int | None = Field(default=None, description="default: more than half")
    init: Literal["supplied", "moments"] = Field(
        default="supplied", description="supplied: the proposer's first k rows"
    )
    seed: int = 0
    timeout_s: float = Field(default=600.0, gt=0, le=24 * 3600)
    owner_timeout_s: float | None = Field(default=None, gt=0, le=3600)
    join_timeout_s: float | None = Field(default=None, gt=0, le=24 * 3600)
    cpu: float = Field(default=1.0, gt=0, le=256)
    ram: str = "256MiB"

    @model_validator(mode="after")
    def _rows(self) -> Collab:
        if (self.data is None) == (self.blobs is None):
            raise ValueError("give the rows as 'data' (a CSV) or 'blobs', one of them")
        return self


class Wait(_Model):
    """Wait some seconds, or for a job: to run, to end, or (mining, a collaboration) to
    finish steps (a collaboration's step is a round)."""

    seconds: float | None = Field(default=None, gt=0, le=3600)
    job: str | None = None
    until: Literal["running", "ended"] = "ended"
    steps: int | None = Field(default=None, ge=1, description="mining steps done")
    timeout_s: float = Field(default=300.0, gt=0, le=24 * 3600)

    @model_validator(mode="after")
    def _one(self) -> Wait:
        if (self.seconds is None) == (self.job is None):
            raise ValueError("give 'seconds', or a 'job' to wait for")
        if self.steps is not None and self.job is None:
            raise ValueError("'steps' needs a 'job'")
        return self


class Onboard(Amounts):
    node: str


class Offboard(_Model):
    node: str
    force: bool = False


_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)(i?)(B|bit)/s\s*$")
_SCALE = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_rate(text: str | float) -> float:
    """Bytes a second from ``1MB/s``, ``512KiB/s``, ``10Mbit/s`` or a bare number (B/s)."""
    if isinstance(text, int | float):
        value = float(text)
    else:
        match = _RATE.match(text)
        if match is None:
            raise ValueError(f"{text!r} is not a rate like 1MB/s, 512KiB/s or 10Mbit/s")
        number, prefix, binary, unit = match.groups()
        scale = _SCALE[prefix.lower()]
        if binary:
            scale = 1024 ** {"": 0, "k": 1, "m": 2, "g": 3}[prefix.lower()]
        value = float(number) * scale / (8 if unit == "bit" else 1)
    if value <= 0:
        raise ValueError("a bandwidth must be more than zero")
    return value


class Link(_Model):
    """Conditions between two groups of nodes (each a group or node name), both ways."""

    between: list[str] = Field(min_length=2, max_length=2)
    latency_ms: float = Field(default=0.0, ge=0, le=60_000)
    loss: float = Field(default=0.0, ge=0, lt=1)
    bandwidth: str | float | None = Field(default=None, description="e.g. 1MB/s, 10Mbit/s")

    @field_validator("bandwidth")
    @classmethod
    def _rate(cls, value: str | float | None) -> str | float | None:
        if value is not None:
            parse_rate(value)
        return value

    @model_validator(mode="after")
    def _some(self) -> Link:
        if not (self.latency_ms or self.loss or self.bandwidth is not None):
            raise ValueError("give latency_ms, loss or bandwidth")
        return self

    @property
    def bandwidth_bps(self) -> float | None:
        return None if self.bandwidth is None else parse_rate(self.bandwidth)


class Step(_Model):
    """One entry of the timeline: an action, not before ``at`` seconds from its start."""

    at: float | None = Field(default=None, ge=0, le=24 * 3600)
    deploy: Deploy | None = None
    mine: Mine | None = None
    collab: Collab | None = None
    wait: Wait | None = None
    kill: Target | None = Field(default=None, description="kill -9: no goodbye, no clean-up")
    restart: Target | None = None
    onboard: Onboard | None = None
    offboard: Offboard | None = None
    partition: list[list[str]] | None = Field(default=None, min_length=2)
    link: Link | None = None
    heal: Literal[True] | None = None

    @model_validator(mode="after")
    def _one(self) -> Step:
        given = [a for a in ACTIONS if getattr(self, a) is not None]
        if len(given) != 1:
            what = ", ".join(given) if given else "none"
            raise ValueError(f"a step takes one of {', '.join(ACTIONS)} (got {what})")
        return self

    @property
    def action(self) -> str:
        return next(a for a in ACTIONS if getattr(self, a) is not None)


class Expect(_Model):
    """What must hold at the end; each failure is named in the exit message."""

    jobs_complete: bool = Field(default=True, description="every job completes")
    no_leaked_leases: bool = Field(default=True, description="no lease left on a running node")
    labels_equal_local: bool = Field(
        default=True, description="every mining job's labels equal --local's"
    )
    labels_equal_plaintext: bool = Field(
        default=False, description="... and plaintext k-means' (k-NN's)"
    )
    placement_p50_ms: float | None = Field(
        default=None, gt=0, description="median request-to-running time at most"
    )
    workers_replaced: int | None = Field(
        default=None, ge=0, description="at least this many lost workers placed again"
    )
    collab_equals_plaintext: bool = Field(
        default=True,
        description="each collaboration's owners get plaintext k-means on the union "
        "(a dropped owner's rows counted until it dropped): labels and centroids",
    )
    owners_dropped: int | None = Field(
        default=None, ge=0, description="at least this many owners dropped, and named"
    )
    settle_s: float = Field(
        default=5.0, ge=0, le=600, description="how long leases may take to go after the end"
    )


class Scenario(_Model):
    name: str = Field(default="scenario", min_length=1, max_length=64)
    description: str = ""
    mode: Mode = "threads"
    seed: int = 0
    nodes: list[NodeGroup] = Field(min_length=1)
    settings: NodeSettings = Field(default_factory=NodeSettings)
    timeline: list[Step] = Field(default_factory=list)
    expect: Expect = Field(default_factory=Expect)

    @field_validator("nodes")
    @classmethod
    def _not_too_many(cls, value: list[NodeGroup]) -> list[NodeGroup]:
        total = sum(g.count for g in value)
        if total > MAX_NODES:
            raise ValueError(f"{total} nodes; at most {MAX_NODES}")
        return value

    def node_names(self) -> list[str]:
        return [n for g in self.nodes for n in g.node_names()]

    def groups(self) -> dict[str, list[str]]:
        """Every name a step may use for a set of nodes: groups, and each node alone."""
        out = {g.name: g.node_names() for g in self.nodes}
        out.update({n: [n] for n in self.node_names()})
        return out

    def group_of(self, node: str) -> NodeGroup:
        return next(g for g in self.nodes if node in g.node_names())

    @property
    def first_node(self) -> str:
        return self.node_names()[0]

    def jobs(self) -> list[tuple[str, Deploy | Mine | Collab]]:
        out: list[tuple[str, Deploy | Mine | Collab]] = []
        for step in self.timeline:
            if step.deploy is not None:
                out += [(n, step.deploy) for n in step.deploy.job_names()]
            elif step.mine is not None:
                out.append((step.mine.name, step.mine))
            elif step.collab is not None:
                out.append((step.collab.name, step.collab))
        return out

    def owner_nodes(self, collab: Collab) -> list[str]:
        """A collaboration's owners, in order (its groups expanded), each once."""
        groups = self.groups()
        names = [n for name in collab.owners for n in groups.get(name, [])]
        return list(dict.fromkeys(names))


Problem = tuple[tuple[int | str, ...], str]


def problems(scenario: Scenario) -> list[Problem]:
    """What the models cannot check alone: names that refer to other parts of the file."""
    found: list[Problem] = []
    names = scenario.node_names()
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        found.append((("nodes",), f"node names must be unique: {', '.join(duplicates)}"))
    if scenario.mode == "netns":
        if not any(g.public for g in scenario.nodes):
            found.append((("nodes",), "mode netns needs a public node (public: true): the "
                          "relay and bootstrap of the nodes behind NAT"))  # fmt: skip
        if len(names) > MAX_NETNS_NODES:
            found.append((("nodes",), f"mode netns runs at most {MAX_NETNS_NODES} nodes"))
    groups = scenario.groups()
    jobs: dict[str, str] = {}  # job name -> kind, as the timeline declares them
    for i, step in enumerate(scenario.timeline):
        here: tuple[int | str, ...] = ("timeline", i, step.action)

        def node(name: str | None, loc: tuple[int | str, ...] = here) -> None:
            if name is not None and name not in names:
                found.append((loc, f"no node {name!r} (nodes: {_listed(names)})"))

        def job(name: str | None, loc: tuple[int | str, ...], kinds: tuple[str, ...] = ()) -> None:
            if name is None:
                return
            if name not in jobs:
                found.append((loc, f"no job {name!r} before this step"))
            elif kinds and jobs[name] not in kinds:
                what = " or ".join(KIND_NAMES[k] for k in kinds)
                found.append((loc, f"{name!r} is not {what}"))

        if step.deploy is not None or step.mine is not None:
            action = step.deploy or step.mine
            assert action is not None
            node(action.from_, (*here, "from"))
            new = step.deploy.job_names() if step.deploy else [action.name]
            clash = [n for n in new if n in jobs]
            if clash:
                found.append(((*here, "name"), f"a job named {clash[0]!r} exists already"))
            jobs.update(dict.fromkeys(new, step.action))
            if step.mine is not None and scenario.mode == "memory":
                found.append((here, MINING_NEEDS_LIBP2P))
        elif step.collab is not None:
            c = step.collab
            for j, name in enumerate(c.owners):
                if name not in groups:
                    found.append(((*here, "owners", j), f"no group or node {name!r}"))
            owners = scenario.owner_nodes(c)
            m = len(owners)
            if c.name in jobs:
                found.append(((*here, "name"), f"a job named {c.name!r} exists already"))
            jobs[c.name] = "collab"
            if m < 2:
                found.append(((*here, "owners"), f"{m} owner node(s): a collaboration needs 2"))
            elif c.threshold is not None and not m // 2 < c.threshold <= m:
                found.append(
                    (
                        (*here, "threshold"),
                        f"threshold {c.threshold} with {m} owners: it must be more than "
                        f"half ({m // 2 + 1}..{m})",
                    )
                )
        elif step.wait is not None:
            kinds = ("mine", "collab") if step.wait.steps is not None else ()
            job(step.wait.job, (*here, "job"), kinds)
        elif step.kill is not None or step.restart is not None:
            target = step.kill or step.restart
            assert target is not None
            node(target.node, (*here, "node"))
            job(target.worker_of, (*here, "worker_of"), ("mine",))
        elif step.onboard is not None or step.offboard is not None:
            action_node = (step.onboard or step.offboard).node  # type: ignore[union-attr]
            node(action_node, (*here, "node"))
        elif step.partition is not None or step.link is not None:
            sides = step.partition if step.partition is not None else [step.link.between]  # type: ignore[union-attr]
            key = "partition" if step.partition is not None else "link"
            seen: set[str] = set()
            for j, side in enumerate(sides):
                for k, name in enumerate(side):
                    loc: tuple[int | str, ...] = ("timeline", i, key, j, k)
                    if step.link is not None:
                        loc = ("timeline", i, "link", "between", j)
                    if name not in groups:
                        found.append((loc, f"no group or node {name!r}"))
                        continue
                    overlap = seen & set(groups[name])
                    if overlap:
                        found.append((loc, f"{sorted(overlap)[0]} is on both sides"))
                    seen |= set(groups[name])
    return found


def _listed(names: list[str], most: int = 6) -> str:
    shown = ", ".join(names[:most])
    return shown + (f", ... ({len(names)} in all)" if len(names) > most else "")


def parse_scenario(
    text: str, source: str = "scenario", base: Path | None = None, mode: str | None = None
) -> Scenario:
    """The scenario in ``text``; its relative paths are taken from ``base``; ``mode``
    replaces the file's own (``dms sim run --mode``)."""
    doc = parse_lined(text, source, ScenarioError)
    data = doc.data
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: expected a mapping with 'nodes', got {type(data).__name__}")
    if mode is not None:
        if mode not in MODES:
            raise ScenarioError(f"--mode: {mode!r} is not one of {', '.join(MODES)}")
        data["mode"] = mode

    def fail(
        loc: tuple[int | str, ...], message: str, more: int = 0, key: bool = False
    ) -> ScenarioError:
        return ScenarioError(doc.message(loc, message, more, key))

    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = data_loc(data, err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        raise fail(loc, message, len(exc.errors()) - 1, err["type"] == EXTRA_KEY) from None
    found = problems(scenario)
    if found:
        raise fail(*found[0], len(found) - 1)
    _resolve_files(scenario, base or Path("."), fail)
    return scenario


def _resolve_files(scenario: Scenario, base: Path, fail: Any) -> None:
    """Read job files into their steps and make data paths absolute (they must exist)."""
    for i, step in enumerate(scenario.timeline):
        if step.deploy is not None and step.deploy.job is not None:
            path = (base / step.deploy.job).resolve()
            try:
                step.deploy.spec = load_spec(path)
            except JobSpecError as err:
                raise fail(("timeline", i, "deploy", "job"), str(err)) from None
        if step.collab is not None and step.collab.data is not None:
            path = (base / step.collab.data).resolve()
            if not path.is_file():
                raise fail(("timeline", i, "collab", "data"), f"no such file: {step.collab.data}")
            step.collab.data = str(path)
        if step.mine is not None:
            for key in ("data", "train", "test"):
                value = getattr(step.mine, key)
                if value is None:
                    continue
                path = (base / value).resolve()
                if not path.is_file():
                    raise fail(("timeline", i, "mine", key), f"no such file: {value}")
                setattr(step.mine, key, str(path))


def load_scenario(path: Path, mode: str | None = None) -> Scenario:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot read: {exc}") from None
    return parse_scenario(text, str(path), Path(path).resolve().parent, mode)
