"""Actors start on parked threads: a stopped actor's thread runs the next one, and the
threads kept parked are bounded in number and in time."""

from __future__ import annotations

import gc
import threading
import weakref

from dms.actor import Actor, ActorSystem, Request, behaviour
from dms.actor.threads import PARKED_NAME, ThreadPark
from tests.conftest import wait_for


class Where(Actor):
    @behaviour("/test/where", public=True)
    def where(self, request: Request) -> str:
        return threading.current_thread().name

    def thread(self) -> threading.Thread:
        return threading.current_thread()


def test_a_stopped_actors_thread_runs_the_next_actor(make_node) -> None:  # type: ignore[no-untyped-def]
    """A node spawns an actor per job (an allocation) and stops it at the job's end:
    each spawn created a thread and waited for it to run, the larger part of a
    spawn's cost on the placement path. The next actor now runs on that thread."""
    system: ActorSystem = make_node()
    caller: ActorSystem = make_node()
    asker = caller.spawn(Where)
    threads = []
    for _ in range(10):
        ref = system.spawn(Where)
        name = asker.ask(ref.handle, "/test/where", timeout=30)
        assert name.startswith("Where-")  # named after the actor while it runs it
        threads.append(ref.pykka_ref.proxy().thread().get(timeout=30))
        system.stop_actor(ref.handle.address.inbox)
        # Stopping returns before the thread parks (a spawn at once may find none): as a
        # node's next job comes, once it has.
        wait_for(lambda: threads[-1].name == PARKED_NAME, 30, "the stopped actor's thread parked")
    assert len(set(threads)) < 3, f"{len(set(threads))} threads for 10 actors in turn"


def test_parked_threads_are_bounded() -> None:
    """Two of five park (the most kept); three exit. The idle time is long here: with
    0.3 s, a test thread paused that long (a loaded machine) saw the two leave before it
    looked, and waited in vain for two parked."""
    park = ThreadPark(max_idle=2, idle_s=60)
    release = threading.Event()
    running = threading.Semaphore(0)

    threads: list[threading.Thread] = []

    def task() -> None:
        threads.append(threading.current_thread())
        running.release()
        release.wait(30)

    for i in range(5):
        park.run(task, f"task-{i}")
    for _ in range(5):
        assert running.acquire(timeout=30)
    assert park.started == 5
    names = {t.name for t in threading.enumerate()}
    assert {f"task-{i}" for i in range(5)} <= names
    release.set()
    wait_for(lambda: park.parked == 2, 30, "two threads parked")
    wait_for(lambda: sum(t.is_alive() for t in threads) == 2, 30, "the three others gone")
    assert park.parked == 2


def test_parked_threads_leave_when_idle() -> None:
    park = ThreadPark(max_idle=2, idle_s=0.3)
    threads: list[threading.Thread] = []
    for i in range(2):
        park.run(lambda: threads.append(threading.current_thread()), f"task-{i}")
    wait_for(lambda: len(threads) == 2, 30, "both tasks run")
    wait_for(lambda: not any(t.is_alive() for t in threads), 30, "every thread gone once idle")
    assert park.parked == 0


def test_a_task_that_raises_keeps_its_thread_for_the_next() -> None:
    park = ThreadPark(max_idle=1, idle_s=30)
    done = threading.Event()
    seen: list[threading.Thread] = []

    def fails() -> None:
        seen.append(threading.current_thread())
        raise RuntimeError("a bug in a task")

    def works() -> None:
        seen.append(threading.current_thread())
        done.set()

    park.run(fails, "fails")
    wait_for(lambda: park.parked == 1, 30, "its thread parked")
    park.run(works, "works")
    assert done.wait(30)
    assert seen[0] is seen[1] and park.started == 1 and park.reused == 1


def test_a_parked_thread_keeps_nothing_of_the_task_it_ran() -> None:
    """A stopped actor's loop is a bound method of the actor: a parked thread that held
    on to it kept the whole actor (its state, its children, an allocation's executor
    and what it holds open) for as long as it stayed parked, up to 30 s each."""
    park = ThreadPark(max_idle=1, idle_s=30)

    class Task:
        def run(self) -> None:
            pass

    task = Task()
    gone = weakref.ref(task)
    park.run(task.run, "task")
    del task
    wait_for(lambda: park.parked == 1, 30, "its thread parked")
    gc.collect()
    assert gone() is None, "the parked thread still holds the task it ran"
