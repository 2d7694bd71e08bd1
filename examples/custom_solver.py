"""A user-written solver whose vector field takes the step size as an input.

Some models are defined together with the step that will integrate them: a learned
velocity conditioned on the step size, or a *modified equation* whose field is
corrected for the error of the method that steps it. diffeqsolve never tells a
vector field the step size, but a solver sees every step's interval, so a small
solver can pass it on.

Here the ODE is logistic growth with an oscillating rate,

    y'(t) = f(t, y) = cos(t) y (1 - y),     exact: y(t) = 1 / (1 + (1/y0 - 1) e^{-sin t}).

Euler's method is first order. Stepping instead with the modified field

    F(t, y, dt) = f + (dt / 2) df/dt,      df/dt = d/dt f(t, y(t)) = f_t + f_y f,

makes each Euler step y0 + dt F(t0, y0, dt) the second-order Taylor method. (The
total derivative df/dt is one `jax.jvp` of f.) The solver below takes such Euler
steps, calling the field with the step size it is used for, and estimates its error
by step doubling: one step of dt against two of dt / 2. With that estimate it is
adaptive, so it works with `ConstantStepSize` and with `PIDController`.

The last part steps the same solver by hand, calling `solver.init` and `solver.step`
in a plain Python loop, and checks that it reproduces `diffeqsolve` step for step.

Run with:  python examples/custom_solver.py
"""

from typing import ClassVar

import equinox as eqx
import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import jax.tree_util as jtu  # noqa: E402
import numpy as np  # noqa: E402

import diffeqx as dfx  # noqa: E402

Y0 = jnp.array([0.2, 0.7])  # two independent initial conditions
T1 = 10.0


# ---- the model: a vector field that takes the step size ---------------------------


def logistic(t, y, args):
    """The ODE's right-hand side f(t, y)."""
    return jnp.cos(t) * y * (1 - y)


def modified_field(t, y, args, dt):
    """F(t, y, dt) = f + (dt / 2) df/dt: Euler steps of size dt with this field are
    second order. At dt = 0 it is the ODE itself."""
    f = logistic(t, y, args)
    _, df_dt = jax.jvp(lambda s, z: logistic(s, z, args), (t, y), (jnp.ones_like(t), f))
    return f + 0.5 * dt * df_dt


def takes_step_size(field):
    """Adapts `field(t, y, args, dt)` to the `ODETerm` signature: the solver below
    calls the term's vector field with the pair `(args, dt)` in place of `args`."""

    def vector_field(t, y, args_and_dt):
        args, dt = args_and_dt
        return field(t, y, args, dt)

    return vector_field


TERM = dfx.ODETerm(takes_step_size(modified_field))


def exact_solution(t, y0=Y0):
    t = jnp.asarray(t)[..., None]
    return 1 / (1 + (1 / y0 - 1) * jnp.exp(-jnp.sin(t)))


# ---- the solver ------------------------------------------------------------------


def _euler(terms, t, y, args, dt):
    """One Euler step of size `dt`, with the field evaluated *for* that step size."""
    field = terms.vf(t, y, (args, dt))
    return jtu.tree_map(lambda yi, di: yi + di, y, terms.prod(field, dt))


class StepSizeAwareEuler(dfx.AbstractAdaptiveSolver):
    """Euler steps `y1 = y0 + dt F(t0, y0, dt)` of a field that knows its step size,
    with an error estimate from step doubling.

    The term's vector field is called as `F(t, y, (args, dt))`, where `dt` is the
    size of the Euler step it is used for (see `takes_step_size`). `F` is assumed to
    be a second-order modified field, `F = f + (dt / 2) df/dt + O(dt^2)`, so that
    every step is second order."""

    term_structure: ClassVar = dfx.ODETerm
    interpolation_cls: ClassVar = dfx.LocalLinearInterpolation

    def order(self, terms):
        return 2

    def error_order(self, terms):
        # The estimate below is the local error of a second-order step, which
        # scales like dt^3; adaptive controllers need that power.
        return 3

    def init(self, terms, t0, t1, y0, args):
        return None  # nothing is carried from one step to the next

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        # For an ODE term the control over [t0, t1] is the step size t1 - t0. (Asking
        # the term for it keeps backward-in-time solves right too.)
        dt = terms.contr(t0, t1)
        half = 0.5 * dt
        one_step = _euler(terms, t0, y0, args, dt)
        midpoint = _euler(terms, t0, y0, args, half)
        two_halves = _euler(terms, t0 + 0.5 * (t1 - t0), midpoint, args, half)
        # Two half steps are ~4x more accurate than one step (second order), so
        # their difference is ~3x the error of `two_halves`: Richardson's estimate.
        y_error = jtu.tree_map(lambda a, b: (a - b) / 3, two_halves, one_step)
        dense_info = dict(y0=y0, y1=two_halves)  # what LocalLinearInterpolation needs
        return two_halves, y_error, dense_info, None, dfx.RESULTS.successful

    def func(self, terms, t0, y0, args):
        # The field in the limit dt -> 0: the ODE itself (used e.g. for dt0=None).
        return terms.vf(t0, y0, (args, jnp.zeros_like(t0)))


