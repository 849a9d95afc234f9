"""What ``pysched bench`` reports: results, ratios, the goals and their verdicts, the table.

The goals are data (:data:`GOALS`): each names the figure it checks, its
target and the node counts the issue states it at; :func:`check_goals`
evaluates them on a run's results and ratios. Ratios read "how many times
better pysched is" whichever way the figure goes (:func:`ratios`).
"""

from __future__ import annotations

import math
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import TypedDict

import numpy as np

import pysched
from pysched.tools.bench.config import BASELINES, IMPLEMENTATIONS, PYSCHED_IMPLEMENTATIONS, BenchConfig
from pysched.tools.bench.harness import timer_overhead_ns
from pysched.tools.bench.implementations import compiled_available

__all__ = [
    "GOALS",
    "BenchReport",
    "Goal",
    "GoalVerdict",
    "Machine",
    "RatioRow",
    "ScenarioResult",
    "check_goals",
    "format_table",
    "machine_info",
    "ratios",
]


# ------------------------------------------------------------------ results
@dataclass
class ScenarioResult:
    """One implementation under one (heartbeat rate, dispatching threads) load."""

    impl: str
    rate: float  #: requested heartbeats/s
    threads: int
    elapsed: float = 0.0  #: seconds of the measured window
    dispatches: int = 0  #: successful dispatch() calls in the window
    failures: dict[str, int] = field(default_factory=dict)  #: failed calls: no_node / no_pool
    latency_us: dict[str, float] = field(default_factory=dict)  #: p50, p99, p99.9, max, mean
    samples: int = 0  #: latency samples the percentiles were computed from
    sampled: bool = False  #: a thread exceeded max_samples and kept a uniform sample
    #: CPU seconds the dispatching threads used in the window (time.thread_time), all threads together
    dispatch_cpu_s: float = 0.0
    heartbeats: int = 0  #: heartbeats applied in the window
    heartbeat_elapsed: float = 0.0  #: seconds the heartbeat thread ran
    #: seconds from the window's start to the end of the heartbeat thread's last burst (the rate's time:
    #: :class:`~.harness.PacedHeartbeats`)
    heartbeat_active: float = 0.0
    heartbeat_errors: int = 0  #: heartbeats the implementation refused
    heartbeat_cpu_s: float = 0.0  #: CPU seconds the heartbeat thread used
    setup_s: float = 0.0  #: building the scheduler and registering the nodes
    warmup_s: float = 0.0  #: binding sessions before the window
    warmed_sessions: int = 0  #: sessions bound before the window
    error: str | None = None  #: an unexpected exception in a worker thread

    @property
    def throughput(self) -> float:
        """Successful dispatches per second, all threads together."""
        return self.dispatches / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def throughput_per_cpu(self) -> float:
        """Successful dispatches per CPU-second of the dispatching threads."""
        return self.dispatches / self.dispatch_cpu_s if self.dispatch_cpu_s > 0 else 0.0

    @property
    def heartbeat_rate(self) -> float:
        """Heartbeats actually applied per second, up to the heartbeat thread's last burst."""
        return self.heartbeats / self.heartbeat_active if self.heartbeat_active > 0 else 0.0

    @property
    def heartbeat_ratio(self) -> float | None:
        """Applied / requested heartbeat rate (None at rate 0)."""
        return self.heartbeat_rate / self.rate if self.rate > 0 else None

    @property
    def failed(self) -> int:
        """Failed dispatch calls, every kind together."""
        return sum(self.failures.values())

    def to_dict(self) -> dict[str, object]:
        """A JSON-serialisable view: the fields and the derived figures."""
        out = asdict(self)
        out.update(throughput=self.throughput, throughput_per_cpu=self.throughput_per_cpu,
                   heartbeat_rate=self.heartbeat_rate,
                   heartbeat_ratio=self.heartbeat_ratio, failed=self.failed)
        return out


#: pysched's figures relative to one baseline in one (rate, threads) block;
#: ratios > 1 mean pysched is better, None where there is no figure
RatioRow = TypedDict("RatioRow", {
    "impl": str,
    "baseline": str,
    "rate": float,
    "threads": int,
    "throughput": float | None,
    "cpu_throughput": float | None,
    "p50": float | None,
    "p99": float | None,
    "p99.9": float | None,
    "max": float | None,
    "heartbeats": float | None,
})


