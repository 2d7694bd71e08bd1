"""Saving: filling the output buffers of each `SubSaveAt` and of dense output."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._saveat import SubSaveAt
from .._transforms import is_batched
from .state import DenseState, SaveState


def _fill(shape_dtype, size):
    dtype = shape_dtype.dtype
    fill = jnp.inf if jnp.issubdtype(dtype, jnp.inexact) else 0
    return jnp.full((size,) + shape_dtype.shape, fill, dtype=dtype)


def num_saves(sub: SubSaveAt, max_steps: int | None) -> int:
    # With `steps=True` the last step already ends at t1, so t1 is not saved twice.
    n = int(sub.t0) + int(sub.t1 and not sub.steps)
    if sub.ts is not None:
        n += sub.ts.shape[0]
    if sub.steps:
        n += max_steps
    return n


def init_save_state(sub: SubSaveAt, t0, y0, args, max_steps, direction) -> SaveState:
    """Allocates the buffers for one output and saves `t0` if asked."""
    size = num_saves(sub, max_steps)
    out_shape = eqx.filter_eval_shape(sub.fn, t0 * direction, y0, args)
    ts = jnp.full((size,), jnp.inf, dtype=jnp.result_type(t0))
    ys = jtu.tree_map(lambda s: _fill(s, size), out_shape)
    if sub.t0:
        ts = ts.at[0].set(t0)
        value = sub.fn(t0 * direction, y0, args)
        ys = jtu.tree_map(lambda buf, v: buf.at[0].set(v), ys, value)
    # Layout: [t0] [ts ...] [steps ...] [t1]; `save_index` is the next slot after the
    # `ts` block, for steps and then t1.
    save_index = jnp.asarray(ts_offset(sub) + _num_ts(sub))
    return SaveState(ts_index=jnp.asarray(0), save_index=save_index, ts=ts, ys=ys)


def ts_offset(sub: SubSaveAt) -> int:
    """The slot of the first `SubSaveAt.ts` value."""
    return int(sub.t0)


def _num_ts(sub: SubSaveAt) -> int:
    return 0 if sub.ts is None else sub.ts.shape[0]


def save_ts_in_step(
    save_state: SaveState,
    sub: SubSaveAt,
    ts_tau,
    interpolant,
    t_end,
    keep,
    args,
    direction,
    inner_while_loop,
) -> SaveState:
    """Saves every requested time in `(t_start, t_end]` from the step's interpolant,
    with a small while loop that runs once per save time inside the step. (Measured:
    masked writes outside a loop cost more than this loop, especially under `vmap`.)"""
    n = ts_tau.shape[0]

    def pending(ts_index):
        next_t = ts_tau[jnp.minimum(ts_index, n - 1)]
        return keep & (ts_index < n) & (next_t <= t_end)

    offset = ts_offset(sub)

    def cond(carry):
        return pending(carry[0])

    def body(carry):
        ts_index, ts_buf, ys_buf = carry
        tau = ts_tau[ts_index]
        value = sub.fn(tau * direction, interpolant.evaluate(tau), args)
        slot = offset + ts_index
        ts_buf = ts_buf.at[slot].set(tau)
        # `value` leads so that buffers are matched whole, not descended into.
        ys_buf = jtu.tree_map(lambda v, b: b.at[slot].set(v), value, ys_buf)
        return ts_index + 1, ts_buf, ys_buf

    carry = (save_state.ts_index, save_state.ts, save_state.ys)

    def run(carry):
        return inner_while_loop(
            cond, body, carry, max_steps=n, buffers=lambda c: (c[1], c[2])
        )

    if is_batched():
        # Under `vmap` some member usually has something to save, so a branch around
        # the loop costs more than it saves (measured: 2.4x slower for a batch of
        # 1,000); a loop with nothing to save costs one test.
        carry = run(carry)
    else:
        # A single solve saves in few of its steps: skipping the loop in the others
        # is cheaper than entering it (measured: 1.6x faster, 100 saves over 2,700
        # steps).
        carry = jax.lax.cond(pending(save_state.ts_index), run, lambda c: c, carry)
    ts_index, ts_buf, ys_buf = carry
    return SaveState(
        ts_index=ts_index, save_index=save_state.save_index, ts=ts_buf, ys=ys_buf
    )


def save_step(save_state: SaveState, sub: SubSaveAt, t, y, keep, args, direction):
    """Saves the state after an accepted step (`SubSaveAt(steps=True)`)."""
    index = save_state.save_index
    value = sub.fn(t * direction, y, args)
    ts = save_state.ts.at[index].set(t, pred=keep)
    ys = jtu.tree_map(lambda v, b: b.at[index].set(v, pred=keep), value, save_state.ys)
    return SaveState(
        ts_index=save_state.ts_index,
        save_index=index + jnp.where(keep, 1, 0),
        ts=ts,
        ys=ys,
    )


def init_dense_state(t0, dense_info_shape, max_steps) -> DenseState:
    ts = jnp.full((max_steps + 1,), jnp.inf, dtype=jnp.result_type(t0)).at[0].set(t0)
    infos = jtu.tree_map(lambda s: _fill(s, max_steps), dense_info_shape)
    return DenseState(save_index=jnp.asarray(0), ts=ts, infos=infos)


def save_dense(dense_state: DenseState, t_end, dense_info, keep) -> DenseState:
    index = dense_state.save_index
    ts = dense_state.ts.at[index + 1].set(t_end, pred=keep)
    infos = jtu.tree_map(
        lambda v, b: b.at[index].set(v, pred=keep), dense_info, dense_state.infos
    )
    return DenseState(save_index=index + jnp.where(keep, 1, 0), ts=ts, infos=infos)


def save_final_step(
    save_state: SaveState,
    sub: SubSaveAt,
    ts_tau,
    interpolant,
    t_end,
    y_end,
    pred,
    args,
    direction,
) -> SaveState:
    """After the loop, saves what falls in a last step that ended early (at a
    terminating event): save times up to `t_end`, from the step's interpolant, and
    the step itself for `steps=True`. A no-op where `pred` is false."""
    ts, ys = save_state.ts, save_state.ys
    ts_index, index = save_state.ts_index, save_state.save_index
    if ts_tau is not None:
        n = ts_tau.shape[0]
        positions = jnp.arange(n)
        pending = (positions >= ts_index) & (ts_tau <= t_end) & pred
        values = jax.vmap(
            lambda tau: sub.fn(tau * direction, interpolant.evaluate(tau), args)
        )(ts_tau)
        slots = jnp.where(pending, ts_offset(sub) + positions, ts.shape[0])
        ts = ts.at[slots].set(ts_tau, mode="drop")
        ys = jtu.tree_map(lambda b, v: b.at[slots].set(v, mode="drop"), ys, values)
        ts_index = ts_index + jnp.sum(pending)
    if sub.steps:
        value = sub.fn(t_end * direction, y_end, args)
        slot = jnp.where(pred, index, ts.shape[0])
        ts = ts.at[slot].set(t_end, mode="drop")
        ys = jtu.tree_map(lambda b, v: b.at[slot].set(v, mode="drop"), ys, value)
        index = index + jnp.where(pred, 1, 0)
    return SaveState(ts_index=ts_index, save_index=index, ts=ts, ys=ys)


def finish_save_state(
    save_state: SaveState,
    sub: SubSaveAt,
    ts_tau,
    t_final,
    y_final,
    okay,
    args,
    direction,
):
    """After the loop: saves `t1`, fills save times equal to the final time that no
    step covered (a zero-length solve), and converts times back to `t`."""
    ts, ys = save_state.ts, save_state.ys
    index = save_state.save_index
    if ts_tau is not None:
        # Only a solve that took no step can leave save times at the final time.
        n = ts_tau.shape[0]
        positions = jnp.arange(n)
        pending = (positions >= save_state.ts_index) & (ts_tau <= t_final) & okay
        slots = ts_offset(sub) + positions
        value = sub.fn(t_final * direction, y_final, args)
        safe_slots = jnp.where(pending, slots, ts.shape[0])
        ts = ts.at[safe_slots].set(jnp.broadcast_to(t_final, (n,)), mode="drop")
        ys = jtu.tree_map(
            lambda b, v: b.at[safe_slots].set(
                jnp.broadcast_to(v, (n,) + v.shape), mode="drop"
            ),
            ys,
            value,
        )
    if sub.t1 and not sub.steps:
        value = sub.fn(t_final * direction, y_final, args)
        slot = jnp.minimum(index, ts.shape[0] - 1)
        ts = ts.at[slot].set(jnp.where(okay, t_final, ts[slot]))
        ys = jtu.tree_map(
            lambda b, v: b.at[slot].set(jnp.where(okay, v, b[slot])), ys, value
        )
    # Times back to the user's direction; unfilled slots stay +inf.
    ts = jnp.where(jnp.isfinite(ts), ts * direction, ts)
    return ts, ys
