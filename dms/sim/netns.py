"""Real NATs for tests, benches and ``dms sim`` mode netns: Linux network namespaces,
veth pairs, masquerading routers.

Root only (``unavailable()`` says why not). :class:`NatTopology` builds, with only
addresses inside the namespaces it makes (10.77.0.0/16 and 10.78.0.0/16), by default::

    relay  10.78.100.1 --+
                         |  "inet": one bridge, the public network 10.78.0.0/16
    r1 wan 10.78.1.1 ----+--- r2 wan 10.78.2.1 ---- r3 wan 10.78.3.1
    r1 lan 10.77.1.1        r2 lan 10.77.2.1        r3 lan 10.77.3.1
    prov1  10.77.1.2        prov2  10.77.2.2        owner  10.77.3.2

Other roles can be given (``public=``, ``nated=``): public host i (from 0) is
10.78.<100+i>.1, and NATed host k (from 1) sits behind router rk (WAN 10.78.k.1,
LAN 10.77.k.1) at 10.77.k.2. Every public address is on a /24 of its own, as on
the Internet: a node counts the peers that confirm it is reachable by network
(dms.network.reachability), and the peers of one /24 would be one.

Each router masquerades what leaves by its WAN side and forwards inbound only for
connections its LAN side opened (conntrack ESTABLISHED,RELATED): the home router
of a provider. No namespace has a route to another's LAN, so a dial to a private
address fails at once (ICMP unreachable) instead of hanging. Daemons run as
``ip netns exec NS python -m dms run ...`` with their own DMS_HOME
(:meth:`NatTopology.daemon`); :meth:`NatTopology.dms` runs a command in a
namespace. Faults: :meth:`drop_mappings` (a router forgets its NAT mappings),
and stopping a daemon (a relay that dies). Everything is removed by
:meth:`NatTopology.close`, also after a failure (use it as a context manager).
See specs/network.md, "Behind NAT".
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["NatTopology", "NsDaemon", "unavailable"]

PUBLIC_NET = "10.78"  # a /16: public hosts and routers' WAN sides, each its own /24
PORT = 4001
PUBLIC = ("relay",)
NATED = ("prov1", "prov2", "owner")
MAX_PUBLIC = 9  # 10.78.100.1 .. 10.78.108.1
MAX_NATED = 89  # routers' WAN sides 10.78.1.1 .. 10.78.89.1
CLONE_NEWNET = 0x40000000


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done


def unavailable() -> str | None:
    """Why a NAT topology cannot be built here, or None when it can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (apt-get install iproute2 iptables)"
    probe = f"dmsprobe{uuid.uuid4().hex[:6]}"
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "netns", "exec", probe, "iptables", "-t", "nat", "-L", "-n")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot make a network namespace with a NAT table: {exc}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


@dataclass
class NsDaemon:
    """A ``dms run`` in a namespace; ``info`` is its ``--json`` line."""

    ns: str
    home: Path
    proc: subprocess.Popen[str]
    info: dict[str, Any] = field(default_factory=dict)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=20)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=20)


