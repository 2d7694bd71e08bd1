"""Run the same `diffeqsolve` call through Diffrax and diffeqx and compare the answers.

A `Case` is a small frozen record of choices (problem, solver, controller, what to save,
time direction, dtype, vmap, event, resume). `solve(lib, case)` builds the call from
those choices with `lib` being either the `diffrax` or the `diffeqx` module (their
public APIs are the same) and returns everything a user can observe as NumPy arrays.
`compare(case)` runs both and returns a list of readable differences (empty when the
two agree); `python -c "from tests.compat._harness import *; compare(Case(...),
verbose=True)"` prints them.

Tolerances: both libraries implement the same mathematics, but not with the same
sequence of floating-point operations, so values are compared to a few hundred ULP
(`TOLERANCE`), while step counts, results, array shapes and dtypes and the positions of
the `inf` padding must match exactly.
"""

import dataclasses
import math
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

import diffeqx

# (rtol, atol) per dtype; see the module docstring.
TOLERANCE = {"float64": (1e-11, 1e-12), "float32": (2e-5, 2e-6)}
# Under `jax.vmap` on CPU in float64, diffeqx combines explicit Runge–Kutta stages
# with elementwise sums, which round otherwise than Diffrax's dot products; adaptive
# step sizes then follow the error estimate's last digits (docs/migration.md: at
# worst 2.4e-10 relative in a sweep of 60 such cases, with the same steps).
VMAP_FLOAT64_TOLERANCE = (1e-9, 1e-12)
MAX_STEPS = 128
RESULT_NAMES = ("successful", "max_steps_reached", "dt_min_reached", "event_occurred")
# The choices of problem and solver a `Case` may make (the sampled axes of the tests).
PROBLEMS = ("lin1", "lin2", "tree", "lv")
# Controlled differential equations, driven by a path interpolating fixed data on
# [0, 2] (`make_term`): linear or cubic Hermite interpolation.
CDE_PROBLEMS = ("cde_linear", "cde_cubic")
EXPLICIT_SOLVERS = (
    "Euler",
    "Heun",
    "Midpoint",
    "Ralston",
    "Bosh3",
    "Tsit5",
    "Dopri5",
    "Dopri8",
)
# Implicit solvers, named `solver` or `solver/root_finder` (see `make_solver`). The
# IMEX methods get the vector field split into two halves, explicit and implicit.
IMPLICIT_SOLVERS = ("ImplicitEuler", "Kvaerno3", "Kvaerno4", "Kvaerno5")
IMEX_SOLVERS = ("KenCarp3", "KenCarp4", "KenCarp5", "Sil3")
ROOT_FINDERS = ("default", "newton", "chord", "verychord")


@dataclasses.dataclass(frozen=True)
class Case:
    problem: str = "lin1"  # lin1 | lin2 | tree | lv
    solver: str = "Tsit5"
    controller: str = (
        "const"  # const | pid | pid_tight | clip_step | clip_jump | stepto
    )
    saveat: str = "t1"  # t1 | t0t1 | ts | steps | steps_n | mixed | dense | fn | subs
    backwards: bool = False
    dtype: str = "float64"
    vmap: bool = False
    event: str = "none"  # none | bool | real | tree | at_t0
    resume: bool = False

    def __str__(self):
        return (
            f"{self.problem}-{self.solver}-{self.controller}-{self.saveat}-"
            f"{'bwd' if self.backwards else 'fwd'}-{self.dtype}-"
            f"{'vmap' if self.vmap else 'single'}-{self.event}-"
            f"{'resumed' if self.resume else 'fresh'}"
        )


# ---------------------------------------------------------------------------- problems
def _first(y):
    return jax.tree.leaves(y)[0][0]


def _lin1(t, y, args):
    return -args * y + jnp.sin(t)


def _lin2(t, y, args):
    matrix, forcing = args
    return -(matrix @ y) + jnp.sin(t) * forcing


def _tree(t, y, args):
    return {"x": y["v"], "v": -args["k"] * y["x"] - args["c"] * y["v"] + jnp.sin(t)}


def _lotka_volterra(t, y, args):
    alpha, beta, gamma, delta = args[0], args[1], args[2], args[3]
    prey, predator = y[0], y[1]
    return jnp.stack(
        [
            alpha * prey - beta * prey * predator,
            delta * prey * predator - gamma * predator,
        ]
    )


