"""Holding sessions: how a batch decides many sessions' bindings, each one thread at a time.

A session's binding is decided by one call at a time (README, "One lock
per session"). The Python path decides holding the session's lock, with
``deciding`` set. A batch decides its sessions over a whole pass, too long
to keep their locks (and through a reservation that may be a Redis round
trip), so it *holds* each one instead: it sets ``held`` under the session's
lock, once no other batch holds it, and clears it when it has written the
binding back. Every other decision waits for ``held`` to clear: the Python
path while it holds the lock (so no batch takes the session anew
meanwhile), the one-call dispatch by handing its job to the Python path.

:meth:`Holds.hold` holds every session at once when none is being decided
(the common case); otherwise it takes them in id order, so two batches that
want some of the same sessions never wait for each other in a cycle. The
compiled ``Dispatcher.batch`` holds its sessions with the same flag, without
ever waiting while it holds one (see ``_dispatch.pxi``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from typing import Generic, Protocol, TypeVar


class _Session(Protocol):
    """What holding reads and writes of a session's state (either kernel's ``SessionState``)."""

    lock: threading.Lock
    binding: tuple[tuple[str, str], int] | None
    deciding: bool
    held: bool


SessionState = TypeVar("SessionState", bound=_Session)

__all__ = ["HELD_POLL", "Held", "Holds", "await_unheld"]

#: seconds between two looks of a thread waiting for a batch to let go of a session (a compiled pass of 2,048
#: jobs lasts a few hundred microseconds; the wait is rare: the same session in a batch and a dispatch at once)
HELD_POLL = 50e-6


def await_unheld(state: _Session) -> None:
    """Wait until no batch holds ``state`` (its caller holds the session's lock with ``deciding`` set).

    Where no compiled batch runs (the twin, Redis mode); the compiled
    ``Dispatcher.await_session`` also waits out a pass running without the GIL.
    """
    while state.held:
        time.sleep(HELD_POLL)


#: (states held by session id, (id, state) of each state made for the hold)
Held = tuple[dict[str, SessionState], list[tuple[str, SessionState]]]


class Holds(Generic[SessionState]):
    """The holds on one session table: what a batch takes (:meth:`hold`) and gives back (:meth:`let_go`).

    :param table: session id -> state (the live table).
    :param new_state: makes a state for a session new to the table.
    :param await_unheld: waits until no batch holds a state (the compiled
        ``Dispatcher.await_session`` where compiled batches run).
    :param try_hold: holds every session at once if none is being decided,
        without waiting, or returns ``None`` (the compiled
        ``Dispatcher.try_hold``, atomic under the GIL); :meth:`try_hold` unless given.
    :param let_go: ends a hold (the compiled ``Dispatcher.let_go``, which
        also drops a state it made from its session index); :meth:`let_go` unless given.
    """

    def __init__(self, table: dict[str, SessionState], new_state: Callable[[float], SessionState],
                 await_unheld: Callable[[SessionState], None] = await_unheld,
                 try_hold: Callable[[Collection[str], float], Held[SessionState] | None] | None = None,
                 let_go: Callable[[dict[str, SessionState], list[tuple[str, SessionState]]], None] | None = None,
                 ) -> None:
        self._table = table
        self._new_state = new_state
        #: waits until no batch holds a state (what a Python-path decision calls under the session's lock)
        self.await_unheld = await_unheld
        self._try_hold = try_hold or self.try_hold
        self._let_go = let_go or self._forget_and_free

    def hold(self, session_ids: Collection[str], now: float) -> Held[SessionState]:
        """Hold every session of ``session_ids`` (distinct ids): their states by id, and the states made here.

        A session not in the table gets its state now (:meth:`let_go` drops
        it again if it is still unbound then, as a failed dispatch leaves no
        session). When no session is being decided (the common case), all
        are held at once without waiting. Otherwise, in id order, each
        session's lock is taken (after a Python-path decision under way),
        ``deciding`` is set while another batch holding it is waited for (so
        that no batch takes it meanwhile), and a state dropped from the table
        while this waited is looked up again. If this raises, nothing is held.
        """
        quick = self._try_hold(session_ids, now)
        if quick is not None:
            return quick
        table = self._table
        held: dict[str, SessionState] = {}
        created: list[tuple[str, SessionState]] = []
        try:
            for sid in sorted(session_ids):
                while True:
                    state = self._state(sid, now, created)
                    with state.lock:
                        state.deciding = True
                        try:
                            self.await_unheld(state)
                            if table.get(sid) is state:
                                state.held = True
                                break
                        finally:
                            state.deciding = False
                held[sid] = state
        except BaseException:
            self.let_go(held, created)
            raise
        return held, created

    def try_hold(self, session_ids: Collection[str], now: float) -> Held[SessionState] | None:
        """:meth:`hold` without waiting: ``None``, nothing held, if any session's lock is taken or it is held."""
        table = self._table
        held: dict[str, SessionState] = {}
        created: list[tuple[str, SessionState]] = []
        try:
            for sid in session_ids:
                state = self._state(sid, now, created)
                if not state.lock.acquire(blocking=False):
                    break
                try:
                    if state.held or table.get(sid) is not state:
                        break
                    state.held = True
                finally:
                    state.lock.release()
                held[sid] = state
            else:
                return held, created
        except BaseException:
            self.let_go(held, created)
            raise
        self.let_go(held, created)
        return None

    def _state(self, sid: str, now: float, created: list[tuple[str, SessionState]]) -> SessionState:
        """``sid``'s state, made (and listed in ``created``) if it has none."""
        state = self._table.get(sid)
        if state is None:
            fresh = self._new_state(now)
            state = self._table.setdefault(sid, fresh)
            if state is fresh:
                created.append((sid, state))
        return state

    def let_go(self, held: dict[str, SessionState], created: list[tuple[str, SessionState]]) -> None:
        """End a hold: each state it made and still unbound leaves the table first, then every held state is free."""
        self._let_go(held, created)

    def _forget_and_free(self, held: dict[str, SessionState], created: list[tuple[str, SessionState]]) -> None:
        """:meth:`let_go` in Python (where no compiled ``Dispatcher.let_go`` is given)."""
        table = self._table
        for sid, state in created:
            if state.binding is None and table.get(sid) is state:
                table.pop(sid, None)
        for state in held.values():
            state.held = False
