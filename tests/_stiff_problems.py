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
