"""``dms onboard``, ``offboard``, ``benchmark`` and ``resources``.

Each works whether or not the daemon runs: with a daemon the change goes
through its ``/dms/node/onboarding/*`` behaviours (so it applies live and
peers hear of it); without one it is made in the store directly, under the
same rules (``dms.resources.onboarding``). The benchmark always runs here, in
the CLI, so the user sees its progress.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dms.cli.actor import TimeoutOption
from dms.cli.common import JsonOption, settings
from dms.cli.output import (
    ago,
    cell,
    emit_json,
    emit_result,
    emit_table,
    jsonable,
    progress_bar,
    say,
)
from dms.config import Settings
from dms.node.client import NodeClient, running_node
from dms.resources.amounts import AmountError

if TYPE_CHECKING:
    from dms.resources import Capability, Onboarder


@contextmanager
def _offline(cfg: Settings) -> Iterator[Onboarder]:
    """The store's onboarding, when no daemon runs (SQLAlchemy loads only then)."""
    from dms.resources import Onboarder
    from dms.store import open_database

    db = open_database(cfg.database_url)
    try:
        yield Onboarder(db, cfg.home, step_s=cfg.benchmark_step_s)
    finally:
        db.close()


def _measure(cfg: Settings, show: bool) -> Capability:
    """Run the benchmark here with a progress bar; the store keeps it via the caller."""
    from dms.resources.benchmark import run_benchmark

    with progress_bar(show, "benchmark", 5) as update:
        return run_benchmark(
            cfg.home, lambda step, done, total: update(done, step, total), cfg.benchmark_step_s
        )


def _steps(update: Callable[..., None]) -> Callable[[str, int, int], None]:
    return lambda step, done, total: update(done, step, total)


POOLS = ("onboarded", "free", "locked", "allocated")
# The price and the counts: said in one line under the pools, first and in this order.
UNDER_THE_POOLS = ("price", "allocations", "leases")
# A capability's fields the table's title says, not its rows.
ABOUT_THE_RUN = ("version", "measured_at", "seconds", "cores")


def _show_capability(capability: dict[str, Any]) -> None:
    """The registered capability in measurement order (the model's), two measures a
    row: 5 rows, not 14 (a daemon's reply has its keys sorted: alphabetical there)."""
    from dms.resources.benchmark import Capability

    order = list(Capability.model_fields)
    items = sorted(
        capability.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)
    )
    measures = [(k, v) for k, v in items if k not in ABOUT_THE_RUN]
    rows = [
        [*measures[i], *(measures[i + 1] if i + 1 < len(measures) else ("", ""))]
        for i in range(0, len(measures), 2)
    ]
    about = [f"{capability['cores']} cores"] if "cores" in capability else []
    if isinstance(capability.get("measured_at"), int | float):
        about.append(f"measured {ago(capability['measured_at'])}")
    title = "registered capability" + (f" ({', '.join(about)})" if about else "")
    emit_table(title, ["measure", "value", "measure", "value"], rows)


def _show_status(status: dict[str, Any], json_out: bool, title: str) -> None:
    """The pools last (what a person looks for, still on a 24-line screen after the
    command): the capability, if any, then the pools' table, then one line of price
    and counts. Each part in one order, with a daemon (its reply's keys sorted) or
    without."""
    if json_out:
        emit_json(jsonable(status))
        return
    capability = status.get("capability")
    if isinstance(capability, dict):
        _show_capability(capability)
    pools = [k for k in POOLS if isinstance(status.get(k), dict)]
    if pools:
        rows = [[k, *(status[k][u] for u in ("cpu", "ram_gib", "disk_gib", "gpu"))] for k in pools]
        emit_table(title, ["pool", "cpu (cores)", "ram (GiB)", "disk (GiB)", "gpu"], rows)
    shown = {*POOLS, "capability"}
    rest = [k for k in UNDER_THE_POOLS if k in status]
    rest += sorted(k for k in status if k not in shown.union(UNDER_THE_POOLS))
    if rest:
        say(", ".join(f"{k} {cell(status[k], k)}" for k in rest))


def _current(cfg: Settings, client: NodeClient | None, timeout: float) -> dict[str, Any]:
    """What this node has onboarded now (the daemon's view, or the store's)."""
    if client is not None:
        return dict(client.invoke("/dms/node/onboarding/status", timeout=timeout))
    with _offline(cfg) as onboarder:
        return onboarder.status()


