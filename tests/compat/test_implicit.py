"""Implicit solvers through both libraries: the same call gives the same answer.

`ImplicitEuler` iterates exactly as Diffrax does (the same chord iteration from the
same starting guess), so it takes the same steps. The Kværnø methods solve their
stage equations with diffeqx's `VeryChord`, whose stopping test differs from
Diffrax's (a correction at rounding level counts as converged), so accept/reject
decisions, and so the steps, may differ: both solutions are compared with an
independent reference to the accuracy the tolerance gives, and diffeqx must not take
more steps (docs/migration.md).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import diffeqx
from _stiff_problems import robertson, robertson_reference

from ._counting import Counted

diffrax = pytest.importorskip("diffrax")


def _solve(lib, name, **solver_kwargs):
    return lib.diffeqsolve(
        lib.ODETerm(robertson),
        getattr(lib, name)(**solver_kwargs),
        0.0,
        1e3,
        1e-4,
        jnp.array([1.0, 0.0, 0.0]),
        saveat=lib.SaveAt(ts=jnp.array(_SAVE_TS)),
        stepsize_controller=lib.PIDController(rtol=1e-6, atol=1e-10),
        max_steps=20_000,
    )


def test_implicit_euler_takes_diffraxs_steps():
    ours, theirs = _solve(diffeqx, "ImplicitEuler"), _solve(diffrax, "ImplicitEuler")
    for key in ("num_steps", "num_accepted_steps", "num_rejected_steps"):
        assert int(ours.stats[key]) == int(theirs.stats[key]), key
    np.testing.assert_allclose(
        np.asarray(ours.ys), np.asarray(theirs.ys), rtol=1e-9, atol=1e-15
    )


_SAVE_TS = (1e-2, 1.0, 1e2, 1e3)


@pytest.mark.parametrize(
    "name",
    [
        "Kvaerno3",
        pytest.param("Kvaerno4", marks=pytest.mark.slow),
        pytest.param("Kvaerno5", marks=pytest.mark.slow),
    ],
)
def test_kvaerno_as_accurate_in_no_more_steps(name):
    ours, theirs = _solve(diffeqx, name), _solve(diffrax, name)
    assert diffeqx.is_successful(ours.result) and bool(
        theirs.result == diffrax.RESULTS.successful
    )
    # Both solutions within the accuracy the tolerances give here (a global error of
    # up to a hundred times the local tolerance rtol |y| + atol: for y_1, of order
    # 1e-5, atol dominates), of the reference and so of each other. (Kvaerno5: 41
    # steps here, 1e-9 from the reference in y_1; Diffrax's, 494 steps, 250 of them
    # rejected where its stopping test calls a rounding-level correction a failure.)
    reference = robertson_reference(_SAVE_TS)
    for ys in (ours.ys, theirs.ys):
        np.testing.assert_allclose(np.asarray(ys), reference, rtol=1e-4, atol=1e-8)
    assert int(ours.stats["num_steps"]) <= int(theirs.stats["num_steps"])


def _prothero_robinson(t, y, args):
    return -1e4 * (y - jnp.cos(t)) - jnp.sin(t)


@pytest.mark.parametrize(
    "name", ["Kvaerno3", pytest.param("Kvaerno5", marks=pytest.mark.slow)]
)
def test_explicit_root_finder_tolerances_with_constant_steps(name):
    def solve(lib):
        return lib.diffeqsolve(
            lib.ODETerm(_prothero_robinson),
            getattr(lib, name)(root_finder=lib.VeryChord(rtol=1e-10, atol=1e-10)),
            0.0,
            1.0,
            0.05,
            jnp.array([1.0]),
        )

    ours, theirs = solve(diffeqx), solve(diffrax)
    assert int(ours.stats["num_steps"]) == int(theirs.stats["num_steps"]) == 20
    np.testing.assert_allclose(
        np.asarray(ours.ys), np.asarray(theirs.ys), rtol=1e-9, atol=1e-14
    )


# IMEX: a forced oscillator split into its linear part (implicit) and its forcing
# (explicit).
def _linear(t, y, args):
    return jnp.stack([y[1], -y[0]])


def _forcing(t, y, args):
    return jnp.stack([jnp.zeros_like(y[0]), jnp.cos(2 * t)])


def _imex_solve(lib, name, **solver_kwargs):
    return lib.diffeqsolve(
        lib.MultiTerm(lib.ODETerm(_forcing), lib.ODETerm(_linear)),
        getattr(lib, name)(**solver_kwargs),
        0.0,
        10.0,
        1e-2,
        jnp.array([1.0, 0.0]),
        saveat=lib.SaveAt(ts=jnp.linspace(0.0, 10.0, 6)),
        stepsize_controller=lib.PIDController(rtol=1e-6, atol=1e-8),
        max_steps=2_000,
        throw=False,
    )


_STEP_STATS = ("num_steps", "num_accepted_steps", "num_rejected_steps")


@pytest.mark.parametrize(
    "name",
    # By default Sil3 (differing diagonal entries: a factorisation per stage), and
    # KenCarp4 in test_imex_default_root_finder.
    [
        pytest.param("KenCarp3", marks=pytest.mark.slow),
        pytest.param("KenCarp4", marks=pytest.mark.slow),
        pytest.param("KenCarp5", marks=pytest.mark.slow),
        "Sil3",
    ],
)
def test_imex_with_the_same_root_finder_takes_diffraxs_steps(name):
    # optimistix.Newton iterates identically in both libraries, so the IMEX engines
    # themselves are compared. (KenCarp5's implicit a_76 differs from Diffrax's in
    # the 11th digit, see imex_coefficients.py: the same steps, answers to ~1e-11.)
    ours = _imex_solve(diffeqx, name, root_finder=optx.Newton(rtol=1e-9, atol=1e-9))
    theirs = _imex_solve(diffrax, name, root_finder=optx.Newton(rtol=1e-9, atol=1e-9))
    for key in _STEP_STATS:
        assert int(ours.stats[key]) == int(theirs.stats[key]), key
    np.testing.assert_allclose(
        np.asarray(ours.ys), np.asarray(theirs.ys), rtol=1e-9, atol=1e-10
    )


@pytest.mark.parametrize(
    "name", ["KenCarp4", pytest.param("Sil3", marks=pytest.mark.slow)]
)
def test_imex_default_root_finder(name):
    # With the default `VeryChord`, diffeqx takes the steps Diffrax takes with
    # Newton's method (Sil3: Diffrax's steps with its own default too). Diffrax
    # 0.7.2's KenCarp methods with their default VeryChord fail on this problem
    # (docs/migration.md), so they are not the comparison.
    ours = _imex_solve(diffeqx, name)
    newton = _imex_solve(diffrax, name, root_finder=optx.Newton(rtol=1e-6, atol=1e-8))
    assert diffeqx.is_successful(ours.result)
    for key in _STEP_STATS:
        assert int(ours.stats[key]) == int(newton.stats[key]), key
    np.testing.assert_allclose(
        np.asarray(ours.ys), np.asarray(newton.ys), rtol=1e-6, atol=1e-8
    )
    if name == "Sil3":
        theirs = _imex_solve(diffrax, name)
        for key in _STEP_STATS:
            assert int(ours.stats[key]) == int(theirs.stats[key]), key


_ROTATION = -0.1 - 1j  # y' = (-0.1 - i) y: a decaying rotation, in complex numbers


def _complex_solve(lib, name):
    y0 = jnp.array([1.0 + 0j, 0.5j], jnp.complex128)
    if name in ("KenCarp3", "KenCarp4", "KenCarp5", "Sil3"):
        terms = lib.MultiTerm(
            lib.ODETerm(lambda t, y, args: -0.1 * y),  # explicit part
            lib.ODETerm(lambda t, y, args: -1j * y),  # implicit part
        )
    else:
        terms = lib.ODETerm(lambda t, y, args: _ROTATION * y)
    with warnings.catch_warnings():
        # Diffrax warns that its complex support is a work in progress.
        warnings.simplefilter("ignore", UserWarning)
        return lib.diffeqsolve(
            terms,
            getattr(lib, name)(),
            0.0,
            2.0,
            0.1,
            y0,
            saveat=lib.SaveAt(ts=jnp.linspace(0.0, 2.0, 5)),
            stepsize_controller=lib.PIDController(rtol=1e-6, atol=1e-6),
        )


@pytest.mark.parametrize(
    "name",
    [
        "Kvaerno3",
        "KenCarp4",
        pytest.param("ImplicitEuler", marks=pytest.mark.slow),
        pytest.param("Kvaerno4", marks=pytest.mark.slow),
        pytest.param("Kvaerno5", marks=pytest.mark.slow),
        pytest.param("KenCarp3", marks=pytest.mark.slow),
        pytest.param("KenCarp5", marks=pytest.mark.slow),
        pytest.param("Sil3", marks=pytest.mark.slow),
    ],
)
def test_a_complex_state_takes_diffraxs_steps(name):
    # Under strict dtype promotion, diffeqx's `VeryChord` (the default root finder of
    # the Kvaerno, KenCarp and Sil3 methods) divided complex corrections by real
    # scales, and failed to trace: found by running Diffrax's own order tests.
    ours, theirs = _complex_solve(diffeqx, name), _complex_solve(diffrax, name)
    assert diffeqx.is_successful(ours.result)
    assert ours.ys.dtype == theirs.ys.dtype == jnp.complex128
    for key in ("num_steps", "num_accepted_steps", "num_rejected_steps"):
        assert int(ours.stats[key]) == int(theirs.stats[key]), key
    # `ImplicitEuler` iterates as Diffrax does; `VeryChord` stops on a different test
    # (docs/migration.md), so its stages agree to the root find's tolerance.
    atol = 1e-12 if name == "ImplicitEuler" else 1e-8
    np.testing.assert_allclose(np.asarray(ours.ys), np.asarray(theirs.ys), atol=atol)
    ts = np.asarray(ours.ts)
    exact = np.exp(_ROTATION * ts)[:, None] * np.array([1.0 + 0j, 0.5j])
    # The global error a local tolerance of 1e-6 gives (KenCarp5 takes 4 steps).
    tolerance = 5e-3 if name == "ImplicitEuler" else 1e-3
    np.testing.assert_allclose(np.asarray(ours.ys), exact, atol=tolerance)


def _counted_solve(lib, name):
    """Steps and (explicit, implicit) evaluations of an IMEX method, or (None,
    evaluations) of a Kvaerno method, with the same root finder in both libraries."""
    implicit = Counted(_linear)
    explicit = Counted(_forcing) if name.startswith(("KenCarp", "Sil")) else None
    if explicit is None:
        terms = lib.ODETerm(
            lambda t, y, args: implicit(t, y, args) + _forcing(t, y, args)
        )
    else:
        terms = lib.MultiTerm(lib.ODETerm(explicit), lib.ODETerm(implicit))
    solver = getattr(lib, name)(root_finder=optx.Newton(rtol=1e-9, atol=1e-9))
    sol = lib.diffeqsolve(
        terms,
        solver,
        0.0,
        3.0,
        1e-2,
        jnp.array([1.0, 0.0]),
        stepsize_controller=lib.PIDController(rtol=1e-6, atol=1e-8),
    )
    jax.effects_barrier()
    counts = (None if explicit is None else explicit.count, implicit.count)
    return sol, counts


@pytest.mark.parametrize(
    "name",
    ["Kvaerno3", "Sil3", pytest.param("Kvaerno5", marks=pytest.mark.slow)],
)
def test_first_same_as_last_methods_evaluate_no_more_than_diffrax(name):
    # Kvaerno3/4/5 and Sil3 are first same as last: their last stage is evaluated at
    # the solution, and Diffrax starts the next step from it. diffeqx evaluated that
    # stage afresh, one evaluation (of each term) more per step.
    ours, our_counts = _counted_solve(diffeqx, name)
    theirs, their_counts = _counted_solve(diffrax, name)
    for key in _STEP_STATS:
        assert int(ours.stats[key]) == int(theirs.stats[key]), key
    for mine, other in zip(our_counts, their_counts, strict=True):
        if mine is not None:
            assert mine <= other, (name, our_counts, their_counts)
    np.testing.assert_allclose(
        np.asarray(ours.ys), np.asarray(theirs.ys), rtol=1e-9, atol=1e-10
    )


@pytest.mark.parametrize("name", ["Kvaerno5", "KenCarp4", "ImplicitEuler"])
def test_implicit_solver_without_tolerances_under_constant_steps_is_refused(name):
    """An implicit solver whose root finder takes its tolerances from the controller,
    under `ConstantStepSize` (which has none): a `ValueError` in both libraries,
    opening with the same words (diffeqx's then names the solver and the fix)."""
    for lib in (diffrax, diffeqx):
        if name == "KenCarp4":
            terms = lib.MultiTerm(
                lib.ODETerm(lambda t, y, args: -y), lib.ODETerm(lambda t, y, args: y)
            )
        else:
            terms = lib.ODETerm(lambda t, y, args: -y)
        with pytest.raises(
            ValueError,
            match="(?i)the tolerances for the implicit solver have not been specified",
        ):
            lib.diffeqsolve(terms, getattr(lib, name)(), 0.0, 1.0, 0.1, jnp.array(1.0))
