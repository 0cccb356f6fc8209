"""This host's interface addresses and their networks.

Read with ``getifaddrs(3)``: every address of every interface that is up, secondary
ones too, with its prefix. Linux only; elsewhere none (a dial then ranks no address as
on-link). See specs/network.md, "py-libp2p corrections" (the dial's ranking).
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import socket
import sys
import time

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
