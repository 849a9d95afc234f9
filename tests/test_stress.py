"""Concurrency stress tests: dispatch and release racing management, TTL expiry and retries.

Several threads dispatch and release while another registers, heartbeats,
drains, removes and re-registers nodes and switches pools. After every step
of every thread the tests check that no node holds more reservations than
its max concurrency (both as the backend counts them and as an independent
test-side tally of jobs held); at the end, that nothing leaked and that no
thread deadlocked (every join is bounded by a timeout).

These tests use the real clock (``time.monotonic``): the races they look for
only exist with real threads and real time. Nothing asserted depends on how
fast the threads run: a stress run lasts at least its duration and then
until it has seen what it must (enough dispatches, full nodes, expiries),
within a long deadline; TTLs and heartbeat timeouts that real time must not
cross are far beyond any run; time-based checks compare clock readings that
bound the event from the safe side.
"""

from __future__ import annotations

import random
import sys
import threading
import time
import traceback

import pytest

import pysched
from pysched import NoNodeAvailable, NoPoolForLanguagePair, PoolConfig, UnknownJob

JOIN_TIMEOUT = 60.0  # only a deadlock gets near this
STRESS_DEADLINE = 120.0  # a stress run goes on until it has seen what it must, at most this long
LONG = 3600.0  # a TTL or heartbeat timeout no test run can reach

LANG_SETS = [
    ("zh", "en"),
    ("en", "fr"),
    ("en", "de", "ja"),
    ("zh", "ja"),
]
# (src, tgt); "auto" sources, and a pair nobody serves (ko -> en)
PAIRS = [
    ("zh", "en"), ("en", "zh"), ("en", "fr"), ("fr", "en"), ("de", "en"), ("ja", "zh"), ("en", "ja"),
    ("auto", "en"), ("auto", "zh"), ("auto", "ja"), ("ko", "en"),
]
FULL_SERVICES = ("asr", "nmt", "tts", "semantic")
NO_TTS = ("asr", "nmt", "semantic")  # ineligible for jobs with the default services
MANUAL_POOLS = [
    [
        PoolConfig(100, "en-hub", frozenset({"en"})),
        PoolConfig(101, "zh-en", frozenset({"zh", "en"})),
        PoolConfig(102, "ja-tts", frozenset({"ja"}), frozenset({"tts"})),
    ],
    [
        PoolConfig(1, "zh", frozenset({"zh"})),
        PoolConfig(7, "fr-en", frozenset({"fr", "en"})),
    ],
]


def _dump_threads(threads) -> str:
    frames = sys._current_frames()
    out = []
    for t in threads:
        if t.is_alive():
            frame = frames.get(t.ident)
            stack = "".join(traceback.format_stack(frame)) if frame is not None else "<no frame>"
            out.append(f"--- thread {t.name} still alive:\n{stack}")
    return "\n".join(out)


def _run_for(threads: list[threading.Thread], duration: float, stop: threading.Event, errors: list[str],
             until=lambda: True) -> None:
    """Start the threads; let them run ``duration`` seconds and then until ``until()`` is true (at most
    STRESS_DEADLINE seconds in all: on a busy machine they get less done per second); stop and join them;
    fail on any error."""
    for t in threads:
        t.start()
    start = time.monotonic()
    time.sleep(duration)
    while not until() and not errors and time.monotonic() - start < STRESS_DEADLINE:
        time.sleep(0.01)
    stop.set()
    _join_all(threads, errors)
    assert not errors, "\n".join(errors[:20])


def _join_all(threads, errors) -> None:
    deadline = time.monotonic() + JOIN_TIMEOUT
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t for t in threads if t.is_alive()]
    if alive:
        pytest.fail(f"deadlock: {len(alive)} thread(s) still running after {JOIN_TIMEOUT}s\n"
                    + _dump_threads(threads) + "\nerrors so far:\n" + "\n".join(errors[:20]))


