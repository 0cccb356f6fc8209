"""What ``dms run`` logs: what dms does, one line each; libp2p's chatter only at DEBUG;
``--log-format json`` for log shippers."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

from dms.cli.node import JsonLines, QuietLibp2p
from tests.clitools import Daemon, dms, dms_json, init_homes, providers_and_owners
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
IRIS = ROOT / "examples" / "iris-features.csv"
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")


def record_lines(text: str) -> list[str]:
    """The log's lines but those of a traceback (from its 'Traceback' line to the next
    record, its exception's own last line included: a stop under load can have py-libp2p
    log one at ERROR, and the line that names the exception starts at the margin)."""
    lines: list[str] = []
    in_traceback = False
    for line in text.splitlines():
        if line.startswith("Traceback"):
            in_traceback = True
        elif TEXT_LINE.match(line):
            in_traceback = False
        if not in_traceback and not line.startswith(" "):
            lines.append(line)
    return lines


def worker_says(owner_id: str) -> tuple[str, ...]:
    """What the provider logs of a deployment and a mining session of ``owner_id``."""
    return (
        f"peer {owner_id} joined",
        f"bid to {owner_id}: 2 lease(s) locked",
        "bid won: lease",
        "of deployment",
        "mining step done in",
        "(mining) for",
        "completed after",
        "released 1 lease(s)",
    )


# The requester's side of placement: rounds, choices, runs, ends.
REQUESTER_SAYS = (
    r"deployment \w+: round 1: asking \d+ peer\(s\) for 2 slot\(s\)",
    r"deployment \w+: w\.0: chose \w+ \(",
    r"deployment \w+: w\.1: running on \w+",
    r"deployment \w+: every allocation completed",
)


def test_the_daemon_logs_peers_bids_allocations_and_mining_rounds(tmp_path: Path) -> None:
    owner, provider = tmp_path / "owner", tmp_path / "provider"
    init_homes(owner, provider)
    worker, requester = providers_and_owners(
        [provider], [owner], cpu="2", first_args=("--log-format", "json")
    )
    try:
        job = tmp_path / "nap.yaml"
        job.write_text(
            "name: nap\nallocations:\n  - {name: w, executor: compute, count: 2, "
            "resources: {cpu: 100m, ram: 16MiB}, params: {mode: sleep, seconds: 0.1}}\n"
        )
        assert dms(owner, "deploy", str(job), "--follow", timeout=60).returncode == 0
        mine = ["mine", "skmeans", "--data", str(IRIS), "--k", "3", "--out", str(tmp_path / "m")]
        assert dms(owner, *mine, timeout=300).returncode == 0
        # The last releases and ends are logged after 'dms mine' returns: waited for, not
        # slept (1 s was not always enough on a loaded machine).
        owner_id = requester.info["peer_id"]
        wait_for(
            lambda: all(said in worker.stderr() for said in worker_says(owner_id)),
            60,
            "the worker's lines",
        )
        wait_for(
            lambda: all(re.search(said, requester.stderr()) for said in REQUESTER_SAYS),
            60,
            "the requester's lines",
        )
    finally:
        requester.stop()
        worker.stop()
    records = [json.loads(line) for line in worker.stderr().splitlines()]
    assert records and all(set(r) >= {"time", "level", "logger", "message"} for r in records)
    said = "\n".join(r["message"] for r in records)
    for expected in worker_says(owner_id):
        assert expected in said, (expected, said)
    assert re.search(r"allocation \w+ started: w\.0 of deployment \w+ \(compute\)", said)
    # libp2p's connection manager reports every 10 s at INFO: not at this level. (What
    # py-libp2p logs at WARNING and above is shown: a stop under load can cut a
    # handshake short, which it logs at ERROR, and that is not chatter.)
    chatter = [r for r in records if r["logger"].startswith("libp2p")]
    assert not [r for r in chatter if r["level"] in ("DEBUG", "INFO")], chatter
    lines = record_lines(requester.stderr())
    assert all(TEXT_LINE.match(line) for line in lines), lines
    assert any("mining session" in line and "being placed" in line for line in lines)
    assert sum("the worker learns" in line for line in lines) == 1, lines  # said once
    # The requester's side of placement: rounds, choices, runs, ends.
    for pattern in REQUESTER_SAYS:
        assert any(re.search(pattern, line) for line in lines), (pattern, lines)
    assert any(f"peer {worker.info['peer_id']} joined" in line for line in lines)


PEER = "12D3KooWEk1HqpKwDGECTsgfLTfkDm4LfnUTYkeWPi18pnff97ux"
# What py-libp2p 0.8's relay logged for each request a node that is no relay refused
# (three nodes on loopback, one bootstrapped on another's 192.0.2.2 address, so
# judged private: 39 ERRORs and 32 WARNINGs each in 12 minutes).
REFUSAL_LINES = [
    ("libp2p.relay.circuit_v2.protocol", logging.ERROR,
     f"Error reading from hop stream from {PEER}: Cannot read from stream; stream is reset", ()),
    ("libp2p.relay.circuit_v2.protocol", logging.ERROR,
     f"Unexpected error handling hop stream from {PEER}: Cannot write to stream; stream is "
     "reset", ()),
    ("libp2p.relay.circuit_v2.protocol", logging.ERROR, "Error sending status message: %s",
     ("Cannot write to stream; stream is reset",)),
    ("libp2p.relay.circuit_v2.transport", logging.WARNING,
     "Reservation failed with relay %s: code %s", (PEER, 202)),
]  # fmt: skip


def test_a_refused_relay_request_is_debug_not_errors() -> None:
    """dms's relay refuses and says so at INFO ('relay refused PEER: not a relay'); what
    py-libp2p logs of the stream it then reset is not shown at INFO."""
    quiet = QuietLibp2p(logging.INFO)
    for name, level, message, args in REFUSAL_LINES:
        record = logging.LogRecord(name, level, __file__, 1, message, args, None)
        assert not quiet.filter(record), record.getMessage()
        assert record.levelname == "DEBUG"
    # A relay error of another kind is still shown.
    other = logging.LogRecord(
        "libp2p.relay.circuit_v2.protocol", logging.ERROR, __file__, 1, "Invalid message type 9",
        None, None,
    )  # fmt: skip
    assert quiet.filter(other) and other.levelname == "ERROR"


def test_a_granted_reservations_stream_end_is_debug_not_an_error(tmp_path: Path) -> None:
    """A relay (forced public) and a node (forced private) on loopback: the node reserves
    a slot, its client closes the hop stream, and py-libp2p's hop loop on the relay,
    reading for another message, logged "ERROR ... Error reading from hop stream from
    PEER: " (no reason: the stream's end) for every reservation and renewal. It is
    DEBUG now (the relay logs at DEBUG here, to see the line come); a read that fails
    with a reason is still an ERROR."""
    relay, node = tmp_path / "relay", tmp_path / "node"
    init_homes(relay, config='reachability = "public"\nrelay = true\nlog_level = "DEBUG"\n')
    init_homes(node, config='reachability = "private"\n')
    first = Daemon(relay)
    second = Daemon(node, "--bootstrap", first.info["addrs"][0])
    ended = f"Error reading from hop stream from {second.info['peer_id']}: "
    try:
        wait_for(lambda: ended in first.stderr(), 120, "the reservation's stream to end")
    finally:
        assert second.stop() == 0, second.stderr()
        assert first.stop() == 0
    assert "reserved a relay slot on" in second.stderr(), second.stderr()
    said = [line for line in record_lines(first.stderr()) if line.endswith(ended)]
    assert said and all(" DEBUG libp2p.relay" in line for line in said), said
    quiet = QuietLibp2p(logging.INFO)
    bad = logging.LogRecord("libp2p.relay.circuit_v2.protocol", logging.ERROR, __file__, 1,
                            f"Error reading from hop stream from {PEER}: message too large",
                            (), None)  # fmt: skip
    assert quiet.filter(bad) and bad.levelname == "ERROR"


def test_a_reservation_a_relay_refused_for_its_limits_is_still_a_warning() -> None:
    """A relay at its max_reservations refuses with RESOURCE_LIMIT_EXCEEDED (201): the
    refused node holds no slot there, dms says nothing of it, and py-libp2p's WARNING
    was demoted with the routine 'not a relay' (202) one, so the node, unreachable,
    logged nothing (three daemons, a relay with relay_max_reservations = 1 and two
    private nodes: the relay said 'relay refused ...: 1 reservations held', the node
    it refused not a line)."""
    from libp2p.relay.circuit_v2.protocol_buffer import StatusCode

    quiet = QuietLibp2p(logging.INFO)
    for code, shown in ((StatusCode.RESOURCE_LIMIT_EXCEEDED, True),
                        (StatusCode.RESERVATION_REFUSED, True),
                        (StatusCode.PERMISSION_DENIED, False)):  # fmt: skip
        record = logging.LogRecord(
            "libp2p.relay.circuit_v2.transport", logging.WARNING, __file__, 1,
            "Reservation failed with relay %s: code %s", (PEER, code), None,
        )  # fmt: skip
        assert quiet.filter(record) is shown, record.getMessage()
        assert record.levelname == ("WARNING" if shown else "DEBUG")


def test_libp2p_chatter_is_debug_and_json_lines_are_one_object() -> None:
    def record(name: str, level: int, message: str = "m") -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, message, None, None)

    quiet = QuietLibp2p(logging.INFO)
    chatter = record("libp2p.network.auto_connector", logging.INFO)
    assert not quiet.filter(chatter) and chatter.levelname == "DEBUG"
    assert quiet.filter(record("libp2p.network", logging.WARNING))
    assert quiet.filter(record("dms.node", logging.INFO))
    assert QuietLibp2p(logging.DEBUG).filter(record("libp2p.x", logging.INFO))
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord(
            "dms.actor", logging.ERROR, __file__, 1, "a\nb %s", ("c",), sys.exc_info()
        )
    line = JsonLines().format(failed)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["message"] == "a\nb c" and "ValueError: boom" in parsed["exception"]
    assert parsed["time"].endswith("+00:00")


def test_a_daemon_that_logs_more_than_a_pipe_holds_still_answers_and_stops(
    tmp_path: Path,
) -> None:
    """The test daemons' log goes to a file: to a pipe nobody read, a daemon's 64 KiB'th
    byte blocked the thread that logged it (a provider stuck mid-call froze a 40-round
    collaboration at round 39; a daemon so blocked did not stop on SIGTERM)."""
    home = tmp_path / "chatty"
    # Beats every 0.1 s (the least allowed), each logged at DEBUG: 80 KiB in about 2 s,
    # not 9 at 0.5 s; a pipe nobody reads blocks at 64 KiB whatever the pace.
    init_homes(home, config='heartbeat_s = 0.1\nlog_level = "DEBUG"\n')
    daemon = Daemon(home)
    try:
        wait_for(lambda: daemon.log.stat().st_size > 80 * 1024, 60, "80 KiB of log")
        assert dms_json(home, "peers", "list") == []
    finally:
        assert daemon.stop() == 0
    assert "DEBUG" in daemon.stderr()
