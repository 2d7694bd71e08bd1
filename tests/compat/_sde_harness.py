"""One SDE `diffeqsolve` call, described by an `SDECase`, run the same way through
Diffrax and diffeqx on the deterministic driving path of `_sde_paths.py`, so that the
two solves can be compared output by output with `_harness.diff_outputs`.

The axes: solver, noise structure, the Lévy area the path returns, step-size
controller, `SaveAt`, time direction, dtype and `jax.vmap` over initial conditions.
"""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

from ._harness import MAX_STEPS, Span, make_saveat, observed
from ._sde_paths import polynomial_path

SDE_SOLVERS = (
    "Euler",
    "Heun",
    "EulerHeun",
    "ItoMilstein",
    "StratonovichMilstein",
    "ReversibleHeun",
    "SEA",
    "SRA1",
    "ShARK",
    "GeneralShARK",
    "SlowRK",
    "SPaRK",
    "HalfSolver(Heun)",
)
# Noise structures: a scalar state and Brownian motion; a 2-vector state with
# additive (state-independent, time-dependent) noise; with diagonal noise given as a
# `lineax.DiagonalLinearOperator`; with general (non-commuting) noise.
NOISES = ("scalar", "additive", "diagonal", "general")
LEVY_AREAS = ("BrownianIncrement", "SpaceTimeLevyArea", "SpaceTimeTimeLevyArea")
SDE_CONTROLLERS = ("const", "pid", "clip_rejected")
SDE_SAVEATS = ("t1", "ts", "steps", "dense", "subs")
SRK_SOLVERS = ("SEA", "SRA1", "ShARK", "GeneralShARK", "SlowRK", "SPaRK")


@dataclasses.dataclass(frozen=True)
class SDECase:
    solver: str = "Euler"
    noise: str = "general"
    levy_area: str = "SpaceTimeLevyArea"
    controller: str = "const"
    saveat: str = "steps"
    backwards: bool = False
    dtype: str = "float64"
    vmap: bool = False

    def __str__(self):
        return (
            f"{self.solver}-{self.noise}-{self.levy_area}-{self.controller}-"
            f"{self.saveat}-{'bwd' if self.backwards else 'fwd'}-{self.dtype}-"
            f"{'vmap' if self.vmap else 'single'}"
        )


_SIGMA = np.array([[0.6, 0.2], [-0.3, 0.5]])
_A = np.array([[0.3, -0.2], [0.1, 0.25]])
_B = np.array([[0.0, 0.4], [-0.35, 0.1]])


def _terms(lib, case: SDECase, dtype):
    levy_area = getattr(lib, case.levy_area)
    if case.noise == "scalar":
        path = polynomial_path(lib, (), levy_area, dtype=dtype)

        def drift(t, y, args):
            return -0.5 * y + jnp.sin(t).astype(y.dtype)

        def diffusion(t, y, args):
            return 0.8 * jnp.cos(y)

        y0 = jnp.asarray(0.7, dtype)
    else:
        path = polynomial_path(lib, (2,), levy_area, dtype=dtype, seed=1)

        def drift(t, y, args):
            return -jnp.sin(y) + jnp.cos(t).astype(y.dtype) * jnp.asarray(
                [0.3, -0.1], y.dtype
            )

        if case.noise == "additive":

            def diffusion(t, y, args):
                return jnp.asarray(_SIGMA, y.dtype) * (1.0 + 0.5 * jnp.sin(t)).astype(
                    y.dtype
                )

        elif case.noise == "diagonal":

            def diffusion(t, y, args):
                return lx.DiagonalLinearOperator(
                    jnp.asarray([0.5, 0.3], y.dtype) * jnp.cos(y)
                )

        else:

            def diffusion(t, y, args):
                a, b = jnp.asarray(_A, y.dtype), jnp.asarray(_B, y.dtype)
                return jnp.stack([a @ jnp.sin(y), b @ y], axis=-1)

        y0 = jnp.asarray([0.5, -0.2], dtype)
    terms = lib.MultiTerm(lib.ODETerm(drift), lib.ControlTerm(diffusion, path))
    return terms, y0


def _solver(lib, name):
    if name.startswith("HalfSolver("):
        return lib.HalfSolver(getattr(lib, name[len("HalfSolver(") : -1])())
    return getattr(lib, name)()


def _controller(lib, name):
    if name == "const":
        return lib.ConstantStepSize()
    pid = lib.PIDController(rtol=1e-2, atol=1e-3)
    if name == "pid":
        return pid
    if name == "clip_rejected":
        return lib.ClipStepSizeController(pid, store_rejected_steps=16)
    raise ValueError(name)


@eqx.filter_jit
def _read(lib, dense: bool, points, sol) -> dict[str, Any]:
    """What `solve_sde` reads from a solution, compiled as one program (eagerly, each
    operation would compile a program of its own)."""
    out = observed(lib, sol)
    if dense:
        # Inside steps: at a step's end `HalfSolver`'s dense output jumps (it is
        # each full step's interpolant, in both libraries), and the two libraries'
        # grids of constant steps can differ in the last bit.
        out["dense"] = jax.vmap(sol.evaluate)(points)
    return out


def solve_sde(lib, case: SDECase) -> dict[str, Any]:
    """Run `case` through `lib` (the `diffrax` or `diffeqx` module); return NumPy
    arrays of what a user observes."""
    dtype = jnp.float32 if case.dtype == "float32" else jnp.float64
    terms, y0 = _terms(lib, case, dtype)
    t0, t1 = (2.0, 0.0) if case.backwards else (0.0, 2.0)
    span = Span(t0, t1, dtype)
    # 0.15 does not divide the interval: constant steps are then spread evenly.
    dt0 = jnp.asarray(-0.15 if case.backwards else 0.15, dtype)
    static: dict[str, Any] = {}

    def run(y0):
        sol = lib.diffeqsolve(
            terms,
            _solver(lib, case.solver),
            jnp.asarray(t0, dtype),
            jnp.asarray(t1, dtype),
            dt0,
            y0,
            saveat=make_saveat(lib, case.saveat, span),
            stepsize_controller=_controller(lib, case.controller),
            max_steps=MAX_STEPS,
            throw=False,
        )
        static["max_steps"] = sol.stats["max_steps"]
        return _read(
            lib, case.saveat == "dense", span.at(0.0, 0.13, 0.47, 0.77, 1.0), sol
        )

    if case.vmap:
        scales = jnp.asarray([1.0, 0.8, 1.3], dtype)
        out = jax.vmap(run)(scales.reshape((3,) + (1,) * jnp.ndim(y0)) * y0)
    else:
        out = run(y0)
    out = jax.tree.map(np.asarray, out)
    out["max_steps"] = static["max_steps"]
    return out


def known_difference(case: SDECase) -> str | None:
    """The docs/migration.md row that sets this case apart, if one does."""
    if case.backwards and case.solver in SRK_SOLVERS:
        return "SRK solvers backwards in time (Diffrax issue #598)"
    return None
