"""Timing: medians over repeats after warm-up, the cases of a comparison side by side.

Every timed call is blocked on (``jax.block_until_ready``), so JAX's asynchronous dispatch
cannot hide work. The cases of one comparison run interleaved (A B, B A, A B, ...: each
round in the reverse order of the one before) so that load from other processes falls on
all of them alike, and each repeat also gives a paired ratio. Figures are wall-clock
seconds; ``cpu`` is the process CPU time over the same call (all threads), so
``cpu / wall`` shows how many cores the call actually kept busy.

The benchmarks in ``experiments/benchmarks/`` and the Early-Bird experiment's step timings
use it::

    from lottojax.timing import Comparison, format_table, interleaved
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import jax


class Timing(NamedTuple):
    """Seconds per repeat (after warm-up) of one case.

    Attributes:
      wall: wall-clock seconds of each timed repeat.
      cpu: process CPU seconds (all threads) of each timed repeat.
      first_call: wall seconds of the first warm-up call (compilation included), or
        ``None`` without warm-up.
    """

    wall: tuple[float, ...]
    cpu: tuple[float, ...]
    first_call: Optional[float] = None

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def spread(self) -> tuple[float, float]:
        """(fastest, slowest) repeat."""
        return min(self.wall), max(self.wall)

    @property
    def cores_busy(self) -> float:
        """Median over repeats of CPU seconds per wall second."""
        return statistics.median(c / w for c, w in zip(self.cpu, self.wall))

    def as_dict(self, work: int = 1) -> dict:
        """JSON-ready figures; ``work``: units of work per repeat (per-unit medians)."""
        return dict(
            repeats=len(self.wall), median_s=self.median, min_s=self.spread[0], max_s=self.spread[1],
            median_per_unit_s=self.median / work, wall_s=list(self.wall), cpu_s=list(self.cpu),
            cores_busy=self.cores_busy, first_call_s=self.first_call,
        )


def _timed_call(fn: Callable, setup: Optional[Callable[[], tuple]], clock, cpu_clock) -> tuple[float, float]:
    args = () if setup is None else setup()
    wall, cpu = clock(), cpu_clock()
    jax.block_until_ready(fn(*args))
    return clock() - wall, cpu_clock() - cpu


def interleaved(
    fns: Mapping[str, Callable],
    *,
    repeats: int,
    warmup: int = 1,
    setups: Optional[Mapping[str, Callable[[], tuple]]] = None,
    clock: Callable[[], float] = time.perf_counter,
    cpu_clock: Callable[[], float] = time.process_time,
) -> dict[str, Timing]:
    """Times several zero-argument callables in turn, ``repeats`` rounds after warm-up.

    Each round reverses the previous round's order (A B, B A, A B, ...), so that a case
    that runs right after another (warm caches, a clock boosted or throttled by it) is
    not always the same one.

    Args:
      fns: name → callable; its result is blocked on. With a setup, it is called on the
        setup's result instead.
      repeats: timed calls of each callable (at least 1).
      warmup: untimed calls of each callable first (compilation, caches); the first one's
        wall time is kept as ``Timing.first_call``.
      setups: optional name → untimed callable returning the argument tuple of one call
        (for cases that consume their input, e.g. an eager PyTorch model).
      clock, cpu_clock: wall and CPU clocks (injectable for tests).

    Returns:
      name → :class:`Timing`.

    Examples:
      >>> calls = []
      >>> ticks = iter(range(100))
      >>> out = interleaved({'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')},
      ...                   repeats=2, warmup=1, clock=lambda: next(ticks), cpu_clock=lambda: 0.0)
      >>> ''.join(calls), out['a'].wall, out['a'].first_call
      ('abbaab', (1, 1), 1)
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    setups = dict(setups or {})
    unknown = set(setups) - set(fns)
    if unknown:
        raise ValueError(f"setups {sorted(unknown)} name no callable in fns {sorted(fns)}")
    first = {name: None for name in fns}
    walls = {name: [] for name in fns}
    cpus = {name: [] for name in fns}
    order = list(fns)
    for i in range(warmup + repeats):
        for name in order if i % 2 == 0 else reversed(order):  # A B, B A, ...: no case always goes first
            wall, cpu = _timed_call(fns[name], setups.get(name), clock, cpu_clock)
            if i == 0 and warmup:
                first[name] = wall
            if i >= warmup:
                walls[name].append(wall)
                cpus[name].append(cpu)
    return {name: Timing(tuple(walls[name]), tuple(cpus[name]), first[name]) for name in fns}


