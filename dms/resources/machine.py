"""What the machine has (spec) and what it is doing (usage), read with psutil."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import psutil

from dms.resources.amounts import Resources

MIB = 2**20


def _existing(path: Path) -> Path:
    path = path.expanduser()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def machine_total(home: Path) -> Resources:
    """The most a node on this machine may onboard: every logical core, all RAM, and
    the disk space free under the node's home plus what its own data already uses."""
    return Resources(
        cpu_milli=(psutil.cpu_count(logical=True) or 1) * 1000,
        ram_mib=psutil.virtual_memory().total // MIB,
        disk_mib=psutil.disk_usage(str(_existing(home))).free // MIB,
        gpu=0,
    )


def hardware_spec(home: Path) -> dict[str, Any]:
    disk = psutil.disk_usage(str(_existing(home)))
    return {
        "cpu_model": platform.processor() or platform.machine(),
        "architecture": platform.machine(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_logical": psutil.cpu_count(logical=True),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 3),
        "disk_total_gib": round(disk.total / 2**30, 3),
        "disk_free_gib": round(disk.free / 2**30, 3),
        "gpus": [],  # no GPU probe yet: gpu onboarding is by declaration only
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def hardware_usage(home: Path) -> dict[str, Any]:
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(_existing(home)))
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "load_1m": round(load[0], 3),
        "load_5m": round(load[1], 3),
        "load_15m": round(load[2], 3),
        "ram_used_gib": round((memory.total - memory.available) / 2**30, 3),
        "ram_percent": memory.percent,
        "disk_used_gib": round(disk.used / 2**30, 3),
        "disk_percent": disk.percent,
    }
