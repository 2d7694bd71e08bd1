"""The saved outputs of a solve differentiated by `BacksolveAdjoint`.

A solve saves outputs `o = fn(t, y(t), args)` at the times of one or more
`SubSaveAt`s. For the continuous adjoint each saved output is a point where the loss
reads the state: its cotangent `c` is pulled back through `fn` (a vector-Jacobian
product) into

- `a_y += c ∂fn/∂y`, added to the adjoint of the state as the backward solve passes
  the output's time;
- `dL/dargs += c ∂fn/∂args` and `dL/dfn += c ∂fn/∂(fn's parameters)`, at once;
- `dL/dt = c ∂fn/∂t + (c ∂fn/∂y) · dy/dt`, the derivative with respect to the save
  time (a `SaveAt(ts=...)` entry, `t0` or `t1`).

The save times of all outputs are merged into one sequence, so that the backward
solve stops at each of them once, in order.
"""

from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._saveat import is_subsaveat, save_y


def subs_of(saveat) -> tuple[list, Any]:
    """The `SubSaveAt`s of `saveat` as a list, and the PyTree structure that the
    solution's `ts` and `ys` share with `saveat.subs`."""
    structure = jtu.tree_structure(saveat.subs, is_leaf=is_subsaveat)
    return jtu.tree_leaves(saveat.subs, is_leaf=is_subsaveat), structure


def _map_subs(saveat, fn):
    subs, structure = subs_of(saveat)
    if not subs:
        return saveat
    new_subs = structure.unflatten([fn(sub) for sub in subs])
    return eqx.tree_at(lambda s: s.subs, saveat, new_subs)


def convert_save_fns(saveat, t0, y0, args):
    """Makes the values that each `SubSaveAt.fn` closes over explicit leaves, so that
    the derivative rule can return gradients for them."""

    def convert(sub):
        if sub.fn is save_y:
            return sub
        fn = eqx.filter_closure_convert(sub.fn, t0, y0, args)
        return eqx.tree_at(lambda s: s.fn, sub, fn)

    return _map_subs(saveat, convert)


class _WithState(eqx.Module):
    """A save function that also saves the state it was given."""

    fn: Any

    def __call__(self, t, y, args):
        return self.fn(t, y, args), y


def saving_states(saveat):
    """`saveat` with each non-default `fn` also saving the state: the backward solve
    restarts from the state at every save time."""

    def wrap(sub):
        if sub.fn is save_y:
            return sub
        return eqx.tree_at(lambda s: s.fn, sub, _WithState(sub.fn))

    return _map_subs(saveat, wrap)


def split_states(saveat, sol):
    """The solution of a `saving_states(saveat)` solve as `saveat` would have given
    it, and the states at the save times (one PyTree per `SubSaveAt`)."""
    subs, structure = subs_of(saveat)
    if not subs:
        return sol, []
    outputs, states = [], []
    for sub, ys in zip(subs, structure.flatten_up_to(sol.ys), strict=True):
        out, y = (ys, ys) if sub.fn is save_y else ys
        outputs.append(out)
        states.append(y)
    sol = eqx.tree_at(lambda s: s.ys, sol, structure.unflatten(outputs))
    return sol, states


def tree_dot(a, b, dtype):
    """`Σ a·b` over all leaves, in `dtype` (leaves may have different dtypes)."""
    total = jnp.zeros((), dtype)
    for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b), strict=True):
        total = total + jnp.sum(x * y.astype(x.dtype)).astype(dtype)
    return total


def _zeros_like_diff(tree):
    return jtu.tree_map(jnp.zeros_like, eqx.filter(tree, eqx.is_inexact_array))


def _add(a, b):
    return jtu.tree_map(jnp.add, a, b)


class PulledBack(eqx.Module):
    """One output's cotangents pulled back through its `fn`: `a_y` (per save, to add
    to the state's adjoint), `g_t` (per save, the derivative in its time), and the
    totals `g_args` and `g_fn`."""

    a_y: Any
    g_t: Any
    g_args: Any
    g_fn: Any


def pull_back(sub, ts, states, cotangent, ct_ts, args, rate) -> PulledBack:
    """Pulls the cotangents of one output back through `sub.fn`. `rate(t, y)` is
    `dy/dt`, or None where the save times are not differentiated (their gradients
    are then left out); `ct_ts` the cotangent of the saved times themselves."""
    time_dtype = ts.dtype

    def time_gradient(t, y, a_y):
        if rate is None:
            return jnp.zeros((), time_dtype)
        return tree_dot(a_y, rate(t, y), time_dtype)

    if sub.fn is save_y:
        g_t = jax.vmap(time_gradient)(ts, states, cotangent)
        return PulledBack(a_y=cotangent, g_t=g_t + ct_ts, g_args=None, g_fn=None)

    def one(carry, x):
        g_args, g_fn = carry
        t, y, c = x

        def output(t_, y_, args_, fn_):
            return fn_(t_, y_, args_)

        _, vjp = eqx.filter_vjp(output, t, y, args, sub.fn)
        d_t, d_y, d_args, d_fn = vjp(c)
        d_t = jnp.zeros((), time_dtype) if d_t is None else d_t.astype(time_dtype)
        g_t = d_t + time_gradient(t, y, d_y)
        return (_add(g_args, d_args), _add(g_fn, d_fn)), (d_y, g_t)

    init = (_zeros_like_diff(args), _zeros_like_diff(sub.fn))
    (g_args, g_fn), (a_y, g_t) = lax.scan(one, init, (ts, states, cotangent))
    return PulledBack(a_y=a_y, g_t=g_t + ct_ts, g_args=g_args, g_fn=g_fn)


def merged_save_points(t0, t1, ts_list, states_list, a_y_list):
    """All save points of all outputs in the order of integration: `(ts, states,
    a_y)` with a leading axis over the points, or None when nothing is saved."""
    if not ts_list:
        return None
    ts = jnp.concatenate(ts_list)
    states = jtu.tree_map(lambda *xs: jnp.concatenate(xs), *states_list)
    a_y = jtu.tree_map(lambda *xs: jnp.concatenate(xs), *a_y_list)
    direction = jnp.where(t1 >= t0, 1, -1).astype(ts.dtype)
    order = jnp.argsort(ts * direction, stable=True)
    take = lambda x: jnp.take(x, order, axis=0)  # noqa: E731
    return take(ts), jtu.tree_map(take, states), jtu.tree_map(take, a_y)
