"""No more work than Diffrax: the same solve through both libraries takes the same
steps, and diffeqx executes no more vector-field evaluations (counted by a host
callback in each field, a `jax.vmap`-batched call counting once), for every solver
family. (`Kvaerno3/4/5` and `Sil3`: tests/compat/test_implicit.py; the Milstein
methods: tests/compat/test_sde.py.)"""

import diffrax
import jax
import jax.numpy as jnp
import pytest

import diffeqx

from ._counting import Counted
from ._sde_paths import polynomial_path


def _linear(t, y, args):
    return jnp.stack([-y[0] + y[1] + jnp.sin(t), -2.0 * y[1]])


def _run(lib, terms, solver, rtol, counters):
    """Solves on [0, 2] from (1, 1) with `PIDController(rtol=atol=rtol)` (constant
    steps of 0.05 if `rtol` is None): `(ys, (steps, rejected), evaluation counts)`."""
    controller = (
        lib.ConstantStepSize()
        if rtol is None
        else lib.PIDController(rtol=rtol, atol=rtol)
    )

    def solve(y0):
        sol = lib.diffeqsolve(
            terms, solver, 0.0, 2.0, 0.05, y0, stepsize_controller=controller
        )
        return sol.ys, sol.stats["num_steps"], sol.stats["num_rejected_steps"]

    with jax.numpy_dtype_promotion("standard" if lib is diffrax else "strict"):
        ys, steps, rejected = jax.jit(solve)(jnp.array([1.0, 1.0]))
    jax.effects_barrier()
    return ys, (int(steps), int(rejected)), tuple(c.count for c in counters)


def _count_ode(lib, name):
    field = Counted(_linear)
    if name.startswith("HalfSolver"):
        solver = lib.HalfSolver(getattr(lib, name[len("HalfSolver(") : -1])())
    else:
        solver = getattr(lib, name)()
    rtol = None if name == "Euler" else 1e-5
    return _run(lib, lib.ODETerm(field), solver, rtol, [field])


def _count_sde(lib, name, noise, adaptive):
    drift = Counted(lambda t, y, args: -y + jnp.sin(t))
    if noise == "additive":
        diffusion = Counted(lambda t, y, args: 0.5 * jnp.eye(2))
    else:
        diffusion = Counted(lambda t, y, args: jnp.diag(0.3 * jnp.cos(y)))
    path = polynomial_path(lib, shape=(2,), levy_area=lib.SpaceTimeLevyArea)
    terms = lib.MultiTerm(lib.ODETerm(drift), lib.ControlTerm(diffusion, path))
    rtol = 1e-3 if adaptive else None
    return _run(lib, terms, getattr(lib, name)(), rtol, [drift, diffusion])


def _check(ours, theirs, rtol):
    (our_ys, our_steps, our_counts), (their_ys, their_steps, their_counts) = (
        ours,
        theirs,
    )
    assert our_steps == their_steps
    for mine, other in zip(our_counts, their_counts, strict=True):
        assert mine <= other, (our_counts, their_counts)
    assert jnp.allclose(our_ys, their_ys, rtol=rtol, atol=rtol)


_ODE = ["Tsit5", "Dopri8", "ReversibleHeun"]
_ODE_SLOW = [
    "Euler",
    "Heun",
    "Midpoint",
    "Ralston",
    "Bosh3",
    "Dopri5",
    "ImplicitEuler",
    "HalfSolver(Tsit5)",
]


@pytest.mark.parametrize(
    "name", _ODE + [pytest.param(n, marks=pytest.mark.slow) for n in _ODE_SLOW]
)
def test_ode_solvers(name):
    _check(_count_ode(diffeqx, name), _count_ode(diffrax, name), 1e-10)


# (solver, noise, adaptive). diffeqx evaluates the diffusion of GeneralShARK, SlowRK
# and SPaRK less often than Diffrax (measured with 40 constant steps on diagonal
# noise: 120 against 240, 200 against 400, 120 against 240).
_SDE = [("SPaRK", "diagonal", True), ("GeneralShARK", "diagonal", False)]
_SDE_SLOW = [
    ("ShARK", "additive", True),
    ("SRA1", "additive", True),
    ("SEA", "additive", False),
    ("SlowRK", "diagonal", False),
    ("SPaRK", "additive", False),
    ("Heun", "diagonal", True),
    ("EulerHeun", "diagonal", False),
    ("ReversibleHeun", "diagonal", True),
]


@pytest.mark.parametrize(
    "name, noise, adaptive",
    _SDE + [pytest.param(*case, marks=pytest.mark.slow) for case in _SDE_SLOW],
)
def test_sde_solvers(name, noise, adaptive):
    _check(
        _count_sde(diffeqx, name, noise, adaptive),
        _count_sde(diffrax, name, noise, adaptive),
        1e-10,
    )
