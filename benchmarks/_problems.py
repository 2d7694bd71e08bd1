"""The benchmark problems, each buildable for diffeqx, diffrax or a hand-written scan.

`build(lib, counter, config)` returns a `Case`: a function of array arguments and those
arguments. `lib` is the imported module (`diffeqx` or `diffrax`) — both receive the same
vector field, solver, controller, tolerances, `dt0`, `max_steps` and data — or `None`
for the `lax.scan` baseline of the fixed-step problems. When `counter` is given, the
vector field is wrapped so that every executed evaluation is counted, and the function
returns `(output, stats)` so that the step counts can be read.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from _timing import EvalCounter

MAX_STEPS = 100_000
STAT_KEYS = ("num_steps", "num_accepted_steps", "num_rejected_steps")
FIXED_NUM_STEPS = 10_000
FIXED_DT = 1.0 / 1024  # a power of two: t0 + n * dt is exact, so exactly 10,000 steps


@dataclasses.dataclass(frozen=True)
class Config:
    dtype: Any  # jnp.float64 or jnp.float32
    batch_size: int  # initial conditions in the vmap problem


@dataclasses.dataclass
class Case:
    fn: Callable  # fn(*args) -> output
    args: tuple
    value: Callable[[Any], Any]  # output -> the numbers compared across libraries
    stats: Callable[[Any], dict] | None = None  # output -> step statistics


# ---- vector fields ------------------------------------------------------------------


def lotka_volterra(t, y, args):
    alpha, beta, gamma, delta = args
    prey, predator = y[0], y[1]
    return jnp.stack(
        [
            alpha * prey - beta * prey * predator,
            -gamma * predator + delta * prey * predator,
        ]
    )


def lorenz(t, y, args):
    sigma, rho, beta = args
    return jnp.stack(
        [
            sigma * (y[1] - y[0]),
            y[0] * (rho - y[2]) - y[1],
            y[0] * y[1] - beta * y[2],
        ]
    )


class NeuralField(eqx.Module):
    """A known linear part plus an MLP correction, both trainable."""

    linear: jax.Array
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return self.linear @ y + self.mlp(y)


def _maybe_counted(field, counter: EvalCounter | None):
    return field if counter is None else counter.wrap(field)


def _stats(sol) -> dict:
    return {key: sol.stats[key] for key in STAT_KEYS}


def _solve_output(output):
    return output[0]


def _solve_stats(output):
    return output[1]


# ---- (a), (c): Lotka–Volterra, Tsit5, rtol = atol = 1e-8, 100 save points ----------


def _lotka_volterra_solver(lib, counter, save_t1_only=False):
    """Saves at `ts`, or (`save_t1_only`) at `t1` alone, `ts` then being unused."""
    field = _maybe_counted(lotka_volterra, counter)

    def solve(y0, params, ts):
        saveat = lib.SaveAt(t1=True) if save_t1_only else lib.SaveAt(ts=ts)
        sol = lib.diffeqsolve(
            lib.ODETerm(field),
            lib.Tsit5(),
            t0=0.0,
            t1=100.0,
            dt0=0.1,
            y0=y0,
            args=params,
            saveat=saveat,
            stepsize_controller=lib.PIDController(rtol=1e-8, atol=1e-8),
            max_steps=MAX_STEPS,
        )
        return sol.ys, _stats(sol)

    return solve


def _lotka_volterra_data(config):
    params = jnp.array([0.1, 0.02, 0.4, 0.02], dtype=config.dtype)
    ts = jnp.linspace(0.0, 100.0, 100, dtype=config.dtype)
    return params, ts


def build_lotka_volterra(lib, counter, config) -> Case:
    params, ts = _lotka_volterra_data(config)
    y0 = jnp.array([10.0, 10.0], dtype=config.dtype)
    solve = _lotka_volterra_solver(lib, counter)
    return Case(solve, (y0, params, ts), _solve_output, _solve_stats)


def build_lotka_volterra_vmap(lib, counter, config) -> Case:
    params, ts = _lotka_volterra_data(config)
    scale = jax.random.uniform(jax.random.key(0), (config.batch_size, 2), minval=0.5)
    y0s = (10.0 * (scale + 0.5)).astype(config.dtype)  # each in [10, 20)
    solve = jax.vmap(_lotka_volterra_solver(lib, counter), in_axes=(0, None, None))
    return Case(solve, (y0s, params, ts), _solve_output, _solve_stats)


# ---- (b): Lorenz, Dopri8, rtol = atol = 1e-8 ----------------------------------------


def build_lorenz(lib, counter, config) -> Case:
    field = _maybe_counted(lorenz, counter)

    def solve(y0, params):
        sol = lib.diffeqsolve(
            lib.ODETerm(field),
            lib.Dopri8(),
            t0=0.0,
            t1=10.0,
            dt0=0.01,
            y0=y0,
            args=params,
            stepsize_controller=lib.PIDController(rtol=1e-8, atol=1e-8),
            max_steps=MAX_STEPS,
        )
        return sol.ys, _stats(sol)

    y0 = jnp.array([1.0, 1.0, 1.0], dtype=config.dtype)
    params = jnp.array([10.0, 28.0, 8.0 / 3.0], dtype=config.dtype)
    return Case(solve, (y0, params), _solve_output, _solve_stats)


# ---- (d): gradient of a neural-ODE loss, RecursiveCheckpointAdjoint ------------------


def _neural_ode_data(config):
    ts = jnp.linspace(0.0, 10.0, 50, dtype=config.dtype)
    # Target: a damped rotation, y(t) = exp(-t/10) (cos t, sin t).
    target = jnp.exp(-0.1 * ts)[:, None] * jnp.stack([jnp.cos(ts), jnp.sin(ts)], -1)
    mlp = eqx.nn.MLP(
        2, 2, 64, 2, activation=jnp.tanh, dtype=config.dtype, key=jax.random.key(0)
    )
    linear = jnp.array([[-0.1, -1.0], [1.0, -0.1]], dtype=config.dtype)
    return NeuralField(linear, mlp), target[0], ts, target


def neural_ode_solve(lib, field, y0, ts, adjoint=None, args=None):
    """The neural-ODE solve of (d), (g), bench_backward.py and bench_adjoint.py (and
    of (h), with `args`): Tsit5, PID 1e-6, saves at `ts`; the default adjoint unless
    `adjoint` is given."""
    if adjoint is None:
        adjoint = lib.RecursiveCheckpointAdjoint()
    return lib.diffeqsolve(
        lib.ODETerm(field),
        lib.Tsit5(),
        t0=ts[0],
        t1=ts[-1],
        dt0=0.1,
        y0=y0,
        args=args,
        saveat=lib.SaveAt(ts=ts),
        stepsize_controller=lib.PIDController(rtol=1e-6, atol=1e-6),
        adjoint=adjoint,
        max_steps=4096,
    )


def _value_and_grad_case(loss_and_stats, args, counted: bool) -> Case:
    """The loss and its gradient; when the field is `counted`, the step statistics
    too."""
    if counted:
        value_and_grad = eqx.filter_value_and_grad(loss_and_stats, has_aux=True)
        return Case(
            value_and_grad,
            args,
            value=lambda output: (output[0][0], output[1]),
            stats=lambda output: output[0][1],
        )
    value_and_grad = eqx.filter_value_and_grad(lambda *a: loss_and_stats(*a)[0])
    return Case(value_and_grad, args, value=lambda output: output)


def build_neural_ode_grad(lib, counter, config) -> Case:
    def loss_and_stats(field, y0, ts, target):
        sol = neural_ode_solve(lib, _maybe_counted(field, counter), y0, ts)
        return jnp.mean((sol.ys - target) ** 2), _stats(sol)

    return _value_and_grad_case(
        loss_and_stats, _neural_ode_data(config), counted=counter is not None
    )


# ---- (f): Lotka–Volterra, Tsit5, rtol = atol = 1e-6, 100 saves over ~100 steps -----


def build_lotka_volterra_dense_saves(lib, counter, config) -> Case:
    """A small adaptive solve that saves at about every step (100 saves, ~100 steps):
    where the cost of saving, not of stepping, decides the run time."""
    field = _maybe_counted(lotka_volterra, counter)

    def solve(y0, params, ts):
        sol = lib.diffeqsolve(
            lib.ODETerm(field),
            lib.Tsit5(),
            t0=0.0,
            t1=ts[-1],
            dt0=0.1,
            y0=y0,
            args=params,
            saveat=lib.SaveAt(ts=ts),
            stepsize_controller=lib.PIDController(rtol=1e-6, atol=1e-6),
            max_steps=MAX_STEPS,
        )
        return sol.ys, _stats(sol)

    params = jnp.array([0.5, 0.02, 0.4, 0.02], dtype=config.dtype)
    ts = jnp.linspace(0.0, 45.0, 100, dtype=config.dtype)
    y0 = jnp.array([10.0, 10.0], dtype=config.dtype)
    return Case(solve, (y0, params, ts), _solve_output, _solve_stats)


# ---- (g): gradient of a batched neural-ODE loss: one solve over 256 trajectories ---


class BatchedField(eqx.Module):
    """`NeuralField` applied to every row of a (batch, 2) state."""

    field: NeuralField

    def __call__(self, t, y, args):
        return jax.vmap(lambda row: self.field(t, row, args))(y)


def build_neural_ode_batch_grad(lib, counter, config) -> Case:
    field, _, ts, _ = _neural_ode_data(config)
    y0s = jax.random.uniform(
        jax.random.key(1), (256, 2), config.dtype, minval=-1.0, maxval=1.0
    )
    targets = jnp.exp(-0.1 * ts)[:, None, None] * y0s[None]

    def loss_and_stats(field, y0s, ts, targets):
        field = _maybe_counted(BatchedField(field), counter)
        sol = neural_ode_solve(lib, field, y0s, ts)
        return jnp.mean((sol.ys - targets) ** 2), _stats(sol)

    return _value_and_grad_case(
        loss_and_stats, (field, y0s, ts, targets), counted=counter is not None
    )


# ---- (h): the gradient of a loss over a vmap of small adaptive solves -----------------


def _lotka_volterra_batch(config):
    """Rows (h) and (i)'s data: the shared parameters, the 50 save times over
    [0, 100] and 256 initial states."""
    params = jnp.array([0.1, 0.02, 0.4, 0.02], dtype=config.dtype)
    ts = jnp.linspace(0.0, 100.0, 50, dtype=config.dtype)
    scale = jax.random.uniform(jax.random.key(3), (256, 2), minval=0.5)
    return params, ts, (10.0 * (scale + 0.5)).astype(config.dtype)


def build_lotka_volterra_vmap_grad(lib, counter, config) -> Case:
    """The gradient with respect to the shared parameters of a loss over a `jax.vmap`
    of 256 Lotka-Volterra solves (Tsit5, PID 1e-6, 50 saves over [0, 100],
    `max_steps=4096`, the default adjoint): batched training with a small state
    and a vector field without a network."""
    params, ts, y0s = _lotka_volterra_batch(config)
    field = _maybe_counted(lotka_volterra, counter)

    def solve(y0, params):
        sol = neural_ode_solve(lib, field, y0, ts, args=params)
        return sol.ys, _stats(sol)

    def loss_and_stats(params, y0s):
        ys, stats = jax.vmap(solve, in_axes=(0, None))(y0s, params)
        return jnp.mean((ys / 10.0) ** 2), stats

    return _value_and_grad_case(
        loss_and_stats, (params, y0s), counted=counter is not None
    )


# ---- (i): per-member gradients: a vmap of the gradient of small adaptive solves -------


def build_lotka_volterra_grad_vmap(lib, counter, config) -> Case:
    """Row (h)'s solves and loss with the transformations the other way round: a
    `jax.vmap` of `jax.value_and_grad` (one gradient of the shared parameters per
    member, as for per-example gradients), so that the derivative is taken inside
    the batch."""
    params, ts, y0s = _lotka_volterra_batch(config)
    field = _maybe_counted(lotka_volterra, counter)

    def loss_and_stats(params, y0):
        sol = neural_ode_solve(lib, field, y0, ts, args=params)
        return jnp.mean((sol.ys / 10.0) ** 2), _stats(sol)

    if counter is not None:
        per_member = jax.vmap(
            jax.value_and_grad(loss_and_stats, has_aux=True), in_axes=(None, 0)
        )
        return Case(
            per_member,
            (params, y0s),
            value=lambda output: (output[0][0], output[1]),
            stats=lambda output: output[0][1],
        )
    per_member = jax.vmap(
        jax.value_and_grad(lambda *a: loss_and_stats(*a)[0]), in_axes=(None, 0)
    )
    return Case(per_member, (params, y0s), value=lambda output: output)


# ---- (e): 10,000 fixed steps: classic RK4 (as a tableau) and Euler, vs lax.scan ------


@functools.cache
def classic_rk4(lib):
    """Classic RK4 defined the way users define a method: a tableau and a subclass."""
    rk4_tableau = lib.ButcherTableau(
        c=np.array([0.5, 0.5, 1.0]),
        b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
        b_error=np.zeros(4),  # no embedded method: this solver takes fixed steps only
        a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
    )

    class ClassicRK4(lib.AbstractERK):
        tableau: ClassVar = rk4_tableau
        interpolation_cls: ClassVar = (
            lib.ThirdOrderHermitePolynomialInterpolation.from_k
        )

        def order(self, terms):
            return 4

    return ClassicRK4


def _fixed_step_library(lib, counter, solver):
    field = _maybe_counted(lotka_volterra, counter)

    def solve(y0, params):
        sol = lib.diffeqsolve(
            lib.ODETerm(field),
            solver,
            t0=0.0,
            t1=FIXED_NUM_STEPS * FIXED_DT,
            dt0=FIXED_DT,
            y0=y0,
            args=params,
            saveat=lib.SaveAt(t1=True),
            max_steps=FIXED_NUM_STEPS,
        )
        return sol.ys[-1], _stats(sol)

    return solve


def _scan_step(method, field, dt):
    if method == "euler":
        return lambda t, y, p: y + dt * field(t, y, p)

    def rk4_step(t, y, p):
        k1 = field(t, y, p)
        k2 = field(t + 0.5 * dt, y + (0.5 * dt) * k1, p)
        k3 = field(t + 0.5 * dt, y + (0.5 * dt) * k2, p)
        k4 = field(t + dt, y + dt * k3, p)
        return y + (dt / 6) * (k1 + 2 * k2 + 2 * k3 + k4)

    return rk4_step


def _fixed_step_scan(counter, method, dtype):
    step = _scan_step(method, _maybe_counted(lotka_volterra, counter), FIXED_DT)
    count = jnp.asarray(FIXED_NUM_STEPS)
    stats = {"num_steps": count, "num_accepted_steps": count, "num_rejected_steps": 0}

    def solve(y0, params):
        def body(y, index):
            return step(index * FIXED_DT, y, params), None

        indices = jnp.arange(FIXED_NUM_STEPS, dtype=dtype)
        y1, _ = jax.lax.scan(body, y0, indices)
        return y1, stats

    return solve


def _build_fixed(method):
    def build(lib, counter, config) -> Case:
        if lib is None:
            solve = _fixed_step_scan(counter, method, config.dtype)
        else:
            solver = classic_rk4(lib)() if method == "rk4" else lib.Euler()
            solve = _fixed_step_library(lib, counter, solver)
        y0 = jnp.array([10.0, 10.0], dtype=config.dtype)
        params = jnp.array([0.1, 0.02, 0.4, 0.02], dtype=config.dtype)
        return Case(solve, (y0, params), _solve_output, _solve_stats)

    return build


build_fixed_rk4 = _build_fixed("rk4")
build_fixed_euler = _build_fixed("euler")


@dataclasses.dataclass(frozen=True)
class Problem:
    key: str  # e.g. "e_rk4"
    letter: str  # the brief's label: a..e
    title: str
    build: Callable[..., Case]
    with_scan: bool = False  # also run the hand-written lax.scan baseline
    index: int = 0  # position in PROBLEMS; rotates which library compiles first


PROBLEMS = tuple(
    dataclasses.replace(problem, index=index)
    for index, problem in enumerate(
        [
            Problem("lotka_volterra", "a", "a: LV Tsit5 1e-8", build_lotka_volterra),
            Problem("lorenz", "b", "b: Lorenz Dopri8 1e-8", build_lorenz),
            Problem(
                "lotka_volterra_vmap", "c", "c: LV vmap", build_lotka_volterra_vmap
            ),
            Problem(
                "neural_ode_grad", "d", "d: neural ODE grad", build_neural_ode_grad
            ),
            Problem("fixed_rk4", "e", "e: RK4 10k fixed", build_fixed_rk4, True),
            Problem("fixed_euler", "e", "e: Euler 10k fixed", build_fixed_euler, True),
            Problem(
                "lotka_volterra_dense_saves",
                "f",
                "f: LV 100 saves 1e-6",
                build_lotka_volterra_dense_saves,
            ),
            Problem(
                "neural_ode_batch_grad",
                "g",
                "g: NODE grad batch 256",
                build_neural_ode_batch_grad,
            ),
            Problem(
                "lotka_volterra_vmap_grad",
                "h",
                "h: LV grad vmap x256",
                build_lotka_volterra_vmap_grad,
            ),
            Problem(
                "lotka_volterra_grad_vmap",
                "i",
                "i: LV vmap grad x256",
                build_lotka_volterra_grad_vmap,
            ),
        ]
    )
)