# ------------------------------------------------------------------ the goals, as data
@dataclass(frozen=True)
class Goal:
    """One target the benchmark checks."""

    wording: str  #: what is required, in words; ``{target}`` is replaced by the target
    #: the figure: a :data:`RatioRow` key (with ``baseline``), "heartbeat_ratio" or "p50_us"
    metric: str
    target: float
    unit: str  #: "x" (a ratio), "%" (a fraction) or "us"
    baseline: str | None = None  #: the ratio's baseline; None: a figure of the compiled kernel alone
    at_most: bool = False  #: the figure must be at most the target (else at least)
    stated_at: tuple[int, ...] = (1000,)  #: node counts the issue states the goal at
    stated: str = "goals are stated at 1,000 nodes"  #: said in the note when the run used other counts
    per_thread_count: bool = True  #: checked per dispatching-thread count; False: once, at 1 thread

    @property
    def text(self) -> str:
        """The wording with its target."""
        return self.wording.format(target=self.target)

    def passes(self, measured: float) -> bool:
        """Whether ``measured`` meets the target.

        :param measured: the figure.
        """
        return measured <= self.target if self.at_most else measured >= self.target


_PEER_STATED = "peer goals are stated at 1,000 and 10,000 nodes"

#: The goals, in the order they are reported; "pysched" in them is the compiled kernel
#: (the product), the pure-Python twin is shown for comparison only.
GOALS: tuple[Goal, ...] = (
    Goal("dispatch throughput >= {target:g}x legacy", "throughput", 20.0, "x", baseline="legacy"),
    Goal("p99 latency <= 1/{target:g} of legacy's", "p99", 30.0, "x", baseline="legacy"),
    Goal("heartbeats applied >= {target:.0%} of requested", "heartbeat_ratio", 0.95, "%"),
    # issue 7: the pure-Python indexed peer
    Goal("p50 latency <= 1/{target:g} of the peer's", "p50", 5.0, "x", baseline="peer",
         stated_at=(1000, 10_000), stated=_PEER_STATED),
    Goal("dispatches per CPU-second >= {target:g}x the peer's", "cpu_throughput", 3.0, "x", baseline="peer",
         stated_at=(1000, 10_000), stated=_PEER_STATED),
    # one dispatching thread: the least GIL interference
    Goal("dispatch() p50 <= {target:g} µs end to end", "p50_us", 3.0, "us", at_most=True, per_thread_count=False),
    # issue 7: one compiled call per job, at 1,000 and 10,000 nodes
    Goal("dispatch() p50 <= {target:g} µs (one compiled call)", "p50_us", 0.6, "us", at_most=True,
         per_thread_count=False, stated_at=(1000, 10_000), stated="stated at 1,000 and 10,000 nodes"),
)


@dataclass
class GoalVerdict:
    """One goal, checked in one scenario."""

    goal: str  #: what is required, in words
    scenario: str  #: where it was measured
    measured: float | None  #: the figure (a ratio, a fraction or µs)
    target: float
    unit: str  #: "x", "%" or "us"
    passed: bool | None  #: None: not measurable in this run
    note: str = ""

    def __post_init__(self) -> None:
        # plain Python types, so the verdict serialises to JSON whatever computed it
        if self.measured is not None:
            self.measured = float(self.measured)
        if self.passed is not None:
            self.passed = bool(self.passed)

    @property
    def verdict(self) -> str:
        """PASS, MISS or N/A."""
        return "N/A" if self.passed is None else ("PASS" if self.passed else "MISS")

    def to_dict(self) -> dict[str, object]:
        """A JSON-serialisable view, with the verdict."""
        out = asdict(self)
        out["verdict"] = self.verdict
        return out


# ------------------------------------------------------------------ machine
class Machine(TypedDict):
    """Where the benchmark ran."""

    cpu: str
    cores: int | None
    usable_cores: int | None
    platform: str
    python: str
    python_implementation: str
    numpy: str
    cython: str | None
    pysched: str
    pysched_compiled_available: bool
    switch_interval_s: float
    openblas_num_threads: str | None
    load_average_at_start: list[float] | None
    timer_overhead_ns: int


