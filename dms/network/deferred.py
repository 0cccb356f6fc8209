"""Parts of py-libp2p (and of dnspython) a dms host does not use unless asked, imported
when first used rather than with ``libp2p``.

``import libp2p`` (0.8.1) imports every transport and option it has, used or not:
its QUIC transport (``libp2p/__init__.py``, and ``custom_types.py`` for a type alias),
the WebSocket transport (``libp2p/transport/__init__.py``), AutoTLS's ACME and broker
clients and mDNS (``host/basic_host.py``), secio (``libp2p/__init__.py``); and
dnspython, which py-libp2p's TCP transport brings for ``/dns`` addresses, imports its
DNS-over-QUIC client whenever aioquic is installed. That is aioquic, pylsqpack,
pyOpenSSL, service_identity, trio-websocket, wsproto, requests, httpx, urllib3,
zeroconf, fastecdsa: 268 of the 1,659 modules ``dms run`` imported, and 0.6 s of the
2.4 s of CPU it took to start (specs/network.md, "What a host imports"), paid by
every daemon (each test's and simulated node's). A dms host listens and dials on TCP
(Noise, Yamux); py-libp2p builds a QUIC or WebSocket transport only for a listen
address of that kind (``new_host``), mDNS only with ``mdns = true``, secio only without
``sec_opt``, AutoTLS only when asked, DNS over QUIC only for a ``doq`` query.

So :func:`defer` puts a finder first on ``sys.meta_path`` that answers for those
modules (:data:`GROUPS`) with a stand-in (:class:`StandIn`): it holds a
:class:`Deferred` for each name their importers take at import; anything else asked of
it, or any use of a ``Deferred`` (a call, ``isinstance``, a subclass, an attribute),
imports the group's real modules (the finder stepping aside, the stand-ins taken out
of ``sys.modules`` first) and puts the real objects in place of the group's
``Deferred`` in every module of py-libp2p and dnspython: from then on their modules
hold what they would have held (only an annotation evaluated at import, dnspython's
``Connection | None``, keeps its stand-in). A stand-in of a package has the package's
real ``__path__``, so a module of it imported directly (py-libp2p's transport manager
takes WebSocket's connection class so) is the real one, and is the one the package has
once loaded.

A group is deferred only while each file it was read against (its modules, and their
importers, which decide what a stand-in must hold) has the digest it had
(:data:`SHIPPED`), as each patch of ``dms.network.libp2p_patches`` checks its
source: another version may take or use these names otherwise, and is imported as it
is. :data:`DEFERRED` names the groups deferred (``tests/test_deferred_imports.py`` fails
on any not, as on a patch skipped).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Group:
    """Modules deferred together, the names their importers take from each at import,
    and the files (from site-packages, in :data:`SHIPPED`) read to know it."""

    name: str
    modules: dict[str, tuple[str, ...]]
    files: tuple[str, ...]


# Each file read for this (from site-packages), by its sha256 then.
SHIPPED: dict[str, str] = {
    "libp2p/__init__.py": "803e73ef8793fcd36c63577e758569face7daccf433314a1dff73722aefb76ab",
    "libp2p/custom_types.py": "4a6150e13a8553b681a940c98d3106756a218a916cfe2a414a0a8f61992be2d5",
    "libp2p/transport/quic/utils.py": (
        "602553ebcd28a4adbfc9063e10535682910b3f653f901f2621a023540b20cb3a"
    ),
    "libp2p/transport/quic/transport.py": (
        "f06c24fa7db90efbc1b86457ec1bb7053fab43f1e5becd35f678be454ed98470"
    ),
    "libp2p/transport/quic/stream.py": (
        "13bdf0f5e20e04baa066a9a8f2fa0a8b0f88351a4369d7dd8d0ecf9e04a96cb4"
    ),
    "libp2p/transport/__init__.py": (
        "e6f60d64ba30b0a0d22ae2e34f57af0e395ae9312bc1fa9cb254e622f7ac702b"
    ),
    "libp2p/transport/websocket/__init__.py": (
        "02b65805a8b3e3df401363bd889fa874d7a12f390bcda3a5fad12b7293f8ec06"
    ),
    "libp2p/transport/websocket/transport.py": (
        "8a6e4678c2c0ff9569bd79a0cfa883929fdfbaebd9e902d800eafa76d81d01e5"
    ),
    "libp2p/host/basic_host.py": (
        "e5bd8f6c2b0b6ff04d4a63ef51a3f7087b7063a65cf69f74a02e36e3d859f7cb"
    ),
    "libp2p/security/tls/autotls/acme.py": (
        "8d685cc27bf8895ab9ba090ed6a80eef37c900a0351cf32a55f432c04e3ac9aa"
    ),
    "libp2p/security/tls/autotls/broker.py": (
        "dea5733d96b02c26abffbd1d677408d5bb74510df881949336bbc6e3466f22aa"
    ),
    "libp2p/discovery/mdns/__init__.py": (
        "50c1d9299d1e63d46e4046eb0759407aaf2125f8f503450f86327d41f655997f"
    ),
    "libp2p/discovery/mdns/mdns.py": (
        "1be8dea6111201b2a98659160ba0dc3c988786159dc1d614c5e8271305b717b5"
    ),
    "libp2p/security/secio/transport.py": (
        "79cb9b41372caaa8dc90dd81d7b1371eb44686f1ac217cd6062800bdd4f1932e"
    ),
    "dns/quic/__init__.py": "4e36733ceee5a250aed3fbfe31c2ec7d50408f3cab1a8cddaa5ff230c21dcefe",
    "dns/query.py": "fff3ff7fbd62dce27a46a55d019cb725b0886ac57e94aec84e5f0dc9af1e98a5",
    "dns/asyncquery.py": "0acb0fb0ff9d71e4769a83848912705ad0645789cd7689ce6ead4030d1d04f35",
}


GROUPS: tuple[Group, ...] = (
    Group(
        "quic",
        {
            # libp2p/__init__.py: the QUIC transport built in new_swarm for a QUIC listen
            # address or enable_quic; is_quic_multiaddr never called.
            "libp2p.transport.quic.utils": ("is_quic_multiaddr",),
            "libp2p.transport.quic.transport": ("QUICTransport",),
            # libp2p/custom_types.py: a Callable alias's argument.
            "libp2p.transport.quic.stream": ("QUICStream",),
        },
        (
            "libp2p/__init__.py",
            "libp2p/custom_types.py",
            "libp2p/transport/quic/utils.py",
            "libp2p/transport/quic/transport.py",
            "libp2p/transport/quic/stream.py",
        ),
    ),
    Group(
        "websocket",
        {
            # libp2p/transport/__init__.py re-exports the transport; new_swarm builds one
            # for a /ws or /wss listen address.
            "libp2p.transport.websocket": (),
            "libp2p.transport.websocket.transport": ("WebsocketTransport",),
        },
        (
            "libp2p/transport/__init__.py",
            "libp2p/transport/websocket/__init__.py",
            "libp2p/transport/websocket/transport.py",
        ),
    ),
    Group(
        "autotls",
        {
            # libp2p/host/basic_host.py: used when the host is asked for AutoTLS.
            "libp2p.security.tls.autotls.acme": ("ACMEClient", "compute_b36_peer_id"),
            "libp2p.security.tls.autotls.broker": ("BrokerClient",),
        },
        (
            "libp2p/host/basic_host.py",
            "libp2p/security/tls/autotls/acme.py",
            "libp2p/security/tls/autotls/broker.py",
        ),
    ),
    Group(
        "mdns",
        {
            # libp2p/host/basic_host.py: built when enable_mDNS (dms: ``mdns = true``).
            "libp2p.discovery.mdns": (),
            "libp2p.discovery.mdns.mdns": ("MDNSDiscovery", "create_mdns_discovery"),
        },
        (
            "libp2p/host/basic_host.py",
            "libp2p/discovery/mdns/__init__.py",
            "libp2p/discovery/mdns/mdns.py",
        ),
    ),
    Group(
        "secio",
        # libp2p/__init__.py: ``import ... as secio``, used by new_swarm without sec_opt.
        {"libp2p.security.secio.transport": ()},
        (
            "libp2p/__init__.py",
            "libp2p/security/secio/transport.py",
        ),
    ),
    Group(
        "doq",
        {
            # dns/query.py, dns/asyncquery.py: ``import dns.quic``; these three in
            # signatures (evaluated at import), the rest inside the DoQ functions.
            "dns.quic": ("Headers", "SyncQuicConnection", "AsyncQuicConnection"),
        },
        (
            "dns/quic/__init__.py",
            "dns/query.py",
            "dns/asyncquery.py",
        ),
    ),
)

# The groups this process defers (their real modules not imported until used).
DEFERRED: list[str] = []
_lock = threading.RLock()
_owner: dict[str, Group] = {}  # deferred module -> its group, while deferred
_loaded: set[str] = set()  # the groups whose real modules are imported and put back


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _site(top: str) -> Path | None:
    """The directory the top-level package ``top`` would be imported from, unimported."""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent.parent


def is_shipped(group: Group) -> bool:
    """Each of the group's files has the digest it was read against."""
    sites: dict[str, Path | None] = {}
    for path in group.files:
        top = path.split("/", 1)[0]
        site = sites.setdefault(top, _site(top))
        if site is None or _sha256(site / path) != SHIPPED[path]:
            return False
    return True