def problem(name: str, dtype) -> tuple[Any, Any, Any]:
    """The vector field, y0 and args of a named problem, built in `dtype`."""

    def arr(x):
        return jnp.asarray(x, dtype=dtype)

    if name == "lin1":
        return _lin1, arr([1.0]), arr(0.7)
    if name == "lin2":
        args = (arr([[0.7, 0.3], [-0.2, 0.5]]), arr([1.0, 0.5]))
        return _lin2, arr([1.0, -0.5]), args
    if name == "tree":
        y0 = {"x": arr([1.0, 0.2]), "v": arr([0.0, -0.3])}
        return _tree, y0, {"k": arr(2.0), "c": arr(0.3)}
    if name == "lv":
        return _lotka_volterra, arr([1.0, 0.5]), arr([1.5, 1.0, 3.0, 1.0])
    if name in CDE_PROBLEMS:
        return _cde_field, arr([1.0, -0.5]), arr([[0.8, -0.4], [0.3, 1.1]])
    raise ValueError(name)


def _cde_field(t, y, args):
    # (state, channel): how each channel of the driving path moves each state entry
    return jnp.tanh(args * y[:, None] + 0.1 * t)


def _cde_path(lib, name, dtype):
    ts = jnp.linspace(0.0, 2.0, 9, dtype=dtype)
    xs = jnp.stack([jnp.sin(3 * ts), ts * ts / 2], axis=-1)
    if name == "cde_linear":
        return lib.LinearInterpolation(ts, xs)
    return lib.CubicInterpolation(ts, lib.backward_hermite_coefficients(ts, xs))


# --------------------------------------------------------------------------- the call
def make_solver(lib, name, dtype):
    """`name` is a solver's name, or `solver/root_finder` for an implicit one with
    `root_finder` one of `ROOT_FINDERS` (`default`: the solver's own)."""
    name, _, finder = name.partition("/")
    tol = 1e-9 if dtype == jnp.float64 else 1e-5
    finders = {
        "default": None,
        "newton": optx.Newton(rtol=tol, atol=tol),
        "chord": optx.Chord(rtol=tol, atol=tol),
        "verychord": lib.VeryChord(rtol=tol, atol=tol),
    }
    finder = finders[finder or "default"]
    if finder is None:
        return getattr(lib, name)()
    return getattr(lib, name)(root_finder=finder)


def make_term(lib, vector_field, solver_name, problem_name="lin1", dtype=jnp.float64):
    if problem_name in CDE_PROBLEMS:
        return lib.ControlTerm(vector_field, _cde_path(lib, problem_name, dtype))
    if solver_name.partition("/")[0] not in IMEX_SOLVERS:
        return lib.ODETerm(vector_field)

    def half(t, y, args):
        return jax.tree.map(lambda dy: dy / 2, vector_field(t, y, args))

    return lib.MultiTerm(lib.ODETerm(half), lib.ODETerm(half))


class Span:
    """Times as fractions of the interval [start, end] (either direction)."""

    def __init__(self, start, end, dtype):
        self.start, self.end, self.dtype = start, end, dtype

    def at(self, *fracs):
        times = [self.start + f * (self.end - self.start) for f in fracs]
        return jnp.asarray(times, dtype=self.dtype)

    def scalar(self, frac):
        return jnp.asarray(self.start + frac * (self.end - self.start), self.dtype)


def make_controller(lib, name, span, full, problem_name="lin1"):
    if name == "const":
        # 0.15 does not divide the interval: Diffrax then spreads the steps evenly.
        return lib.ConstantStepSize(), 0.15 if problem_name in ("tree", "lv") else 0.1
    if name == "pid":
        return lib.PIDController(rtol=1e-3, atol=1e-6), 0.1
    if name == "pid_tight":
        return lib.PIDController(rtol=1e-5, atol=1e-7), None
    pid = lib.PIDController(rtol=1e-3, atol=1e-6)
    if name == "clip_step":  # includes the whole solve's t0 and t1
        step_ts = full.at(0.0, 0.275, 0.65, 1.0)
        return lib.ClipStepSizeController(pid, step_ts=step_ts), 0.1
    if name == "clip_jump":
        jump_ts = full.at(0.0, 0.15, 0.6, 1.0)
        return lib.ClipStepSizeController(pid, jump_ts=jump_ts), 0.1
    if name == "stepto":
        return lib.StepTo(ts=span.at(0.0, 0.05, 0.2, 0.45, 0.6, 0.8, 0.9, 1.0)), None
    raise ValueError(name)