class Fleet:
    """The test's own view of the nodes: max concurrency, public flag, jobs held."""

    def __init__(self, sched: pysched.Scheduler) -> None:
        self.sched = sched
        self.lock = threading.Lock()
        self.max: dict[str, int] = {}       # only ever grows (see check())
        self.public: dict[str, bool] = {}   # fixed per node id for the test's life
        self.langs: dict[str, tuple] = {}
        self.held: dict[str, int] = {}      # jobs the test holds, per node
        self.errors: list[str] = []

    def fail(self, msg: str) -> None:
        with self.lock:
            self.errors.append(msg)

    def register(self, node_id: str, langs: tuple, max_c: int, public: bool) -> None:
        # Record the max *before* the scheduler can use it: the test's max is
        # then never below the scheduler's, so the check has no false alarms.
        with self.lock:
            self.max[node_id] = max(max_c, self.max.get(node_id, 0))
            self.public[node_id] = public
            self.langs[node_id] = langs
            self.held.setdefault(node_id, 0)
            max_c = self.max[node_id]
        self.sched.register_node(node_id, languages=langs, services=FULL_SERVICES, max_concurrency=max_c,
                                 accept_public_jobs=public)

    def check(self, where: str) -> None:
        """No node exceeds its max: per the backend, and per the test's own tally.

        Max concurrency only ever grows in these tests: if it shrank, jobs
        already reserved could legitimately exceed the new limit. That is
        also why the counts are read first and the maxima after them: a max
        read before a count may trail one raised, and used by a dispatch, in
        between (a false alarm seen once in CI: n29, the last node the loop
        reads, held 5 against the max of 4 read before the loop began); read
        after, it bounds the count.
        """
        res = self.sched.reservations
        with self.lock:
            node_ids = list(self.max)
        counts = [(node_id, res.count(node_id)) for node_id in node_ids]
        with self.lock:
            maxima = dict(self.max)
            held = dict(self.held)
        for node_id, n in counts:
            max_c = maxima[node_id]
            if n > max_c:
                self.fail(f"{where}: node {node_id} holds {n} reservations > max {max_c}")
            if n < 0:
                self.fail(f"{where}: node {node_id} has a negative count {n}")
            h = held.get(node_id, 0)
            if h > max_c:
                self.fail(f"{where}: the test holds {h} jobs on {node_id} > max {max_c}")
            if h < 0:
                self.fail(f"{where}: the test's tally for {node_id} went negative: {h}")


# ---------------------------------------------------------------------------
# 1. dispatch/release racing management
# ---------------------------------------------------------------------------