def machine_info() -> Machine:
    """CPU model, cores, Python, numpy, Cython, pysched, load average, timer overhead."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    try:
        import Cython

        cython_version: str | None = str(getattr(Cython, "__version__", "unknown"))
    except ImportError:
        cython_version = None
    load: list[float] | None
    try:
        load = list(os.getloadavg())
    except (AttributeError, OSError):
        load = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "numpy": np.__version__,
        "cython": cython_version,
        "pysched": pysched.__version__,
        "pysched_compiled_available": compiled_available(),
        "switch_interval_s": sys.getswitchinterval(),
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "load_average_at_start": load,
        "timer_overhead_ns": timer_overhead_ns(),
    }


# ------------------------------------------------------------------ the report
@dataclass
class BenchReport:
    """Everything :func:`~pysched.tools.bench.run_bench` measured, with ratios and goal verdicts."""

    config: BenchConfig
    machine: Machine
    results: list[ScenarioResult]
    ratios: list[RatioRow]  #: per (rate, threads, pysched impl, baseline): figures relative to the baseline
    goals: list[GoalVerdict]
    missing: dict[str, str]  #: implementation -> why it did not run
    legacy_path: str | None  #: the file of the legacy model that ran
    wall: float  #: seconds for the whole run
    peer_path: str | None = None  #: the file of the peer that ran
    peer_kind: str | None = None  #: its index ("heap" or "sortedlist")

    def result(self, impl: str, rate: float, threads: int) -> ScenarioResult | None:
        """The result of one scenario, or None if it did not run.

        :param impl: implementation name.
        :param rate: requested heartbeats/s.
        :param threads: dispatching threads.
        """
        for r in self.results:
            if r.impl == impl and r.rate == float(rate) and r.threads == threads:
                return r
        return None

    @property
    def errors(self) -> list[str]:
        """Unexpected worker exceptions, as "impl rate/threads: message"."""
        return [f"{r.impl} rate={r.rate:g} threads={r.threads}: {r.error}" for r in self.results if r.error]

    def to_dict(self) -> dict[str, object]:
        """A JSON-serialisable view: config, machine, scenarios, ratios, goals."""
        return {
            "config": asdict(self.config),
            "machine": dict(self.machine),
            "legacy_path": self.legacy_path,
            "peer_path": self.peer_path,
            "peer_kind": self.peer_kind,
            "missing": dict(self.missing),
            "wall_s": self.wall,
            "scenarios": [r.to_dict() for r in self.results],
            "ratios": [dict(r) for r in self.ratios],
            "goals": [g.to_dict() for g in self.goals],
            "errors": self.errors,
        }


# ------------------------------------------------------------------ ratios and goals
def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0 or a < 0:
        return None
    return float(a) / float(b)


def ratios(results: list[ScenarioResult], config: BenchConfig) -> list[RatioRow]:
    """Pysched's figures relative to each baseline, per (rate, threads), pysched implementation and baseline.

    Throughput, throughput per CPU-second and heartbeats are pysched/baseline;
    latencies are baseline/pysched, so every ratio reads "how many times
    better pysched is" (> 1 is better). ``baseline`` is "peer" or "legacy".
    A scenario that raised (see ``BenchReport.errors``) has no ratios: its
    figures are partial or zero.

    :param results: the run's scenario results.
    :param config: the run's configuration (its rates and thread counts).
    """
    by_key = {(r.impl, r.rate, r.threads): r for r in results if r.error is None}
    out: list[RatioRow] = []
    for rate in config.rates:
        for threads in config.threads:
            for baseline in BASELINES:
                base = by_key.get((baseline, rate, threads))
                if base is None:
                    continue
                for impl in PYSCHED_IMPLEMENTATIONS:
                    mine = by_key.get((impl, rate, threads))
                    if mine is None:
                        continue
                    mine_lat, base_lat = mine.latency_us, base.latency_us
                    out.append({
                        "impl": impl, "baseline": baseline, "rate": rate, "threads": threads,
                        "throughput": _div(mine.throughput, base.throughput),
                        "cpu_throughput": _div(mine.throughput_per_cpu, base.throughput_per_cpu),
                        "p50": _div(base_lat.get("p50"), mine_lat.get("p50")),
                        "p99": _div(base_lat.get("p99"), mine_lat.get("p99")),
                        "p99.9": _div(base_lat.get("p99.9"), mine_lat.get("p99.9")),
                        "max": _div(base_lat.get("max"), mine_lat.get("max")),
                        "heartbeats": _div(mine.heartbeat_rate, base.heartbeat_rate) if rate > 0 else None,
                    })
    return out


def _ratio_figure(row: RatioRow, metric: str) -> float | None:
    value = row.get(metric)
    return value if isinstance(value, float) else None


def check_goals(results: list[ScenarioResult], ratio_rows: list[RatioRow], config: BenchConfig,
                missing: dict[str, str], goals: tuple[Goal, ...] = GOALS) -> list[GoalVerdict]:
    """Evaluate ``goals`` at ``config.goal_rate``: per dispatching-thread count run, then the once-only ones.

    :param results: the run's scenario results.
    :param ratio_rows: :func:`ratios` of them.
    :param config: the run's configuration.
    :param missing: implementation -> why it did not run (said in the notes).
    :param goals: what to check.
    """
    rate = float(config.goal_rate)
    at = f"{config.nodes:,} nodes, {rate:,.0f} hb/s"
    by_key = {(r.impl, r.rate, r.threads): r for r in results if r.error is None}
    failed = {(r.impl, r.rate, r.threads): r.error for r in results if r.error is not None}
    ratio_of = {(r["impl"], r["baseline"], r["rate"], r["threads"]): r for r in ratio_rows}

    def joined(*parts: str) -> str:
        return "; ".join(x for x in parts if x)

    def compiled_missing(threads: int) -> str:
        if ("compiled", rate, threads) in failed:
            return "compiled raised: " + str(failed[("compiled", rate, threads)])
        return missing.get("compiled") or ("rate not in this run" if rate not in config.rates else "compiled not run")

    def baseline_missing(baseline: str, threads: int) -> str:
        if (baseline, rate, threads) in failed:
            return f"{baseline} raised: {failed[(baseline, rate, threads)]}"
        return f"{baseline} missing: {missing[baseline]}" if baseline in missing else f"{baseline} not run"

    def check(goal: Goal, threads: int) -> GoalVerdict:
        where = f"{at}, {threads} thread{'s' if threads > 1 else ''}"
        note = "" if config.nodes in goal.stated_at else f"{goal.stated}; this run used {config.nodes:,}"
        compiled = by_key.get(("compiled", rate, threads))
        value: float | None
        if goal.baseline is not None:
            ratio = ratio_of.get(("compiled", goal.baseline, rate, threads))
            value = None if ratio is None else _ratio_figure(ratio, goal.metric)
            if compiled is None:
                why = compiled_missing(threads)
            elif ratio is None:
                why = baseline_missing(goal.baseline, threads)
            else:
                why = "" if value is not None else "no figure"
        else:
            if compiled is None:
                value = None
            elif goal.metric == "heartbeat_ratio":
                value = compiled.heartbeat_ratio
            else:
                value = compiled.latency_us.get("p50")
            why = "" if compiled is not None else compiled_missing(threads)
        return GoalVerdict(goal.text, where, value, goal.target, goal.unit,
                           None if value is None else goal.passes(value), joined(why, note))

    verdicts = [check(goal, threads) for threads in config.threads for goal in goals if goal.per_thread_count]
    once = 1 if 1 in config.threads else min(config.threads)
    verdicts.extend(check(goal, once) for goal in goals if not goal.per_thread_count)
    return verdicts


# ------------------------------------------------------------------ the table
def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    if value is None or math.isnan(value):
        return "-"
    return format(value, spec) + suffix


def _lat(value: float | None) -> str:
    """A latency in µs: one decimal while small, thousands separators once large."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.1f}" if value < 1000 else f"{value:,.0f}"  # noqa: PLR2004  (four digits: separators)