def median_time(fn: Callable, *, repeats: int, warmup: int = 1, setup: Optional[Callable[[], tuple]] = None) -> Timing:
    """Times one callable: :func:`interleaved` with a single case.

    Examples:
      >>> import jax.numpy as jnp
      >>> t = median_time(lambda: jnp.ones(3) * 2, repeats=3)
      >>> len(t.wall), t.median > 0
      (3, True)
    """
    setups = None if setup is None else {"fn": setup}
    return interleaved({"fn": fn}, repeats=repeats, warmup=warmup, setups=setups)["fn"]


def median_interval(values: Sequence[float], confidence: float = 0.95) -> Optional[tuple[float, float]]:
    """A distribution-free confidence interval for the median of ``values``.

    The interval between the k-th smallest and the k-th largest value covers the median
    with probability 1 - 2 P(Binomial(n, 1/2) < k), whatever the distribution; k is the
    largest that keeps this at least ``confidence``. ``None`` when there are too few values
    (fewer than 6 at 95%).

    Examples:
      >>> median_interval([1.0, 1.1, 0.9, 1.05, 0.95, 1.2])  # k = 1: the range
      (0.9, 1.2)
      >>> median_interval(range(21))  # k = 6: coverage 1 - 2 * 0.0133
      (5, 15)
      >>> median_interval([1.0, 1.1, 0.9]) is None
      True
    """
    ordered = sorted(values)
    n = len(ordered)
    tail = (1.0 - confidence) / 2
    k, below = 0, 0.0  # below: P(Binomial(n, 1/2) < k)
    while k < n and below + math.comb(n, k) / 2**n <= tail:
        below += math.comb(n, k) / 2**n
        k += 1
    if k == 0:
        return None
    return ordered[k - 1], ordered[n - k]


class Comparison(NamedTuple):
    """One row group of the table: cases timed side by side and the ratio between two of them.

    Attributes:
      title: what is compared.
      unit: the unit of work the medians are divided by (``'step'``, ``'seed'``, ...).
      work: units of work per timed repeat.
      timings: case label → :class:`Timing`, in print order.
      numerator, denominator: the labels whose medians form the ratio.
      ratio_name: how to read the ratio (e.g. ``'masked/dense'``).
      target: ``('<=', 1.02)``, ``('>=', 4.0)`` or ``None``.
      checks: name → number (or tuple of numbers): figures that show the cases did the same
        work (printed and saved).
    """

    title: str
    unit: str
    work: int
    timings: Mapping[str, Timing]
    numerator: str
    denominator: str
    ratio_name: str
    target: Optional[tuple[str, float]] = None
    checks: Mapping[str, object] = {}

    @property
    def ratio(self) -> float:
        return self.timings[self.numerator].median / self.timings[self.denominator].median

    @property
    def cpu_ratio(self) -> float:
        """The ratio of median CPU seconds: less sensitive than wall time to being
        descheduled on a shared machine (but it counts threads that spin while waiting)."""
        num, den = self.timings[self.numerator].cpu, self.timings[self.denominator].cpu
        return statistics.median(num) / statistics.median(den)

    @property
    def paired_ratios(self) -> tuple[float, ...]:
        """The ratio within each interleaved repeat."""
        num, den = self.timings[self.numerator].wall, self.timings[self.denominator].wall
        return tuple(n / d for n, d in zip(num, den))

    @property
    def paired_median(self) -> float:
        """The median of :attr:`paired_ratios`."""
        return statistics.median(self.paired_ratios)

    @property
    def paired_interval(self) -> Optional[tuple[float, float]]:
        """95% confidence interval of :attr:`paired_median` (:func:`median_interval`)."""
        return median_interval(self.paired_ratios)

    @property
    def verdict(self) -> Optional[str]:
        """Against the target: ``'met'`` or ``'NOT MET'`` when the whole 95% interval of the
        paired median is on one side of the bound, ``'undecided'`` when it straddles it;
        with too few repeats for an interval, the paired median alone decides. ``None``
        without a target.

        Examples:
          >>> t = lambda *w: Timing(w, w)
          >>> close = Comparison('c', 'step', 1, {'a': t(*[1.0] * 9), 'b': t(*[0.99, 1.01] * 4, 1.0)},
          ...                    'b', 'a', 'b/a', ('<=', 1.005))
          >>> close.paired_interval, close.verdict
          ((0.99, 1.01), 'undecided')
          >>> close._replace(target=('<=', 1.02)).verdict
          'met'
        """
        if self.target is None:
            return None
        op, bound = self.target
        inside = (lambda r: r <= bound) if op == "<=" else (lambda r: r >= bound)
        low, high = self.paired_interval or (self.paired_median,) * 2
        if inside(low) and inside(high):
            return "met"
        if not inside(low) and not inside(high):
            return "NOT MET"
        return "undecided"

    def as_dict(self) -> dict:
        return dict(
            title=self.title, unit=self.unit, work_per_repeat=self.work,
            cases={label: t.as_dict(self.work) for label, t in self.timings.items()},
            ratio=dict(name=self.ratio_name, value=self.ratio, paired=list(self.paired_ratios),
                       paired_median=self.paired_median, paired_interval_95=self.paired_interval,
                       cpu_time=self.cpu_ratio,
                       target=None if self.target is None else f"{self.target[0]} {self.target[1]}",
                       verdict=self.verdict),
            checks=dict(self.checks),
        )