def test_stress_dispatch_vs_management(kernel_name):
    # TTL and heartbeat timeout out of reach: a held job must still be held when the test releases it,
    # however long the run takes on a busy machine
    sched = pysched.Scheduler(clock=time.monotonic, reservation_ttl=LONG, heartbeat_timeout=LONG, seed=7,
                              kernel=kernel_name)
    fleet = Fleet(sched)
    rng0 = random.Random(2024)
    for i in range(30):
        fleet.register(f"n{i:02d}", LANG_SETS[i % len(LANG_SETS)], rng0.randint(1, 3), public=(i % 7 != 0))

    duration = 1.5
    n_dispatchers = 4
    max_held = 12
    stop = threading.Event()
    held_jobs: dict[int, list] = {i: [] for i in range(n_dispatchers)}
    counters = {"ok": 0, "no_node": 0, "no_pool": 0, "released": 0, "committed": 0, "mgmt": 0}
    counters_lock = threading.Lock()

    def bump(key: str, n: int = 1) -> None:
        with counters_lock:
            counters[key] += n

    def dispatcher(idx: int) -> None:
        rng = random.Random(1000 + idx)
        held = held_jobs[idx]
        seq = 0
        try:
            while not stop.is_set() and not fleet.errors:
                if held and (len(held) >= max_held or rng.random() < 0.35):
                    job_id, node_id = held.pop(rng.randrange(len(held)))
                    with fleet.lock:
                        fleet.held[node_id] -= 1
                    if not sched.release(job_id):
                        fleet.fail(f"release({job_id!r}) of a held job on {node_id} returned False")
                    bump("released")
                    fleet.check(f"dispatcher {idx} after release")
                    continue
                session = f"s{rng.randrange(50)}"
                src, tgt = rng.choice(PAIRS)
                kwargs = {}
                if rng.random() < 0.2:
                    kwargs["exclude"] = [f"n{rng.randrange(32):02d}" for _ in range(rng.randint(1, 3))]
                if rng.random() < 0.3:
                    kwargs["tenant"] = rng.choice(["acme", "globex"])
                if rng.random() < 0.2:
                    seq += 1
                    kwargs["job_id"] = f"d{idx}-{seq}"
                try:
                    a = sched.dispatch(session, src, tgt, **kwargs)
                except NoNodeAvailable:
                    bump("no_node")
                    fleet.check(f"dispatcher {idx} after NoNodeAvailable")
                    continue
                except NoPoolForLanguagePair:
                    bump("no_pool")
                    fleet.check(f"dispatcher {idx} after NoPoolForLanguagePair")
                    continue
                with fleet.lock:
                    known = a.node_id in fleet.max
                    public = fleet.public.get(a.node_id)
                    if known:
                        fleet.held[a.node_id] += 1
                        if fleet.held[a.node_id] > fleet.max[a.node_id]:
                            fleet.errors.append(
                                f"dispatcher {idx}: {fleet.held[a.node_id]} jobs held on {a.node_id} "
                                f"> max {fleet.max[a.node_id]}")
                if not known:
                    fleet.fail(f"dispatch returned an unknown node: {a!r}")
                    continue
                held.append((a.job_id, a.node_id))
                bump("ok")
                if "exclude" in kwargs and a.node_id in kwargs["exclude"]:
                    fleet.fail(f"dispatch ignored exclude={kwargs['exclude']}: {a!r}")
                if "tenant" not in kwargs and not public:
                    fleet.fail(f"public job on a node that refuses public jobs: {a!r}")
                if "job_id" in kwargs and a.job_id != kwargs["job_id"]:
                    fleet.fail(f"dispatch ignored job_id={kwargs['job_id']!r}: {a!r}")
                r = sched.reservations.get(a.job_id)
                if r is None or r.node_id != a.node_id:
                    fleet.fail(f"reservation of {a!r} is {r!r}")
                if rng.random() < 0.5:
                    sched.commit(a.job_id)
                    bump("committed")
                fleet.check(f"dispatcher {idx} after dispatch")
        except BaseException as exc:  # anything else is a failure
            fleet.fail(f"dispatcher {idx}: unexpected {type(exc).__name__}: {exc}\n{traceback.format_exc()}")

    def manager() -> None:
        rng = random.Random(99)
        next_new = 0
        unhealthy: dict[str, int] = {}
        try:
            while not stop.is_set() and not fleet.errors:
                with fleet.lock:
                    live = sorted(fleet.max)
                node_id = rng.choice(live)
                op = rng.random()
                if op < 0.08 and next_new < 20:
                    fleet.register(f"x{next_new:02d}", rng.choice(LANG_SETS), rng.randint(1, 3),
                                   public=rng.random() < 0.8)
                    next_new += 1
                elif op < 0.30:
                    with fleet.lock:
                        mx = fleet.max[node_id]
                    sched.heartbeat(node_id, running=rng.randint(0, mx), cpu=rng.uniform(0, 100),
                                    gpu=rng.uniform(0, 100), mem=rng.uniform(0, 90))
                elif op < 0.38:
                    sched.heartbeat(node_id, services=rng.choice([FULL_SERVICES, NO_TTS]))
                elif op < 0.45:
                    langs = rng.choice(LANG_SETS)
                    with fleet.lock:
                        fleet.langs[node_id] = langs
                    sched.heartbeat(node_id, languages=langs, healthy=True)
                elif op < 0.52:
                    # a streak of unhealthy heartbeats (degraded at 3), sometimes healed
                    for _ in range(rng.randint(1, 3)):
                        sched.heartbeat(node_id, healthy=False)
                        unhealthy[node_id] = unhealthy.get(node_id, 0) + 1
                        fleet.check("manager after healthy=False")
                    if rng.random() < 0.5:
                        sched.heartbeat(node_id, healthy=True)
                        unhealthy.pop(node_id, None)
                elif op < 0.56:
                    # max concurrency only grows: record it first, then announce it
                    with fleet.lock:
                        fleet.max[node_id] = new_max = fleet.max[node_id] + 1
                    sched.heartbeat(node_id, max_concurrency=new_max)
                elif op < 0.64:
                    sched.drain_node(node_id)
                elif op < 0.74:
                    sched.resume_node(node_id)
                elif op < 0.80:
                    sched.mark_offline(node_id)
                elif op < 0.88:
                    # remove, let dispatch run against the gap, then come back under the same id
                    with fleet.lock:
                        langs, mx, public = fleet.langs[node_id], fleet.max[node_id], fleet.public[node_id]
                    sched.remove_node(node_id)
                    fleet.check("manager after remove_node")
                    time.sleep(rng.uniform(0, 0.003))
                    fleet.check("manager while removed")
                    fleet.register(node_id, langs, mx, public)
                elif op < 0.94:
                    sched.set_pools(rng.choice(MANUAL_POOLS + ["auto", "auto"]))
                else:
                    sched.stats()
                    sched.pools()
                    sched.explain(*rng.choice(PAIRS[:-1]))
                    sched.node(node_id)
                bump("mgmt")
                fleet.check("manager")
                time.sleep(0.0005)
        except BaseException as exc:
            fleet.fail(f"manager: unexpected {type(exc).__name__}: {exc}\n{traceback.format_exc()}")

    threads = [threading.Thread(target=dispatcher, args=(i,), name=f"dispatcher-{i}", daemon=True)
               for i in range(n_dispatchers)]
    threads.append(threading.Thread(target=manager, name="manager", daemon=True))

    def stressed() -> bool:
        with counters_lock:
            return counters["ok"] > 100 and counters["no_node"] > 0 and counters["mgmt"] > 50

    _run_for(threads, duration, stop, fleet.errors, until=stressed)
    # the stress actually stressed: jobs went through, and nodes were often full
    assert counters["ok"] > 100, counters
    assert counters["no_node"] > 0, counters
    assert counters["mgmt"] > 50, counters

    # release everything still held: nothing leaks, and release stays idempotent
    all_jobs = [job for jobs in held_jobs.values() for job in jobs]
    for job_id, node_id in all_jobs:
        assert sched.release(job_id) is True, (job_id, node_id)
        with fleet.lock:
            fleet.held[node_id] -= 1
    assert all(v == 0 for v in fleet.held.values()), fleet.held
    assert sched.reservations.count() == 0
    assert all(sched.reservations.count(n) == 0 for n in fleet.max)
    assert int(sched.snapshot.inflight.sum()) == 0
    assert int(sched.reservations.inflight.sum()) == 0
    assert int(sched.reservations.inflight.min()) == 0
    for job_id, _ in all_jobs:
        assert sched.release(job_id) is False
    assert sched.stats()["reservations"] == 0
    sched.close()


