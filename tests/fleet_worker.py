"""One scheduler process of the multi-process fleet tests (``multiprocessing``, spawn).

Each worker builds its own client, :class:`~pysched.Scheduler`,
:class:`~pysched.redis.RedisReservations` and
:class:`~pysched.RedisFleet` on the shared redis-server, registers *its*
nodes, waits until it sees the whole fleet, reports its pools, then
dispatches bursts of jobs from several threads.

The nodes are simulated by a Redis-independent, cross-process counter of
jobs held at once (:class:`NodeCounters`, shared memory): a job "starts"
on its node after a successful dispatch and "ends" before it is released,
so the counter's peak is what a real node would have seen.

Not a test module (no ``test_`` prefix); it lives in ``tests/`` so that the
spawned children import it by name (spawn hands the parent's ``sys.path``
to the children).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any

#: seconds a worker waits for the fleet to converge before giving up
SYNC_TIMEOUT = 30.0


class NodeCounters:
    """Jobs each simulated node holds right now, and the most it ever held.

    Two shared ``int`` arrays behind one cross-process lock (the
    ``multiprocessing`` lock of ``held``). Never touched by a process that
    may be killed, so the lock cannot be left held.
    """

    def __init__(self, ctx: Any, n_nodes: int) -> None:
        self.held = ctx.Array("i", n_nodes)
        self.peak = ctx.Array("i", n_nodes, lock=False)
        self.completed = ctx.Value("i", 0)

    def start(self, index: int) -> None:
        with self.held.get_lock():
            self.held[index] += 1
            self.peak[index] = max(self.peak[index], self.held[index])

    def end(self, index: int) -> None:
        with self.held.get_lock():
            self.held[index] -= 1
        with self.completed.get_lock():
            self.completed.value += 1


def _client(socket_path: str, timeout: float) -> Any:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # Fail fast and never retry inside redis-py: an outage must surface as
    # ReservationBackendUnavailable within the timeout.
    return redis.Redis(unix_socket_path=socket_path, socket_timeout=timeout, socket_connect_timeout=timeout,
                       retry=Retry(NoBackoff(), 0))


def build(cfg: dict) -> tuple[Any, Any, Any, Any]:
    """(client, backend, scheduler, fleet) for one worker, fleet started."""
    import pysched
    from pysched.redis import RedisReservations

    client = _client(cfg["socket"], cfg.get("timeout", 0.3))
    backend = RedisReservations(client, namespace=cfg["namespace"], holder_id=cfg["name"],
                                recovery_grace=cfg.get("recovery_grace", 5.0),
                                recovery_quiet=cfg.get("recovery_quiet", 2.0))
    sched = pysched.Scheduler(reservations=backend, reservation_ttl=cfg.get("ttl", 30.0),
                              seed=cfg.get("seed"))
    fleet = pysched.RedisFleet(sched, client, cfg["namespace"], process_id=cfg["name"],
                               refresh_interval=cfg.get("refresh_interval", 0.2))
    # Redis may be briefly busy while siblings start: retry the join.
    deadline = time.monotonic() + SYNC_TIMEOUT
    while True:
        try:
            fleet.start()
            break
        except pysched.ReservationBackendUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    return client, backend, sched, fleet


def _view(sched: Any, pairs: Sequence[Sequence[str]]) -> dict:
    """What must agree across processes: pools (id -> name, members) and the index."""
    stats = sched.stats()
    return {
        "pools": {int(pid): (p["name"], p["members"]) for pid, p in stats["pools"].items()},
        "explain": {f"{s}>{t}": list(sched.explain(s, t).pools) for s, t in pairs},
        "nodes": sorted({n for p in sched.pools() for n in p.node_ids}),
    }


def run(cfg: dict, counters: NodeCounters | None, reports: Any, go: Any, done: Any,
        signals: dict | None = None) -> None:
    """Entry point of a spawned worker; every outcome goes to ``reports`` as a dict.

    ``signals``: the extra events and shared values of the "fill" mode.
    """
    name = cfg["name"]
    try:
        _run(cfg, counters, reports, go, done, signals)
    except BaseException as exc:  # report, then die: the parent asserts on reports
        reports.put({"name": name, "kind": "error", "error": f"{type(exc).__name__}: {exc}",
                     "trace": traceback.format_exc()})
        raise


def _run(cfg: dict, counters: NodeCounters | None, reports: Any, go: Any, done: Any,
         signals: dict | None = None) -> None:
    import pysched

    name = cfg["name"]
    client, backend, sched, fleet = build(cfg)
    for node_id, langs, cap in cfg["nodes"]:
        sched.register_node(node_id, langs, max_concurrency=cap)
    deadline = time.monotonic() + SYNC_TIMEOUT
    while sched.stats()["nodes_total"] < cfg["expect_nodes"]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: saw {sched.stats()['nodes_total']} of {cfg['expect_nodes']} nodes")
        time.sleep(0.02)
    # Let a late pool allocation of a sibling land before reporting the view.
    fleet.flush()
    time.sleep(0.3)
    reports.put({"name": name, "kind": "synced", "pid": os.getpid(), **_view(sched, cfg["pairs"])})

    if not go.wait(SYNC_TIMEOUT):
        raise TimeoutError(f"{name}: never told to go")

    if cfg["mode"] == "hog":
        _hog(cfg, sched, reports)
        return
    if cfg["mode"] == "idle":
        while True:  # its nodes live on in the others' views; it waits for its SIGKILL
            time.sleep(1)
    if cfg["mode"] == "fill":
        _fill(cfg, client, backend, sched, fleet, counters, reports, signals or {})
        return

    stats = {"dispatched": 0, "completed": 0, "unavailable": 0, "unavailable_max_s": 0.0, "no_node": 0,
             "commit_failed": 0, "release_false": 0, "release_retries": 0}
    lock = threading.Lock()
    index = cfg["node_index"]
    pairs = cfg["pairs"]

    def add(key: str, n: float = 1) -> None:
        with lock:
            stats[key] += n

    def dispatch_one(tid: int, k: int, burst: int) -> Any:
        src, tgt = pairs[(tid + k + burst) % len(pairs)]
        started = time.monotonic()
        try:
            return sched.dispatch(f"{name}-t{tid}-s{k % 3}", src, tgt)
        except pysched.ReservationBackendUnavailable:
            took = time.monotonic() - started
            with lock:
                stats["unavailable"] += 1
                stats["unavailable_max_s"] = max(stats["unavailable_max_s"], took)
            time.sleep(0.02)
        except pysched.NoNodeAvailable:
            add("no_node")
            time.sleep(0.002)
        return None

    def release(job_id: str, deferred: list[str]) -> None:
        try:
            if not sched.release(job_id):
                add("release_false")  # Redis lost it (restart): nothing left to give back
        except pysched.ReservationBackendUnavailable:
            # The job is over on its node; Redis must still hear of it. Retry
            # later, and keep dispatching meanwhile (as a real caller would).
            add("release_retries")
            deferred.append(job_id)

    def worker(tid: int) -> None:
        left = cfg["jobs_per_thread"]
        burst = 0
        deferred: list[str] = []
        while left > 0 or deferred:
            retry, deferred[:] = list(deferred), []
            for job_id in retry:
                release(job_id, deferred)
            if left <= 0:
                time.sleep(0.02)
                continue
            burst += 1
            held = []
            for k in range(min(cfg["burst"], left)):
                a = dispatch_one(tid, k, burst)
                if a is None:
                    break  # take what the burst got; the rest waits for the next one
                add("dispatched")
                counters.start(index[a.node_id])
                held.append(a)
                try:
                    sched.commit(a.job_id)
                except (pysched.ReservationBackendUnavailable, pysched.UnknownJob):
                    add("commit_failed")
            if not held:
                continue
            time.sleep(cfg["hold_s"])
            for a in held:
                counters.end(index[a.node_id])
                release(a.job_id, deferred)
                add("completed")
            left -= len(held)

    failures: list[str] = []

    def guarded(tid: int) -> None:
        try:
            worker(tid)
        except BaseException:  # a thread's exception would otherwise vanish
            failures.append(traceback.format_exc())

    threads = [threading.Thread(target=guarded, args=(t,)) for t in range(cfg["threads"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"{len(failures)} dispatch thread(s) failed; first:\n{failures[0]}")
    reports.put({"name": name, "kind": "done", **stats})

    # Every process has finished: the fleet-wide mirror must read zero everywhere.
    if not done.wait(SYNC_TIMEOUT * 2):
        raise TimeoutError(f"{name}: never told that everybody is done")
    deadline = time.monotonic() + 10
    while True:
        try:
            backend.refresh_inflight()
            total = backend.count()
            break
        except pysched.ReservationBackendUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    snap = sched.snapshot
    inflight = {n: int(snap.inflight[snap.slot(n)]) for n in index if snap.slot(n) is not None}
    fleet.stop()
    reports.put({"name": name, "kind": "final", "inflight": inflight, "count": total, "fleet": fleet.stats(),
                 **_view(sched, cfg["pairs"])})
    client.close()


def _hog(cfg: dict, sched: Any, reports: Any) -> None:
    """Reserve (never commit) all the capacity there is, report it, keep dispatching until killed."""
    import pysched

    held = []
    deadline = time.monotonic() + SYNC_TIMEOUT
    while len(held) < cfg["hog"]:
        try:
            held.append(sched.dispatch(f"hog-{len(held)}", *cfg["pairs"][0]).job_id)
        except pysched.NoNodeAvailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    reports.put({"name": cfg["name"], "kind": "holding", "jobs": held})
    # Mid-run when the SIGKILL lands: still dispatching (every attempt refused).
    i = 0
    while True:
        i += 1
        with contextlib.suppress(pysched.SchedulerError):
            sched.dispatch(f"hog-more-{i}", *cfg["pairs"][0])
        time.sleep(0.005)


def _fill(cfg: dict, client: Any, backend: Any, sched: Any, fleet: Any, counters: NodeCounters, reports: Any,
          signals: dict) -> None:
    """Hold jobs (committed and not) until the fleet is full, then probe through a Redis restart.

    Phase 1: dispatch until the node-side counters show every slot of the
    fleet taken (by any process); commit every other job. Phase 2 (after
    ``restarted``): keep dispatching until ``stop_probe``; with every slot
    held, each success would be an over-commit, and is counted on the node
    counters like any job. Phase 3 (``release``): end and release every job.
    """
    import pysched

    name = cfg["name"]
    index, pairs, total = cfg["node_index"], cfg["pairs"], cfg["total_capacity"]
    held: list[Any] = []
    deadline = time.monotonic() + SYNC_TIMEOUT
    k = 0
    while True:
        with counters.held.get_lock():
            if sum(counters.held[:]) >= total:
                break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: the fleet never filled up")
        k += 1
        src, tgt = pairs[k % len(pairs)]
        try:
            a = sched.dispatch(f"{name}-fill-{k}", src, tgt)
        except pysched.NoNodeAvailable:
            time.sleep(0.005)
            continue
        counters.start(index[a.node_id])
        held.append(a)
        if len(held) % 2:
            sched.commit(a.job_id)
    reports.put({"name": name, "kind": "holding", "jobs": len(held),
                 "committed": sum(1 for i in range(len(held)) if i % 2 == 0)})

    if not signals["restarted"].wait(SYNC_TIMEOUT * 2):
        raise TimeoutError(f"{name}: never told that Redis restarted")
    stats = {"probes": 0, "successes": 0, "unavailable": 0, "refused": 0}
    reasons: dict[str, int] = {}
    extra: list[Any] = []
    recovered = False
    while not signals["stop_probe"].is_set():
        stats["probes"] += 1
        with signals["probes"].get_lock():
            signals["probes"].value += 1
        src, tgt = pairs[stats["probes"] % len(pairs)]
        try:
            a = sched.dispatch(f"{name}-probe-{stats['probes']}", src, tgt)
        except pysched.ReservationBackendUnavailable:
            stats["unavailable"] += 1
            time.sleep(0.01)
        except pysched.NoNodeAvailable as exc:
            stats["refused"] += 1
            for reason, n in exc.breakdown.items():
                reasons[reason] = reasons.get(reason, 0) + n
            time.sleep(0.002)
        else:
            counters.start(index[a.node_id])  # an over-commit: the parent's check sees it
            stats["successes"] += 1
            extra.append(a)
        if not recovered and backend.stats()["recoveries"] >= 1:
            recovered = True
            reports.put({**backend.stats(), "name": name, "kind": "recovered"})

    if not signals["release"].wait(SYNC_TIMEOUT * 2):
        raise TimeoutError(f"{name}: never told to release")
    release_false = 0
    for a in held + extra:
        counters.end(index[a.node_id])
        while True:
            try:
                if not sched.release(a.job_id):
                    release_false += 1
                break
            except pysched.ReservationBackendUnavailable:
                time.sleep(0.05)
    stats["release_false"] = release_false
    fleet.stop()
    reports.put({"name": name, "kind": "done", "reasons": reasons, "backend": backend.stats(),
                 "fleet": fleet.stats(), **stats})
    client.close()