def _ratio_text(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}x" if value < 100 else f"{value:,.0f}x"  # noqa: PLR2004  (three digits: no decimal)


def _goal_lines(report: BenchReport) -> list[str]:
    cfg = report.config
    lines = [f"GOALS (pysched = compiled kernel; at {cfg.goal_rate:,.0f} heartbeats/s)"]
    for g in report.goals:
        if g.measured is None:
            measured = "n/a"
            margin = ""
        elif g.unit == "x":
            measured = f"{g.measured:,.1f}x"
            margin = (f"{g.measured / g.target:.2f} of the target" if not g.passed
                      else f"{g.measured / g.target:.1f}x the target")
        elif g.unit == "%":
            measured = f"{100 * g.measured:.1f}%"
            margin = f"{100 * (g.measured - g.target):+.1f} points"
        else:
            measured = f"{g.measured:.2f} µs"
            margin = f"{g.measured - g.target:+.2f} µs vs target"
        lines.append(f"  [{g.verdict:<4}] {g.goal:<48} {g.scenario:<36} measured {measured}"
                     + (f" ({margin})" if margin else "") + (f"; {g.note}" if g.note else ""))
    verdicts = [g.passed for g in report.goals if g.passed is not None]
    lines.append(f"  {sum(verdicts)} of {len(verdicts)} measurable goal checks pass"
                 + (f", {len(report.goals) - len(verdicts)} not measurable" if len(verdicts) < len(report.goals)
                    else ""))
    return lines


