"""`BacksolveAdjoint`: gradients from the continuous adjoint equations, solved
backwards in time ("optimise-then-discretise")."""

import math
from typing import Any, ClassVar, final

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx

from .._saveat import SaveAt
from .._term import AbstractTerm, MultiTerm
from .._transforms import mapped_from_start
from .backsolve_saves import (
    convert_save_fns,
    merged_save_points,
    pull_back,
    saving_states,
    split_states,
    subs_of,
    tree_dot,
)
from .base import (
    AbstractCustomGradientAdjoint,
    closure_convert_terms,
    while_loop_of_kind,
)


class UnsupportedError(ValueError, NotImplementedError):
    """A combination of arguments `BacksolveAdjoint` does not support. Both a
    `ValueError` (diffeqx's kind of error for arguments refused at the call) and a
    `NotImplementedError` (what Diffrax raises for the same combinations), so that
    code catching either keeps working."""


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


class _AdjointTerm(AbstractTerm):
    """One part of the augmented system `(y, a_y, a_args, a_terms)` solved backwards
    in time. For the part `dy = g(t, y, θ) dX` of the equation (`X` its control:
    time for an ODE term, a path for a control term, Brownian motion for an SDE's
    diffusion) it is `dy = g dX`, `da_y = -a_y ∂g/∂y dX`, `da_θ = -a_y ∂g/∂θ dX`,
    driven by the same control, so an SDE's adjoint is driven by the same Brownian
    path (the Stratonovich adjoint equations). A `MultiTerm` becomes a `MultiTerm`
    of such parts, so solvers that take its parts apart accept the adjoint too.

    `terms` is the whole PyTree of terms (the gradients are taken with respect to
    all of it); `index` picks the part: `None` for a term that is not a `MultiTerm`.
    """

    terms: Any
    index: int | None = eqx.field(static=True)

    def _part(self, terms):
        return terms if self.index is None else terms.terms[self.index]

    def vf_prod(self, t, aug, args, control):
        def increment(y_, args_, terms_):
            out = self._part(terms_).vf_prod(t, y_, args_, control)
            # A field may promote (e.g. a float32 state with float64 times); the
            # adjoint needs its output in the state's dtypes.
            return jtu.tree_map(lambda o, yi: o.astype(yi.dtype), out, y_)

        dy, vjp = eqx.filter_vjp(increment, aug.y, args, self.terms)
        d_y, d_args, d_terms = vjp(aug.a_y)
        return AdjointState(dy, _neg(d_y), _neg(d_args), _neg(d_terms))

    def contr(self, t0, t1, **kwargs):
        return self._part(self.terms).contr(t0, t1, **kwargs)

    def vf(self, t, aug, args):
        # The field as a linear map of the control, materialised: one `vf_prod` per
        # entry of the (flattened) control, stacked on a trailing axis; no axis for
        # a scalar control.
        like = jax.eval_shape(lambda: self.contr(t, t))
        leaves = jtu.tree_leaves(like)
        if len(leaves) == 1 and leaves[0].shape == ():
            unit = jtu.tree_unflatten(
                jtu.tree_structure(like), [jnp.ones((), leaves[0].dtype)]
            )
            return self.vf_prod(t, aug, args, unit)
        size = sum(math.prod(x.shape) for x in leaves)

        def along(j):
            basis = jax.nn.one_hot(j, size, dtype=leaves[0].dtype)
            return self.vf_prod(t, aug, args, _unflatten_control(like, basis))

        columns = jax.vmap(along)(jnp.arange(size))
        return jtu.tree_map(lambda c: jnp.moveaxis(c, 0, -1), columns)

    def prod(self, vf, control):
        leaves = jtu.tree_leaves(control)
        if len(leaves) == 1 and jnp.ndim(leaves[0]) == 0:
            return jtu.tree_map(lambda v: (leaves[0] * v).astype(v.dtype), vf)
        flat = jnp.concatenate([jnp.ravel(x) for x in leaves])
        return jtu.tree_map(
            lambda v: jnp.tensordot(v, flat.astype(v.dtype), axes=1), vf
        )


def _unflatten_control(like, flat):
    """A flat vector as a PyTree shaped like the control `like`."""
    leaves, structure = jtu.tree_flatten(like)
    parts, start = [], 0
    for x in leaves:
        n = math.prod(x.shape)
        parts.append(flat[start : start + n].reshape(x.shape).astype(x.dtype))
        start += n
    return jtu.tree_unflatten(structure, parts)