class NatTopology:
    """Public hosts, and hosts each behind a masquerading router of its own (see module
    doc); by default one public relay and three NATed hosts."""

    def __init__(
        self,
        root: Path,
        env: dict[str, str] | None = None,
        *,
        public: Sequence[str] = PUBLIC,
        nated: Sequence[str] = NATED,
    ) -> None:
        if not 1 <= len(public) <= MAX_PUBLIC or len(nated) > MAX_NATED:
            raise ValueError(
                f"a topology has 1 to {MAX_PUBLIC} public hosts and at most {MAX_NATED} "
                f"behind NAT (got {len(public)} and {len(nated)})"
            )
        if len(set(public) | set(nated)) != len(public) + len(nated):
            raise ValueError("a role is named twice")
        self.root = root
        self.env = env or {}
        self.tag = uuid.uuid4().hex[:6]
        self.public = list(public)
        # NATed role -> its router's index k (its LAN is 10.77.<k>.0/24)
        self.nated = {role: k for k, role in enumerate(nated, start=1)}
        self.namespaces: list[str] = []
        self.daemons: list[NsDaemon] = []

    def ns(self, role: str) -> str:
        """The namespace name of a role: relay, prov1, prov2, owner, r1..r3, inet."""
        return f"dms{self.tag}-{role}"

    def ip(self, role: str) -> str:
        if role in self.public:
            return f"{PUBLIC_NET}.{100 + self.public.index(role)}.1"
        return f"10.77.{self.nated[role]}.2"

    def listen(self, role: str) -> str:
        return f"/ip4/{self.ip(role)}/tcp/{PORT}"

    # ---- building ---------------------------------------------------------------------

    def __enter__(self) -> NatTopology:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_ns(self, role: str) -> str:
        name = self.ns(role)
        _run("ip", "netns", "add", name)
        self.namespaces.append(name)
        self.sh(role, "ip", "link", "set", "lo", "up")
        return name

    def sh(self, role: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", self.ns(role), *argv, check=check)

    def _veth(self, a: str, a_if: str, b: str, b_if: str) -> None:
        _run(
            "ip", "link", "add", a_if, "netns", self.ns(a), "type", "veth",
            "peer", "name", b_if, "netns", self.ns(b),
        )  # fmt: skip

    def _addr(self, role: str, ifname: str, cidr: str) -> None:
        self.sh(role, "ip", "addr", "add", cidr, "dev", ifname)
        self.sh(role, "ip", "link", "set", ifname, "up")

    def build(self) -> None:
        self._add_ns("inet")
        self.sh("inet", "ip", "link", "add", "br0", "type", "bridge")
        self.sh("inet", "ip", "link", "set", "br0", "up")
        for i, role in enumerate(self.public):
            self._add_ns(role)
            self._veth(role, "eth0", "inet", f"h{i}")
            self._addr(role, "eth0", f"{self.ip(role)}/16")
            self.sh("inet", "ip", "link", "set", f"h{i}", "master", "br0", "up")
        for role, k in self.nated.items():
            router = f"r{k}"
            self._add_ns(router)
            self._add_ns(role)
            self._veth(router, "wan", "inet", f"p{k}")
            self.sh("inet", "ip", "link", "set", f"p{k}", "master", "br0", "up")
            self._addr(router, "wan", f"{PUBLIC_NET}.{k}.1/16")
            self._veth(router, "lan", role, "eth0")
            self._addr(router, "lan", f"10.77.{k}.1/24")
            self._addr(role, "eth0", f"10.77.{k}.2/24")
            self.sh(role, "ip", "route", "add", "default", "via", f"10.77.{k}.1")
            self.sh(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            self._nat_rules(router)

    def _nat_rules(self, router: str) -> None:
        self.sh(router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan",
                "-j", "MASQUERADE")  # fmt: skip
        self.sh(router, "iptables", "-A", "FORWARD", "-i", "wan", "-m", "conntrack",
                "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")  # fmt: skip
        self.sh(router, "iptables", "-A", "FORWARD", "-i", "wan", "-j", "DROP")
        # Unsolicited packets to the router itself are dropped, not answered with a
        # reset (as most home routers do): a hole-punching SYN that arrives before the
        # router's own mapping exists is retried by TCP instead of refused.
        self.sh(router, "iptables", "-A", "INPUT", "-i", "wan", "-m", "conntrack",
                "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")  # fmt: skip
        self.sh(router, "iptables", "-A", "INPUT", "-i", "wan", "-j", "DROP")

    def close(self) -> None:
        for daemon in self.daemons:
            with contextlib.suppress(Exception):
                daemon.stop()
        for name in reversed(self.namespaces):
            _run("ip", "netns", "del", name, check=False)
        self.namespaces.clear()

    # ---- faults -----------------------------------------------------------------------

    def drop_mappings(self, role: str) -> None:
        """The router of ``role`` forgets every NAT mapping, as a home router that
        reboots: its new mappings take other ports (masquerading with random ports
        from then on), so a connection through it that goes on sending arrives at
        its peer from a port the peer does not know, and is reset; inbound packets
        of the old mappings are dropped. Done by refusing what it forwarded and
        taking the WAN side down, which flushes the masquerade's conntrack entries
        (no conntrack tool needed). Hole punching through it fails from then on
        (its ports cannot be predicted)."""
        router = f"r{self.nated[role]}"
        self.sh(router, "iptables", "-I", "FORWARD", "1", "-j", "DROP")
        self.sh(router, "iptables", "-t", "nat", "-F", "POSTROUTING")
        self.sh(router, "ip", "link", "set", "wan", "down")
        self.sh(router, "ip", "link", "set", "wan", "up")
        self.sh(router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan",
                "-j", "MASQUERADE", "--random-fully")  # fmt: skip
        self.sh(router, "iptables", "-D", "FORWARD", "1")

    # ---- dms in a namespace -------------------------------------------------------------

    @contextlib.contextmanager
    def entered(self, role: str) -> Iterator[None]:
        """The calling thread in the namespace of ``role`` (other threads stay where they
        are): sockets it opens there belong to that namespace, as a daemon's local API
        on its 127.0.0.1 does."""
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(f"/var/run/netns/{self.ns(role)}", os.O_RDONLY)
            try:
                if libc.setns(target, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"cannot enter {self.ns(role)}: {os.strerror(err)}")
            finally:
                os.close(target)
            try:
                yield
            finally:
                libc.setns(own, CLONE_NEWNET)
        finally:
            os.close(own)

    def home(self, role: str) -> Path:
        """The DMS_HOME of ``role`` (any name: a node need not live in its own namespace)."""
        return self.root / f".dms-{role}"

    def env_for(self, role: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DMS_")}
        env.update(self.env)
        env["DMS_HOME"] = str(self.home(role))
        return env

    def dms(
        self, role: str, *args: str, timeout: float = 60, where: str = ""
    ) -> subprocess.CompletedProcess[str]:
        """``dms ARGS`` in the namespace of ``where`` (default ``role``) with the
        DMS_HOME of ``role``."""
        return subprocess.run(
            ["ip", "netns", "exec", self.ns(where or role), sys.executable, "-m", "dms", *args],
            env=self.env_for(role),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def dms_json(self, role: str, *args: str, timeout: float = 60, where: str = "") -> Any:
        done = self.dms(role, *args, "--json", timeout=timeout, where=where)
        if done.returncode != 0:
            raise RuntimeError(f"dms {' '.join(args)} in {role}: {done.stderr.strip()}")
        return json.loads(done.stdout)

    def daemon(self, role: str, *extra: str, where: str = "", port: int = PORT) -> NsDaemon:
        """Start ``dms run`` for ``role`` (its DMS_HOME) in the namespace of ``where``
        (default: its own) on that namespace's address and ``port``; return once it
        listens. ``where="relay"`` puts a node on the public network."""
        where = where or role
        log = (self.root / f"{role}.log").open("a")
        proc = subprocess.Popen(
            [
                *("ip", "netns", "exec", self.ns(where), sys.executable, "-m", "dms", "run"),
                *("--listen", f"/ip4/{self.ip(where)}/tcp/{port}", "--api-port", "0"),
                "--json",
                *extra,
            ],
            env=self.env_for(role),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        log.close()  # the daemon holds its own copy
        daemon = NsDaemon(self.ns(where), self.home(role), proc)
        self.daemons.append(daemon)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            err = (self.root / f"{role}.log").read_text()
            raise RuntimeError(f"dms run in {role} did not start: {err.strip()[-2000:]}")
        daemon.info = json.loads(line)
        return daemon
