"""An actor's mailbox in two lanes (dms.actor.inbox): what its actor reads, and when."""

from __future__ import annotations

import threading
import time

import pytest
import trio
from pykka import ActorDeadError
from pykka._envelope import Envelope as Mail

from dms.actor.admission import Ticket
from dms.actor.handle import ROOT_INBOX
from dms.actor.inbox import LanedInbox
from dms.actor.system import Call, Inbound
from dms.actor.wakes import wakes_deferred
from dms.network.loop import run_loop
from tests.conftest import NodeFactory, wait_for
from tests.test_actor_pipeline import Service


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


def _reader(inbox: LanedInbox) -> tuple[threading.Thread, list[Mail]]:
    got: list[Mail] = []

    def read() -> None:
        got.append(inbox.get())

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, got


def test_a_trio_loops_put_wakes_the_actor_when_the_loop_next_waits_not_before() -> None:
    """The loop's thread holds the GIL until it waits for I/O: the actor it queued a
    message for is woken then (``run_loop``), not in the middle of the loop's step, and
    is woken even though nothing else happens in the loop afterwards."""
    inbox = LanedInbox()
    reader, got = _reader(inbox)
    seen_in_step: list[list[Mail]] = []
    call = Mail(Call(print))

    async def main() -> None:
        inbox.put(call)
        # The rest of this step: the reader, were it woken, has plenty of time to run
        # (time.sleep gives up the GIL).
        time.sleep(0.2)
        seen_in_step.append(list(got))
        # The loop now waits (a long sleep): the wake is handed out before it.
        with trio.move_on_after(30):
            while not got:
                await trio.sleep(0.01)
        seen_while_running.append(list(got))

    seen_while_running: list[list[Mail]] = []
    run_loop(main)
    reader.join(5)
    assert seen_in_step == [[]]  # not woken inside the step
    assert seen_while_running == [[call]]  # woken once the loop waited, while it ran


@pytest.mark.parametrize("fails", [False, True])
def test_a_put_after_the_loops_last_wait_is_handed_out_when_it_ends(fails: bool) -> None:
    inbox = LanedInbox()
    _, got = _reader(inbox)
    call = Mail(Call(print))

    class PutAtTheEnd(trio.abc.Instrument):
        def after_run(self) -> None:  # past the loop's last before_io_wait
            inbox.put(call)

    async def main() -> None:
        trio.lowlevel.add_instrument(PutAtTheEnd())
        if fails:
            raise ValueError("the loop ends by an exception")

    if fails:
        with pytest.raises(ValueError):
            run_loop(main)
    else:
        run_loop(main)
    wait_for(lambda: got, timeout=10, what="the reader to get the message put as the loop ended")
    assert got == [call]


def test_a_loops_thread_that_blocks_on_an_actor_wakes_it_first(make_node: NodeFactory) -> None:
    """An ask, or a blocking stop, from a loop's own thread: the wake it deferred is
    handed out before it blocks (else it waits out its timeout for a wake it holds)."""
    node = make_node()
    node.spawn(Service, inbox=ROOT_INBOX, identity=node.identity)
    child = node.spawn(Service)
    answers: list[object] = []

    async def main() -> None:
        answers.append(child.ask(child.handle, "/test/echo", "hi", timeout=20))
        node.stop_actor(child.handle.address.inbox, timeout=20)
        answers.append(child.pykka_ref.is_alive())

    run_loop(main)
    # Without the flush the ask waits out its 20 s and raises, and the stop too.
    assert answers == ["hi", False]


def test_a_wake_deferred_past_its_bound_is_handed_out_at_the_next_put() -> None:
    """A long pass of the loop does not hold a wake for its whole length: the next put
    after ``MAX_DEFER_S`` hands out every wake held so far."""
    first, second = LanedInbox(), LanedInbox()
    _, got = _reader(first)
    seen: list[list[Mail]] = []
    call = Mail(Call(print))

    async def main() -> None:
        first.put(call)
        time.sleep(0.1)
        seen.append(list(got))  # still held: no put since
        second.put(Mail(Call(print)))  # past the bound: both wakes go out
        wait_for(lambda: got, what="the first reader, woken by the second put")
        seen.append(list(got))

    run_loop(main)
    assert seen == [[], [call]]


def test_a_put_from_any_other_thread_wakes_the_actor_at_once() -> None:
    """Only a loop's own thread defers: a put from an actor's thread while a loop runs
    elsewhere wakes its reader then and there."""
    inbox = LanedInbox()
    _, got = _reader(inbox)
    call = Mail(Call(print))
    started, done = threading.Event(), threading.Event()

    async def main() -> None:
        started.set()
        await trio.to_thread.run_sync(done.wait, abandon_on_cancel=True)

    loop = threading.Thread(target=run_loop, args=(main,), daemon=True)
    loop.start()
    assert started.wait(10)
    inbox.put(call)
    wait_for(lambda: got, what="the reader to be woken by a put from a plain thread")
    done.set()
    loop.join(10)
    assert got == [call]


def test_a_thread_defers_its_wakes_in_one_block_at_a_time() -> None:
    with wakes_deferred(), pytest.raises(RuntimeError, match="already defers"), wakes_deferred():
        pass