# ---------------------------------------------------------------------------
# 2. the same job id dispatched by many threads at once
# ---------------------------------------------------------------------------

def _same_job_round(sched, job_id: str, n_threads: int, src: str = "zh", tgt: str = "en"):
    barrier = threading.Barrier(n_threads)
    results: list = [None] * n_threads

    def worker(i: int) -> None:
        try:
            barrier.wait(JOIN_TIMEOUT)
            results[i] = sched.dispatch("session-1", src, tgt, job_id=job_id)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,), name=f"same-job-{i}", daemon=True)
               for i in range(n_threads)]
    for t in threads:
        t.start()
    _join_all(threads, [])
    return results


def test_same_job_id_concurrently_gets_one_assignment(kernel_name):
    # the reservations of every round must still be held at the last one, however slow the rounds
    sched = pysched.Scheduler(clock=time.monotonic, reservation_ttl=LONG, heartbeat_timeout=LONG, seed=3,
                              kernel=kernel_name)
    for i in range(10):
        sched.register_node(f"n{i}", ["zh", "en"], max_concurrency=4)
    rounds, n_threads = 20, 12
    for r in range(rounds):
        job_id = f"job-{r}"
        results = _same_job_round(sched, job_id, n_threads)
        errors = [x for x in results if not isinstance(x, pysched.Assignment)]
        assert not errors, errors
        assert all(x == results[0] for x in results), results
        assert results[0].job_id == job_id
        assert sched.reservations.count() == r + 1  # exactly one reservation per job id
        assert sched.reservations.get(job_id).node_id == results[0].node_id
    assert int(sched.reservations.inflight.sum()) == rounds
    for r in range(rounds):
        assert sched.release(f"job-{r}") is True
        assert sched.release(f"job-{r}") is False
    assert sched.reservations.count() == 0
    assert int(sched.snapshot.inflight.sum()) == 0
    sched.close()