def defer() -> list[str]:
    """Defer each group none of whose modules is imported yet and whose files are as
    read; the groups deferred."""
    with _lock:
        for group in GROUPS:
            if group.name in DEFERRED or any(m in sys.modules for m in group.modules):
                continue
            if is_shipped(group):
                _owner.update(dict.fromkeys(group.modules, group))
                DEFERRED.append(group.name)
        if _owner and not any(isinstance(f, _Finder) for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder())
        return list(DEFERRED)


def load(group: Group) -> None:
    """Import the group's real modules; put their objects wherever a ``Deferred`` of
    the group is, in the modules of the packages deferred from.

    Only taking the stand-ins out is done under ``_lock``: the imports are not. Python's
    module locks order threads importing the same module (and tell a cycle); a lock of
    ours held across them would deadlock against a thread that, in the middle of
    importing a module these imports need, uses a ``Deferred``. An import that fails
    (aioquic not installed) raises its ``ImportError`` here, at each use, as
    ``import libp2p`` would have: the group is not counted loaded."""
    if group.name in _loaded:
        return
    with _lock:
        for name in group.modules:
            if _owner.get(name) is group:
                del _owner[name]
                if isinstance(sys.modules.get(name), StandIn):
                    del sys.modules[name]
    for name in group.modules:
        importlib.import_module(name)
    tops = tuple({name.split(".", 1)[0] + "." for name in group.modules})
    for module in list(sys.modules.values()):
        name = getattr(module, "__name__", None)
        if not isinstance(name, str) or not (name + ".").startswith(tops):
            continue
        found = vars(module)
        for key, value in list(found.items()):
            if isinstance(value, Deferred) and value._module in group.modules:
                found[key] = getattr(sys.modules[value._module], value._name)
    _loaded.add(group.name)