def _keep_the_others(given: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """The amounts not given on the command line stay as they are: ``dms onboard --cpu 4``
    changes the cores only. A first onboarding needs all three amounts."""
    onboarded = current.get("onboarded")
    before = onboarded if isinstance(onboarded, dict) and onboarded.get("cpu") else None
    missing = [f"--{k}" for k in ("cpu", "ram", "disk") if given[k] is None]
    if missing and before is None:
        raise AmountError(
            f"nothing is onboarded yet: give --cpu, --ram and --disk (missing {', '.join(missing)})"
            ", e.g. dms onboard --cpu 2 --ram 4 --disk 10"
        )
    kept = {"cpu": "cpu", "ram": "ram_gib", "disk": "disk_gib", "gpu": "gpu"}
    filled = dict(given)
    for name, key in kept.items():
        if filled[name] is None:
            filled[name] = before[key] if before is not None else 0
    if filled["price"] is None:
        filled["price"] = current.get("price", 0.0) if before is not None else 0.0
    return filled


def onboard(
    cpu: Annotated[
        str | None, typer.Option("--cpu", help="Cores to contribute (2, 0.5, 500m).")
    ] = None,
    ram: Annotated[
        str | None, typer.Option("--ram", help="RAM, GiB unless a unit is given (4, 512MiB).")
    ] = None,
    disk: Annotated[
        str | None, typer.Option("--disk", help="Disk, GiB unless a unit is given.")
    ] = None,
    gpu: Annotated[int | None, typer.Option("--gpu", help="GPUs to contribute.")] = None,
    price: Annotated[
        float | None, typer.Option("--price", help="Price asked per allocation-hour.")
    ] = None,
    benchmark: Annotated[
        bool, typer.Option("--benchmark", help="Measure the capability again.")
    ] = False,
    timeout: TimeoutOption = 60.0,
    json_out: JsonOption = False,
) -> None:
    """Contribute part of this machine; run again to change any of the amounts (the
    ones not given stay as they are)."""
    from dms.resources import OnboardRequest, checked_amounts

    cfg = settings()
    client = running_node(cfg.home)
    given = {"cpu": cpu, "ram": ram, "disk": disk, "gpu": gpu, "price": price}
    if any(v is None for v in given.values()):
        given = _keep_the_others(given, _current(cfg, client, timeout))
    request = OnboardRequest(**given, benchmark=benchmark)
    checked_amounts(request, cfg.home)  # a mistake costs nothing: checked before measuring
    if client is None:
        with _offline(cfg) as onboarder:
            if onboarder.needs_benchmark(request):
                request.capability = _measure(cfg, not json_out)
            status = onboarder.onboard(request)
    else:
        state = client.invoke("/dms/node/onboarding/status", timeout=timeout)
        if benchmark or state.get("capability") is None:
            request.capability = _measure(cfg, not json_out)
        status = client.invoke(
            "/dms/node/onboarding/onboard", request.model_dump(mode="json"), timeout=timeout
        )
    _show_status(status, json_out, "onboarded")


def offboard(
    force: Annotated[
        bool, typer.Option("--force", help="Stop running allocations and release them.")
    ] = False,
    timeout: TimeoutOption = 30.0,
    json_out: JsonOption = False,
) -> None:
    """Withdraw this machine; refused while allocations run unless --force."""
    cfg = settings()
    client = running_node(cfg.home)
    if client is None:
        with _offline(cfg) as onboarder:
            result = onboarder.offboard(force)
    else:
        result = client.invoke("/dms/node/onboarding/offboard", {"force": force}, timeout=timeout)
    if json_out:
        emit_json(jsonable(result))
    else:
        released = result.get("released", [])
        emit_result({"offboarded": True, "released": len(released)}, False)


def benchmark(timeout: TimeoutOption = 30.0, json_out: JsonOption = False) -> None:
    """Measure this machine's capability (cpu, memory, disk, CKKS, Liu) and register it."""
    cfg = settings()
    capability = _measure(cfg, not json_out)
    client = running_node(cfg.home)
    if client is None:
        with _offline(cfg) as onboarder:
            onboarder.register(capability)
    else:
        client.invoke(
            "/dms/node/onboarding/capability",
            {"capability": capability.model_dump(mode="json")},
            timeout=timeout,
        )
    emit_result(capability.model_dump(mode="json"), json_out, title="capability")


def resources(timeout: TimeoutOption = 10.0, json_out: JsonOption = False) -> None:
    """The resource pools: onboarded = free + locked + allocated."""
    cfg = settings()
    client: NodeClient | None = running_node(cfg.home)
    if client is None:
        with _offline(cfg) as onboarder:
            pools = onboarder.ledger.pools().as_dict()
    else:
        pools = client.invoke("/dms/node/resources/pools", timeout=timeout)
    _show_status(pools, json_out, "resources")
