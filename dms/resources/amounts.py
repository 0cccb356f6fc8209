"""Amounts of cpu, ram, disk and gpu, in exact integer units.

Accounting adds and subtracts these many times a second; floats would drift
(0.1 + 0.2 != 0.3), so every amount is an integer: cpu in millicores, ram and
disk in MiB, gpus as a count. People write amounts with units (``2``,
``500m``, ``4GiB``, ``512MiB``); :func:`parse_cpu` and :func:`parse_size`
turn those into units and refuse anything else with a one-line reason.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dms.errors import DmsError

KINDS = ("cpu", "ram", "disk", "gpu")

_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([A-Za-z]*)\s*$")
_MIB_PER = {
    "": 1024.0,  # a bare number of ram or disk is GiB
    "m": 1.0, "mi": 1.0, "mib": 1.0, "mb": 1e6 / 2**20,
    "g": 1024.0, "gi": 1024.0, "gib": 1024.0, "gb": 1e9 / 2**20,
    "t": 1024.0**2, "ti": 1024.0**2, "tib": 1024.0**2, "tb": 1e12 / 2**20,
}  # fmt: skip
_MILLI_PER = {"": 1000.0, "core": 1000.0, "cores": 1000.0, "m": 1.0}


class AmountError(DmsError, ValueError):
    """An amount that is not a number with a known unit, or is not positive."""


def _quantity(text: str | float | int, what: str, units: dict[str, float]) -> int:
    if isinstance(text, bool):
        raise AmountError(f"{what}: expected a number, got {text!r}")
    if isinstance(text, int | float):
        number, unit = float(text), ""
    else:
        if str(text).strip().startswith("-"):
            raise AmountError(f"{what}: {text!r} is negative; amounts must be more than zero")
        match = _QUANTITY.match(str(text))
        if match is None:
            raise AmountError(f"{what}: {text!r} is not a number with a unit")
        number, unit = float(match.group(1)), match.group(2).lower()
    if unit not in units:
        known = ", ".join(sorted({u for u in units if u})) or "none"
        raise AmountError(f"{what}: unknown unit {unit!r} in {text!r} (known: {known})")
    if number != number or number in (float("inf"), float("-inf")):
        raise AmountError(f"{what}: {text!r} is not a finite number")
    return round(number * units[unit])


def parse_cpu(text: str | float | int) -> int:
    """Cores (``2``, ``0.5``, ``2 cores``) or millicores (``500m``) -> millicores."""
    return _quantity(text, "cpu", _MILLI_PER)


def parse_size(text: str | float | int, what: str = "size") -> int:
    """GiB by default (``4``), or with a unit (``512MiB``, ``1.5GiB``, ``2TB``) -> MiB."""
    return _quantity(text, what, _MIB_PER)


class Resources(BaseModel):
    """An amount of each resource kind; also accepts ``cpu``/``ram``/``disk`` with units."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cpu_milli: int = Field(default=0, ge=0, description="cpu in thousandths of a core")
    ram_mib: int = Field(default=0, ge=0)
    disk_mib: int = Field(default=0, ge=0)
    gpu: int = Field(default=0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _with_units(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not ({"cpu", "ram", "disk"} & data.keys()):
            return data
        data = dict(data)
        if "cpu" in data:
            data["cpu_milli"] = parse_cpu(data.pop("cpu"))
        for kind in ("ram", "disk"):
            if kind in data:
                data[f"{kind}_mib"] = parse_size(data.pop(kind), kind)
        return data

    # ---- arithmetic, per kind ------------------------------------------------------

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.cpu_milli, self.ram_mib, self.disk_mib, self.gpu)

    @classmethod
    def of(cls, values: tuple[int, int, int, int] | list[int]) -> Resources:
        cpu, ram, disk, gpu = values
        if (
            cls is Resources
            and type(cpu) is int
            and type(ram) is int
            and type(disk) is int
            and type(gpu) is int
            and cpu >= 0
            and ram >= 0
            and disk >= 0
            and gpu >= 0
        ):
            return _filled(cpu, ram, disk, gpu)
        return cls(cpu_milli=cpu, ram_mib=ram, disk_mib=disk, gpu=gpu)

    def __add__(self, other: Resources) -> Resources:
        a, b = self.__dict__, other.__dict__
        return Resources.of(
            (
                a["cpu_milli"] + b["cpu_milli"],
                a["ram_mib"] + b["ram_mib"],
                a["disk_mib"] + b["disk_mib"],
                a["gpu"] + b["gpu"],
            )
        )

    def minus(self, other: Resources) -> tuple[int, int, int, int]:
        """Per-kind difference; may be negative, so it is a tuple, not Resources."""
        a, b = self.as_tuple(), other.as_tuple()
        return (a[0] - b[0], a[1] - b[1], a[2] - b[2], a[3] - b[3])

    def fits_in(self, other: Resources) -> bool:
        return all(a <= b for a, b in zip(self.as_tuple(), other.as_tuple(), strict=True))

    def shortfall(self, available: Resources) -> list[str]:
        """What this amount needs beyond ``available``, per kind, for reasons people read."""
        short = []
        for kind, need, have in zip(KINDS, self.as_tuple(), available.as_tuple(), strict=True):
            if need > have:
                short.append(f"{kind} {show(kind, need)} > {show(kind, have)} free")
        return short

    def is_zero(self) -> bool:
        return not any(self.as_tuple())

    def human(self) -> dict[str, float | int]:
        """Cores and GiB, for tables and JSON people read."""
        return {
            "cpu": self.cpu_milli / 1000,
            "ram_gib": round(self.ram_mib / 1024, 3),
            "disk_gib": round(self.disk_mib / 1024, 3),
            "gpu": self.gpu,
        }


_ALL_SET = frozenset(Resources.model_fields)


def _filled(cpu: int, ram: int, disk: int, gpu: int) -> Resources:
    """``Resources.of`` for four ints each at least 0 (every bound its fields declare),
    as validation would build it, without validation: accounting makes these many
    times per bid (sums, free, what a bid takes), ~10 µs each through pydantic."""
    made = object.__new__(Resources)
    values = {"cpu_milli": cpu, "ram_mib": ram, "disk_mib": disk, "gpu": gpu}
    object.__setattr__(made, "__dict__", values)
    object.__setattr__(made, "__pydantic_fields_set__", set(_ALL_SET))
    object.__setattr__(made, "__pydantic_extra__", None)
    object.__setattr__(made, "__pydantic_private__", None)
    return made


ZERO = Resources()


def show(kind: str, amount: int) -> str:
    if kind == "cpu":
        return f"{amount / 1000:g} cores"
    if kind in ("ram", "disk"):
        return f"{amount / 1024:g} GiB"
    return str(amount)
