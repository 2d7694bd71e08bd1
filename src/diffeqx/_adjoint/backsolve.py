"""`BacksolveAdjoint`: gradients from the continuous adjoint equations, solved
backwards in time ("optimise-then-discretise")."""

from typing import Any, ClassVar, final

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx

from .._saveat import SaveAt, is_subsaveat, save_y
from .._term import AbstractTerm
from .base import (
    AbstractCustomGradientAdjoint,
    closure_convert_terms,
    while_loop_of_kind,
)


class AdjointState(eqx.Module):
    """The state of `BacksolveAdjoint`'s backward solve: the forward state `y`, its
    adjoint `a_y`, and the running gradients `a_args`, `a_terms`."""

    y: Any
    a_y: Any
    a_args: Any
    a_terms: Any


def adjoint_rms_seminorm(x) -> Any:
    """The RMS norm of the state and its adjoint only, for the error control of
    `BacksolveAdjoint`'s backward solve.

    The backward solve integrates `(y, a_y, a_args, a_terms)`: the state, its adjoint
    and the running parameter gradients. The parameter gradients never feed back into
    the dynamics, so their error need not be controlled; leaving them out of the norm
    can save backward steps when their error estimate is what limits the step size
    (how much depends on the problem: on a small neural ODE the saving is often
    nil). On any other input (e.g. the forward solve's error, when one controller
    serves both solves) it is the ordinary RMS norm.

    Use as `PIDController(rtol, atol, norm=adjoint_rms_seminorm)`.
    """
    if isinstance(x, AdjointState):
        x = (x.y, x.a_y)
    return optx.rms_norm(x)


def time_derivative(terms, t, y, args):
    """`dy/dt` at `(t, y)` for any terms: the vector field applied to the rate of
    change of the control (for an ODE the control is time, whose rate is one)."""
    t = jnp.asarray(t)

    def increment(h):
        return terms.vf_prod(t, y, args, terms.contr(t, t + h))

    zero = jnp.zeros((), t.dtype)
    return jax.jvp(increment, (zero,), (jnp.ones((), t.dtype),))[1]


def _zeros_for_none(cotangent, like):
    """Cotangents with zeros in place of `None` (outputs the loss does not use)."""
    if cotangent is None:
        return jtu.tree_map(jnp.zeros_like, like)
    return jtu.tree_map(
        lambda c, x: jnp.zeros_like(x) if c is None else c,
        cotangent,
        like,
        is_leaf=lambda x: x is None,
    )


def _neg(tree):
    return jtu.tree_map(jnp.negative, tree)


def _dot(a, b):
    return sum(
        (
            jnp.sum(x * y)
            for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b), strict=True)
        ),
        start=jnp.asarray(0.0),
    )


class _AdjointTerm(AbstractTerm):
    """The augmented system `(y, a_y, a_args, a_terms)` solved backwards in time:
    `dy/dt = f`, `da_y/dt = -a_y df/dy`, `da_θ/dt = -a_y df/dθ`."""

    terms: Any

    def vf(self, t, aug, args):
        y, a_y = aug.y, aug.a_y

        def rate(y_, args_, terms_):
            out = time_derivative(terms_, t, y_, args_)
            # A field may promote (e.g. a float32 state with float64 times); the
            # adjoint needs its output in the state's dtypes.
            return jtu.tree_map(lambda o, yi: o.astype(yi.dtype), out, y_)

        f, vjp = eqx.filter_vjp(rate, y, args, self.terms)
        d_y, d_args, d_terms = vjp(a_y)
        return AdjointState(f, _neg(d_y), _neg(d_args), _neg(d_terms))

    def contr(self, t0, t1, **kwargs):
        return t1 - t0

    def prod(self, vf, control):
        return jtu.tree_map(lambda v: (control * v).astype(v.dtype), vf)


_BACKSOLVE_OPTIONS = ("solver", "stepsize_controller", "dt0", "max_steps")