def _block_lines(report: BenchReport, rate: float, threads: int) -> list[str]:
    cfg = report.config
    lines = [
        "",
        f"== {rate:,.0f} heartbeats/s requested, {threads} dispatching thread{'s' if threads > 1 else ''}",
        (f"  {'implementation':<24}{'dispatch/s':>12}{'per CPU-s':>11}{'p50':>9}{'p99':>9}{'p99.9':>9}{'max':>10}"
         f"{'heartbeats/s':>14}{'(% req)':>9}{'failures':>10}"),
    ]
    for impl in cfg.impls:
        label = IMPLEMENTATIONS[impl]
        r = report.result(impl, rate, threads)
        if r is None:
            lines.append(f"  {label:<24}{'missing':>12}")
            continue
        lat = r.latency_us
        hb = r.heartbeat_ratio
        lines.append(
            f"  {label:<24}{r.throughput:>12,.0f}{r.throughput_per_cpu:>11,.0f}{_lat(lat.get('p50')):>9}"
            f"{_lat(lat.get('p99')):>9}{_lat(lat.get('p99.9')):>9}{_lat(lat.get('max')):>10}"
            f"{(_fmt(r.heartbeat_rate, ',.0f') if rate > 0 else '-'):>14}"
            f"{(_fmt(None if hb is None else 100 * hb, '.1f', '%')):>9}{r.failed:>10,}"
            + (f"  ERROR: {r.error}" if r.error else "")
        )
    rows = [row for row in report.ratios if row["rate"] == rate and row["threads"] == threads]
    for row in rows:
        label = f"{row['impl']} vs {row['baseline']}"
        lines.append(
            f"  {label:<24}{_ratio_text(row['throughput']):>12}{_ratio_text(row['cpu_throughput']):>11}"
            f"{_ratio_text(row['p50']):>9}"
            f"{_ratio_text(row['p99']):>9}{_ratio_text(row['p99.9']):>9}{_ratio_text(row['max']):>10}"
            f"{_ratio_text(row['heartbeats']):>14}"
        )
    if rows:
        lines.append("  (ratios: dispatch/s, per CPU-s and heartbeats/s are pysched/baseline; latencies "
                     "are baseline/pysched, so > 1x means pysched is better)")
    return lines


def format_table(report: BenchReport) -> str:
    """The human-readable report: machine, one block per (rate, threads), ratios, goals.

    :param report: what :func:`~pysched.tools.bench.run_bench` returned.
    """
    cfg = report.config
    m = report.machine
    lines = []
    lines.append(
        f"pysched bench: {cfg.nodes:,} nodes in {cfg.pools} auto pools, {cfg.sessions:,} sessions, "
        f"hold {cfg.hold_ms:g} ms, max_concurrency {cfg.max_concurrency}, {cfg.duration:g} s per scenario, "
        f"seed {cfg.seed}" + (" (--quick)" if cfg.quick else "")
    )
    load = m["load_average_at_start"]
    lines.append(
        f"machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable); "
        f"Python {m['python']}, numpy {m['numpy']}, Cython {m['cython'] or 'not installed'}, "
        f"pysched {m['pysched']}" + (f"; load average {load[0]:.2f} at start" if load else "")
    )
    if report.peer_path:
        lines.append(f"peer: {report.peer_path} ({report.peer_kind} index)")
    if report.legacy_path:
        lines.append(f"legacy model: {report.legacy_path}")
    for impl, why in report.missing.items():
        lines.append(f"MISSING {IMPLEMENTATIONS[impl]}: {why}; its columns are marked missing")
    timer = m["timer_overhead_ns"]
    lines.append(f"latency: each dispatch() call alone, µs (timer overhead {timer} ns, included)"
                 "; throughput: successful dispatches/s, all threads; per CPU-s: dispatches per CPU-second "
                 "of the dispatching threads (time.thread_time)")
    for impl in cfg.impls:
        cold = [r for r in report.results if r.impl == impl and r.warmed_sessions < cfg.sessions]
        if cold:
            least = min(r.warmed_sessions for r in cold)
            lines.append(f"note: the warm-up ({cfg.warmup_seconds:g} s at most) bound only {least:,} of "
                         f"{cfg.sessions:,} sessions for {IMPLEMENTATIONS[impl]} in some scenarios; "
                         "its window includes first-contact dispatches")
    for rate in cfg.rates:
        for threads in cfg.threads:
            lines.extend(_block_lines(report, rate, threads))
    lines.append("")
    lines.extend(_goal_lines(report))
    if report.errors:
        lines.append("")
        lines.append("ERRORS")
        lines.extend(f"  {e}" for e in report.errors)
    lines.append("")
    lines.append(f"wall time {report.wall:.1f} s")
    return "\n".join(lines)
