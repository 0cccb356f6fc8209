"""What a dms host does not use by default (py-libp2p's QUIC and WebSocket transports,
AutoTLS, mDNS, secio; dnspython's DNS over QUIC) is imported when first used
(dms.network.deferred): each check runs in a fresh interpreter, as a daemon starts."""

from __future__ import annotations

import json
import subprocess
import sys

from dms.network import deferred

# Packages only the deferred modules bring (none of them imported by anything else a
# daemon imports); the daemon-level check is tests/test_cli_startup.py's.
BROUGHT = ("aioquic", "pylsqpack", "trio_websocket", "wsproto", "requests", "httpx", "zeroconf")


def run(code: str) -> dict:
    """``code`` in a fresh interpreter; the JSON it prints last."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_every_group_is_deferred_for_the_installed_libraries() -> None:
    """Each group goes in only while the files it was read against are unchanged: an
    upgrade past them must fail here, not silently import everything again."""
    found = run(
        "import json, sys\n"
        "import dms.network.host\n"
        "from dms.network import deferred\n"
        "print(json.dumps({'deferred': deferred.DEFERRED, 'modules': sorted(sys.modules)}))\n"
    )
    assert found["deferred"] == [group.name for group in deferred.GROUPS]
    assert [m for m in found["modules"] if m.startswith(BROUGHT)] == []


def test_a_quic_listen_address_builds_the_real_quic_transport() -> None:
    """The first use loads the real modules and puts them wherever a stand-in was: the
    host gets py-libp2p's own QUICTransport, listening on UDP, and ``libp2p`` holds the
    real class again."""
    found = run(
        "import json, sys, trio\n"
        "import dms.network.host\n"
        "import libp2p, libp2p.custom_types\n"
        "from multiaddr import Multiaddr\n"
        "from libp2p.crypto.ed25519 import create_new_key_pair\n"
        "before = 'aioquic' in sys.modules\n"
        "host = libp2p.new_host(key_pair=create_new_key_pair(),\n"
        "    listen_addrs=[Multiaddr('/ip4/127.0.0.1/udp/0/quic-v1')])\n"
        "from libp2p.transport.quic.transport import QUICTransport\n"
        "from libp2p.transport.quic.stream import QUICStream\n"
        "listened = []\n"
        "async def main():\n"
        "    addr = Multiaddr('/ip4/127.0.0.1/udp/0/quic-v1')\n"
        "    async with host.run(listen_addrs=[addr]):\n"
        "        listened.extend(str(a) for a in host.get_addrs())\n"
        "trio.run(main)\n"
        "transports = host.get_network().transport_manager.get_transports()\n"
        "print(json.dumps({\n"
        "    'before': before,\n"
        "    'real': [type(t) is QUICTransport for t in transports],\n"
        "    'rebound': libp2p.QUICTransport is QUICTransport\n"
        "        and libp2p.custom_types.QUICStream is QUICStream,\n"
        "    'listened': listened,\n"
        "}))\n"
    )
    assert found["before"] is False
    assert found["real"] == [True]
    assert found["rebound"] is True
    assert any("/udp/" in a and "/quic-v1" in a for a in found["listened"]), found


def test_a_submodule_imported_under_a_stand_in_is_the_one_its_package_gets() -> None:
    """py-libp2p's transport manager imports a WebSocket module directly (inside a
    function): the real module, loaded under the package's stand-in, and the same object
    the real package holds once something loads it."""
    found = run(
        "import json, sys\n"
        "import dms.network.host\n"
        "from libp2p.transport.websocket.connection import P2PWebSocketConnection as c\n"
        "stand_in = type(sys.modules['libp2p.transport.websocket']).__name__\n"
        "import libp2p.transport\n"
        "before = isinstance(libp2p.transport.WebsocketTransport, type)\n"
        "import libp2p.transport.websocket as package\n"
        "same = package.P2PWebSocketConnection is c\n"  # uses the stand-in: loads
        "real = sys.modules['libp2p.transport.websocket']\n"
        "print(json.dumps({'stand_in': stand_in, 'before': before, 'same': same,\n"
        "    'package': type(real).__name__, 'parent': libp2p.transport.websocket is real,\n"
        "    'after': isinstance(libp2p.transport.WebsocketTransport, type)}))\n"
    )
    assert found == {
        "stand_in": "StandIn",
        "before": False,
        "same": True,
        "package": "module",
        "parent": True,
        "after": True,
    }


def test_a_group_whose_files_changed_is_imported_as_it_is() -> None:
    """A group one of whose files has another digest (another py-libp2p) is left out:
    its modules import as the library wrote them, the other groups are still deferred."""
    found = run(
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('copy', {deferred.__file__!r})\n"
        "copy = importlib.util.module_from_spec(spec)\n"
        "sys.modules['copy_of_deferred'] = copy\n"
        "spec.loader.exec_module(copy)\n"
        "copy.SHIPPED['libp2p/custom_types.py'] = '0' * 64\n"
        "groups = copy.defer()\n"
        "import libp2p\n"
        "print(json.dumps({'groups': groups, 'quic': isinstance(libp2p.QUICTransport, type),\n"
        "    'aioquic': 'aioquic.quic.connection' in sys.modules,\n"
        "    'websocket': 'trio_websocket' in sys.modules}))\n"
    )
    names = [group.name for group in deferred.GROUPS]
    assert found == {
        "groups": [name for name in names if name != "quic"],
        "quic": True,
        "aioquic": True,
        "websocket": False,
    }