# ---- solving with diffeqsolve ----------------------------------------------------


@eqx.filter_jit
def solve_constant(dt0, t1=T1, saveat=dfx.SaveAt(t1=True)):
    return dfx.diffeqsolve(TERM, StepSizeAwareEuler(), 0.0, t1, dt0, Y0, saveat=saveat)


@eqx.filter_jit
def solve_adaptive(rtol, atol):
    return dfx.diffeqsolve(
        TERM,
        StepSizeAwareEuler(),
        0.0,
        T1,
        None,  # the first step is chosen from `func`
        Y0,
        stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol),
    )


@eqx.filter_jit
def solve_plain_euler(dt0):
    """For comparison: ordinary Euler on the ODE itself."""
    return dfx.diffeqsolve(dfx.ODETerm(logistic), dfx.Euler(), 0.0, T1, dt0, Y0)


def final_error(sol):
    return float(jnp.max(jnp.abs(sol.ys[-1] - exact_solution(T1))))


# ---- manual stepping ---------------------------------------------------------------


def step_by_hand(solver, term, t0, t1, dt, y0, args=None):
    """Constant steps of `solver` in a plain Python loop: `init` once, then `step`
    until `t1`. Returns the times and the states after each step."""
    num_steps = round((t1 - t0) / dt)
    step = eqx.filter_jit(solver.step)  # compiled once, reused for every step
    # Step k ends at t0 + k dt, computed directly rather than by summing steps (as
    # ConstantStepSize does), so that no rounding error builds up.
    ts = t0 + dt * jnp.arange(num_steps + 1, dtype=jnp.result_type(float))
    state = solver.init(term, ts[0], ts[1], y0, args)
    y, made_jump = y0, False
    ys = []
    for k in range(num_steps):
        y, _, _, state, result = step(term, ts[k], ts[k + 1], y, args, state, made_jump)
        if result != dfx.RESULTS.successful:
            raise RuntimeError(f"step {k} failed: {result}")
        ys.append(y)
    return ts[1:], jnp.stack(ys)


def main():
    print(f"y' = cos(t) y (1 - y) on [0, {T1:g}], y0 = {Y0.tolist()}")
    print()
    print("Constant steps: the modified field against plain Euler on the ODE")
    header = f"{'dt':>8}  {'steps':>5}  {'error':>9}  {'order':>5}  {'plain Euler':>11}"
    print(header + f"  {'order':>5}")
    previous = None
    for dt0 in (0.1, 0.05, 0.025):
        error = final_error(solve_constant(dt0))
        plain = final_error(solve_plain_euler(dt0))
        if previous is None:
            orders = ("", "")
        else:
            orders = (
                f"{np.log2(previous[0] / error):.2f}",
                f"{np.log2(previous[1] / plain):.2f}",
            )
        steps = round(T1 / dt0)
        print(
            f"{dt0:8.3f}  {steps:5d}  {error:9.2e}  {orders[0]:>5}  {plain:11.2e}"
            f"  {orders[1]:>5}"
        )
        previous = (error, plain)

    print()
    print("Adaptive steps (PIDController; dt0=None picks the first step from `func`)")
    print(f"{'rtol':>8}  {'steps':>5}  {'rejected':>8}  {'error':>9}")
    for rtol in (1e-4, 1e-6, 1e-8):
        sol = solve_adaptive(rtol, rtol)
        print(
            f"{rtol:8.0e}  {int(sol.stats['num_steps']):5d}  "
            f"{int(sol.stats['num_rejected_steps']):8d}  {final_error(sol):9.2e}"
        )

    print()
    dt = 0.125
    ts, ys = step_by_hand(StepSizeAwareEuler(), TERM, 0.0, T1, dt, Y0)
    sol = solve_constant(dt, saveat=dfx.SaveAt(steps=True))
    num_steps = int(sol.stats["num_steps"])
    difference = float(jnp.max(jnp.abs(ys - sol.ys[:num_steps])))
    print(
        f"Manual stepping: {len(ts)} steps of {dt} in a Python loop, {num_steps} in "
        f"diffeqsolve; max |difference| = {difference:.1e}"
    )


if __name__ == "__main__":
    main()
