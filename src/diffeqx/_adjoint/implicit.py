"""`ImplicitAdjoint`: gradients of a steady state by the implicit function theorem."""

from typing import final

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx

from .._saveat import is_subsaveat, save_y
from .backsolve import time_derivative
from .base import (
    AbstractCustomGradientAdjoint,
    closure_convert_terms,
    while_loop_of_kind,
)


@final
class ImplicitAdjoint(AbstractCustomGradientAdjoint):
    """Differentiates a solve that ends at a steady state `y*` (where `dy/dt = 0`,
    e.g. stopped by `Event(steady_state_event())`) through the implicit function
    theorem: `f(t, y*, θ) = 0`, so `dy*/dθ = -(∂f/∂y)⁻¹ ∂f/∂θ`, with one linear solve
    (by `lineax`) and no differentiation through the steps taken. Gradients therefore
    do not depend on the path, and cost and memory do not grow with the number of
    steps.

    Derivatives are with respect to `args` and the parameters of the terms (including
    values captured by vector-field closures); the steady state does not depend on
    `y0`, `t0` or `t1`, so those derivatives are zero. Works in forward and reverse
    mode, to any order.

    **Arguments:**

    - `linear_solver`: the `lineax` solver for the linear system with `∂f/∂y`;
      `lineax.AutoLinearSolver(well_posed=None)` by default.
    - `tags`: `lineax` tags describing `∂f/∂y` (e.g. `lineax.symmetric_tag`), to pick
      a faster solver.

    Supports `SaveAt(t1=True)` only (the steady state). The result is only meaningful
    when the solve really reached a steady state.
    """

    linear_solver: lx.AbstractLinearSolver = lx.AutoLinearSolver(well_posed=None)
    tags: frozenset = eqx.field(static=True, default=frozenset())

    def loop(self, *, run_loop, init_state, max_steps):
        loop = while_loop_of_kind("lax")
        return run_loop(init_state, loop, loop)

    def custom_solve(self, solve, problem):
        saveat = problem["saveat"]
        sub = saveat.subs
        if (
            saveat.dense
            or not is_subsaveat(sub)
            or sub.t0
            or sub.ts is not None
            or sub.steps
            or not sub.t1
            or sub.fn is not save_y
        ):
            raise ValueError(
                "`ImplicitAdjoint` differentiates the steady state only, so it supports "
                f"`SaveAt(t1=True)` alone; got {saveat!r}. Use "
                "`RecursiveCheckpointAdjoint()` (the default) to differentiate other "
                "outputs."
            )
        problem = dict(problem)
        problem["terms"] = closure_convert_terms(
            problem["terms"], problem["t0"], problem["y0"], problem["args"]
        )
        names = ("terms", "args", "y0", "t0", "t1", "dt0")
        inputs = {k: problem.pop(k) for k in names}
        static_out = []

        @eqx.filter_custom_jvp
        def run(inputs):
            from .forward import ForwardMode

            sol = solve(**inputs, **problem, adjoint=ForwardMode())
            dynamic, static = eqx.partition(sol, eqx.is_array)
            static_out[:] = [static]
            return dynamic

        @run.def_jvp
        def run_jvp(primals, tangents):
            (inputs,) = primals
            (t_inputs,) = tangents
            sol = run(inputs)
            t_sol = _steady_state_tangent(
                sol,
                inputs["terms"],
                inputs["args"],
                t_inputs["terms"],
                t_inputs["args"],
                self,
            )
            return sol, t_sol

        return eqx.combine(run(inputs), static_out[0])


def _steady_state_tangent(sol, terms, args, t_terms, t_args, adjoint):
    """The tangent of the saved steady state: `-(∂f/∂y)⁻¹ (∂f/∂θ · θ̇)`; every other
    output has a zero tangent."""
    root = jtu.tree_map(lambda y: y[-1], sol.ys)
    t_end = sol.ts[-1]
    t_diff = (t_terms, t_args)
    # Values being differentiated may arrive as Python scalars (e.g. `jax.grad` of a
    # float captured by a closure); make them arrays so that they are seen below.
    diff = jtu.tree_map(
        lambda x, t: x if t is None else jnp.asarray(x),
        (terms, args),
        t_diff,
        is_leaf=lambda x: x is None,
    )
    d_diff, d_static = eqx.partition(diff, eqx.is_inexact_array)
    # A zero tangent for every (inexact) array not being differentiated.
    t_diff = jtu.tree_map(
        lambda x, t: None if x is None else (jnp.zeros_like(x) if t is None else t),
        d_diff,
        t_diff,
        is_leaf=lambda x: x is None,
    )

    def rate(y, d):
        terms_, args_ = eqx.combine(d, d_static)
        return time_derivative(terms_, t_end, y, args_)

    operator = lx.JacobianLinearOperator(rate, root, d_diff, tags=adjoint.tags)
    _, rhs = jax.jvp(lambda d: rate(root, d), (d_diff,), (t_diff,))
    t_root = lx.linear_solve(
        operator, jtu.tree_map(jnp.negative, rhs), adjoint.linear_solver
    ).value
    t_ys = jtu.tree_map(lambda t, y: jnp.broadcast_to(t, y.shape), t_root, sol.ys)
    t_sol = jtu.tree_map(lambda _: None, sol)
    return eqx.tree_at(lambda s: s.ys, t_sol, t_ys, is_leaf=lambda x: x is None)
