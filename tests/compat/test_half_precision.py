"""float16 and bfloat16 states through both libraries. Both cast a method's
coefficients to the state's dtype; diffeqx then combines the stages, and the dense
output's weights, in float32 and rounds once, where Diffrax combines them in the
state's dtype. The same constant steps, and values closer to the exact solution
(listed on the migration page)."""

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
