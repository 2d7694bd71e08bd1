"""The loop's starting counters and times (computed from `y0` at run time rather than
held as constants, for speed on CPU) change nothing a user sees: an array, a PyTree
or an integer `y0` gives Diffrax's result, statistics and outputs, and the
statistics have Diffrax's dtypes; a `y0` holding NaN (where the two libraries differ
on purpose, see the migration page) still starts every count at zero.
"""

import pytest

diffrax = pytest.importorskip("diffrax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import diffeqx  # noqa: E402


def _field(t, y, args):
    return jax.tree_util.tree_map(lambda x: -0.5 * x + jnp.sin(t), y)


def _solve(lib, y0, controller):
    ts = jnp.linspace(0.0, 2.0, 7)
    if controller == "pid":
        stepsize_controller = lib.PIDController(rtol=1e-6, atol=1e-8)
    else:
        stepsize_controller = lib.ConstantStepSize()
    sol = lib.diffeqsolve(
        lib.ODETerm(_field),
        lib.Tsit5(),
        0.0,
        2.0,
        0.1,
        y0,
        saveat=lib.SaveAt(ts=ts, t0=True, t1=True),
        stepsize_controller=stepsize_controller,
        max_steps=64,
        throw=False,
    )
    flags = [
        bool(sol.result == getattr(lib.RESULTS, name))
        for name in ("successful", "max_steps_reached", "dt_min_reached")
    ]
    return sol, flags


Y0S = {
    "finite": jnp.array([0.3, 1.0]),
    "tree": {"a": jnp.array([1.0, 2.0]), "b": jnp.array(0.5)},
    "int_tree": {"a": jnp.array([1, 2]), "b": jnp.array([0.5])},
}


# By default an array with constant steps, and a PyTree with integer and float leaves
# with adaptive ones.
_DEFAULT_START_CASES = (("finite", "const"), ("int_tree", "pid"))


@pytest.mark.parametrize(
    "name, controller",
    [
        pytest.param(
            name,
            controller,
            id=f"{name}-{controller}",
            marks=()
            if (name, controller) in _DEFAULT_START_CASES
            else (pytest.mark.slow,),
        )
        for controller in ("pid", "const")
        for name in Y0S
    ],
)
def test_start_values_give_diffraxs_answer(name, controller):
    y0 = Y0S[name]
    expected, expected_result = _solve(diffrax, y0, controller)
    actual, actual_result = _solve(diffeqx, y0, controller)
    assert actual_result == expected_result, (actual.result, expected.result)
    for key in ("num_steps", "num_accepted_steps", "num_rejected_steps"):
        e, a = jnp.asarray(expected.stats[key]), jnp.asarray(actual.stats[key])
        assert int(a) == int(e), key
        assert a.dtype == e.dtype, key
    np.testing.assert_allclose(
        np.asarray(actual.ts), np.asarray(expected.ts), rtol=1e-12, atol=1e-14
    )
    for e, a in zip(
        jax.tree_util.tree_leaves(expected.ys),
        jax.tree_util.tree_leaves(actual.ys),
        strict=True,
    ):
        assert a.dtype == e.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-10)


@pytest.mark.parametrize(
    "controller, result, steps",
    [("pid", "max_steps_reached", 64), ("const", "non_finite_state", 1)],
)
def test_nan_in_y0_starts_the_counts_at_zero(controller, result, steps):
    # The run-time zero is computed from `y0`, so a NaN there is where it could go
    # wrong: every step taken is rejected, and the counts show exactly those.
    sol, _ = _solve(diffeqx, jnp.array([jnp.nan, 1.0]), controller)
    assert sol.result == getattr(diffeqx.RESULTS, result)
    assert int(sol.stats["num_steps"]) == steps
    assert int(sol.stats["num_accepted_steps"]) == 0
    assert int(sol.stats["num_rejected_steps"]) == steps
    assert float(sol.ts[0]) == 0.0  # the t0 save, at the first slot


_SAVEATS = (
    dict(),
    dict(t0=True),
    dict(t1=True),
    dict(steps=True),
    dict(t0=True, t1=True, steps=True),
)


