"""Timing and counting helpers shared by the benchmark scripts.

Compile time and run time are measured separately:

- compile: `eqx.filter_jit(fn).lower(*args)` (tracing + lowering to StableHLO) and
  `.compile()` (the XLA compiler), each timed on its own, after `jax.clear_caches()`
  so that nothing traced or compiled earlier in the process is reused;
- run: the median wall time of several calls of the compiled executable, each ended
  by `jax.block_until_ready`, after one untimed warm-up call; the libraries compared
  on one problem take turns, so that background load affects them alike.

Vector-field evaluations are counted in a separate, untimed run in which the field
calls `jax.debug.callback` with no operands: the host counter is bumped once per
executed evaluation (once per *batched* evaluation under `jax.vmap`), whatever the
solver does internally (stage loops, FSAL, rejected steps, recomputation under AD).
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax


@dataclasses.dataclass
class CompileTiming:
    lower_s: float  # trace + lower to StableHLO
    xla_s: float  # XLA compilation of the lowered module
    cpu_s: float  # process CPU time of both (all threads): steadier on a busy machine

    @property
    def total_s(self) -> float:
        return self.lower_s + self.xla_s


@dataclasses.dataclass
class RunTiming:
    first_s: float  # first call of the compiled executable
    median_s: float
    min_s: float
    repeats: int


def compile_once(fn: Callable, args: tuple) -> tuple[Any, CompileTiming]:
    """Trace, lower and compile `fn` at `args` from cold caches; time each phase."""
    jax.clear_caches()
    cpu_start = time.process_time()
    start = time.perf_counter()
    lowered = eqx.filter_jit(fn).lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done_at = time.perf_counter()
    cpu_s = time.process_time() - cpu_start
    return compiled, CompileTiming(lowered_at - start, done_at - lowered_at, cpu_s)


def fastest(timings: list[CompileTiming]) -> CompileTiming:
    return min(timings, key=lambda timing: timing.total_s)


def time_runs(
    runners: dict[str, tuple[Callable, tuple]],
    *,
    min_time_s: float,
    min_repeats: int = 5,
    max_repeats: int = 500,
) -> tuple[dict[str, Any], dict[str, RunTiming]]:
    """Median wall time of repeated calls of each `compiled(*args)` in `runners`.

    The runners take turns, one call each per round, so that a noisy machine (other
    processes, frequency changes) disturbs all of them alike. Each runner is called
    once, untimed, first; its output is returned. Python's garbage collector is
    paused while timing.
    """
    outputs, first_s = {}, {}
    for name, (compiled, args) in runners.items():
        start = time.perf_counter()
        outputs[name] = jax.block_until_ready(compiled(*args))
        first_s[name] = time.perf_counter() - start
    samples: dict[str, list[float]] = {name: [] for name in runners}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        budget_start = time.perf_counter()
        while len(samples[next(iter(runners))]) < max_repeats and (
            len(samples[next(iter(runners))]) < min_repeats
            or time.perf_counter() - budget_start < min_time_s * len(runners)
        ):
            for name, (compiled, args) in runners.items():
                start = time.perf_counter()
                jax.block_until_ready(compiled(*args))
                samples[name].append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    timings = {
        name: RunTiming(first_s[name], statistics.median(times), min(times), len(times))
        for name, times in samples.items()
    }
    return outputs, timings


class EvalCounter:
    """Counts executed vector-field evaluations through a host callback."""

    def __init__(self) -> None:
        self.count = 0

    def _tick(self) -> None:
        self.count += 1

    def wrap(self, field: Callable) -> Callable:
        """`field` with a side effect that bumps this counter whenever it runs.

        The result is an `eqx.Module`, so the arrays inside `field` (e.g. a neural
        network's weights) stay visible to `jax.grad` and `eqx.filter_jit`.
        """
        return _CountedField(field, self._tick)

    def run(self, fn: Callable, args: tuple) -> Any:
        """Run `fn(*args)` once (jitted) and return its output; `self.count` is set."""
        jitted = eqx.filter_jit(fn)
        self.count = 0
        output = jax.block_until_ready(jitted(*args))
        jax.effects_barrier()  # wait for every pending callback before reading
        return output


class _CountedField(eqx.Module):
    field: Callable
    tick: Callable

    def __call__(self, t, y, args):
        jax.debug.callback(self.tick)
        return self.field(t, y, args)
