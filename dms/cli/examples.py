"""The examples at the end of every ``dms ... --help``: one or two real command lines
each (``tests/test_newcomer.py`` parses every one of them against its command)."""

from __future__ import annotations

IRIS = "examples/iris-features.csv"
PEER = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
DID = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"
ADDRESS = f"/ip4/10.0.0.5/tcp/900/p2p/{PEER}"  # 78 characters: whole in an 80-column help

EXAMPLES: dict[str, tuple[str, ...]] = {
    "init": ("dms init", "DMS_HOME=~/.dms-two dms init"),
    "run": (
        "dms run --listen /ip4/0.0.0.0/tcp/4001",
        f"dms run --detach --bootstrap {ADDRESS}",
    ),
    "logs": ("dms logs", "dms logs -f"),
    "stop": ("dms stop", "DMS_HOME=~/.dms-two dms stop"),
    "onboard": ("dms onboard --cpu 2 --ram 4 --disk 10", "dms onboard --cpu 1"),
    "offboard": ("dms offboard", "dms offboard --force"),
    "benchmark": ("dms benchmark",),
    "resources": ("dms resources", "dms resources --json"),
    "deploy": ("dms deploy examples/jobs/compute.yaml --follow",),
    "status": ("dms status", "dms status --watch"),
    "unlock": ("dms unlock", "dms unlock --timeout 2h"),
    "lock": ("dms lock", "dms lock --all"),
    "version": ("dms version", "dms --version"),
    "key new": ("dms key new backup",),
    "key did": ("dms key did user",),
    "key list": ("dms key list", "dms key list --json"),
    "cap grant": (f"dms cap grant {DID} --cap /dms/deployment --expiry 30d",),
    "cap delegate": (f"dms cap delegate {DID} --cap /dms/deployment --expiry 7d",),
    "cap anchor": (f"dms cap anchor --root {DID}", "dms cap anchor --provide TOKEN"),
    "cap remove": ("dms cap remove 3f2a9c", f"dms cap remove --root {DID}"),
    "cap revoke": ("dms cap revoke 3f2a9c",),
    "cap list": ("dms cap list", "dms cap list --json"),
    "config show": ("dms config show", "dms config show --json"),
    "mine kmeans": (f"dms mine kmeans --data {IRIS} --k 3 --local --out out/plain",),
    "mine skmeans": (
        f"dms mine skmeans --data {IRIS} --k 3 --local --compare --out out/iris",
        f"dms mine skmeans --data {IRIS} --k 3 --shards 2 --out out/placed --report",
    ),
    "mine dbskmeans": (f"dms mine dbskmeans --data {IRIS} --k 3 --local --out out/db",),
    "mine knn": ("dms mine knn --train train.csv --test test.csv --k 5 --local --out out/knn",),
    "mine sknn": (
        "dms mine sknn --train train.csv --test test.csv --k 5 --local --out out/sknn",
        "dms mine sknn --train train.csv --test test.csv --k 5 --out out/sknn --report",
    ),
    "mine collab propose": (
        f"dms mine collab propose --data mine.csv --owners {PEER} --k 3 --out proposal.json",
    ),
    "mine collab join": ("dms mine collab join proposal.json --data mine.csv",),
    "mine collab result": ("dms mine collab result 7e2c0a91 --wait 600 --out out/collab",),
    "actor cmd": ("dms actor cmd /public/status", f"dms actor cmd /public/status --dest {PEER}"),
    "actor send": (f"dms actor send /public/status --dest {PEER}",),
    "actor broadcast": ("dms actor broadcast /dms/broadcast text=hi",),
    "peers list": ("dms peers list", "dms peers list --all --json"),
    "peers self": ("dms peers self",),
    "peers ping": (f"dms peers ping {PEER}",),
    "peers connect": (f"dms peers connect {ADDRESS}",),
    "job validate": ("dms job validate examples/jobs/compute.yaml",),
    "deployment list": ("dms deployment list", "dms deployment list --all"),
    "deployment status": ("dms deployment status 5c1d0a7e9f2b",),
    "deployment logs": ("dms deployment logs 5c1d0a7e9f2b",),
    "deployment manifest": ("dms deployment manifest 5c1d0a7e9f2b",),
    "deployment shutdown": ("dms deployment shutdown 5c1d0a7e9f2b",),
    "sim run": ("dms sim run examples/sim/quickstart.yaml", "dms sim run SCENARIO.yaml --json"),
    "sim up": ("dms sim up --nodes 3", "dms sim up --nodes 5 --mode threads"),
}


def epilog(command: str) -> str | None:
    """The help's last paragraph for ``command`` ("mine skmeans"), if it has examples."""
    lines = EXAMPLES.get(command)
    if not lines:
        return None
    # A blank line between them: the help keeps each one a line of its own. The leading
    # ANSI reset (invisible) makes Typer read the text as ANSI, not as rich markup, which
    # would turn the ":key:" of "did:key:..." into an emoji.
    return "\x1b[0mExamples:\n\n" + "\n\n".join(f"  {line}" for line in lines)