def adjoint_terms(terms):
    """The augmented system's terms for `terms`: a `MultiTerm` of adjoint parts for a
    `MultiTerm`, else a single adjoint term."""
    if isinstance(terms, MultiTerm):
        return MultiTerm(*(_AdjointTerm(terms, i) for i in range(len(terms.terms))))
    return _AdjointTerm(terms, None)


_BACKSOLVE_OPTIONS = ("solver", "stepsize_controller", "dt0", "max_steps")


@final
class BacksolveAdjoint(AbstractCustomGradientAdjoint):
    """Differentiates by solving the continuous adjoint equations backwards in time
    ("optimise-then-discretise"), as in neural ODEs.

    The forward solve stores nothing but its saved outputs (and, for outputs saved
    through `SaveAt(fn=...)`, the states at their save times). The backward pass
    solves the state, its adjoint and the parameter gradients together from the last
    save time back to `t0`, stopping at every save time of every output: there the
    cotangent of the saved value `fn(t, y, args)` is pulled back through `fn` (a
    vector-Jacobian product) and added to the adjoint of the state. Memory is
    therefore independent of the number of steps. The gradients are those of the
    exact solution, up to the accuracy of the backward solve, rather than the exact
    derivative of the forward computation.

    Gradients are available with respect to `y0`, `args` (any PyTree, including the
    parameters of an `eqx.Module` vector field or values a vector-field closure
    captures), `t0`, `t1`, the save times `SaveAt(ts=...)` and values a save
    function `fn` captures. (Diffrax's `BacksolveAdjoint` differentiates with respect
    to `y0` and `args` only, and refuses `fn` and `subs`.)

    **Arguments:**

    Keyword arguments for the backward solves: `solver`, `stepsize_controller`,
    `dt0` and `max_steps`. Each defaults to the forward solve's value (`dt0` with its
    sign reversed). `stepsize_controller=PIDController(..., norm=adjoint_rms_seminorm)`
    controls the error of the state and adjoint only.

    Supports `SaveAt(t0=..., t1=..., ts=..., fn=...)` and several such outputs with
    `SaveAt(subs=...)`, in reverse mode (also under `jax.hessian` or reverse over
    reverse, which differentiate the backward solve; not forward mode alone). Not
    supported (a `ValueError` when the solve is traced): `steps=True` in any output,
    `SaveAt(dense=True)`, and events; use `RecursiveCheckpointAdjoint` for those.
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
            raise UnsupportedError(
                f"{where} does not support events; use `RecursiveCheckpointAdjoint()` "
                "(the default) or `DirectAdjoint()` with `event=`."
            )
        if saveat.dense:
            raise UnsupportedError(
                f"{where} does not support `SaveAt(dense=True)`; use "
                "`RecursiveCheckpointAdjoint()` (the default) for dense output."
            )
        if any(sub.steps for sub in subs_of(saveat)[0]):
            raise UnsupportedError(
                f"{where} does not support `SaveAt(steps=True)` (in `SaveAt` or any "
                "`SubSaveAt`); use `RecursiveCheckpointAdjoint()` (the default), or "
                "save at given times with `SaveAt(ts=...)`."
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

    def check_sde(self, terms, solver):
        """The adjoint of an SDE, solved backwards on the same Brownian path, is the
        Stratonovich adjoint: both solves must converge to Stratonovich solutions."""
        from .._brownian.base import brownian_paths
        from .._solver.base import AbstractStratonovichSolver, AbstractWrappedSolver

        if not brownian_paths(terms):
            return
        for role, candidate in (
            ("solver", solver),
            ("backward solver", self.kwargs.get("solver", solver)),
        ):
            inner = candidate
            while isinstance(inner, AbstractWrappedSolver):
                inner = inner.solver
            if not isinstance(inner, AbstractStratonovichSolver):
                raise ValueError(
                    "`BacksolveAdjoint` on an SDE solves the Stratonovich adjoint "
                    f"equations, but the {role} `{type(inner).__name__}` does not "
                    "converge to the Stratonovich solution. Use a Stratonovich "
                    "solver (e.g. `Heun()`, `EulerHeun()`, `ReversibleHeun()`), or "
                    "`RecursiveCheckpointAdjoint()` (the default) with any solver."
                )

    def custom_solve(self, solve, problem):
        self.check(problem["saveat"], problem["event"], problem["stepsize_controller"])
        self.check_sde(problem["terms"], problem["solver"])
        problem = dict(problem)
        t0, y0, args = problem["t0"], problem["y0"], problem["args"]
        problem["terms"] = closure_convert_terms(problem["terms"], t0, y0, args)
        problem["saveat"] = convert_save_fns(problem["saveat"], t0, y0, args)
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
    from .checkpoint import RecursiveCheckpointAdjoint

    # Values being differentiated may arrive as Python scalars (JAX keeps a float
    # given to `jax.grad` as a typed Python float), where the terms were closure-
    # converted with arrays in their place: make them arrays, as the backward pass
    # does.
    diff = jtu.tree_map(lambda x, p: jnp.asarray(x) if p else x, diff, perturbed)
    saveat = diff["saveat"]
    # Solve saving the states beside any `fn` outputs: the backward solve restarts
    # from the state at each save time, and pulls cotangents back through `fn` there.
    forward = dict(diff, saveat=saving_states(saveat))
    sol = solve(**forward, **rest, adjoint=RecursiveCheckpointAdjoint())
    sol, states = split_states(saveat, sol)
    return sol, (sol.ts, sol.ys, states)


@_backsolve.def_bwd
def _backsolve_bwd(residuals, grad_obj, perturbed, diff, rest, solve, adjoint):
    from .._solve.diffeqsolve import initial_solver_and_controller_state
    from .checkpoint import RecursiveCheckpointAdjoint

    out_ts, out_ys, states = residuals
    # Values being differentiated may arrive as Python scalars (e.g. `jax.grad` of a
    # float); make them arrays so that the vector-field derivatives below see them.
    diff = jtu.tree_map(lambda x, p: jnp.asarray(x) if p else x, diff, perturbed)
    y0, args, terms = diff["y0"], diff["args"], diff["terms"]
    t0, t1, saveat = diff["t0"], diff["t1"], diff["saveat"]
    subs, structure = subs_of(saveat)
    options = adjoint.kwargs
    solver = options.get("solver", rest["solver"])
    controller = options.get("stepsize_controller", rest["stepsize_controller"])
    max_steps = options.get("max_steps", rest["max_steps"])
    if "dt0" in options:
        dt0 = options["dt0"]
    else:
        dt0 = None if rest["dt0"] is None else -rest["dt0"]
    time_dtype = jnp.result_type(t0)

    def rate(t, y):
        return time_derivative(terms, t, y, args)

    # The derivatives with respect to times need the vector field at those times:
    # evaluated only for the times being differentiated. (Unused, they would be
    # removed as dead code, but not from a program that counts evaluations with a
    # callback.)
    t0_perturbed, t1_perturbed = _any(perturbed["t0"]), _any(perturbed["t1"])

    # Each output's cotangents, pulled back through its `fn`.
    pulled = []
    if subs:
        ct_ys = structure.flatten_up_to(_zeros_for_none(grad_obj.ys, out_ys))
        ct_ts = structure.flatten_up_to(_zeros_for_none(grad_obj.ts, out_ts))
        ts_list = structure.flatten_up_to(out_ts)
        perturbed_subs, _ = subs_of(perturbed["saveat"])
        for sub, p_sub, ts, y, c, c_ts in zip(
            subs, perturbed_subs, ts_list, states, ct_ys, ct_ts, strict=True
        ):
            times_perturbed = (
                (sub.t0 and t0_perturbed) or (sub.t1 and t1_perturbed) or _any(p_sub.ts)
            )
            pulled.append(
                pull_back(sub, ts, y, c, c_ts, args, rate if times_perturbed else None)
            )
    points = merged_save_points(
        t0,
        t1,
        structure.flatten_up_to(out_ts) if subs else [],
        states,
        [p.a_y for p in pulled],
    )

    a_y = jtu.tree_map(jnp.zeros_like, y0)
    a_args = jtu.tree_map(jnp.zeros_like, eqx.filter(args, eqx.is_inexact_array))
    a_terms = jtu.tree_map(jnp.zeros_like, eqx.filter(terms, eqx.is_inexact_array))
    if points is not None:
        point_ts, point_ys, point_a_y = points
        adj_term = adjoint_terms(terms)
        # Walk the save points from last to first; segment k runs from point k back
        # to point k-1 (or to t0 for the first), restarting from the saved state.
        prev_ts = jnp.concatenate(
            [jnp.reshape(t0, (1,)).astype(point_ts.dtype), point_ts[:-1]]
        )
        num_points = point_ts.shape[0]
        # As in Diffrax, each segment resumes the solver and controller states the
        # previous one ended with (a constant step size, or an adaptive one, carries
        # on across the save time), and every segment after the first starts with a
        # jump: the cotangent added there changes the adjoint state.
        later = jnp.arange(num_points) < num_points - 1

        def segment_problem(t_k, t_prev, state, solver_state, controller_state):
            return dict(
                terms=adj_term,
                solver=solver,
                t0=t_k,
                t1=t_prev,
                dt0=dt0,
                y0=state,
                args=args,
                stepsize_controller=controller,
                max_steps=max_steps,
                solver_state=solver_state,
                controller_state=controller_state,
            )

        def segment(carry, x):
            a_y, a_args, a_terms, solver_state, controller_state = carry
            t_k, t_prev, y_k, c_k, made_jump = x
            a_y = jtu.tree_map(jnp.add, a_y, c_k)
            sol = solve(
                **segment_problem(
                    t_k,
                    t_prev,
                    AdjointState(y_k, a_y, a_args, a_terms),
                    solver_state,
                    controller_state,
                ),
                saveat=SaveAt(t1=True, solver_state=True, controller_state=True),
                made_jump=made_jump,
                adjoint=RecursiveCheckpointAdjoint(),
                throw=rest["throw"],
            )
            end = jtu.tree_map(lambda v: v[-1], sol.ys)
            carry = (end.a_y, end.a_args, end.a_terms)
            return (*carry, sol.solver_state, sol.controller_state), None

        # The states the first (last in time) segment starts from.
        last = jtu.tree_map(lambda v: v[-1], (point_ts, prev_ts, point_ys, point_a_y))
        first_state = AdjointState(
            last[2], jtu.tree_map(jnp.add, a_y, last[3]), a_args, a_terms
        )
        solver_state, controller_state = initial_solver_and_controller_state(
            **segment_problem(last[0], last[1], first_state, None, None),
            saveat=SaveAt(t1=True),
        )
        # Mapped from the start under `jax.vmap` where the saved states or their
        # cotangents are (`batched_as`): the accumulators start as zeros.
        init = mapped_from_start(
            (a_y, a_args, a_terms, solver_state, controller_state),
            point_ys,
            point_a_y,
        )
        (a_y, a_args, a_terms, _, _), _ = lax.scan(
            segment,
            init,
            (point_ts, prev_ts, point_ys, point_a_y, later),
            reverse=True,
        )

    # The times: t0 moves the start of the trajectory; every save time moves its
    # output; the solution's own `t0`/`t1` fields may have cotangents too.
    if t0_perturbed:
        g_t0 = -tree_dot(a_y, rate(t0, y0), time_dtype)
    else:
        g_t0 = jnp.zeros((), time_dtype)
    g_t1 = jnp.zeros((), time_dtype)
    g_subs = []
    for sub, p in zip(subs, pulled, strict=True):
        if sub.t0:
            g_t0 = g_t0 + p.g_t[0]
        if sub.t1:
            g_t1 = g_t1 + p.g_t[-1]
        if p.g_args is not None:
            a_args = jtu.tree_map(jnp.add, a_args, p.g_args)
        g_sub = jtu.tree_map(lambda _: None, sub)
        if sub.ts is not None:
            offset = int(sub.t0)
            g_ts = p.g_t[offset : offset + sub.ts.shape[0]]
            g_sub = eqx.tree_at(
                lambda s: s.ts, g_sub, _like(g_ts, sub.ts), is_leaf=_is_none
            )
        if p.g_fn is not None:
            g_sub = eqx.tree_at(lambda s: s.fn, g_sub, p.g_fn, is_leaf=_is_none)
        g_subs.append(g_sub)
    if grad_obj.t0 is not None:
        g_t0 = g_t0 + grad_obj.t0
    if grad_obj.t1 is not None:
        g_t1 = g_t1 + grad_obj.t1
    g_saveat = jtu.tree_map(lambda _: None, saveat)
    if subs:
        g_saveat = eqx.tree_at(
            lambda s: s.subs, g_saveat, structure.unflatten(g_subs), is_leaf=_is_none
        )
    return dict(
        y0=a_y,
        args=a_args,
        terms=a_terms,
        t0=_like(g_t0, t0),
        t1=_like(g_t1, t1),
        saveat=g_saveat,
    )


def _any(perturbed) -> bool:
    """Whether any leaf of a `perturbed` PyTree of booleans is true."""
    return any(jtu.tree_leaves(perturbed))


def _is_none(x):
    return x is None


def _like(g, x):
    """The gradient `g` in the dtype and shape of the value `x`."""
    return jnp.asarray(g, jnp.result_type(x)).reshape(jnp.shape(x))