def test_same_job_id_race_on_last_free_slot(kernel_name):
    """Deterministic replay of the interleaving: the twin reserves the last free
    slot between the retry's reservation lookup and its node selection; the
    retry must still answer with the twin's assignment, not NoNodeAvailable."""
    sched = pysched.Scheduler(clock=time.monotonic, reservation_ttl=30.0, seed=3, kernel=kernel_name)
    sched.register_node("only", ["zh", "en"], max_concurrency=1)
    res = sched.reservations
    real_get = res.get
    twin: list = []

    def get(job_id):
        found = real_get(job_id)
        res.get = real_get  # once: the twin thread runs its dispatch right here
        twin.append(sched.dispatch("session-1", "zh", "en", job_id=job_id))
        return found

    res.get = get
    try:
        a = sched.dispatch("session-1", "zh", "en", job_id="J")
    finally:
        res.get = real_get
    assert a == twin[0]
    assert sched.reservations.count() == 1
    sched.close()


def test_same_job_id_threads_on_last_free_slot(kernel_name):
    """The same race with real threads on a single max-1 node: whatever the
    interleaving, every thread gets the one assignment and one reservation exists."""
    sched = pysched.Scheduler(clock=time.monotonic, reservation_ttl=LONG, heartbeat_timeout=LONG, seed=3,
                              kernel=kernel_name)
    sched.register_node("only", ["zh", "en"], max_concurrency=1)
    for r in range(30):
        job_id = f"job-{r}"
        results = _same_job_round(sched, job_id, 6)
        errors = [x for x in results if not isinstance(x, pysched.Assignment)]
        assert not errors, errors
        assert all(x == results[0] for x in results), results
        assert results[0].node_id == "only"
        assert sched.reservations.count() == 1
        assert sched.reservations.count("only") == 1
        assert sched.release(job_id) is True
        assert sched.reservations.count() == 0
    sched.close()


# ---------------------------------------------------------------------------
# 3. reservations expiring while others dispatch
# ---------------------------------------------------------------------------

