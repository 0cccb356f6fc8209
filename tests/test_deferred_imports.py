"""What a dms host does not use by default (py-libp2p's QUIC and WebSocket transports,
AutoTLS, mDNS, secio; dnspython's DNS over QUIC) is imported when first used
(dms.network.deferred): each check runs in a fresh interpreter, as a daemon starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def test_the_hostile_peer_imported_first_defers_them_too() -> None:
    """``dms.sim.adversary`` imports libp2p above its ``dms`` imports (isort's order): a
    process that imported it first (an adversarial test, ``bench/adversary.py``) loaded
    every transport, aioquic among them, before ``dms.network`` could defer them."""
    found = run(
        "import json, sys\n"
        "import dms.sim.adversary\n"
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


def test_a_failed_load_raises_its_import_error_at_each_use() -> None:
    """With aioquic not importable a TCP host still starts (nothing imports it), and each
    QUIC listen address raises the ImportError ``import libp2p`` would have: the second
    raised KeyError('libp2p.transport.quic.transport'), the group counted loaded."""
    found = run(
        "import json, sys\n"
        "sys.modules['aioquic'] = None\n"  # as if it were not installed
        "import dms.network.host\n"
        "import libp2p\n"
        "from multiaddr import Multiaddr\n"
        "from libp2p.crypto.ed25519 import create_new_key_pair\n"
        "raised = []\n"
        "for _ in range(2):\n"
        "    try:\n"
        "        libp2p.new_host(key_pair=create_new_key_pair(),\n"
        "            listen_addrs=[Multiaddr('/ip4/127.0.0.1/udp/0/quic-v1')])\n"
        "    except Exception as exc:\n"
        "        raised.append(type(exc).__name__)\n"
        "libp2p.new_host(key_pair=create_new_key_pair(),\n"
        "    listen_addrs=[Multiaddr('/ip4/127.0.0.1/tcp/0')])\n"
        "print(json.dumps({'raised': raised}))\n"
    )
    assert found == {"raised": ["ModuleNotFoundError", "ModuleNotFoundError"]}


# Two groups of modules made for the test below: thread A's first use of Heavy imports
# dq_a, which needs dq_mid; thread B, importing dq_mid, uses Thing (of the other group).
DEADLOCK_MODULES = {
    "dq_sync.py": "import threading\na_in = threading.Event()\nb_in = threading.Event()\n",
    "dq_a.py": "import dq_sync\ndq_sync.a_in.set()\nimport dq_mid\nHeavy = 'heavy'\n",
    "dq_mid.py": (
        "import dq_sync\ndq_sync.b_in.set()\ndq_sync.a_in.wait(30)\n"
        "from dq_b import Thing\nvalue = Thing()\n"
    ),
    "dq_b.py": "def Thing():\n    return 'thing'\n",
}


def test_two_threads_loading_while_importing_do_not_deadlock(tmp_path: Path) -> None:
    """A first use in one thread (the trio thread's QUIC transport, say) while another
    thread imports a module that load needs and itself uses a deferred name: with the
    imports under deferred's lock, A held the lock waiting for dq_mid's import lock and
    B held that waiting for the lock, both for ever."""
    for name, text in DEADLOCK_MODULES.items():
        (tmp_path / name).write_text(text)
    found = run(
        "import json, os, sys, threading\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from dms.network import deferred\n"
        "deferred.GROUPS = (deferred.Group('dq1', {'dq_a': ('Heavy',)}, ()),\n"
        "    deferred.Group('dq2', {'dq_b': ('Thing',)}, ()))\n"
        "deferred.defer()\n"
        "import dq_sync\n"
        "from dq_a import Heavy\n"
        "got = {}\n"
        "def b():\n"
        "    import dq_mid\n"
        "    got['b'] = dq_mid.value\n"
        "def a():\n"
        "    got['a'] = Heavy.real()\n"
        "threads = [threading.Thread(target=b, daemon=True)]\n"
        "threads[0].start()\n"
        "dq_sync.b_in.wait(30)\n"
        "threads.append(threading.Thread(target=a, daemon=True))\n"
        "threads[1].start()\n"
        "for thread in threads:\n"
        "    thread.join(30)\n"
        "print(json.dumps(got), flush=True)\n"
        "os._exit(0)\n"  # not waiting on threads that may hang
    )
    assert found == {"a": "heavy", "b": "thing"}
