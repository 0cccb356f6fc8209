"""This host's interface addresses, and a wildcard listen address made into them.

A node listening on ``/ip4/0.0.0.0/tcp/9000`` (the default) is reachable at every
address of every interface, but py-libp2p advertises the listener as bound: the
unspecified address, which a peer that dials it reaches itself with. go-libp2p
advertises the interfaces' addresses instead (``manet.ResolveUnspecifiedAddresses``);
:func:`advertised` does the same, as the host's ``addrs_factory``. Addresses come from
``getifaddrs(3)`` (every address of every interface that is up, secondary ones too,
with its prefix, which a dial ranks by: ``dms.network.dialing``). Linux only: elsewhere
none, and a wildcard stays as it is. See specs/network.md, "What a node advertises".
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import socket
import sys
import time
from collections.abc import Iterable

from multiaddr import Multiaddr

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# How long this host's interface addresses are taken as they were read.
INTERFACES_TTL_S = 10.0
_IFF_UP = 0x1


class _SockAddr(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("data", ctypes.c_ubyte * 14)]


class _SockAddrIn(ctypes.Structure):
    _fields_ = [
        ("family", ctypes.c_ushort),
        ("port", ctypes.c_uint16),
        ("addr", ctypes.c_ubyte * 4),
    ]


class _SockAddrIn6(ctypes.Structure):
    _fields_ = [
        ("family", ctypes.c_ushort),
        ("port", ctypes.c_uint16),
        ("flowinfo", ctypes.c_uint32),
        ("addr", ctypes.c_ubyte * 16),
        ("scope_id", ctypes.c_uint32),
    ]


class _IfAddrs(ctypes.Structure):
    pass


_IfAddrs._fields_ = [
    ("next", ctypes.POINTER(_IfAddrs)),
    ("name", ctypes.c_char_p),
    ("flags", ctypes.c_uint),
    ("addr", ctypes.POINTER(_SockAddr)),
    ("netmask", ctypes.POINTER(_SockAddr)),
    ("ifu", ctypes.POINTER(_SockAddr)),
    ("data", ctypes.c_void_p),
]


def _ip(sockaddr: ctypes._Pointer[_SockAddr]) -> bytes | None:  # type: ignore[name-defined]
    if not sockaddr:
        return None
    family = sockaddr.contents.family
    if family == socket.AF_INET:
        return bytes(ctypes.cast(sockaddr, ctypes.POINTER(_SockAddrIn)).contents.addr)
    if family == socket.AF_INET6:
        return bytes(ctypes.cast(sockaddr, ctypes.POINTER(_SockAddrIn6)).contents.addr)
    return None


def _read() -> list[IPInterface]:
    """Every address of every interface that is up, in the kernel's order."""
    if not sys.platform.startswith("linux"):
        return []
    libc = ctypes.CDLL(None, use_errno=True)
    head = ctypes.POINTER(_IfAddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        return []
    out: list[IPInterface] = []
    try:
        entry = head
        while entry:
            ifa = entry.contents
            ip, mask = _ip(ifa.addr), _ip(ifa.netmask)
            if ifa.flags & _IFF_UP and ip is not None and mask is not None:
                with contextlib.suppress(ValueError):
                    address = ipaddress.ip_address(ip)
                    prefix = bin(int.from_bytes(mask, "big")).count("1")
                    out.append(ipaddress.ip_interface(f"{address}/{prefix}"))
            entry = ifa.next
    finally:
        libc.freeifaddrs(head)
    return out


# network namespace -> (when read, this host's interface addresses there)
_cache: dict[int, tuple[float, list[IPInterface]]] = {}


def _namespace() -> int:
    """The network namespace of the calling thread (one process may run hosts in several:
    the tests' namespaces), 0 where there are none."""
    try:
        return os.stat("/proc/thread-self/ns/net").st_ino
    except OSError:
        return 0


def interface_networks() -> list[IPInterface]:
    """This host's addresses with their networks, read again every ``INTERFACES_TTL_S``
    (a laptop changes networks)."""
    key = _namespace()
    read_at, nets = _cache.get(key, (float("-inf"), []))
    now = time.monotonic()
    if now - read_at >= INTERFACES_TTL_S:
        try:
            nets = _read()
        except (OSError, AttributeError):
            nets = []
        _cache[key] = (now, nets)
    return nets


def expanded(addr: Multiaddr, nets: Iterable[IPInterface]) -> list[Multiaddr]:
    """``addr`` with a wildcard IP (``0.0.0.0``, ``::``) made into one address per
    interface address of its family (link-local IPv6 left out: it needs a zone),
    loopback last; any other address as it is. No interface address: as it is."""
    parts = str(addr).split("/")
    if len(parts) < 3 or (parts[1], parts[2]) not in (("ip4", "0.0.0.0"), ("ip6", "::")):
        return [addr]
    version = 4 if parts[1] == "ip4" else 6
    ips = [
        net.ip
        for net in nets
        if net.version == version and not (net.version == 6 and net.ip.is_link_local)
    ]
    ips.sort(key=lambda ip: ip.is_loopback)
    if not ips:
        return [addr]
    return [Multiaddr("/".join([*parts[:2], str(ip), *parts[3:]])) for ip in dict.fromkeys(ips)]


def advertised(addrs: list[Multiaddr]) -> list[Multiaddr]:
    """A host's ``addrs_factory``: its addresses with each wildcard made into this host's
    interface addresses (:func:`expanded`), each once."""
    nets = interface_networks()
    out: dict[str, Multiaddr] = {}
    for addr in addrs:
        for one in expanded(addr, nets):
            out.setdefault(str(one), one)
    return list(out.values())


def _keep_rank(addr: str) -> int:
    """Which of a node's addresses a cap on their number keeps first: 0 for one any peer
    may reach it at (a public IP, a name, a relay's circuit), 1 for a private one (RFC
    1918, ULA, CGNAT: a LAN, Docker's bridges, a VPN), 2 for one no other machine
    dials (loopback, link-local, unspecified)."""
    if "/p2p-circuit" in addr:
        return 0
    parts = addr.split("/")
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        return 0
    try:
        ip = ipaddress.ip_address(parts[2].split("%")[0])
    except ValueError:
        return 0
    if ip.is_loopback or ip.is_link_local or ip.is_unspecified:
        return 2
    if ip.is_global:
        return 0
    return 1


def fitted(addrs: list[str], cap: int) -> list[str]:
    """``addrs`` cut to ``cap``, in their order, keeping those other machines may reach
    the node at first (:func:`_keep_rank`): a host with dozens of interface addresses
    (Docker's bridges) would otherwise fill a heartbeat's 16 with them, and its
    NAT-observed public address and relayed addresses, listed after, would be cut."""
    if len(addrs) <= cap:
        return list(addrs)
    keep = set(sorted(range(len(addrs)), key=lambda i: _keep_rank(addrs[i]))[:cap])
    return [a for i, a in enumerate(addrs) if i in keep]