def _save_fn(t, y, args):
    total = sum(jnp.sum(leaf * leaf) for leaf in jax.tree.leaves(y))
    return jnp.stack([t, total])


def make_saveat(lib, name, span):
    ts = span.at(0.0, 0.175, 0.55, 0.8, 1.0)
    if name == "t1":
        return lib.SaveAt(t1=True)
    if name == "t0t1":
        return lib.SaveAt(t0=True, t1=True)
    if name == "ts":
        return lib.SaveAt(ts=ts)
    if name == "steps":
        return lib.SaveAt(steps=True)
    if name == "steps_n":
        return lib.SaveAt(steps=3)
    if name == "mixed":
        return lib.SaveAt(t0=True, ts=span.at(0.05, 0.3), steps=True, t1=True)
    if name == "dense":
        return lib.SaveAt(dense=True, t1=True)
    if name == "fn":
        return lib.SaveAt(ts=ts, fn=_save_fn)
    if name == "subs":
        subs = [
            lib.SubSaveAt(ts=span.at(0.1, 0.7), fn=_save_fn),
            lib.SubSaveAt(steps=True),
            lib.SubSaveAt(t0=True, t1=True),
        ]
        return lib.SaveAt(subs=subs)
    raise ValueError(name)


def make_event(lib, name, full, dtype):
    # Time-driven conditions (plus a little of the state, so root finding goes through
    # the interpolation) that cross once in either direction of integration.
    # In a backward solve Diffrax passes a condition its internal time `-t`, while
    # diffeqx passes the real time `t` (a documented, deliberate difference), so each
    # condition first recovers the real time for the library it is given. (Not with
    # `|t|`: at `t = 0`, an end of the backward solves here, `|t|`'s derivative has
    # the wrong sign for Diffrax's internal time, and a Newton root find started
    # there diverges.)
    backwards = float(full.end) < float(full.start)
    internal = backwards and lib.__name__ == "diffrax"

    def real_time(t):
        return -t if internal else t

    sign = -1.0 if backwards else 1.0
    tol = 1e-8 if dtype == jnp.float64 else 1e-5
    newton = optx.Newton(rtol=tol, atol=tol)
    t_event = full.scalar(0.62)
    if name == "none":
        return None
    if name == "bool":
        return lib.Event(lambda t, y, args, **kw: sign * (real_time(t) - t_event) > 0)
    if name == "real":

        def cond(t, y, args, **kw):
            return sign * (real_time(t) - t_event) + 0.05 * _first(y)

        return lib.Event(cond, root_finder=newton)
    if name == "tree":
        t_a, t_b = full.scalar(0.45), full.scalar(0.7)
        conds = (
            lambda t, y, args, **kw: t_a - real_time(t) + 0.01 * _first(y),
            lambda t, y, args, **kw: t_b - real_time(t) + 0.01 * _first(y),
        )
        return lib.Event(conds, root_finder=newton, direction=(True, False))
    if name == "at_t0":
        return lib.Event(lambda t, y, args, **kw: _first(y) > -100.0)
    raise ValueError(name)


def _result_name(lib, result):
    flags = [result == getattr(lib.RESULTS, name) for name in RESULT_NAMES]
    return jnp.stack(flags)


def observed(lib, sol) -> dict[str, Any]:
    """What a user observes of a solution: the interval, saved times and values,
    step counts and result code."""
    return dict(
        t0_t1=jnp.stack([sol.t0, sol.t1]),
        ts=sol.ts,
        ys=sol.ys,
        stats={
            k: sol.stats[k]
            for k in ("num_steps", "num_accepted_steps", "num_rejected_steps")
        },
        result=_result_name(lib, sol.result),
    )


