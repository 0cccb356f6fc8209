"""``dms unlock`` and ``dms lock``: the passphrase once per terminal session, or in
the OS keyring, instead of a prompt on every command (``specs/unlock.md``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer

from dms.cli.common import JsonOption, settings
from dms.cli.output import console, duration, emit_json
from dms.node.home import NODE_KEY, NodeError
from dms.security import Keystore, KeystoreError, agent, osring
from dms.security.keystore import passphrase_from_env_or_prompt

DEFAULT_TIMEOUT_S = 15 * 60
_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}

TimeoutOption = Annotated[
    str,
    typer.Option("--timeout", help="Forget after this long unused: 90s, 15m, 2h (at most 7d)."),
]
KeyringOption = Annotated[
    bool,
    typer.Option("--keyring", help="The OS keyring instead of this session (needs dms[keyring])."),
]


def parse_timeout(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|)\s*", text)
    seconds = float(match.group(1)) * _UNITS[match.group(2)] if match else 0.0
    if not 0 < seconds <= agent.MAX_TIMEOUT_S:
        raise NodeError(f"--timeout {text!r}: give a duration like 90s, 15m or 2h (at most 7d)")
    return seconds


def _checked_passphrase(home: Path) -> str:
    """Asked afresh (DMS_PASSPHRASE or a prompt, never a remembered one) and proven
    on the node key, so a typo is refused now rather than on every later command."""
    keystore = Keystore(home, passphrase=passphrase_from_env_or_prompt)
    if not keystore.exists(NODE_KEY):
        raise NodeError(f"{home} holds no node key yet: run 'dms init' first")
    passphrase = passphrase_from_env_or_prompt(NODE_KEY, False)
    try:
        Keystore(home, passphrase=lambda _c, _n: passphrase).load(NODE_KEY)
    except KeystoreError as exc:
        raise KeystoreError(f"{exc}; nothing stored") from None
    return passphrase


def remember(home: Path, passphrase: str, seconds: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Give ``passphrase`` to this terminal session's agent (started if none runs)."""
    session = agent.session_id()
    path = agent.start(session)
    reply = agent.ask(
        agent.Request(
            op="put", home=agent.home_key(home), passphrase=passphrase, timeout_s=seconds
        ),
        path,
    )
    return {
        "unlocked": True, "home": agent.home_key(home), "where": "agent", "session": session,
        "timeout_s": seconds, "pid": reply.pid, "socket": str(path),
    }  # fmt: skip


def unlock(
    timeout: TimeoutOption = "15m",
    use_keyring: KeyringOption = False,
    status: Annotated[
        bool, typer.Option("--status", help="Say what is unlocked; ask nothing.")
    ] = False,
    json_out: JsonOption = False,
) -> None:
    """Give the passphrase once for this terminal session (or the OS keyring)."""
    home = Path(agent.home_key(settings().home))
    if status:
        _status(home, json_out)
        return
    seconds = parse_timeout(timeout)
    # What cannot keep it is said before the passphrase is asked.
    if use_keyring:
        osring.secure_backend()
    else:
        agent.require_supported()
    passphrase = _checked_passphrase(home)
    if use_keyring:
        marker = osring.store(home, passphrase)
        result: dict[str, Any] = {
            "unlocked": True, "home": str(home), "where": "keyring", "backend": marker.backend,
        }  # fmt: skip
        lines = [
            f"unlocked in the OS keyring: {home}",
            f"kept by {marker.backend} until dms lock --keyring",
        ]
    else:
        result = remember(home, passphrase, seconds)
        lines = [
            f"unlocked for this terminal session: {home}",
            f"forgotten after {duration(seconds)} unused, or now with dms lock",
        ]
    if json_out:
        emit_json(result)
    else:
        for line in lines:
            console.print(line, soft_wrap=False)


def lock(
    every: Annotated[
        bool, typer.Option("--all", help="Every home unlocked in this terminal session.")
    ] = False,
    use_keyring: Annotated[
        bool, typer.Option("--keyring", help="Also delete it from the OS keyring.")
    ] = False,
    json_out: JsonOption = False,
) -> None:
    """Forget the passphrase now (this home, or --all)."""
    home = Path(agent.home_key(settings().home))
    forgotten = 0
    running = False
    if agent.supported():
        try:
            reply = agent.ask(agent.Request(op="forget", home=None if every else str(home)))
            forgotten, running = reply.forgotten, True
        except agent.AgentError:
            pass  # no agent for this session: nothing of it to forget
    deleted = osring.delete(home) if use_keyring else None
    still_in_keyring = not use_keyring and osring.opted_in(home) is not None
    if json_out:
        emit_json(
            {"home": str(home), "forgotten": forgotten, "agent": running,
             "keyring_deleted": deleted, "still_in_keyring": still_in_keyring}
        )  # fmt: skip
        return
    what = "every home" if every else str(home)
    if forgotten:
        console.print(f"forgot the passphrase of {what}", soft_wrap=False)
    elif not deleted and every:
        console.print("nothing to forget in this terminal session", soft_wrap=False)
    elif not deleted:
        console.print(f"nothing to forget, not unlocked here: {what}", soft_wrap=False)
    if deleted:
        console.print(f"deleted from the OS keyring: {home}", soft_wrap=False)
    if still_in_keyring:
        console.print("it is still in the OS keyring: dms lock --keyring", soft_wrap=False)


def _status(home: Path, json_out: bool) -> None:
    entries: list[agent.Entry] = []
    pid = None
    if agent.supported():
        try:
            reply = agent.ask(agent.Request(op="status"))
            entries, pid = reply.entries, reply.pid
        except agent.AgentError:
            pass
    mine = next((e for e in entries if e.home == str(home)), None)
    marker = osring.opted_in(home)
    if json_out:
        emit_json(
            {"home": str(home), "unlocked": mine is not None, "session": agent.session_id(),
             "agent_pid": pid, "entries": [e.model_dump() for e in entries],
             "keyring": marker.model_dump() if marker else None}
        )  # fmt: skip
        return
    if mine is not None:
        idle = f"idle {duration(mine.idle_s)} of {duration(mine.timeout_s)}"
        console.print(f"unlocked here ({idle}): {home}", soft_wrap=False)
    else:
        console.print(f"locked in this terminal session: {home}", soft_wrap=False)
    others = [e.home for e in entries if e is not mine]
    if others:
        console.print(f"also unlocked here: {', '.join(others)}", soft_wrap=False)
    if marker is not None:
        console.print(f"in the OS keyring ({marker.backend})", soft_wrap=False)
