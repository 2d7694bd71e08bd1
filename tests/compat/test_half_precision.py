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


def _rounded_path(lib, levy_area, rounding, out):
    """A smooth stand-in for Brownian motion on [0, 1], a path of `lib`, whose
    increments and Lévy areas are computed in float64 and rounded to `rounding`:
    a half-precision solve and a float64 one see the same values."""

    def w(t):
        return jnp.stack([0.8 * jnp.sin(3.0 * t), jnp.cos(5.0 * t) - 1.0])

    def rounded(x):
        return x.astype(rounding).astype(out)

    class RoundedPath(lib.AbstractBrownianPath):
        @property
        def t0(self):
            return 0.0

        @property
        def t1(self):
            return 1.0

        @property
        def shape(self):
            return (2,)

        @property
        def levy_area(self):
            return levy_area

        def evaluate(self, t0, t1=None, left=True, use_levy=False):
            s = jnp.asarray(t0, jnp.float64)
            if t1 is None:
                return rounded(w(s))
            t = jnp.asarray(t1, jnp.float64)
            if not use_levy:
                return rounded(w(t) - w(s))
            h = t - s
            return levy_area(
                dt=rounded(h),
                W=rounded(w(t) - w(s)),
                H=rounded(0.1 * h * jnp.stack([jnp.sin(7 * s), jnp.cos(s)])),
            )

    return RoundedPath()


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
        path = _rounded_path(lib, lib.SpaceTimeLevyArea, dtype, state_dtype)
        terms = lib.MultiTerm(
            lib.ODETerm(lambda t, y, args: matrix @ y + jnp.sin(t).astype(state_dtype)),
            lib.ControlTerm(
                lambda t, y, args: jnp.diag(jnp.asarray(0.3, state_dtype) * jnp.cos(y)),
                path,
            ),
        )
        if steps is None:
            t0, t1, dt0 = (jnp.asarray(x, state_dtype) for x in (0.0, 1.0, 0.0625))
            controller = lib.ConstantStepSize()
        else:
            t0, t1, dt0 = steps[0], steps[-1], None
            controller = lib.StepTo(ts=jnp.asarray(steps, state_dtype))

        def one(y0):
            sol = lib.diffeqsolve(
                terms,
                getattr(lib, solver)(),
                t0,
                t1,
                dt0,
                y0,
                saveat=lib.SaveAt(steps=True),
                stepsize_controller=controller,
            )
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