@final
class BacksolveAdjoint(AbstractCustomGradientAdjoint):
    """Differentiates by solving the continuous adjoint equations backwards in time
    ("optimise-then-discretise"), as in neural ODEs.

    The forward solve stores nothing but its saved outputs. The backward pass solves
    the state, its adjoint and the parameter gradients together from the last saved
    time back to `t0`, adding each saved output's cotangent as it passes that output's
    time. Memory is therefore independent of the number of steps. The gradients are
    those of the exact solution, up to the accuracy of the backward solve, rather
    than the exact derivative of the forward computation.

    Gradients are available with respect to `y0`, `args` (any PyTree, including the
    parameters of an `eqx.Module` vector field or values a vector-field closure
    captures), `t0`, `t1` and the save times `SaveAt(ts=...)`.

    **Arguments:**

    Keyword arguments for the backward solves: `solver`, `stepsize_controller`,
    `dt0` and `max_steps`. Each defaults to the forward solve's value (`dt0` with its
    sign reversed). `stepsize_controller=PIDController(..., norm=adjoint_rms_seminorm)`
    controls the error of the state and adjoint only.

    Supports `SaveAt(t0=..., t1=..., ts=...)` with the default `fn`, and reverse mode
    only. Not supported: `SaveAt(steps=True)`, `SaveAt(dense=True)`, `SaveAt(fn=...)`,
    `subs`, and events; use `RecursiveCheckpointAdjoint` for those.
    """

    kwargs: dict
    name: ClassVar[str] = "BacksolveAdjoint"

    def __init__(self, **kwargs):
        unknown = sorted(set(kwargs) - set(_BACKSOLVE_OPTIONS))
        if unknown:
            raise TypeError(
                f"`BacksolveAdjoint` got unexpected keyword argument(s) {unknown}; it "
                f"accepts {list(_BACKSOLVE_OPTIONS)} for the backward solve."
            )
        self.kwargs = kwargs

    def loop(self, *, run_loop, init_state, max_steps):
        loop = while_loop_of_kind("lax")
        return run_loop(init_state, loop, loop)

    def check(self, saveat, event, stepsize_controller):
        from .._controller.clip import unwrap_controller
        from .._controller.constant import StepTo

        where = "`BacksolveAdjoint`"
        if event is not None:
            raise ValueError(
                f"{where} does not support events; use `RecursiveCheckpointAdjoint()` "
                "(the default) or `DirectAdjoint()` with `event=`."
            )
        if saveat.dense:
            raise ValueError(
                f"{where} does not support `SaveAt(dense=True)`; use "
                "`RecursiveCheckpointAdjoint()` (the default) for dense output."
            )
        sub = saveat.subs
        if not is_subsaveat(sub):
            raise ValueError(
                f"{where} supports a single `SaveAt(t0=..., t1=..., ts=...)`, not a "
                f"PyTree of `SubSaveAt`s; got subs={sub!r}. Use "
                "`RecursiveCheckpointAdjoint()` for several save specifications."
            )
        if sub.steps:
            raise ValueError(
                f"{where} does not support `SaveAt(steps=True)`; use "
                "`RecursiveCheckpointAdjoint()` (the default), or save at given times "
                "with `SaveAt(ts=...)`."
            )
        if sub.fn is not save_y:
            raise ValueError(
                f"{where} does not support `SaveAt(fn=...)` (the adjoint needs the "
                "saved states themselves); use `RecursiveCheckpointAdjoint()`, or "
                "apply the function to `sol.ys` after the solve."
            )
        if (
            isinstance(unwrap_controller(stepsize_controller), StepTo)
            and "stepsize_controller" not in self.kwargs
        ):
            raise ValueError(
                f"{where} cannot run `StepTo(ts)` backwards; pass a controller for the "
                "backward solve, e.g. "
                "`BacksolveAdjoint(stepsize_controller=PIDController(...))`."
            )

    def custom_solve(self, solve, problem):
        self.check(problem["saveat"], problem["event"], problem["stepsize_controller"])
        problem = dict(problem)
        problem["terms"] = closure_convert_terms(
            problem["terms"], problem["t0"], problem["y0"], problem["args"]
        )
        diff = {
            k: problem.pop(k) for k in ("y0", "args", "terms", "t0", "t1", "saveat")
        }
        return _backsolve(diff, problem, solve, self)


@eqx.filter_custom_vjp
def _backsolve(diff, rest, solve, adjoint):
    from .checkpoint import RecursiveCheckpointAdjoint

    return solve(**diff, **rest, adjoint=RecursiveCheckpointAdjoint())


@_backsolve.def_fwd
def _backsolve_fwd(perturbed, diff, rest, solve, adjoint):
    sol = _backsolve(diff, rest, solve, adjoint)
    return sol, (sol.ts, sol.ys)