def test_stress_expiry_vs_dispatch(kernel_name):
    ttl = 0.2
    sched = pysched.Scheduler(clock=time.monotonic, reservation_ttl=ttl, heartbeat_timeout=LONG, seed=11,
                              kernel=kernel_name)
    fleet = Fleet(sched)
    for i in range(12):
        fleet.register(f"n{i:02d}", LANG_SETS[i % 2], 1 + i % 2, public=True)

    duration = 1.0
    stop = threading.Event()
    all_jobs: list[str] = []
    jobs_lock = threading.Lock()
    counters = {"ok": 0, "no_node": 0, "released": 0, "late_release": 0, "committed": 0, "expired_commit": 0,
                "expired_swept": 0}
    counters_lock = threading.Lock()

    def bump(key: str, n: int = 1) -> None:
        with counters_lock:
            counters[key] += n

    def dispatcher(idx: int) -> None:
        rng = random.Random(500 + idx)
        # [release at, job id, clock before dispatch, commit at, clock after dispatch]: the reservation's
        # clock reading (inside dispatch) lies between the two, so its expiry is within [before, after] + ttl
        mine: list[list] = []
        try:
            while not stop.is_set() and not fleet.errors:
                now = time.monotonic()
                # commit the jobs whose client accepts them now: before the TTL
                # that must work, after it it must not
                for entry in mine:
                    if entry[3] is None or entry[3] > now:
                        continue
                    _, job_id, before, _, t0 = entry
                    entry[3] = None
                    age = time.monotonic() - t0  # at most the job's age when commit reads the clock
                    try:
                        sched.commit(job_id)
                    except UnknownJob:
                        bump("expired_commit")
                        # at least the job's age when commit read the clock: below the TTL it must not expire
                        oldest = time.monotonic() - before
                        if oldest < ttl - 1e-6:  # (1 µs: float rounding of the clock readings)
                            fleet.fail(f"{job_id} vanished at most {oldest:.3f}s after dispatch, TTL {ttl}s")
                    else:
                        bump("committed")
                        # (a margin: see test_expiry_order_with_late_lock below)
                        if age > ttl * 1.25:
                            fleet.fail(f"{job_id} committed {age:.3f}s after dispatch, past its TTL {ttl}s")
                        if entry[0] == float("inf"):
                            # a committed job never expires: its client must release it
                            entry[0] = time.monotonic() + rng.uniform(0, ttl)
                    fleet.check(f"expiry dispatcher {idx} after commit")
                # release the jobs that are due; some are long past their TTL:
                # release then says True or False, but never counts twice
                now = time.monotonic()
                due = [m for m in mine if m[0] <= now]
                if due:
                    mine[:] = [m for m in mine if m[0] > now]
                    for _, job_id, _, _, _ in due:
                        bump("released" if sched.release(job_id) else "late_release")
                        fleet.check(f"expiry dispatcher {idx} after release")
                op = rng.random()
                if op < 0.05:
                    bump("expired_swept", sched.reservations.expire())
                    fleet.check(f"expiry dispatcher {idx} after expire")
                else:
                    before = time.monotonic()
                    try:
                        a = sched.dispatch(f"s{rng.randrange(30)}", *rng.choice(PAIRS[:4]))
                    except (NoNodeAvailable, NoPoolForLanguagePair):
                        bump("no_node")
                    else:
                        t0 = time.monotonic()
                        kind = rng.random()
                        if kind < 0.4:
                            release_at = t0 + rng.uniform(0, ttl * 0.5)     # done in time
                        elif kind < 0.7:
                            release_at = t0 + rng.uniform(ttl * 1.2, ttl * 2)  # released late
                        else:
                            release_at = float("inf")                        # client vanished
                        commit_at = t0 + rng.uniform(0, 2 * ttl) if rng.random() < 0.3 else None
                        mine.append([release_at, a.job_id, before, commit_at, t0])
                        with jobs_lock:
                            all_jobs.append(a.job_id)
                        bump("ok")
                    fleet.check(f"expiry dispatcher {idx} after dispatch")
                inflight = sched.reservations.inflight
                if int(inflight.min()) < 0:
                    fleet.fail(f"negative in-flight count: {inflight.tolist()}")
                time.sleep(0.0005)
        except BaseException as exc:
            fleet.fail(f"expiry dispatcher {idx}: unexpected {type(exc).__name__}: {exc}\n"
                       f"{traceback.format_exc()}")

    threads = [threading.Thread(target=dispatcher, args=(i,), name=f"expiry-{i}", daemon=True) for i in range(4)]

    def stressed() -> bool:
        with counters_lock:
            return counters["ok"] > 50 and counters["no_node"] > 0 and counters["late_release"] > 0

    _run_for(threads, duration, stop, fleet.errors, until=stressed)
    assert counters["ok"] > 50, counters
    assert counters["no_node"] > 0, counters  # the fleet was saturated at times
    assert counters["late_release"] > 0, counters  # reservations did expire under the threads

    # Committed jobs never expire: release those; everything else must come back by TTL. The threads
    # are joined, so no reservation is younger than this sleep (a lower bound on the time that passes).
    time.sleep(ttl + 0.1)
    sched.reservations.expire()
    committed = [j for j in all_jobs if (r := sched.reservations.get(j)) is not None and r.committed]
    assert sched.reservations.count() == len(committed)
    for job_id in committed:
        assert sched.release(job_id) is True
    assert sched.reservations.count() == 0
    assert all(sched.reservations.count(n) == 0 for n in fleet.max)
    assert int(sched.snapshot.inflight.sum()) == 0
    assert int(sched.reservations.inflight.min()) == 0
    for job_id in all_jobs:
        assert sched.release(job_id) is False
    # and the returned capacity is usable again: every node takes its max
    total = sum(fleet.max.values())
    for i in range(total):
        sched.dispatch(f"after-{i}", "auto", "en")
    assert sched.reservations.count() == total
    sched.close()


