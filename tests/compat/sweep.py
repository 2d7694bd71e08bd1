"""A wider sweep of the compatibility cases than the test suite runs: a fresh random
sample of `Case`s (see `test_solves.py`), each compared with Diffrax, printing the
differences and the largest relative differences of times and values.

    python -m tests.compat.sweep [--seed N] [--cases N] [--vmap-float64-adaptive]
    python -m tests.compat.sweep --gradients [--forward-mode] [--seed N] [--cases N]
    python -m tests.compat.sweep --implicit [--seed N] [--cases N]
    python -m tests.compat.sweep --cde [--seed N] [--cases N]
    python -m tests.compat.sweep --events [--seed N] [--cases N]

`--vmap-float64-adaptive` samples only adaptive solves under `jax.vmap` in float64 (the
cases in which diffeqx combines Runge–Kutta stages by elementwise sums; see "Values to
the last digits" in docs/migration.md). `--gradients` samples the gradient cases of
`test_gradients.py` instead (loss and gradients with respect to `y0` and `args`, each
adjoint; with `--forward-mode`, `ForwardMode` and `jax.jacfwd` instead). `--implicit` samples the implicit and IMEX solvers, each with its own
root finder or a given one (`IMPLICIT_SOLVERS`, `IMEX_SOLVERS` and `ROOT_FINDERS` in
`_harness.py`), on the same axes otherwise; a call that both libraries refuse is
counted as such. `--cde` samples controlled differential equations driven by a
linear or cubic interpolation (`CDE_PROBLEMS`) instead of the ODE problems.
`--saveat NAME` samples only that `SaveAt` (a name of `make_saveat`). `--events`
samples the event cases of `test_events.py` (condition, direction, root finding,
`SaveAt`, controller, direction of time, dtype, `vmap`, `max_steps`). The figures quoted there come from `--seed 11 --cases 150`, `--seed 3
--cases 60 --vmap-float64-adaptive` and `--gradients --seed 7 --cases 60`.
"""

import argparse
import itertools
import random

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402

import diffeqx  # noqa: E402

from ._harness import (  # noqa: E402
    CDE_PROBLEMS,
    IMEX_SOLVERS,
    IMPLICIT_SOLVERS,
    ROOT_FINDERS,
    VMAP_FLOAT64_TOLERANCE,
    Case,
    diff_outputs,
    solve,
    tolerance_for,
)
from .test_solves import AXES, diffrax_accepts  # noqa: E402


def _largest_relative(expected, actual) -> dict:
    out = {}
    for key in ("ts", "ys"):
        largest = 0.0
        e_leaves, a_leaves = (
            jax.tree.leaves(expected[key]),
            jax.tree.leaves(actual[key]),
        )
        if len(e_leaves) != len(a_leaves):
            continue  # a structural difference, which `diff_outputs` reports
        for e, a in zip(e_leaves, a_leaves, strict=True):
            e, a = np.asarray(e, np.float64), np.asarray(a, np.float64)
            if e.shape != a.shape:
                continue
            both = np.isfinite(e) & np.isfinite(a)
            if both.any():
                scale = np.maximum(np.abs(e[both]), 1e-3)
                largest = max(largest, float(np.max(np.abs(e[both] - a[both]) / scale)))
        out[key] = largest
    return out


def _through_both(run, case) -> list:
    """`run(lib, case)` for Diffrax, then diffeqx: each output, or a line saying what
    the library raised. Compiled programs are dropped after each case."""
    outputs = []
    for lib in (diffrax, diffeqx):
        try:
            outputs.append(run(lib, case))
        except Exception as error:  # noqa: BLE001 - reported, not fatal
            outputs.append(f"{lib.__name__} raised {type(error).__name__}: {error}")
    jax.clear_caches()
    return outputs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--cases", type=int, default=150)
    parser.add_argument("--vmap-float64-adaptive", action="store_true")
    parser.add_argument("--gradients", action="store_true")
    parser.add_argument("--implicit", action="store_true")
    parser.add_argument("--forward-mode", action="store_true")
    parser.add_argument("--cde", action="store_true")
    parser.add_argument("--saveat", help="sample only this SaveAt (e.g. dense)")
    parser.add_argument("--events", action="store_true")
    options = parser.parse_args(argv)
    if options.events:
        return _events(options.seed, options.cases)
    if options.gradients:
        return _gradients(options.seed, options.cases, options.forward_mode)
    axes = dict(AXES)
    if options.vmap_float64_adaptive:
        axes.update(
            vmap=(True,),
            dtype=("float64",),
            controller=("pid", "pid_tight", "clip_step", "clip_jump"),
        )
    if options.cde:
        axes.update(problem=CDE_PROBLEMS)
    if options.saveat:
        axes.update(saveat=(options.saveat,))
    if options.implicit:
        axes.update(
            solver=tuple(
                f"{solver}/{finder}"
                for solver in IMPLICIT_SOLVERS + IMEX_SOLVERS
                for finder in ROOT_FINDERS
            )
        )
    product = [Case(*values) for values in itertools.product(*axes.values())]
    sample = random.Random(options.seed).sample(product, 3 * options.cases)
    cases = [case for case in sample if diffrax_accepts(case)][: options.cases]

    def verdict(case, expected, actual):
        problems = diff_outputs(expected, actual, case.dtype, tolerance_for(case))
        largest = _largest_relative(expected, actual)
        sizes = ", ".join(f"{k} {v:.1e}" for k, v in largest.items())
        return problems, f" ({sizes})"

    return _sweep(cases, solve, verdict)


