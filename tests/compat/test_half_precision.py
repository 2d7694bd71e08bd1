"""float16 and bfloat16 states through both libraries. Both cast a method's
coefficients to the state's dtype; diffeqx then combines the stages, and the dense
output's weights (and an SDE step's stages and increments), in float32 and rounds
once, where Diffrax combines them in the state's dtype. The same steps, and values
closer to the exact (or float64) solution (listed on the migration page)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx
from _sde import langevin_half_precision_rms, rounded_path, same_steps_solve

diffrax = pytest.importorskip("diffrax")


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("solver", ["Tsit5", "Dopri8"])
def test_half_precision_constant_steps_are_diffrax_s_steps_with_smaller_errors(
    dtype, solver
):
    def solve(lib):
        t0, t1, dt0 = (jnp.asarray(t, dtype) for t in (0.0, 1.0, 0.1))
        sol = lib.diffeqsolve(
            lib.ODETerm(lambda t, y, args: -y),
            getattr(lib, solver)(),
            t0,
            t1,
            dt0,
            jnp.ones(2, dtype),
            saveat=lib.SaveAt(ts=jnp.linspace(t0, t1, 5, dtype=dtype)),
        )
        exact = np.exp(-np.asarray(sol.ts, np.float64))
        error = np.abs(np.asarray(sol.ys[:, 0], np.float64) - exact) / exact
        return sol, np.max(error)

    ours, our_error = solve(diffeqx)
    theirs, their_error = solve(diffrax)
    assert ours.ys.dtype == theirs.ys.dtype == dtype
    assert int(ours.stats["num_steps"]) == int(theirs.stats["num_steps"])
    np.testing.assert_array_equal(np.asarray(ours.ts), np.asarray(theirs.ts))
    # Measured, relative to the dtype's epsilon: diffeqx within 0.61, Diffrax
    # 1.5 to 39.
    eps = float(jnp.finfo(dtype).eps)
    assert our_error <= eps
    assert our_error <= their_error


@pytest.mark.parametrize(
    "solver, dtype",
    [
        ("SPaRK", jnp.bfloat16),
        ("StratonovichMilstein", jnp.float16),
        pytest.param("SPaRK", jnp.float16, marks=pytest.mark.slow),
        pytest.param("StratonovichMilstein", jnp.bfloat16, marks=pytest.mark.slow),
    ],
)
def test_half_precision_sde_solves_round_less_than_diffrax_s(solver, dtype):
    # Diffrax combines an SDE step's stages and increments in the state's dtype,
    # diffeqx in float32, rounding once. On the same path values and step times
    # (those both libraries take with constant steps of 1/16 in `dtype`), against
    # a float64 solve.
    y0s = np.random.default_rng(0).uniform(-1.5, 1.5, (64, 2))

    def solve(lib, state_dtype, steps=None):
        matrix = jnp.asarray([[-1.0, 0.3], [-0.2, -0.7]], state_dtype)
        path = rounded_path(lib, lib.SpaceTimeLevyArea, dtype, state_dtype)
        terms = lib.MultiTerm(
            lib.ODETerm(lambda t, y, args: matrix @ y + jnp.sin(t).astype(state_dtype)),
            lib.ControlTerm(
                lambda t, y, args: jnp.diag(jnp.asarray(0.3, state_dtype) * jnp.cos(y)),
                path,
            ),
        )

        def one(y0):
            sol = same_steps_solve(lib, terms, solver, y0, state_dtype, 0.0625, steps)
            return sol.ts, sol.ys, sol.stats["num_steps"]

        ts, ys, steps = jax.jit(jax.vmap(one))(jnp.asarray(y0s, state_dtype))
        assert ys.dtype == state_dtype
        n = int(steps[0])
        assert np.all(np.asarray(steps) == n)
        return np.asarray(ts[0, :n], np.float64), np.asarray(ys[:, n - 1], np.float64)

    times, ours = solve(diffeqx, dtype)
    their_times, theirs = solve(diffrax, dtype)
    np.testing.assert_array_equal(times, their_times)
    _, reference = solve(diffeqx, jnp.float64, np.concatenate([[0.0], times]))
    eps = float(jnp.finfo(dtype).eps)

    def rms_error(ys):
        error = np.abs(ys - reference) / np.maximum(np.abs(reference), 0.25)
        return float(np.sqrt(np.mean(error**2))) / eps

    our_error, their_error = rms_error(ours), rms_error(theirs)
    # Measured: diffeqx 0.77 to 1.15 epsilons, Diffrax 1.3 to 1.7.
    assert our_error <= 1.25, our_error
    assert our_error < their_error, (our_error, their_error)


@pytest.mark.parametrize(
    "solver, dtype",
    [
        ("ShOULD", jnp.bfloat16),
        pytest.param("ALIGN", jnp.float16, marks=pytest.mark.slow),
        pytest.param("QUICSORT", jnp.float16, marks=pytest.mark.slow),
    ],
)
def test_half_precision_langevin_solves_round_less_than_diffrax_s(solver, dtype):
    # Diffrax computes a Langevin step in the state's dtype, with coefficients
    # rounded to it; diffeqx in float32, rounding once. The same steps (constant
    # steps of 1/64 in `dtype`), against a float64 solve on the same path values.
    # Measured, in epsilons: diffeqx 0.91 to 2.15, Diffrax 2.1 to 161 (ShOULD in
    # bfloat16 the most).
    ours, our_steps = langevin_half_precision_rms(diffeqx, solver, dtype)
    theirs, their_steps = langevin_half_precision_rms(diffrax, solver, dtype)
    assert our_steps == their_steps
    assert ours <= 2.5
    assert ours < theirs
