"""An actor's mailbox in two lanes (dms.actor.inbox): what its actor reads, and when."""

from __future__ import annotations

import threading

import pytest
from pykka import ActorDeadError
from pykka._envelope import Envelope as Mail

from dms.actor.admission import Ticket
from dms.actor.inbox import LanedInbox
from dms.actor.system import Call, Inbound
from tests.conftest import wait_for


def request(peer: str, staked: bool) -> Mail:
    ticket = Ticket(peer=peer, ip=None, size=100, staked=staked)
    return Mail(Inbound(sealed=None, ticket=ticket))  # type: ignore[arg-type]


def test_requests_of_unknown_peers_wait_behind_everything_else() -> None:
    inbox = LanedInbox()
    stranger = [request(f"stranger-{i}", staked=False) for i in range(3)]
    partner = request("partner", staked=True)
    call = Mail(Call(print))
    for mail in (*stranger, partner, call):
        inbox.put(mail)
    assert inbox.qsize() == len(inbox) == 5
    assert [inbox.get() for _ in range(5)] == [partner, call, *stranger]
    assert inbox.empty()


def test_a_reader_waits_for_the_next_message_after_requests_were_dropped() -> None:
    """Stopping drops the requests still waiting (their tickets are given back); the
    actor's thread must not take a message that is gone, nor miss the next one."""
    inbox = LanedInbox()
    dropped = request("stranger", staked=False)
    inbox.put(dropped)
    assert inbox.close() == [dropped.message]
    assert inbox.empty()
    got: list[Mail] = []
    reader = threading.Thread(target=lambda: got.append(inbox.get()), daemon=True)
    reader.start()
    reader.join(0.2)
    assert reader.is_alive() and not got  # still waiting: nothing to read
    call = Mail(Call(print))
    inbox.put(call)
    wait_for(lambda: got, what="the reader to get the message put after the drop")
    assert got == [call]
    assert inbox.empty()


def test_a_closed_inbox_refuses_requests_and_still_takes_the_actors_own_messages() -> None:
    """A request put after the stop gave back the waiting ones' tickets would never be
    handled nor its ticket given back: it is refused, as by a dead actor."""
    inbox = LanedInbox()
    assert inbox.close() == []
    with pytest.raises(ActorDeadError):
        inbox.put(request("stranger", staked=False))
    call = Mail(Call(print))
    inbox.put(call)  # pykka's own teardown still reads what is not a request
    assert len(inbox) == 1 and inbox.get() == call


def test_many_writers_one_reader_lose_nothing() -> None:
    inbox = LanedInbox()
    per_writer, writers = 500, 4
    mails = [
        [request(f"w{w}", staked=bool(i % 2)) for i in range(per_writer)] for w in range(writers)
    ]
    threads = [threading.Thread(target=lambda ms=ms: [inbox.put(m) for m in ms]) for ms in mails]
    for t in threads:
        t.start()
    got = [inbox.get() for _ in range(per_writer * writers)]
    for t in threads:
        t.join()
    assert sorted(map(id, got)) == sorted(id(m) for ms in mails for m in ms)
    for w in range(writers):  # one peer's requests in each lane keep their order
        for staked in (True, False):
            mine = [
                m
                for m in got
                if m.message.ticket.peer == f"w{w}" and m.message.ticket.staked is staked
            ]
            assert mine == [m for m in mails[w] if m.message.ticket.staked is staked]
    assert inbox.empty()
