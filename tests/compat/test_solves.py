"""The same `diffeqsolve` call through Diffrax and diffeqx gives the same answer.

Cases are drawn deterministically from the cross product of problem x solver x step
size controller x SaveAt x time direction x dtype x vmap x event x resume, keeping only
the combinations Diffrax itself accepts. The cases listed in `DEFAULT_CASES` run by
default; the rest carry the `slow` marker (`pytest tests/compat -m slow`).

To look at one case: `compare(Case(...), verbose=True)` in `_harness.py`.
"""

import itertools
import random

import pytest

diffrax = pytest.importorskip("diffrax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import diffeqx  # noqa: E402

from ._harness import (  # noqa: E402
    EXPLICIT_SOLVERS,
    PROBLEMS,
    RESULT_NAMES,
    Case,
    Span,
    compare,
    problem,
    solve,
)

AXES = dict(
    problem=PROBLEMS,
    solver=EXPLICIT_SOLVERS,
    controller=("const", "pid", "pid_tight", "clip_step", "clip_jump", "stepto"),
    saveat=("t1", "t0t1", "ts", "steps", "steps_n", "mixed", "dense", "fn", "subs"),
    backwards=(False, True),
    dtype=("float64", "float32"),
    vmap=(False, True),
    event=("none", "bool", "real", "tree", "at_t0"),
    resume=(False, True),
)
NUM_CASES = 360
# The cases run by default: together they make every choice of every axis, picked
# greedily for the most new choices per second of run time (and none that adds no
# choice the others lack).
DEFAULT_CASES = (7, 10, 12, 22, 38, 51, 55, 56, 86, 115, 130)


def diffrax_accepts(case: Case) -> bool:
    """Whether Diffrax 0.7.2 runs this combination (the others are not comparisons)."""
    adaptive = case.controller in ("pid", "pid_tight", "clip_step", "clip_jump")
    if case.solver == "Euler" and adaptive:
        return False  # Euler gives no error estimate: Diffrax refuses to adapt it.
    if case.dtype == "float32" and case.event in ("real", "tree"):
        # With x64 on, Diffrax's root finding over a float32 real-valued condition
        # fails inside `lax.cond` (float32 vs float64 branches).
        return False
    return True


def _cases() -> list[Case]:
    product = [Case(*values) for values in itertools.product(*AXES.values())]
    sampled = random.Random(0).sample(product, 3 * NUM_CASES)
    return [case for case in sampled if diffrax_accepts(case)][:NUM_CASES]


CASES = _cases()


# Cases in which diffeqx differs from Diffrax in a way docs/migration.md lists; each
# has its own test below, checking that the difference is exactly that one.
NON_FINITE_STEP_CASE = 334  # Diffrax accepts a fixed step to an infinite state
DIFFRAX_ROOT_FIND_FAILS_CASE = 203  # Diffrax's Newton stops at its iteration limit
DOCUMENTED = (NON_FINITE_STEP_CASE, DIFFRAX_ROOT_FIND_FAILS_CASE)


def _param(index: int, case: Case):
    marks = () if index in DEFAULT_CASES else (pytest.mark.slow,)
    return pytest.param(case, id=str(case), marks=marks)


@pytest.mark.parametrize(
    "case", [_param(i, c) for i, c in enumerate(CASES) if i not in DOCUMENTED]
)
def test_same_answer_as_diffrax(case):
    problems = compare(case)
    assert not problems, f"{case}\n" + "\n".join(problems)


def test_sample_covers_every_choice():
    default = [CASES[i] for i in DEFAULT_CASES]
    for axis, values in AXES.items():
        seen = {getattr(case, axis) for case in default}
        # Euler with an adaptive controller is not a valid combination, so every
        # value of every axis must still appear among the default cases.
        assert seen == set(values), (axis, set(values) - seen)


def _only_member_1_differs(theirs, ours):
    """The results of the three `vmap` members: only the second one differs, and
    everything the other two saved agrees."""
    differing = [
        i
        for i in range(3)
        if (np.asarray(theirs["result"][i]) != np.asarray(ours["result"][i])).any()
    ]
    assert differing == [1], differing
    for key in ("ts", "ys"):
        for e, a in zip(jax_leaves(theirs[key]), jax_leaves(ours[key]), strict=True):
            np.testing.assert_allclose(a[[0, 2]], e[[0, 2]], rtol=1e-11, atol=1e-12)


def jax_leaves(tree):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_a_fixed_step_to_an_infinite_state_is_reported_not_accepted():
    """docs/migration.md: a step whose state is NaN or infinite is rejected and a
    fixed-step solve stops with `RESULTS.non_finite_state`; Diffrax reports
    success. (Lotka–Volterra integrated backwards blows up for one member.)"""
    case = CASES[NON_FINITE_STEP_CASE]
    theirs, ours = solve(diffrax, case), solve(diffeqx, case)
    _only_member_1_differs(theirs, ours)
    successful = RESULT_NAMES.index("successful")
    assert theirs["result"][1][successful]
    # `non_finite_state` is not among the codes both libraries share.
    assert not np.asarray(ours["result"][1]).any()
    for leaf in jax_leaves(theirs["ys"]) + jax_leaves(ours["ys"]):
        assert not np.isfinite(leaf[1]).all()


@pytest.mark.slow
def test_event_located_where_diffraxs_newton_stops_at_its_iteration_limit():
    """docs/migration.md: in this resumed backward solve, Diffrax's Newton iteration
    reaches its limit for one member (`nonlinear_max_steps_reached`); diffeqx
    locates the event, where the condition is zero."""
    case = CASES[DIFFRAX_ROOT_FIND_FAILS_CASE]
    theirs, ours = solve(diffrax, case), solve(diffeqx, case)
    _only_member_1_differs(theirs, ours)
    assert not np.asarray(theirs["result"][1]).any()  # not a shared code
    assert ours["result"][1][RESULT_NAMES.index("event_occurred")]
    # The "real" event condition of the harness: -(|t| - t_event) + 0.05 y["v"][0].
    t_event = float(Span(2.0, 0.0, np.float64).scalar(0.62))
    t = float(np.asarray(ours["ts"])[1].ravel()[-1])
    v = float(np.asarray(ours["ys"]["v"])[1].reshape(-1, 2)[-1, 0])
    assert abs(-(abs(t) - t_event) + 0.05 * v) < 1e-9


@pytest.mark.slow
def test_event_located_in_a_single_fresh_backward_solve_where_diffraxs_newton_fails():
    """docs/migration.md: the same difference in a single backward solve from a fresh
    start (found by a wider sweep of the cases above): Diffrax's Newton iteration
    ends in a failure code the libraries do not share, diffeqx locates the event,
    where the condition is zero."""
    case = Case("lin1", "Tsit5", "pid", "dense", True, "float64", False, "real")
    theirs, ours = solve(diffrax, case), solve(diffeqx, case)
    assert not np.asarray(theirs["result"]).any()  # not a shared code
    assert ours["result"][RESULT_NAMES.index("event_occurred")]
    # The "real" event condition of the harness: -(|t| - t_event) + 0.05 y[0].
    t_event = float(Span(2.0, 0.0, np.float64).scalar(0.62))
    t = float(np.asarray(ours["ts"]).ravel()[-1])
    y = float(np.asarray(ours["ys"]).ravel()[-1])
    assert abs(t) < t_event + 0.05  # the crossing, not the start
    assert abs(-(abs(t) - t_event) + 0.05 * y) < 1e-9


@pytest.mark.slow
def test_a_float32_decision_near_the_threshold_goes_either_way_in_both_libraries():
    """docs/migration.md ("Values to the last digits"): in float32 at tight
    tolerances the error estimate is mostly rounding. In the resumed `lin1` solve
    of a wider sweep, Diffrax rejects a step that diffeqx accepts at `rtol=1e-5`,
    and moving `rtol` by 1% flips the decision in either library."""
    vector_field, y0, args = problem("lin1", jnp.float32)

    def rejections(lib, rtol):
        term, solver = lib.ODETerm(vector_field), lib.Tsit5()
        controller = lib.PIDController(rtol=rtol, atol=1e-7)
        t0, t_mid, t1 = (jnp.asarray(t, jnp.float32) for t in (0.0, 0.85, 2.0))
        first = lib.diffeqsolve(
            term, solver, t0, t_mid, None, y0, args, stepsize_controller=controller,
            saveat=lib.SaveAt(t1=True, solver_state=True, controller_state=True,
                              made_jump=True),
        )  # fmt: skip
        second = lib.diffeqsolve(
            term, solver, t_mid, t1, None, jax.tree.map(lambda x: x[-1], first.ys),
            args, stepsize_controller=controller, solver_state=first.solver_state,
            controller_state=first.controller_state, made_jump=first.made_jump,
        )  # fmt: skip
        return int(second.stats["num_rejected_steps"])

    rtols = (0.99e-5, 1e-5, 1.01e-5)
    theirs = [rejections(diffrax, rtol) for rtol in rtols]
    ours = [rejections(diffeqx, rtol) for rtol in rtols]
    assert theirs[1] == 1 and ours[1] == 0
    assert set(theirs) == set(ours) == {0, 1}


def _dense_heun(lib, t0, t1, dt0, event=None):
    def field(t, y, args):
        return jnp.stack([y[1], -y[0]])

    return lib.diffeqsolve(
        lib.ODETerm(field),
        lib.Heun(),
        t0,
        t1,
        dt0,
        jnp.array([1.0, 0.0]),
        saveat=lib.SaveAt(dense=True),
        event=event,
    )


def test_left_limit_of_a_backward_solve_is_in_real_time():
    """docs/migration.md: at a step boundary of a backward solve, diffeqx's `left`
    is the limit from smaller `t` (the later step of the solve), Diffrax's the limit
    in its internal, negated time, so from larger `t`. Heun's dense output has a
    kink at each step boundary."""
    knot = jnp.asarray(0.5)  # a step boundary of both solves below
    ours = _dense_heun(diffeqx, 1.0, 0.0, -0.1)
    theirs = _dense_heun(diffrax, 1.0, 0.0, -0.1)
    below = ours.derivative(knot - 1e-7)
    above = ours.derivative(knot + 1e-7)
    left, right = ours.derivative(knot, left=True), ours.derivative(knot, left=False)
    assert not np.allclose(left, right, rtol=1e-3)  # a kink: the sides differ
    np.testing.assert_allclose(left, below, rtol=1e-5)
    np.testing.assert_allclose(right, above, rtol=1e-5)
    np.testing.assert_allclose(theirs.derivative(knot, left=True), right, rtol=1e-12)
    np.testing.assert_allclose(theirs.derivative(knot, left=False), left, rtol=1e-12)
    # Forwards in time the two libraries mean the same side.
    ours, theirs = (
        _dense_heun(diffeqx, 0.0, 1.0, 0.1),
        _dense_heun(diffrax, 0.0, 1.0, 0.1),
    )
    for side in (True, False):
        np.testing.assert_allclose(
            ours.derivative(knot, left=side),
            theirs.derivative(knot, left=side),
            rtol=1e-12,
        )


def test_derivative_of_a_solve_that_took_no_steps():
    """docs/migration.md: a solve that an event stops at `t0` has a dense output of
    one point, `y0`; its derivative is zero in diffeqx and NaN in Diffrax."""

    def solve(lib):
        event = lib.Event(lambda t, y, args, **kwargs: y[0] > 0.0)
        return _dense_heun(lib, 0.0, 1.0, 0.1, event=event)

    ours, theirs = solve(diffeqx), solve(diffrax)
    t0 = jnp.asarray(0.0)
    np.testing.assert_array_equal(ours.evaluate(t0), theirs.evaluate(t0))
    np.testing.assert_array_equal(ours.derivative(t0), np.zeros(2))
    assert np.isnan(np.asarray(theirs.derivative(t0))).all()


@pytest.mark.parametrize("controller", ["PIDController", "ClipStepSizeController"])
def test_no_error_estimate_under_an_adaptive_controller_is_a_runtime_error(controller):
    """docs/migration.md: `Euler` (no error estimate) under an adaptive controller.
    Diffrax raises a `RuntimeError`; diffeqx raises at trace time an error that is a
    `RuntimeError` too (and a `ValueError`), so `except RuntimeError` keeps
    catching it."""

    def call(lib):
        pid = lib.PIDController(rtol=1e-3, atol=1e-3)
        if controller == "ClipStepSizeController":
            pid = lib.ClipStepSizeController(pid, step_ts=jnp.array([0.5]))
        return lib.diffeqsolve(
            lib.ODETerm(lambda t, y, args: -y),
            lib.Euler(),
            0.0,
            1.0,
            0.1,
            jnp.array(1.0),
            stepsize_controller=pid,
        )

    for lib in (diffrax, diffeqx):
        with pytest.raises(RuntimeError):
            call(lib)
    with pytest.raises(ValueError, match="Euler returns no error estimate"):
        call(diffeqx)