class _Finder(importlib.abc.MetaPathFinder):
    """Answers for deferred modules with their stand-ins; for nothing else."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        group = _owner.get(fullname)
        if group is None:
            return None
        real = importlib.machinery.PathFinder.find_spec(fullname, path)
        if real is None:
            return None
        spec = importlib.machinery.ModuleSpec(
            fullname,
            _StandInLoader(group),
            origin=real.origin,
            is_package=real.submodule_search_locations is not None,
        )
        spec.submodule_search_locations = real.submodule_search_locations
        return spec


class _StandInLoader(importlib.abc.Loader):
    def __init__(self, group: Group) -> None:
        self.group = group

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return StandIn(spec.name, self.group)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


class StandIn(types.ModuleType):
    """In ``sys.modules`` in place of a deferred module: its importers' names as
    :class:`Deferred`; anything else imports the real module and answers from it."""

    def __init__(self, name: str, group: Group) -> None:
        super().__init__(name, f"stands in for {name} until used (dms.network.deferred)")
        self._group = group
        for attr in group.modules[name]:
            setattr(self, attr, Deferred(name, attr, group))

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        load(self._group)
        return getattr(sys.modules[self.__name__], attr)


class Deferred:
    """A class or function of a deferred module; any use imports it and delegates."""

    def __init__(self, module: str, name: str, group: Group) -> None:
        self._module = module
        self._name = name
        self._group = group

    def real(self) -> Any:
        load(self._group)
        return getattr(sys.modules[self._module], self._name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.real()(*args, **kwargs)

    def __instancecheck__(self, obj: Any) -> bool:
        return isinstance(obj, self.real())

    def __subclasscheck__(self, cls: type) -> bool:
        return issubclass(cls, self.real())

    def __mro_entries__(self, bases: tuple[Any, ...]) -> tuple[Any, ...]:
        return (self.real(),)

    # ``X | None`` in a signature evaluated at import (dnspython's): a Union holding
    # this stand-in, not the class; resolved by whoever reads the hints (nobody at run).
    def __or__(self, other: Any) -> Any:
        return typing.Union[self, other]  # noqa: UP007

    def __ror__(self, other: Any) -> Any:
        return typing.Union[other, self]  # noqa: UP007

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return getattr(self.real(), attr)

    def __repr__(self) -> str:
        return f"<deferred {self._module}.{self._name}>"
