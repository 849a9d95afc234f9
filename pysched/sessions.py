"""Per-session state, each session behind its own lock.

A session remembers the language pair it is bound to and the pool that
serves it. Both are decided one call at a time: under the session's own
lock (or, by a batch, under a hold: :mod:`pysched._holding`), with no I/O
and no management lock inside, so sessions never wait on each other or on
heartbeats. Sessions idle for ``session_ttl`` seconds are forgotten.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import ModuleType

from pysched._impl import kernel as default_kernel

__all__ = ["SessionState", "SessionManager"]

#: One session's record: ``lock``, ``binding`` (one tuple ``((src, tgt),
#: pool_id)`` or ``None``, so a reader gets a consistent view from one
#: attribute read), ``last_used``, and the flags of a decision under way:
#: ``deciding`` (the Python path's, under ``lock``) and ``held`` (a batch's). It is the kernel's type, because the
#: compiled dispatch reads and writes it directly.
SessionState = default_kernel.SessionState


class SessionManager:
    """Session id -> :class:`SessionState`, without a global lock.

    Creating an entry is one atomic ``dict.setdefault``; two threads racing
    on a new session end up with the same entry. Idle entries are swept at
    most every ``sweep_interval`` seconds, by whichever dispatch notices first.

    :param session_ttl: seconds of idleness after which a session is forgotten.
    :param clock: the scheduler's clock.
    :param core: the kernel module (``pysched._core`` or ``pysched._pycore``)
        whose ``SessionState`` the entries are.
    :param on_next_sweep: told every time ``next_sweep`` moves.
    :param on_forget: told of every state dropped (a session closed or
        swept), just after it leaves the table.
    """

    def __init__(self, session_ttl: float, clock: Callable[[], float], *, core: ModuleType = default_kernel,
                 on_next_sweep: Callable[[float], None] | None = None,
                 on_forget: Callable[[SessionState], None] | None = None) -> None:
        self._ttl = session_ttl
        self._clock = clock
        self._state: Callable[[float], SessionState] = core.SessionState
        self._entries: dict[str, SessionState] = {}
        self._sweep_interval = min(max(session_ttl / 8.0, 0.05), 60.0)
        self.next_sweep = clock() + self._sweep_interval
        self._sweep_lock = threading.Lock()
        #: told every time ``next_sweep`` moves (the compiled dispatch checks it)
        self.on_next_sweep = on_next_sweep
        #: told of every state dropped, just after it leaves the table (the compiled calls' index follows it)
        self.on_forget = on_forget

    @property
    def entries(self) -> dict[str, SessionState]:
        """The live session table (read it, never write it, from outside)."""
        return self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._entries

    def get(self, session_id: str) -> SessionState | None:
        """The session's state, or ``None`` if it is not known."""
        return self._entries.get(session_id)

    def entry(self, session_id: str, now: float) -> SessionState:
        """The session's state, created on first use."""
        return self.claim(session_id, now)[0]

    def claim(self, session_id: str, now: float) -> tuple[SessionState, bool]:
        """The session's state, created on first use, and whether this call created it."""
        if now >= self.next_sweep:
            self.maybe_sweep(now)
        state = self._entries.get(session_id)
        if state is not None:
            return state, False
        fresh = self._state(now)
        state = self._entries.setdefault(session_id, fresh)
        return state, state is fresh

    def discard(self, session_id: str, state: SessionState) -> bool:
        """Forget ``state`` if the table still holds it under ``session_id``; False otherwise.

        For a dispatch that created it and failed: a failed call leaves no
        session behind.
        """
        if self._entries.get(session_id) is not state:
            return False
        del self._entries[session_id]
        if self.on_forget is not None:
            self.on_forget(state)
        return True

    def close(self, session_id: str) -> bool:
        """Forget a session; False if it was not known."""
        state = self._entries.pop(session_id, None)
        if state is None:
            return False
        if self.on_forget is not None:
            self.on_forget(state)
        return True

    def sweep(self, now: float | None = None) -> int:
        """Forget every session idle for longer than the TTL; return how many."""
        now = self._clock() if now is None else now
        cutoff = now - self._ttl
        dropped = 0
        entries = self._entries
        for session_id, state in list(entries.items()):
            # a session whose lock is held is being dispatched to (the Python path holds it while it decides
            # and records its binding): in use, so not swept, and not waited for
            if state.last_used < cutoff and state.lock.acquire(blocking=False):
                try:
                    # re-check under the session's lock: a dispatch may just have used it
                    if state.last_used < cutoff and entries.get(session_id) is state:
                        del entries[session_id]
                        dropped += 1
                        if self.on_forget is not None:
                            self.on_forget(state)
                finally:
                    state.lock.release()
        return dropped

    def maybe_sweep(self, now: float) -> None:
        """Sweep if the interval has passed and no other thread is sweeping."""
        if not self._sweep_lock.acquire(blocking=False):
            return
        try:
            if now >= self.next_sweep:
                self.next_sweep = now + self._sweep_interval
                if self.on_next_sweep is not None:
                    self.on_next_sweep(self.next_sweep)
                self.sweep(now)
        finally:
            self._sweep_lock.release()
