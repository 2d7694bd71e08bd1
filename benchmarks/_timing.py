"""Timing and counting helpers shared by the benchmark scripts.

Compile time and run time are measured separately:

- compile: `eqx.filter_jit(fn).lower(*args)` (tracing + lowering to StableHLO) and
  `.compile()` (the XLA compiler), each timed on its own, after `jax.clear_caches()`
  so that nothing traced or compiled earlier in the process is reused;
- run: the median wall time of several calls, each ended by `jax.block_until_ready`,
  after one untimed warm-up call; the libraries compared on one problem take turns,
  so that background load affects them alike. The calls go through `jax.jit`, as a
  user's jitted function is called, not through the compiled executable that the
  compile timing produced: JAX calls an executable that holds a host callback
  (as the error checks of `throw=True` solves do, in both libraries) by a slower
  Python path when it is called as a `Compiled` object (about 28 µs more per call on
  the 2-core CPU used for `results/`), but not when it is called through `jax.jit`.

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


class Runner:
    """`fn`, to be called at `args`: `runner(*args)` calls the executable that
    `compile_once` compiled (or `fn` jitted, when there is none); `dispatch()`
    gives `(call, call_args)` calling `fn(*args)` through `jax.jit`, with `args`
    split into arrays and the rest once, beforehand, so that the call costs what a
    call of a jitted function costs. `call` returns the arrays of `fn`'s output."""

    def __init__(self, fn: Callable, args: tuple, compiled: Any = None):
        self.fn, self.args = fn, args
        self.compiled = compiled if compiled is not None else eqx.filter_jit(fn)

    def __call__(self, *args):
        return self.compiled(*args)

    def dispatch(self) -> tuple[Callable, tuple]:
        dynamic, static = eqx.partition(self.args, eqx.is_array)

        def call(dynamic):
            return eqx.filter(self.fn(*eqx.combine(dynamic, static)), eqx.is_array)

        return jax.jit(call), (dynamic,)


def compile_once(fn: Callable, args: tuple) -> tuple[Runner, CompileTiming]:
    """Trace, lower and compile `fn` at `args` from cold caches; time each phase."""
    jax.clear_caches()
    cpu_start = time.process_time()
    start = time.perf_counter()
    lowered = eqx.filter_jit(fn).lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done_at = time.perf_counter()
    cpu_s = time.process_time() - cpu_start
    timing = CompileTiming(lowered_at - start, done_at - lowered_at, cpu_s)
    return Runner(fn, args, compiled), timing


def fastest(timings: list[CompileTiming]) -> CompileTiming:
    return min(timings, key=lambda timing: timing.total_s)


def time_runs(
    runners: dict[str, tuple[Callable, tuple]],
    *,
    min_time_s: float,
    min_repeats: int = 5,
    max_repeats: int = 500,
) -> tuple[dict[str, Any], dict[str, RunTiming]]:
    """Median wall time of repeated calls of each `compiled(*args)` in `runners`
    (through `jax.jit` for a `Runner`: see the module's docstring).

    The runners take turns, one call each per round, so that a noisy machine (other
    processes, frequency changes) disturbs all of them alike. Each runner is called
    once, untimed, first; its output is returned. Python's garbage collector is
    paused while timing.
    """
    outputs, first_s, calls = {}, {}, {}
    for name, (compiled, args) in runners.items():
        start = time.perf_counter()
        outputs[name] = jax.block_until_ready(compiled(*args))
        first_s[name] = time.perf_counter() - start
        calls[name] = (compiled, args)
        if isinstance(compiled, Runner):
            call, call_args = compiled.dispatch()
            jax.block_until_ready(call(*call_args))  # compiles it
            calls[name] = (call, call_args)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        budget_start = time.perf_counter()
        while len(samples[next(iter(runners))]) < max_repeats and (
            len(samples[next(iter(runners))]) < min_repeats
            or time.perf_counter() - budget_start < min_time_s * len(runners)
        ):
            for name, (call, args) in calls.items():
                start = time.perf_counter()
                jax.block_until_ready(call(*args))
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