@eqx.filter_jit
def _read(lib, case: Case, sol) -> dict[str, Any]:
    """What `solve` reads from a solution, compiled as one program (eagerly, each
    operation would compile a program of its own). The solve itself stays the
    library's own compiled call, as a user makes it."""
    out = observed(lib, sol)
    t0, t1 = (2.0, 0.0) if case.backwards else (0.0, 2.0)
    t_mid = 0.425 * (t1 - t0) + t0 if case.resume else t0
    span = Span(t_mid, t1, jnp.float32 if case.dtype == "float32" else jnp.float64)
    if case.event in ("tree",):
        out["event_mask"] = sol.event_mask
    if case.saveat == "dense":
        if case.event == "at_t0":
            points = span.at(0.0)
        elif case.event != "none":
            points = span.at(0.0, 0.1, 0.2, 0.3)
        else:
            points = span.at(0.0, 0.13, 0.5, 0.77, 1.0)
        out["dense"] = jax.vmap(sol.evaluate)(points)

        # From the right at the same times (a knot of the steps is where the two
        # sides differ), and the derivative of the dense output. A listed
        # difference (docs/migration.md): in a backward solve Diffrax's `left`
        # names the limit in its internal, negated time; diffeqx's in `t`. So
        # Diffrax is asked for the other side, the same limit in `t`.
        def side(left):
            return left if lib is diffeqx or not case.backwards else not left

        out["dense_right"] = jax.vmap(lambda t: sol.evaluate(t, left=side(False)))(
            points
        )
        if case.event != "at_t0":
            # (With no step taken, Diffrax's derivative is NaN and diffeqx's
            # zero: listed, and tested in test_solves.py.)
            out["dense_derivative"] = jax.vmap(
                lambda t: sol.derivative(t, left=side(True))
            )(points)
    return out


def solve(lib, case: Case) -> dict[str, Any]:
    """Run `case` through `lib` (the `diffrax` or `diffeqx` module); return NumPy
    arrays of what a user observes."""
    dtype = jnp.float32 if case.dtype == "float32" else jnp.float64
    vector_field, y0, args = problem(case.problem, dtype)
    t0, t1 = (2.0, 0.0) if case.backwards else (0.0, 2.0)
    full = Span(t0, t1, dtype)
    t_mid = 0.425 * (t1 - t0) + t0 if case.resume else t0
    span = Span(t_mid, t1, dtype)
    solver = make_solver(lib, case.solver, dtype)
    term = make_term(lib, vector_field, case.solver, case.problem, dtype)
    static: dict[str, Any] = {}

    def run(y0):
        out = {}
        kwargs = {}
        start = jnp.asarray(t0, dtype)
        if case.resume:
            first_span = Span(t0, t_mid, dtype)
            controller, dt0 = make_controller(
                lib, case.controller, first_span, full, case.problem
            )
            first = lib.diffeqsolve(
                term,
                solver,
                start,
                jnp.asarray(t_mid, dtype),
                None
                if dt0 is None
                else jnp.asarray(math.copysign(dt0, t1 - t0), dtype),
                y0,
                args,
                saveat=lib.SaveAt(
                    t1=True, solver_state=True, controller_state=True, made_jump=True
                ),
                stepsize_controller=controller,
                max_steps=MAX_STEPS,
                throw=False,
            )
            out["first_ys"] = first.ys
            out["first_ts"] = first.ts
            kwargs = dict(
                solver_state=first.solver_state,
                controller_state=first.controller_state,
                made_jump=first.made_jump,
            )
            if case.controller == "stepto":
                # StepTo's state is an index into the first solve's own grid, which
                # means nothing for the second solve's grid (Diffrax then steps from
                # the wrong grid point): not a call a user would write.
                del kwargs["controller_state"]
            start = jnp.asarray(t_mid, dtype)
            y0 = jax.tree.map(lambda leaf: leaf[-1], first.ys)
        controller, dt0 = make_controller(
            lib, case.controller, span, full, case.problem
        )
        if dt0 is not None:
            dt0 = jnp.asarray(math.copysign(dt0, t1 - t0), dtype)
        sol = lib.diffeqsolve(
            term,
            solver,
            start,
            jnp.asarray(t1, dtype),
            dt0,
            y0,
            args,
            saveat=make_saveat(lib, case.saveat, span),
            stepsize_controller=controller,
            event=make_event(lib, case.event, full, dtype),
            max_steps=MAX_STEPS,
            throw=False,
            **kwargs,
        )
        static["max_steps"] = sol.stats["max_steps"]
        out.update(_read(lib, case, sol))
        return out

    if case.vmap:
        scales = jnp.asarray([1.0, 0.8, 1.3], dtype)
        y0s = jax.tree.map(
            lambda leaf: scales.reshape((3,) + (1,) * leaf.ndim) * leaf[None], y0
        )
        out = jax.vmap(run)(y0s)
    else:
        out = run(y0)
    out = jax.tree.map(np.asarray, out)
    out["max_steps"] = static["max_steps"]
    return out


