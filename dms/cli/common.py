"""Options and context shared by every command."""

from __future__ import annotations

from typing import Annotated

import typer

from dms.config import Settings, load_settings

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]


def settings() -> Settings:
    return load_settings()


def dialable(addrs: list[str]) -> list[str]:
    """Addresses another node can dial: a wildcard listen address (``/ip4/0.0.0.0/...``,
    ``/ip6/::/...``) becomes one address per interface address of this machine, as the
    node advertises it (``dms.network.interfaces.expanded``)."""
    from multiaddr import Multiaddr

    from dms.network.interfaces import expanded, interface_networks

    nets = interface_networks()
    out: list[str] = []
    for addr in addrs:
        try:
            out.extend(str(one) for one in expanded(Multiaddr(addr), nets))
        except Exception:  # not a multiaddr: as it is
            out.append(addr)
    return list(dict.fromkeys(out))
