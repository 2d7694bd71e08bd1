"""Saving: filling the output buffers of each `SubSaveAt` and of dense output.

Each output is one buffer filled in time order through a single write index, as
Diffrax does: `t0` (if asked), then the `ts` and the step ends merged in the order in
which the solve reaches them, then `t1`. Unused slots stay `inf`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._adjoint.base import while_loop_of_kind
from .._saveat import SubSaveAt
from .._transforms import is_batched
from .state import DenseState, SaveState


def fill_like(shape_dtype, size):
    """A buffer of `size` copies of `shape_dtype`'s shape, filled with `inf` (`0` for
    non-floating dtypes): the value of every slot that is never written."""
    dtype = shape_dtype.dtype
    fill = jnp.inf if jnp.issubdtype(dtype, jnp.inexact) else 0
    return jnp.full((size,) + shape_dtype.shape, fill, dtype=dtype)


def step_stride(sub: SubSaveAt) -> int:
    """Every how many accepted steps `sub` saves: 0 for never, 1 for `steps=True`,
    `n` for `steps=n`."""
    return int(sub.steps)


def num_saves(sub: SubSaveAt, max_steps: int | None) -> int:
    """The length of the output buffers of `sub`."""
    n = int(sub.t0)
    if sub.ts is not None:
        n += sub.ts.shape[0]
    stride = step_stride(sub)
    if stride:
        # With `t1=True`, `t1` is saved only when the last step was not itself saved,
        # so it needs a slot of its own only when `max_steps` is not a multiple.
        n += -(-max_steps // stride) if sub.t1 else max_steps // stride
    elif sub.t1:
        n += 1
    return n


def _set(buffer, slot, value, pred):
    if pred is True:
        return buffer.at[slot].set(value)
    if isinstance(buffer, jax.Array):
        # A plain array (outside a loop): a write to an out-of-range slot is dropped.
        return buffer.at[jnp.where(pred, slot, buffer.shape[0])].set(value, mode="drop")
    # A loop's write-once buffer, which takes the predicate itself.
    return buffer.at[slot].set(value, pred=pred)


def _write(save_state: SaveState, slot, t, value, pred) -> SaveState:
    """Writes `(t, value)` into `slot` where `pred`, and advances the write index."""
    ts = _set(save_state.ts, slot, t, pred)
    # `value` leads so that buffers are matched whole, not descended into.
    ys = jtu.tree_map(lambda v, b: _set(b, slot, v, pred), value, save_state.ys)
    return SaveState(
        ts_index=save_state.ts_index,
        save_index=save_state.save_index + jnp.where(pred, 1, 0),
        ts=ts,
        ys=ys,
    )


def init_save_state(sub: SubSaveAt, t0, y0, args, max_steps, direction) -> SaveState:
    """Allocates the buffers for one output and saves `t0` if asked."""
    size = num_saves(sub, max_steps)
    out_shape = eqx.filter_eval_shape(sub.fn, t0 * direction, y0, args)
    state = SaveState(
        ts_index=jnp.asarray(0),
        save_index=jnp.asarray(0),
        ts=jnp.full((size,), jnp.inf, dtype=jnp.result_type(t0)),
        ys=jtu.tree_map(lambda s: fill_like(s, size), out_shape),
    )
    if sub.t0:
        state = _write(state, 0, t0, sub.fn(t0 * direction, y0, args), True)
    return state


def save_pending_ts(
    save_state: SaveState,
    sub: SubSaveAt,
    ts_tau,
    t_end,
    state_at,
    pred,
    args,
    direction,
    while_loop,
) -> SaveState:
    """Saves every requested time not yet saved and at most `t_end`, in order, with
    the state `state_at(tau)` (a step's interpolant, or a constant state). A no-op
    where `pred` is false. A small while loop runs once per time saved. (Measured:
    masked writes of every time outside a loop cost more, especially under `vmap`.)"""
    n = ts_tau.shape[0]

    def pending(ts_index):
        next_t = ts_tau[jnp.minimum(ts_index, n - 1)]
        return pred & (ts_index < n) & (next_t <= t_end)

    def body(state):
        tau = ts_tau[state.ts_index]
        state = _write(
            state,
            state.save_index,
            tau,
            sub.fn(tau * direction, state_at(tau), args),
            True,
        )
        return eqx.tree_at(lambda s: s.ts_index, state, state.ts_index + 1)

    def run(state):
        return while_loop(
            lambda s: pending(s.ts_index),
            body,
            state,
            max_steps=n,
            buffers=lambda s: (s.ts, s.ys),
        )

    if is_batched():
        # Under `vmap` some member usually has something to save, so a branch around
        # the loop costs more than it saves (measured: 2.4x slower for a batch of
        # 1,000); a loop with nothing to save costs one test.
        return run(save_state)
    # A single solve saves in few of its steps: skipping the loop in the others is
    # cheaper than entering it (measured: 1.6x faster, 100 saves over 2,700 steps).
    return jax.lax.cond(pending(save_state.ts_index), run, lambda s: s, save_state)


def save_step(
    save_state: SaveState, sub: SubSaveAt, t, y, keep, num_accepted, args, direction
) -> SaveState:
    """Saves the state after an accepted step, if it is one that `sub.steps` asks
    for. `num_accepted` counts the accepted steps before this one."""
    stride = step_stride(sub)
    pred = keep
    if stride > 1:
        pred = pred & ((num_accepted + 1) % stride == 0)
    value = sub.fn(t * direction, y, args)
    return _write(save_state, save_state.save_index, t, value, pred)


def save_in_step(
    save_state: SaveState,
    sub: SubSaveAt,
    ts_tau,
    interpolant,
    t_end,
    y_end,
    keep,
    num_accepted,
    args,
    direction,
    while_loop,
) -> SaveState:
    """Everything one accepted step `[., t_end]` saves into `sub`: the requested times
    inside it, then (for `steps`) its end."""
    if ts_tau is not None:
        save_state = save_pending_ts(
            save_state,
            sub,
            ts_tau,
            t_end,
            interpolant.evaluate,
            keep,
            args,
            direction,
            while_loop,
        )
    if sub.steps:
        save_state = save_step(
            save_state, sub, t_end, y_end, keep, num_accepted, args, direction
        )
    return save_state


def after_loop_while_loop():
    """The while loop for saves made after the solve loop (at a terminating event,
    or at the end of a solve that took no step): bounded, so that it is
    differentiable in both modes."""
    return while_loop_of_kind("bounded")


def _save_ts_at_start(
    save_state: SaveState, sub, ts_tau, t_final, y_final, no_step, args, direction
) -> SaveState:
    """After a solve that accepted no step, and so ends where it started: the
    requested times still pending are those equal to that time (times lie in
    `[t0, t1]`), and all get its one state. A masked fill of the buffers rather than
    a loop, which would be compiled into every program for this edge case."""
    index = jnp.arange(ts_tau.shape[0])
    pending = no_step & (index >= save_state.ts_index) & (ts_tau <= t_final)
    count = jnp.sum(pending).astype(save_state.save_index.dtype)
    slots = jnp.arange(save_state.ts.shape[0])
    fill = (slots >= save_state.save_index) & (slots < save_state.save_index + count)
    value = sub.fn(t_final * direction, y_final, args)

    def _fill(v, buffer):
        mask = fill.reshape(fill.shape + (1,) * jnp.ndim(v))
        return jnp.where(mask, jnp.asarray(v, buffer.dtype), buffer)

    return SaveState(
        ts_index=save_state.ts_index + count,
        save_index=save_state.save_index + count,
        ts=jnp.where(fill, t_final, save_state.ts),
        ys=jtu.tree_map(_fill, value, save_state.ys),
    )


def finish_save_state(
    save_state: SaveState,
    sub: SubSaveAt,
    ts_tau,
    t_final,
    y_final,
    num_accepted,
    args,
    direction,
):
    """After the loop: fills save times equal to the final time that no step covered
    (a solve that took no step), saves `t1`, and converts times back to `t`.

    `t1` is saved unless the last step was already saved through `steps`; a solve
    that stopped early (`throw=False`) saves where it stopped, so that the failure
    can be inspected."""
    if ts_tau is not None:
        save_state = _save_ts_at_start(
            save_state,
            sub,
            ts_tau,
            t_final,
            y_final,
            num_accepted == 0,
            args,
            direction,
        )
    if sub.t1:
        stride = step_stride(sub)
        pred = True if not stride else num_accepted % stride != 0
        slot = jnp.minimum(save_state.save_index, save_state.ts.shape[0] - 1)
        save_state = _write(
            save_state, slot, t_final, sub.fn(t_final * direction, y_final, args), pred
        )
    ts = save_state.ts
    # Times back to the user's direction; unfilled slots stay +inf.
    ts = jnp.where(jnp.isfinite(ts), ts * direction, ts)
    return ts, save_state.ys


def init_dense_state(t0, dense_info_shape, max_steps) -> DenseState:
    ts = jnp.full((max_steps + 1,), jnp.inf, dtype=jnp.result_type(t0)).at[0].set(t0)
    infos = jtu.tree_map(lambda s: fill_like(s, max_steps), dense_info_shape)
    return DenseState(save_index=jnp.asarray(0), ts=ts, infos=infos)


def save_dense(dense_state: DenseState, t_end, dense_info, keep) -> DenseState:
    index = dense_state.save_index
    ts = dense_state.ts.at[index + 1].set(t_end, pred=keep)
    infos = jtu.tree_map(
        lambda v, b: b.at[index].set(v, pred=keep), dense_info, dense_state.infos
    )
    return DenseState(save_index=index + jnp.where(keep, 1, 0), ts=ts, infos=infos)