def _edge_solve(lib, t0, t1, ts, y0, saveat, event=None):
    sol = lib.diffeqsolve(
        lib.ODETerm(lambda t, y, args: -y),
        lib.Tsit5(),
        t0,
        t1,
        0.1,
        y0,
        saveat=lib.SaveAt(ts=jnp.array(ts), **saveat),
        stepsize_controller=lib.PIDController(rtol=1e-6, atol=1e-6),
        max_steps=8,
        throw=False,
        event=None if event is None else lib.Event(lambda t, y, args, **kw: True),
    )
    return np.asarray(sol.ts), np.asarray(sol.ys), sol.event_mask


def _assert_same_saves(case):
    (ts, ys, mask), (ts_ref, ys_ref, mask_ref) = (
        _edge_solve(lib, *case) for lib in (diffeqx, diffrax)
    )
    np.testing.assert_array_equal(ts, ts_ref)
    np.testing.assert_array_equal(ys, ys_ref)
    assert (mask is None) == (mask_ref is None)
    if mask is not None:
        assert bool(mask) == bool(mask_ref)


@pytest.mark.parametrize("saveat", _SAVEATS)
def test_times_at_t0_stay_unsaved_after_a_failed_first_step(saveat):
    """A solve that fails before accepting a step (here every step is rejected, `y0`
    holding NaN) leaves its requested times unfilled, even those equal to `t0`, as
    Diffrax does; only `SaveAt(t0=True)` and the final state are saved."""
    _assert_same_saves((0.0, 1.0, [0.0, 0.0, 0.5], jnp.array([jnp.nan, 1.0]), saveat))


@pytest.mark.parametrize(
    "saveat, y0",
    [
        pytest.param(
            saveat,
            y0,
            id=f"{i}-{name}",
            # The default run: a finite `y0` with each `SaveAt`, a NaN one with the
            # richest (about 4 s each, as both libraries compile eight programs).
            marks=(pytest.mark.slow,)
            if name == "nan" and i != len(_SAVEATS) - 1
            else (),
        )
        for name, y0 in (("finite", (1.0, 2.0)), ("nan", (float("nan"), 1.0)))
        for i, saveat in enumerate(_SAVEATS)
    ],
)
def test_a_zero_length_solve_saves_as_diffrax_with_an_event_at_t0(saveat, y0):
    """With `t0 == t1` every requested time is `t0` and gets `y0`, with or without a
    terminating event that holds there (which Diffrax reports in `event_mask` but
    which stops nothing)."""
    for event in (None, "at t0"):
        _assert_same_saves((0.0, 0.0, [0.0, 0.0], jnp.array(y0), saveat, event))


@pytest.mark.parametrize(
    "controller",
    ["const", "step_to", "pid", "clip_jump"],
)
def test_saved_made_jump_is_known_at_trace_time_as_in_diffrax(controller):
    # `SaveAt(made_jump=True)` with a controller that never jumps: Diffrax's
    # `Solution.made_jump` is `False` itself, so code may test it in Python under
    # `jax.jit`; with one that may jump, an array. (diffeqx gave an array in both
    # cases until 2026-12-06.)
    def kinds(lib):
        controllers = {
            "const": (lib.ConstantStepSize(), 0.1),
            "step_to": (lib.StepTo([0.0, 0.3, 1.0]), None),
            "pid": (lib.PIDController(rtol=1e-6, atol=1e-6), 0.1),
            "clip_jump": (
                lib.ClipStepSizeController(
                    lib.PIDController(rtol=1e-6, atol=1e-6), jump_ts=[0.5]
                ),
                0.1,
            ),
        }
        ctrl, dt0 = controllers[controller]
        seen = []

        @jax.jit
        def solve(y0):
            sol = lib.diffeqsolve(
                lib.ODETerm(lambda t, y, args: -y),
                lib.Tsit5(),
                0.0,
                1.0,
                dt0,
                y0,
                stepsize_controller=ctrl,
                saveat=lib.SaveAt(t1=True, made_jump=True),
            )
            seen.append(sol.made_jump)
            return sol.ys

        solve(jnp.asarray(1.0))
        (made_jump,) = seen
        return made_jump if isinstance(made_jump, bool) else "traced"

    assert kinds(diffeqx) == kinds(diffrax)
    if controller != "clip_jump":
        assert kinds(diffeqx) is False
