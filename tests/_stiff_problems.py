"""Stiff test problems shared by the implicit- and Rosenbrock-solver tests, with
independent references from SciPy's Radau at tight tolerances."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx as dfx


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


def decay_solve(solver, adjoint=None):
    """`(rate, y0) -> sum(y(1)^2)` for `y' = -rate y + sin(t)`, solved by `solver` at
    tight tolerances: a stiffish problem (at rate 5) whose end state still depends on
    `y0`, for gradients against finite differences."""
    adjoint = dfx.RecursiveCheckpointAdjoint() if adjoint is None else adjoint

    def solve(rate, y0):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, a: -a * y + jnp.sin(t)),
            solver,
            0.0,
            1.0,
            0.05,
            y0,
            args=rate,
            stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-10),
            adjoint=adjoint,
        )
        return jnp.sum(sol.ys[-1] ** 2)

    return solve


def assert_decay_gradients_match_fd(solve):
    """`jax.grad` of a `decay_solve` loss against central differences, in the rate
    and in each component of `y0`."""
    solve = jax.jit(solve)
    rate, y0 = jnp.asarray(5.0), jnp.array([1.0, -2.0])
    grads = jax.jit(jax.grad(solve, argnums=(0, 1)))(rate, y0)
    eps = 1e-5
    fd_rate = (solve(rate + eps, y0) - solve(rate - eps, y0)) / (2 * eps)
    fd_y0 = [
        (solve(rate, y0.at[i].add(eps)) - solve(rate, y0.at[i].add(-eps))) / (2 * eps)
        for i in range(2)
    ]
    np.testing.assert_allclose(float(grads[0]), float(fd_rate), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(np.asarray(grads[1]), np.asarray(fd_y0), rtol=1e-4)


ROBERTSON_TS = (1e-2, 1.0, 1e2, 1e4, 1e5)


def assert_robertson_matches_radau(terms, solver):
    """Robertson's problem to `t = 1e5` at rtol 1e-8 against `robertson_reference`,
    with mass conserved to rounding. `terms` holds `robertson` as its implicit part."""
    sol = dfx.diffeqsolve(
        terms,
        solver,
        0.0,
        1e5,
        1e-6,
        jnp.array([1.0, 0.0, 0.0]),
        saveat=dfx.SaveAt(ts=jnp.array(ROBERTSON_TS)),
        stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-12),
        max_steps=20_000,
    )
    ys = np.asarray(sol.ys)
    # Each species to a relative 3e-5 of its own size. y2 is ~1e-5..1e-7 of the
    # others, so atol=1e-12 allows it a relative error of ~1e-7..1e-5 per step.
    np.testing.assert_allclose(
        ys, robertson_reference(ROBERTSON_TS), rtol=3e-5, atol=1e-13
    )
    # Mass is conserved to rounding: every Newton correction keeps sum(y) (the rows
    # of the field's Jacobian sum to zero).
    np.testing.assert_allclose(ys.sum(axis=1), 1.0, rtol=0, atol=1e-10)


# The adjoints gradients are checked with: the default in the default run, the others
# in the slow set.
ADJOINTS = pytest.mark.parametrize(
    "adjoint",
    [
        dfx.RecursiveCheckpointAdjoint(),
        pytest.param(dfx.DirectAdjoint(), marks=pytest.mark.slow),
        pytest.param(dfx.BacksolveAdjoint(), marks=pytest.mark.slow),
    ],
    ids=["checkpoint", "direct", "backsolve"],
)