def format_seconds(seconds: float) -> str:
    """A duration with a readable unit.

    Examples:
      >>> format_seconds(0.000412), format_seconds(0.0123), format_seconds(3.5)
      ('412 µs', '12.3 ms', '3.50 s')
    """
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.2f} s"


def format_value(value) -> str:
    """Numbers to 4 significant digits, sequences comma-separated.

    Examples:
      >>> format_value((0.912345, 0.9)), format_value(2.5e-7), format_value(2)
      ('0.9123, 0.9', '2.5e-07', '2')
    """
    if isinstance(value, (tuple, list)):
        return ", ".join(format_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(comparisons: Sequence[Comparison]) -> str:
    """The side-by-side table: per case the median per unit of work, the fastest–slowest
    repeat, repeats and cores kept busy; then the ratio of the medians, its range over the
    interleaved repeats and the ratio of median CPU times; then the median of the paired
    ratios, its 95% confidence interval and the verdict against the target.

    Examples:
      >>> c = Comparison('masked vs dense', 'step', 10,
      ...                {'dense': Timing((1.0, 1.2), (1.0, 1.0)), 'masked': Timing((1.1, 1.2), (1.0, 1.1))},
      ...                'masked', 'dense', 'masked/dense', ('<=', 1.02))
      >>> print(format_table([c]))
      masked vs dense
        case                                       median/step         fastest–slowest  repeats  cores busy
        dense                                           110 ms           100 ms–120 ms        2         0.9
        masked                                          115 ms           110 ms–120 ms        2         0.9
        ratio masked/dense                               1.045   per repeat 1.000–1.100  CPU-time ratio 1.050
        paired median 1.050 (too few repeats for a 95% interval)   target <= 1.02: NOT MET
    """
    lines = []
    for c in comparisons:
        lines.append(c.title)
        lines.append(f"  {'case':<40} {'median/' + c.unit:>13}   {'fastest–slowest':>21}  repeats  cores busy")
        for label, t in c.timings.items():
            low, high = (format_seconds(s / c.work) for s in t.spread)
            lines.append(f"  {label:<40} {format_seconds(t.median / c.work):>13}   {low + '–' + high:>21}"
                         f"  {len(t.wall):>7}  {t.cores_busy:>10.1f}")
        paired, interval = c.paired_ratios, c.paired_interval
        lines.append(f"  {'ratio ' + c.ratio_name:<40} {c.ratio:>13.3f}   {'per repeat ' + f'{min(paired):.3f}–{max(paired):.3f}':>21}"
                     f"  CPU-time ratio {c.cpu_ratio:.3f}")
        spread = ("(too few repeats for a 95% interval)" if interval is None
                  else f"(95% interval {interval[0]:.3f}–{interval[1]:.3f})")
        verdict = "" if c.verdict is None else f"   target {c.target[0]} {c.target[1]:g}: {c.verdict}"
        lines.append(f"  paired median {c.paired_median:.3f} {spread}{verdict}")
        for name, value in c.checks.items():
            lines.append(f"  check {name}: {format_value(value)}")
        lines.append("")
    return "\n".join(lines).rstrip()
