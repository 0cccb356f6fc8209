"""Options and context shared by every command."""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
from pathlib import Path
from typing import Annotated

import typer

from dms.config import Settings, load_settings

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]


def settings() -> Settings:
    return load_settings()


_SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


def interface_addresses() -> dict[str, list[str]]:
    """This machine's addresses by family ("ip4", "ip6"), the loopback ones last; link-local
    IPv6 left out (it needs a zone to be dialled)."""
    ip4: list[str] = []
    for _, name in socket.if_nameindex():
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe,
            contextlib.suppress(OSError),
        ):
            packed = fcntl.ioctl(
                probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode())
            )
            ip4.append(socket.inet_ntoa(packed[20:24]))
    ip6: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            raw = line.split()[0]
            if raw.startswith("fe80"):
                continue
            ip6.append(str(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(raw))))
    loopback = ("127.", "::1")
    return {
        "ip4": sorted(dict.fromkeys(ip4 or ["127.0.0.1"]), key=lambda a: a.startswith(loopback)),
        "ip6": sorted(dict.fromkeys(ip6 or ["::1"]), key=lambda a: a.startswith(loopback)),
    }


def dialable(addrs: list[str]) -> list[str]:
    """Addresses another node can dial: a wildcard listen address (``/ip4/0.0.0.0/...``,
    ``/ip6/::/...``) becomes one address per interface address of this machine."""
    found: dict[str, list[str]] | None = None
    out: list[str] = []
    for addr in addrs:
        parts = addr.split("/")
        if len(parts) > 2 and (parts[1], parts[2]) in (("ip4", "0.0.0.0"), ("ip6", "::")):
            found = found or interface_addresses()
            out.extend("/".join([*parts[:2], ip, *parts[3:]]) for ip in found[parts[1]])
        else:
            out.append(addr)
    return list(dict.fromkeys(out))
