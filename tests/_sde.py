"""Shared harness for strong convergence orders of SDE solvers.

A problem is a drift, a diffusion (for `ControlTerm`), the shape of its Brownian
motion, its noise class, and where one exists a closed-form pathwise solution in terms
of `W(t1) - W(t0)`. `strong_errors` solves it on many Brownian paths (a
`VirtualBrownianTree` per key, fine enough that every step size used is exact in law),
with several step sizes on the same paths, and returns the mean absolute error at the
final time against the closed form or, where there is none, against a reference solve
on the same path with a much finer step. `fitted_order` is the least-squares slope of
log(error) against log(dt).

Every solve is one `jax.jit(jax.vmap(...))` over keys per step size, in float64.
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import diffeqx as dfx


@dataclasses.dataclass(frozen=True)
class SDEProblem:
    name: str
    y0: Callable[[], jax.Array]
    drift: Callable
    diffusion: Callable
    bm_shape: tuple[int, ...]
    noise: str  # scalar | diagonal | commutative | additive | general
    # (y0, w, t1, calculus) -> y(t1), with w = W(t1) - W(t0), t0 = 0; or None.
    exact: Callable | None = None
    t1: float = 1.0


def _gbm_exact(mu, sigma):
    def exact(y0, w, t1, calculus):
        shift = mu - 0.5 * sigma**2 if calculus == "ito" else mu
        return y0 * jnp.exp(shift * t1 + sigma * w)

    return exact


def _commutative_exact(a, b):
    # dy = a y dt + sum_j b_j y dW^j: the noise vector fields b_j y commute.
    b = np.asarray(b)

    def exact(y0, w, t1, calculus):
        shift = a - 0.5 * float(np.sum(b**2)) if calculus == "ito" else a
        return y0 * jnp.exp(shift * t1 + jnp.dot(jnp.asarray(b), w))

    return exact


def _diagonal_exact(a, b):
    a, b = np.asarray(a), np.asarray(b)

    def exact(y0, w, t1, calculus):
        shift = a - 0.5 * b**2 if calculus == "ito" else a
        return y0 * jnp.exp(jnp.asarray(shift) * t1 + jnp.asarray(b) * w)

    return exact


_SIGMA_ADDITIVE = np.array([[0.6, 0.2], [-0.3, 0.5]])
_A_GENERAL = np.array([[0.0, 0.7], [-0.7, 0.0]])
_B_GENERAL = np.array([[0.7, 0.0], [0.0, -0.7]])


PROBLEMS = {
    # Geometric Brownian motion, scalar noise: dy = mu y dt + sigma y dW.
    "gbm": SDEProblem(
        "gbm",
        y0=lambda: jnp.asarray(1.0),
        drift=lambda t, y, args: 0.5 * y,
        diffusion=lambda t, y, args: 0.8 * y,
        bm_shape=(),
        noise="scalar",
        exact=_gbm_exact(0.5, 0.8),
    ),
    # Independent GBMs, diagonal noise.
    "diagonal": SDEProblem(
        "diagonal",
        y0=lambda: jnp.asarray([1.0, 0.5]),
        drift=lambda t, y, args: jnp.asarray([0.3, -0.2]) * y,
        diffusion=lambda t, y, args: jnp.diag(jnp.asarray([0.6, 0.9]) * y),
        bm_shape=(2,),
        noise="diagonal",
        exact=_diagonal_exact([0.3, -0.2], [0.6, 0.9]),
    ),
    # Scalar state, two commuting noise vector fields b_j y.
    "commutative": SDEProblem(
        "commutative",
        y0=lambda: jnp.asarray([1.0]),
        drift=lambda t, y, args: 0.4 * y,
        diffusion=lambda t, y, args: y[:, None] * jnp.asarray([[0.5, -0.4]]),
        bm_shape=(2,),
        noise="commutative",
        exact=_commutative_exact(0.4, [0.5, -0.4]),
    ),
    # Additive noise with a nonlinear, time-dependent drift (no closed form).
    "additive": SDEProblem(
        "additive",
        y0=lambda: jnp.asarray([0.5, -0.2]),
        drift=lambda t, y, args: -jnp.sin(y) + jnp.cos(t) * jnp.asarray([0.3, -0.1]),
        diffusion=lambda t, y, args: jnp.asarray(_SIGMA_ADDITIVE),
        bm_shape=(2,),
        noise="additive",
    ),
    # Linear non-commutative noise: the noise vector fields A y (a rotation) and
    # B y (a reflection) anticommute, so AB - BA = 2AB is far from zero; no closed
    # form.
    "general": SDEProblem(
        "general",
        y0=lambda: jnp.asarray([1.0, 0.5]),
        drift=lambda t, y, args: -0.5 * y + 0.2 * jnp.sin(y),
        diffusion=lambda t, y, args: jnp.stack(
            [jnp.asarray(_A_GENERAL) @ y, jnp.asarray(_B_GENERAL) @ y], axis=-1
        ),
        bm_shape=(2,),
        noise="general",
    ),
}


def terms_for(problem: SDEProblem, bm):
    return dfx.MultiTerm(
        dfx.ODETerm(problem.drift), dfx.ControlTerm(problem.diffusion, bm)
    )


def brownian(problem: SDEProblem, key, levy_area=dfx.BrownianIncrement, tol=2.0**-14):
    return dfx.VirtualBrownianTree(
        0.0, problem.t1, tol=tol, shape=problem.bm_shape, key=key, levy_area=levy_area
    )


def _solver_fn(solver, problem, levy_area, make_terms, controller, max_steps):
    """One compiled function `(keys, dt) -> (y(t1), W(t1) - W(0))` per path: the step
    size is traced, so every step size shares one compilation."""

    def one(key, dt):
        bm = brownian(problem, key, levy_area)
        sol = dfx.diffeqsolve(
            make_terms(problem, bm),
            solver,
            0.0,
            problem.t1,
            dt,
            problem.y0(),
            stepsize_controller=controller,
            max_steps=max_steps,
        )
        return sol.ys[-1], bm.evaluate(0.0, problem.t1)

    return jax.jit(jax.vmap(one, in_axes=(0, None)))


def strong_errors(
    solver,
    problem: SDEProblem,
    dts,
    *,
    calculus: str,
    n_paths: int = 64,
    levy_area=dfx.BrownianIncrement,
    reference_solver=None,
    reference_dt: float = 2.0**-12,
    make_terms=terms_for,
    seed: int = 5678,
) -> np.ndarray:
    """Mean over `n_paths` Brownian paths of |y_numerical(t1) - y_true(t1)|, for each
    step size in `dts`. `y_true` is the closed form when the problem has one, else
    `reference_solver` (default: `solver`) with step `reference_dt` on the same path.
    """
    assert calculus in ("ito", "stratonovich")
    keys = jr.split(jr.key(seed), n_paths)
    controller = dfx.ConstantStepSize()
    finest = min(min(dts), reference_dt)
    max_steps = int(round(problem.t1 / finest)) + 2
    run = _solver_fn(solver, problem, levy_area, make_terms, controller, max_steps)
    results = [run(keys, jnp.asarray(dt)) for dt in dts]
    if problem.exact is not None:
        y0 = problem.y0()
        w = results[0][1]
        truth = jax.vmap(lambda w_: problem.exact(y0, w_, problem.t1, calculus))(w)
    else:
        if reference_solver is not None:
            run = _solver_fn(
                reference_solver, problem, levy_area, make_terms, controller, max_steps
            )
        truth, _ = run(keys, jnp.asarray(reference_dt))
    errors = []
    for y, _ in results:
        diff = np.asarray(y - truth).reshape(n_paths, -1)
        errors.append(float(np.mean(np.max(np.abs(diff), axis=-1))))
    return np.asarray(errors)


def fitted_order(dts, errors) -> float:
    slope, _ = np.polyfit(np.log(np.asarray(dts)), np.log(np.asarray(errors)), 1)
    return float(slope)


DTS = tuple(2.0**-k for k in range(3, 8))


def assert_strong_order(
    solver, problem, expected, *, calculus, dts=DTS, tolerance=0.15, **kwargs
):
    errors = strong_errors(solver, problem, dts, calculus=calculus, **kwargs)
    order = fitted_order(dts, errors)
    assert math.isfinite(order), errors
    assert abs(order - expected) <= tolerance, (
        f"{type(solver).__name__} on {problem.name}: strong order {order:.3f}, "
        f"expected {expected} +- {tolerance}; errors {errors}"
    )
    return order


def rounded_path(lib, levy_area, rounding, out):
    """A smooth stand-in for Brownian motion on [0, 1], an `AbstractBrownianPath` of
    `lib` (`diffeqx` or `diffrax`), whose increments and Lévy areas are computed in
    float64, rounded to `rounding`, and returned in `out`: a half-precision solve and
    a float64 one see exactly the same values. `levy_area` is the class (of `lib`)
    that `evaluate(..., use_levy=True)` returns."""

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
            fields = dict(dt=rounded(h), W=rounded(w(t) - w(s)))
            if issubclass(levy_area, lib.AbstractSpaceTimeLevyArea):
                fields["H"] = rounded(0.1 * h * jnp.stack([jnp.sin(7 * s), jnp.cos(s)]))
            if issubclass(levy_area, lib.AbstractSpaceTimeTimeLevyArea):
                fields["K"] = rounded(
                    0.02 * h * jnp.stack([jnp.cos(4 * s), jnp.sin(s)])
                )
            return levy_area(**fields)

    return RoundedPath()


def same_steps_solve(lib, terms, solver: str, y0, out, dt0: float, steps=None):
    """`lib.diffeqsolve` on [0, 1] in dtype `out`, saving every step: constant steps
    of `dt0` when `steps` is None, else exactly the times `steps` (`StepTo`), so that
    a float64 solve can take a half-precision solve's steps."""
    if steps is None:
        t0, t1, dt = (jnp.asarray(x, out) for x in (0.0, 1.0, dt0))
        controller = lib.ConstantStepSize()
    else:
        t0, t1, dt = jnp.asarray(steps[0], out), jnp.asarray(steps[-1], out), None
        controller = lib.StepTo(ts=jnp.asarray(steps, out))
    return lib.diffeqsolve(
        terms,
        getattr(lib, solver)(),
        t0,
        t1,
        dt,
        y0,
        saveat=lib.SaveAt(steps=True),
        stepsize_controller=controller,
    )