# ------------------------------------------------------------------------- comparison
def _compare_arrays(path, expected, actual, rtol, atol):
    if expected.shape != actual.shape:
        return [f"{path}: shape diffrax {expected.shape} vs diffeqx {actual.shape}"]
    if expected.dtype != actual.dtype:
        return [f"{path}: dtype diffrax {expected.dtype} vs diffeqx {actual.dtype}"]
    if expected.dtype == bool or np.issubdtype(expected.dtype, np.integer):
        bad = expected != actual
    else:
        finite = np.isfinite(expected) & np.isfinite(actual)
        same_special = ~finite & (
            (expected == actual) | (np.isnan(expected) & np.isnan(actual))
        )
        close = np.isclose(expected, actual, rtol=rtol, atol=atol)
        bad = ~np.where(finite, close, same_special)
    if not bad.any():
        return []
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    return [
        f"{path}: {int(bad.sum())}/{bad.size} differ; first at index {index}: "
        f"diffrax {expected[index]!r} vs diffeqx {actual[index]!r}"
        + (
            f"\n    diffrax {expected.ravel()[:12]}\n    diffeqx {actual.ravel()[:12]}"
            if expected.ndim
            else ""
        )
    ]


def diff_outputs(expected, actual, dtype: str, tolerance=None) -> list[str]:
    """Readable differences between two outputs of `solve` (empty list: they agree),
    to `tolerance` (`(rtol, atol)`; by default `TOLERANCE[dtype]`)."""
    rtol, atol = TOLERANCE[dtype] if tolerance is None else tolerance
    problems = []
    expected = dict(expected)
    actual = dict(actual)
    if expected.pop("max_steps", None) != actual.pop("max_steps", None):
        problems.append("stats['max_steps'] differs")
    for key in sorted(expected, key=lambda k: (k != "result", k != "stats", k)):
        if key not in actual:
            problems.append(f"{key}: missing from diffeqx's output")
            continue
        e_leaves, e_def = jax.tree_util.tree_flatten_with_path(expected[key])
        a_leaves, a_def = jax.tree_util.tree_flatten_with_path(actual[key])
        if e_def != a_def:
            problems.append(
                f"{key}: PyTree structure diffrax {e_def} vs diffeqx {a_def}"
            )
            continue
        if key == "result":
            e_name, a_name = _describe(e_leaves[0][1]), _describe(a_leaves[0][1])
            if e_name != a_name:
                problems.append(f"result: diffrax {e_name} vs diffeqx {a_name}")
            continue
        # A derivative of the dense output divides a difference of values by a
        # step size, which amplifies their rounding.
        scale = 10.0 if key == "dense_derivative" else 1.0
        for (path, e), (_, a) in zip(e_leaves, a_leaves, strict=True):
            name = key + jax.tree_util.keystr(path)
            e = np.asarray(e)
            if key == "ts":
                # Documented difference (docs/migration.md): when an event stops a
                # backward solve, Diffrax pads the first unreached save time with
                # `-inf` (its internal, negated time); diffeqx pads every unreached
                # slot with `inf`.
                e = np.where(np.isneginf(e), np.inf, e)
            problems += _compare_arrays(
                name, e, np.asarray(a), scale * rtol, scale * atol
            )
    return problems


def _describe(flags):
    flags = np.asarray(flags).reshape(-1, len(RESULT_NAMES))
    names = [
        RESULT_NAMES[int(np.argmax(row))] if row.any() else "other" for row in flags
    ]
    return names[0] if len(set(names)) == 1 else names


def sampled_params(cases, num_default: int) -> list:
    """`pytest.param`s of sampled `cases`, named by the case: the first
    `num_default` in the default run, the others marked slow."""
    import pytest

    return [
        pytest.param(
            case, id=str(case), marks=() if i < num_default else pytest.mark.slow
        )
        for i, case in enumerate(cases)
    ]


def tolerance_for(case: Case):
    """The `(rtol, atol)` that `compare` uses for `case`, or None for the default of
    its dtype (`TOLERANCE`)."""
    if case.vmap and case.dtype == "float64" and jax.default_backend() == "cpu":
        return VMAP_FLOAT64_TOLERANCE
    return None


def compare(case: Case, verbose: bool = False) -> list[str]:
    """Run `case` through both libraries; return (and with `verbose`, print) the
    differences. An exception in diffeqx is reported as a difference."""
    expected = solve(diffrax, case)
    try:
        actual = solve(diffeqx, case)
    except Exception as error:  # noqa: BLE001 - any refusal is a difference
        problems = [f"diffeqx raised {type(error).__name__}: {str(error)[:300]}"]
    else:
        problems = diff_outputs(expected, actual, case.dtype, tolerance_for(case))
    if verbose:
        print(case)
        print("\n".join(problems) if problems else "  same answer")
    return problems
