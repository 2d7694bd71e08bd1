"""Stiff test problems shared by the implicit- and Rosenbrock-solver tests, with
independent references from SciPy's Radau at tight tolerances."""

import functools

import jax.numpy as jnp
import numpy as np


def robertson(t, y, args):
    """Robertson's three-species reaction: dy/dt for y = (A, B, C)."""
    y1, y2, y3 = y[0], y[1], y[2]
    return jnp.stack(
        [
            -0.04 * y1 + 1e4 * y2 * y3,
            0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2,
            3e7 * y2**2,
        ]
    )


def _robertson_numpy(t, y):
    y1, y2, y3 = y
    return [
        -0.04 * y1 + 1e4 * y2 * y3,
        0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2,
        3e7 * y2**2,
    ]


def _robertson_jacobian_numpy(t, y):
    _, y2, y3 = y
    return [
        [-0.04, 1e4 * y3, 1e4 * y2],
        [0.04, -1e4 * y3 - 6e7 * y2, -1e4 * y2],
        [0.0, 6e7 * y2, 0.0],
    ]


@functools.cache
def robertson_reference(ts: tuple) -> np.ndarray:
    """Robertson's problem from y = (1, 0, 0) at the times `ts` (a tuple), by SciPy's
    Radau at rtol 1e-12 with the exact Jacobian: one row per time."""
    from scipy.integrate import solve_ivp

    sol = solve_ivp(
        _robertson_numpy,
        (0.0, ts[-1]),
        [1.0, 0.0, 0.0],
        method="Radau",
        rtol=1e-12,
        atol=1e-16,
        jac=_robertson_jacobian_numpy,
        t_eval=ts,
    )
    assert sol.success
    return sol.y.T


def hires(t, y, args):
    """HIRES (Schäfer 1975; Hairer & Wanner's test set): eight reacting species."""
    y1, y2, y3, y4, y5, y6, y7, y8 = (y[i] for i in range(8))
    return jnp.stack(
        [
            -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
            1.71 * y1 - 8.75 * y2,
            -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
            8.32 * y2 + 1.71 * y3 - 1.12 * y4,
            -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
            -280.0 * y6 * y8 + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
            280.0 * y6 * y8 - 1.81 * y7,
            -280.0 * y6 * y8 + 1.81 * y7,
        ]
    )


HIRES_Y0 = (1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0057)
HIRES_T1 = 321.8122


@functools.cache
def hires_reference() -> np.ndarray:
    """HIRES at `HIRES_T1` by SciPy's Radau at rtol 1e-12 with the exact Jacobian
    (computed with JAX, an independent program from the solvers under test)."""
    import jax
    from scipy.integrate import solve_ivp

    jacobian = jax.jit(jax.jacfwd(lambda y: hires(0.0, y, None)))
    field = jax.jit(lambda y: hires(0.0, y, None))
    sol = solve_ivp(
        lambda t, y: np.asarray(field(jnp.asarray(y))),
        (0.0, HIRES_T1),
        np.asarray(HIRES_Y0),
        method="Radau",
        rtol=1e-12,
        atol=1e-16,
        jac=lambda t, y: np.asarray(jacobian(jnp.asarray(y))),
    )
    assert sol.success
    return sol.y[:, -1]