class _HookClock:
    """A manual clock that can run one callback inside its next read."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.hook = None

    def __call__(self) -> float:
        hook, self.hook = self.hook, None
        now = self.now
        if hook is not None:
            hook()
        return now


def test_expiry_order_with_late_lock(kernel_name):
    """Regression: a reservation queued behind a later-expiring one still expires on time.

    Thread A reads the clock; before it reserves, thread B (later clock)
    reserves. A's entry then reaches the expiry queue after B's, out of time
    order; the sweep orders entries by expiry, so A expires at its own TTL
    (a FIFO sweep stopped at B's entry and let A outlive its TTL).
    """
    clock = _HookClock()
    sched = pysched.Scheduler(clock=clock, reservation_ttl=1.0, seed=5, kernel=kernel_name)
    sched.register_node("n1", ["zh", "en"], max_concurrency=4)

    def thread_b() -> None:
        clock.now = 1000.5
        sched.dispatch("session-b", "zh", "en", job_id="B")

    clock.hook = thread_b  # runs inside A's clock read, before A reserves
    sched.dispatch("session-a", "zh", "en", job_id="A")
    res = sched.reservations
    assert res.get("A").expires_at == 1001.0
    assert res.get("B").expires_at == 1001.5
    clock.now = 1001.2  # past A's expiry, before B's
    assert res.expire() == 1
    assert res.get("A") is None
    with pytest.raises(UnknownJob):
        sched.commit("A")
    assert res.count() == 1
    sched.close()


# ---------------------------------------------------------------------------
# 4. a burst spreads: in-flight counts change the moment a reservation is made
# ---------------------------------------------------------------------------

def test_burst_spreads_over_idle_nodes(make_scheduler):
    sched = make_scheduler()
    for i in range(10):
        sched.register_node(f"n{i}", ["zh", "en"], max_concurrency=4)
    assert len(sched.pools()) == 1
    first = [sched.dispatch(f"burst-{i}", "zh", "en") for i in range(10)]
    assert len({a.node_id for a in first}) == 10, [a.node_id for a in first]
    inflight = sched.snapshot.inflight
    slots = [sched.snapshot.slot(f"n{i}") for i in range(10)]
    assert [int(inflight[s]) for s in slots] == [1] * 10
    # a second burst (same session: one pool binding) spreads again, one more per node
    second = [sched.dispatch("one-session", "zh", "en") for _ in range(10)]
    assert len({a.node_id for a in second}) == 10, [a.node_id for a in second]
    assert [int(sched.snapshot.inflight[s]) for s in slots] == [2] * 10
    for a in first + second:
        assert sched.release(a.job_id) is True
    assert int(sched.snapshot.inflight.sum()) == 0