def _sweep(cases, run, verdict) -> int:
    """Each case through both libraries (`run(lib, case)`), printing a line per case
    and the differences that `verdict(case, expected, actual)` returns with a
    suffix for the line, then the totals."""
    differing = refused = 0
    for index, case in enumerate(cases):
        outputs = _through_both(run, case)
        if all(isinstance(out, str) for out in outputs):
            print(f"{index} {case}: refused by both; " + outputs[1][:300])
            refused += 1
            continue
        if any(isinstance(out, str) for out in outputs):
            print(f"{index} {case}: " + "; ".join(map(str, outputs))[:400])
            differing += 1
            continue
        problems, suffix = verdict(case, *outputs)
        differing += bool(problems)
        print(f"{index} {case}: {'DIFFERS' if problems else 'same'}{suffix}")
        for line in problems:
            print("    " + line[:300])
    print(
        f"{differing} of {len(cases)} cases differ"
        + (f"; {refused} refused by both" if refused else "")
    )
    return 0


def _events(seed: int, num_cases: int) -> int:
    from .test_events import EventCase, run

    directions = {
        "pair": (None, (True, False), (False, True), (True, True)),
        "same_step": (None, (True, True)),
        "mixed": (None, {"late": None, "half": True}, {"late": True, "half": False}),
    }
    axes = dict(
        cond=("real", "bool", "pair", "mixed", "bool_at_t0", "zero_at_t0")
        + ("same_step", "steady"),
        root_finder=(True, False),
        saveat=("t1", "mixed", "ts", "steps", "subs"),
        controller=("const", "pid"),
        backwards=(False, True),
        dtype=("float64", "float32"),
        vmap=(False, True),
        max_steps=(256, None),
    )
    rng = random.Random(seed)
    cases = []
    while len(cases) < num_cases:
        choice = {axis: rng.choice(values) for axis, values in axes.items()}
        choice["direction"] = rng.choice(
            directions.get(choice["cond"], (None, True, False))
        )
        if choice["cond"] == "steady":
            choice["y0"] = rng.choice((1.0, 2.0))
        if choice["dtype"] == "float32":
            # With x64 enabled Diffrax cannot root-find a float32 condition.
            choice["root_finder"] = False
        case = EventCase(**choice)
        if case not in cases:
            cases.append(case)

    def verdict(case, expected, actual):
        fired = bool(expected["result"].reshape(-1, 4)[:, 3].any())
        tolerance = None
        if case.vmap and case.dtype == "float64" and case.controller == "pid":
            tolerance = VMAP_FLOAT64_TOLERANCE  # see `_harness.tolerance_for`
        problems = diff_outputs(expected, actual, case.dtype, tolerance)
        return problems, "" if fired else " (no event)"

    return _sweep(cases, run, verdict)


def _gradients(seed: int, num_cases: int, forward_mode: bool = False) -> int:
    from .test_gradients import AXES as GRAD_AXES, GradCase, loss_and_gradients

    axes = dict(GRAD_AXES, adjoint=("ForwardMode",)) if forward_mode else GRAD_AXES
    product = [GradCase(*values) for values in itertools.product(*axes.values())]
    sample = random.Random(seed).sample(product, 3 * num_cases)
    # Euler gives no error estimate: Diffrax refuses to adapt its step size.
    cases = [c for c in sample if not (c.solver == "Euler" and c.controller != "const")]

    def verdict(case, expected, actual):
        return diff_outputs(expected, actual, case.dtype), ""

    return _sweep(cases[:num_cases], loss_and_gradients, verdict)


if __name__ == "__main__":
    raise SystemExit(main())
