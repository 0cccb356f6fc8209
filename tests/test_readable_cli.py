"""What people read: every table command at 80 columns against real ``dms run`` daemons,
and ``dms status [--watch]``.

Each command runs as a user runs it (a subprocess, ``COLUMNS=80``) and is checked:
no line longer than 80, no word cut across lines (every word of its ``--json``
answer is either whole in the text or not shown at all), and no raw Unix time.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dms.node.api import ApiClient
from tests.clitools import (
    Daemon,
    at_80,
    dms_json,
    dms_many,
    env_for,
    init_home_quick,
    init_homes,
    providers_and_owners,
    side_by_side,
    submit,
)
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
IRIS = ROOT / "examples" / "iris-features.csv"
JOB = ROOT / "examples" / "jobs" / "compute.yaml"
# A number that reads as a Unix time; check_readable counts it if within 30 days of now.
MULTIADDR = re.compile(r"/ip[46]/\S+/p2p/\w+")
UNIX_TIME = re.compile(r"(?<![\d.])1[5-9]\d{8}(?:\.\d+)?(?![\d])")


def words(data: Any) -> set[str]:
    """The words of every string in a JSON answer."""
    if isinstance(data, dict):
        return set().union(*(words(v) for v in data.values()), *(words(k) for k in data))
    if isinstance(data, list):
        return set().union(*(words(v) for v in data)) if data else set()
    if isinstance(data, str):
        return {w.strip(",;()[]{}'\"") for w in data.split()}
    return set()


def cut_words(text: str, vocabulary: set[str]) -> list[str]:
    """Words of ``vocabulary`` that the text cuts across lines: the end of a cell (or a
    line) and the start of the same cell on the next lines join into one of them. A
    multiaddr split before its ``/p2p/`` part is not cut: whole, it is 81 characters
    and fits no 80-column line, so it is split where its parts meet."""
    prefixes = {w[:i] for w in vocabulary for i in range(1, len(w))}
    rows = [re.split(r"[│┃]", line) for line in text.splitlines()]
    cut = []
    for n, cells in enumerate(rows):
        for col, cell in enumerate(cells):
            parts = cell.split()
            if not parts or parts[-1] in vocabulary or parts[-1] not in prefixes:
                continue
            joined = parts[-1]
            for below in rows[n + 1 :]:
                if len(below) != len(cells) or not below[col].split():
                    break
                head = below[col].split()[0]
                if head.startswith("/p2p/"):
                    break
                joined += head
                if joined in vocabulary:
                    cut.append(joined)
                    break
                if joined not in prefixes or len(below[col].split()) > 1:
                    break
    return cut


def check_readable(text: str, answer: Any = None) -> None:
    lines = text.splitlines()
    assert lines, "nothing printed"
    # A multiaddr alone on its line stays whole (81 characters with a 5-digit port), to be
    # copied into --bootstrap: the terminal wraps it, nothing splits it.
    too_long = [line for line in lines if len(line) > 80 and not MULTIADDR.fullmatch(line)]
    assert not too_long, "\n".join(too_long)
    raw = [t for t in UNIX_TIME.findall(text) if abs(float(t) - time.time()) < 30 * 86400]
    assert not raw, f"raw Unix times {raw}:\n{text}"
    if answer is not None:
        cut = cut_words(text, words(answer))
        assert not cut, f"words cut across lines: {cut}\n{text}"


def test_the_cut_word_check_finds_a_cut_word() -> None:
    folded = "│ sha │ com │\n│ rd0 │ ple │\n│     │ ted │\n"
    assert sorted(cut_words(folded, {"shard0", "completed"})) == ["completed", "shard0"]
    assert cut_words("│ shard0 │ completed │\n│ x │ y │", {"shard0", "completed"}) == []
    assert cut_words("a long line ends with lock\ned and goes on", {"locked"}) == ["locked"]


class Homes:
    """A provider and a data owner, with a deployment and a mining session done (what
    their commands printed at 80 columns is checked with the other tables)."""

    def __init__(self, root: Path) -> None:
        self.owner, self.provider = root / "owner", root / "provider"
        init_homes(self.owner, self.provider)
        self.provider_daemon, self.owner_daemon = providers_and_owners(
            [self.provider], [self.owner], cpu="2"
        )
        self.provider_id = self.provider_daemon.info["peer_id"]
        deploy = ["deploy", str(JOB), "--follow"]
        mine = ["mine", "skmeans", "--data", str(IRIS), "--k", "3", "--out", str(root / "m")]
        self.done = [(deploy, at_80(self.owner, *deploy)), (mine, at_80(self.owner, *mine))]
        for args, done in self.done:
            assert done.returncode == 0, (args, done.stderr)
        self.deployments = dms_json(self.owner, "deployment", "list")
        self.session = next(d["id"] for d in self.deployments if d["name"].startswith("mine-"))
        self.compute = next(d["id"] for d in self.deployments if d["name"] == "compute-demo")

    def stop(self) -> None:
        self.owner_daemon.stop()
        self.provider_daemon.stop()


@pytest.fixture(scope="module")
def homes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Homes]:
    made = Homes(tmp_path_factory.mktemp("readable"))
    try:
        yield made
    finally:
        made.stop()


def commands(h: Homes, root: Path) -> list[tuple[Path, list[str]]]:
    o, p = h.owner, h.provider
    return [
        (o, ["status"]),
        (o, ["peers", "list"]),
        (o, ["peers", "self"]),
        (o, ["peers", "ping", h.provider_id]),
        (o, ["deployment", "list"]),
        (o, ["deployment", "status", h.compute]),
        (o, ["deployment", "manifest", h.compute]),
        (o, ["deployment", "manifest", h.session]),
        (o, ["deployment", "logs", h.session]),
        (p, ["resources"]),
        (o, ["key", "list"]),
        (o, ["key", "did", "user"]),
        (o, ["config", "show"]),
        (o, ["actor", "cmd", "/public/status"]),
        (p, ["actor", "cmd", "/dms/node/resources/allocated"]),
        (o, ["job", "validate", str(JOB)]),
        (o, ["init"]),
        (p, ["benchmark"]),
        (p, ["onboard", "--cpu", "2", "--ram", "1", "--disk", "1"]),
        (o, ["mine", "dbskmeans", "--data", str(IRIS), "--k", "3", "--out", str(root / "d"),
             "--local", "--compare"]),
        # and the fixture's 'deploy --follow' and placed 'mine skmeans' (Homes.done)
    ]  # fmt: skip


def test_every_table_command_fits_80_columns_with_whole_words(homes: Homes, tmp_path: Path) -> None:
    every = commands(homes, tmp_path)
    changing = ("deploy", "mine", "onboard", "init", "benchmark")  # not rerun for --json
    reading = [(home, args) for home, args in every if args[0] not in changing]
    # The commands that only read run side by side, and their --json twins (the words a
    # table may show) in one process per home (nothing changes the nodes meanwhile); the
    # others one after the other, in order.
    shown = side_by_side(lambda h=h, a=a: at_80(h, *a) for h, a in reading)
    answers: dict[tuple[Path, str], Any] = {}
    for home in {h for h, _ in reading}:
        asked = [a for h, a in reading if h == home]
        for args, (code, out, err) in zip(
            asked, dms_many(home, [[*a, "--json"] for a in asked]), strict=True
        ):
            assert code == 0, (args, err)
            answers[home, " ".join(args)] = json.loads(out)
    checks = [
        ((h, a), done, answers[h, " ".join(a)]) for (h, a), done in zip(reading, shown, strict=True)
    ]

    def changed_in_order(home: Path) -> list[tuple[tuple[Path, list[str]], Any, Any]]:
        return [
            ((home, args), at_80(home, *args), None)
            for h, args in every
            if h == home and args[0] in changing
        ]

    # Each home's changing commands in order, the two homes side by side.
    for ran in side_by_side(lambda h=h: changed_in_order(h) for h in (homes.owner, homes.provider)):
        checks += ran
    checks += [((homes.owner, args), done, None) for args, done in homes.done]
    for (_, args), done, answer in checks:
        assert done.returncode == 0, (args, done.stderr)
        try:
            check_readable(done.stdout, answer)
        except AssertionError as exc:
            raise AssertionError(f"dms {' '.join(args)}: {exc}") from None
    # relative times where there were Unix numbers
    listed = at_80(homes.owner, "deployment", "list").stdout
    assert re.search(r"\d+ (s|min) ago", listed), listed
    benchmark = at_80(homes.provider, "actor", "cmd", "/dms/node/onboarding/status").stdout
    check_readable(benchmark)
    assert "measured_at" in benchmark


def test_status_shows_node_peers_resources_deployments_and_mining(homes: Homes) -> None:
    done = at_80(homes.owner, "status")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    check_readable(text)
    assert homes.owner_daemon.info["peer_id"] in text and homes.provider_id in text
    assert homes.session in text and homes.compute in text
    assert "mining sessions" in text and "skmeans" in text and "completed" in text
    assert re.search(r"\d+ (s|min) ago", text)
    provider = at_80(homes.provider, "status").stdout
    assert "free of onboarded: cpu" in provider
    data = dms_json(homes.owner, "status")
    assert set(data) >= {"node", "resources", "peers", "deployments", "mining"}
    assert data["node"]["peer_id"] == homes.owner_daemon.info["peer_id"]
    session = next(m for m in data["mining"] if m["id"] == homes.session)
    assert session["phase"] == "completed" and session["steps"] >= 2


def peer_lists_answered(node: Daemon) -> int:
    """How many peer lists ``node`` has answered (GET /metrics)."""
    api = ApiClient(node.home, node.info["peer_id"])
    _, body = api._request("GET", "/metrics", None, 10)
    found = re.search(
        r'dms_invokes_total\{behaviour="/dms/node/peers/list",outcome="ok"\} (\S+)', body.decode()
    )
    return int(float(found.group(1))) if found else 0


def test_status_watch_refreshes_until_ctrl_c(homes: Homes) -> None:
    env = env_for(homes.owner)
    env["COLUMNS"] = "80"
    command = [sys.executable, "-m", "dms", "status", "--watch", "--interval", "0.3"]
    lines = subprocess.Popen(
        [*command, "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert lines.stdout is not None
    first, second = lines.stdout.readline(), lines.stdout.readline()
    lines.send_signal(signal.SIGINT)
    # Read to the end: it may have printed more lines meanwhile, and a full pipe nobody
    # reads holds its exit (once 20 s 'wait' timed out so, on a loaded machine).
    _, err = lines.communicate(timeout=20)
    assert lines.returncode == 0, err
    one, two = json.loads(first), json.loads(second)
    assert two["at"] > one["at"] and one["node"]["peer_id"] == two["node"]["peer_id"]

    # Ctrl-C once the screen has been drawn and is being refreshed (a second gather), not
    # after a sleep of 3 s: on a loaded machine the command could still be starting then,
    # and end on the Ctrl-C having shown nothing. (Written to a pipe, the screen is printed
    # as it stands when the command ends: its output cannot tell the test before.)
    before = peer_lists_answered(homes.owner_daemon)
    screen = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(
        lambda: peer_lists_answered(homes.owner_daemon) >= before + 2, 120, "the screen refreshed"
    )
    screen.send_signal(signal.SIGINT)
    out, err = screen.communicate(timeout=20)
    assert screen.returncode == 0, err
    assert homes.owner_daemon.info["peer_id"] in out and "mining sessions" in out
    check_readable(out)


@pytest.mark.parametrize("launcher", ["python -m dms", "the dms script"])
@pytest.mark.parametrize("loaded", ["typer", "dms.cli.app"])
def test_ctrl_c_while_dms_is_still_loading_ends_it_quietly(
    homes: Homes, loaded: str, launcher: str
) -> None:
    """Ctrl-C pressed as 'dms status --watch' starts (its modules take seconds to load
    on a busy machine) ends it with 130 and no traceback: in dms.cli.app's own imports
    ('typer' in) or in the command's ('dms.cli.app' in, 'dms.cli.status' loading),
    whether it was started as ``python -m dms`` or by the installed script."""
    program = [sys.executable, "-m", "dms"]
    if launcher == "the dms script":
        program = [str(Path(sys.executable).parent / "dms")]
    env = {**env_for(homes.owner), "PYTHONPROFILEIMPORTTIME": "1"}
    started = subprocess.Popen(
        [*program, "status", "--watch", "--json"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert started.stderr is not None
    # -X importtime writes a line on stderr as each module is in: Ctrl-C just after.
    said = []
    for line in started.stderr:
        said.append(line)
        if line.split("|")[-1].strip() == loaded:
            break
    started.send_signal(signal.SIGINT)
    out, err = started.communicate(timeout=60)
    told = [t for t in "".join([*said, err]).splitlines() if not t.startswith("import time:")]
    assert started.returncode == 130 and not told and not out, (started.returncode, told)


def test_status_without_a_node_is_one_line(tmp_path: Path) -> None:
    home = tmp_path / "idle"
    init_home_quick(home)
    done = at_80(home, "status")
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and "dms run" in done.stderr


def test_long_tables_show_the_first_rows_and_say_how_to_see_all(
    homes: Homes, tmp_path: Path
) -> None:
    job = tmp_path / "nap.yaml"
    job.write_text(
        "name: nap\nallocations:\n  - {name: w, executor: compute, "
        "resources: {cpu: 100m, ram: 16MiB}, params: {mode: sleep, seconds: 0.1}}\n"
    )
    submit(homes.owner, job, 21)
    shown = at_80(homes.owner, "deployment", "list").stdout
    assert "more not shown: --all or --json" in shown
    every = at_80(homes.owner, "deployment", "list", "--all").stdout
    ids = [d["id"] for d in dms_json(homes.owner, "deployment", "list")]
    assert len(ids) > 20 and all(i in every for i in ids)
    assert sum(i in shown for i in ids) == 20
    check_readable(every)