@_backsolve.def_bwd
def _backsolve_bwd(residuals, grad_obj, perturbed, diff, rest, solve, adjoint):
    from .checkpoint import RecursiveCheckpointAdjoint

    out_ts, out_ys = residuals
    # Values being differentiated may arrive as Python scalars (e.g. `jax.grad` of a
    # float); make them arrays so that the vector-field derivatives below see them.
    diff = jtu.tree_map(lambda x, p: jnp.asarray(x) if p else x, diff, perturbed)
    y0, args, terms = diff["y0"], diff["args"], diff["terms"]
    t0, t1, saveat = diff["t0"], diff["t1"], diff["saveat"]
    sub = saveat.subs
    options = adjoint.kwargs
    solver = options.get("solver", rest["solver"])
    controller = options.get("stepsize_controller", rest["stepsize_controller"])
    max_steps = options.get("max_steps", rest["max_steps"])
    if "dt0" in options:
        dt0 = options["dt0"]
    else:
        dt0 = None if rest["dt0"] is None else -rest["dt0"]

    ct_ys = _zeros_for_none(grad_obj.ys, out_ys)
    ct_ts = _zeros_for_none(grad_obj.ts, out_ts)

    def rate(t, y):
        return time_derivative(terms, t, y, args)

    diff_args = eqx.filter(args, eqx.is_inexact_array)
    diff_terms = eqx.filter(terms, eqx.is_inexact_array)
    a_y0 = jtu.tree_map(lambda y: jnp.zeros(jnp.shape(y)[1:], y.dtype), out_ys)
    a_args0 = jtu.tree_map(jnp.zeros_like, diff_args)
    a_terms0 = jtu.tree_map(jnp.zeros_like, diff_terms)
    adj_term = _AdjointTerm(terms)

    # Walk the saved points from last to first; segment k runs from point k back to
    # point k-1 (or to t0 for the first point), restarting from the saved state.
    prev_times = jnp.concatenate(
        [jnp.reshape(t0, (1,)).astype(out_ts.dtype), out_ts[:-1]]
    )

    def segment(carry, x):
        a_y, a_args, a_terms = carry
        t_k, t_prev, y_k, c_k = x
        a_y = jtu.tree_map(jnp.add, a_y, c_k)
        g_time = _dot(c_k, rate(t_k, y_k))
        sol = solve(
            adj_term,
            solver,
            t_k,
            t_prev,
            dt0,
            AdjointState(y_k, a_y, a_args, a_terms),
            args,
            saveat=SaveAt(t1=True),
            stepsize_controller=controller,
            adjoint=RecursiveCheckpointAdjoint(),
            max_steps=max_steps,
            throw=rest["throw"],
        )
        end = jtu.tree_map(lambda v: v[-1], sol.ys)
        a_y, a_args, a_terms = end.a_y, end.a_args, end.a_terms
        return (a_y, a_args, a_terms), g_time

    (a_y, a_args, a_terms), g_times = lax.scan(
        segment,
        (a_y0, a_args0, a_terms0),
        (out_ts, prev_times, out_ys, ct_ys),
        reverse=True,
    )
    g_times = g_times + ct_ts

    n_ts = 0 if sub.ts is None else sub.ts.shape[0]
    offset = 1 if sub.t0 else 0
    g_t0 = -_dot(a_y, rate(t0, y0))
    if sub.t0:
        g_t0 = g_t0 + g_times[0]
    g_t1 = g_times[-1] if sub.t1 else jnp.zeros_like(g_t0)
    if grad_obj.t0 is not None:
        g_t0 = g_t0 + grad_obj.t0
    if grad_obj.t1 is not None:
        g_t1 = g_t1 + grad_obj.t1
    g_ts = None if sub.ts is None else g_times[offset : offset + n_ts]

    def like(g, x):
        return (
            None
            if g is None
            else jnp.asarray(g, jnp.result_type(x)).reshape(jnp.shape(x))
        )

    g_saveat = jtu.tree_map(lambda _: None, saveat)
    if sub.ts is not None:
        g_saveat = eqx.tree_at(
            lambda s: s.subs.ts,
            g_saveat,
            like(g_ts, sub.ts),
            is_leaf=lambda x: x is None,
        )
    return dict(
        y0=a_y,
        args=a_args,
        terms=a_terms,
        t0=like(g_t0, t0),
        t1=like(g_t1, t1),
        saveat=g_saveat,
    )