# The Langevin problem of the half-precision tests: a quadratic potential, with
# parameters and initial values exact in float16 and bfloat16.
_LANGEVIN_Q = np.array([[2.0, 0.5], [0.5, 1.0]])


def _langevin_gradient(x, args):
    return jnp.asarray(_LANGEVIN_Q, dtype=x.dtype) @ x


def langevin_half_precision_rms(lib, solver: str, dtype) -> tuple[float, int]:
    """The root-mean-square relative error, in epsilons of `dtype`, at the end of an
    underdamped Langevin solve in `dtype` with `lib` (constant steps of 1/64 on
    [0, 1] and `rounded_path`), against a float64 solve with diffeqx on the same
    path values and step times; and the number of steps."""

    def solve(solve_lib, out, steps=None):
        path = rounded_path(solve_lib, solve_lib.SpaceTimeTimeLevyArea, dtype, out)
        gamma = jnp.asarray([1.5, 0.75], out)
        u = jnp.asarray([1.0, 0.5], out)
        terms = solve_lib.MultiTerm(
            solve_lib.UnderdampedLangevinDriftTerm(gamma, u, _langevin_gradient),
            solve_lib.UnderdampedLangevinDiffusionTerm(gamma, u, path),
        )
        y0 = (jnp.asarray([1.0, -0.5], out), jnp.asarray([0.25, 0.5], out))
        sol = same_steps_solve(solve_lib, terms, solver, y0, out, 1 / 64, steps)
        n = int(sol.stats["num_steps"])
        assert all(y.dtype == out for y in sol.ys)
        ends = np.concatenate([np.asarray(y[n - 1], np.float64) for y in sol.ys])
        return np.asarray(sol.ts[:n], np.float64), ends

    times, ends = solve(lib, dtype)
    _, reference = solve(dfx, jnp.float64, np.concatenate([[0.0], times]))
    error = np.abs(ends - reference) / np.maximum(np.abs(reference), 0.25)
    return float(np.sqrt(np.mean(error**2))) / float(jnp.finfo(dtype).eps), len(times)


def spark_on_a_tree(key, drift, diffusion, y0, *, rtol=1e-3, **kwargs):
    """An adaptive `SPaRK` solve of one 4-dimensional path on `[0, 5]`, on a
    `VirtualBrownianTree` of depth 19 with space-time Lévy area (the adaptive problem
    of `benchmarks/bench_sde.py` for one path): `(solution, tree)`. `kwargs` go to
    `PIDController` (`dtmax`) or `diffeqsolve` (`saveat`, `max_steps`)."""
    bm = dfx.VirtualBrownianTree(
        0.0, 5.0, 1e-5, (4,), key, levy_area=dfx.SpaceTimeLevyArea
    )
    terms = dfx.MultiTerm(dfx.ODETerm(drift), dfx.ControlTerm(diffusion, bm))
    controller = dfx.PIDController(
        rtol=rtol, atol=rtol, dtmax=kwargs.pop("dtmax", None)
    )
    kwargs.setdefault("max_steps", 4096)
    sol = dfx.diffeqsolve(
        terms, dfx.SPaRK(), 0.0, 5.0, 0.05, y0, stepsize_controller=controller, **kwargs
    )
    return sol, bm
