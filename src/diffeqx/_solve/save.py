"""Saving: filling the output buffers of each `SubSaveAt` and of dense output.

Each output is one buffer filled in time order through a single write index, as
Diffrax does: `t0` (if asked), then the `ts` and the step ends merged in the order in
which the solve reaches them, then `t1`. Unused slots stay `inf`.

Requested times (`ts`) are saved in one of two ways. In the loop, each step
interpolates the times it covers in a small inner loop. Deferred (`defer_ts`), each
step that covers a requested time only records its interpolation data, and all the
times are interpolated at once after the loop. Under reverse mode the second keeps
the inner loop and its checkpointing out of the differentiated step, which makes the
program smaller; it stores one step's interpolation data per requested time, so it
is used only when that fits a memory budget.
"""

import math

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._adjoint.base import while_loop_of_kind
from .._saveat import SubSaveAt
from .._transforms import differentiation_levels, is_batched
from .state import DeferredSaves, DenseState, SaveState

# The most memory that deferred saving may take for the interpolation data of one
# output, per solve (per batch member under `vmap`). 16 MiB, as the fixed-step path's
# storage (see `_adjoint/checkpoint.py`): measured on CPU, the gradient of a solve of
# a 10,000-element state saved at 40 times (22 MB of interpolation data) ran in
# 55 ms deferred (94 MB of temporary memory) and in 36-39 ms saving in the steps.
DEFER_BUDGET_BYTES = 2**24
DEFER_BUDGET_BYTES_BATCHED = 2**20


def fill_value(dtype):
    """The value of every slot of a save buffer that is never written: `inf` (`0`
    for non-floating dtypes)."""
    return jnp.asarray(jnp.inf if jnp.issubdtype(dtype, jnp.inexact) else 0, dtype)


def fill_like(shape_dtype, size):
    """A buffer of `size` copies of `shape_dtype`'s shape, filled with
    `fill_value`."""
    dtype = shape_dtype.dtype
    return jnp.full((size,) + shape_dtype.shape, fill_value(dtype), dtype=dtype)


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
        deferred=save_state.deferred,
        deferred_count=save_state.deferred_count,
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


def _deferred_slots(sub: SubSaveAt, max_steps: int | None) -> int:
    """How many steps can cover a requested time: each such step covers at least
    one, and there are at most `max_steps` steps."""
    n = sub.ts.shape[0]
    return n if max_steps is None else min(n, max_steps)


def may_defer(subs) -> bool:
    """Whether any of `subs` might be deferred (`defer_ts`), before the size of the
    interpolation data is known."""
    if not any(sub.ts is not None and not sub.steps for sub in subs):
        return False
    return "reverse" in differentiation_levels()


def defer_ts(sub: SubSaveAt, max_steps: int | None, dense_info_shape) -> bool:
    """Whether `sub`'s requested times are interpolated after the loop: in a solve
    traced for reverse-mode differentiation, when it saves at requested times but
    not at steps (whose saves interleave with them), and its interpolation data fit
    the budget.

    Only under reverse mode: there the inner loop it replaces is checkpointed too,
    and deferring makes the program smaller and faster (measured: the gradient of
    the neural-ODE benchmark compiles in 0.8x the time). Without it the inner loop
    is cheap, and the interpolation after the loop costs more compile time than it
    saves."""
    if sub.ts is None or sub.steps or sub.ts.shape[0] == 0:
        return False
    if "reverse" not in differentiation_levels():
        return False
    if dense_info_shape is None:
        return False
    per_step = sum(
        math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        for leaf in jtu.tree_leaves(dense_info_shape)
    )
    budget = DEFER_BUDGET_BYTES_BATCHED if is_batched() else DEFER_BUDGET_BYTES
    return _deferred_slots(sub, max_steps) * per_step <= budget


def init_deferred(sub: SubSaveAt, tau0, dense_info_shape, max_steps) -> DeferredSaves:
    size = _deferred_slots(sub, max_steps)
    n = sub.ts.shape[0]
    return DeferredSaves(
        tprev=jnp.zeros((size,), dtype=jnp.result_type(tau0)),
        tnext=jnp.ones((size,), dtype=jnp.result_type(tau0)),
        first=jnp.full((size,), n, dtype=jnp.asarray(0).dtype),
        infos=jtu.tree_map(
            lambda s: jnp.zeros((size,) + s.shape, s.dtype), dense_info_shape
        ),
    )


def _count_at_most(sorted_ts, t):
    """How many of `sorted_ts` (ascending) are at most `t`: none for a NaN `t`.
    Compares all of them when they are few (one fused reduction), else a binary
    search unrolled over the bits of their number."""
    n = sorted_ts.shape[0]
    if n <= 128:
        return jnp.sum(sorted_ts <= t)
    lo, hi = jnp.asarray(0), jnp.asarray(n)
    for _ in range(n.bit_length()):
        mid = (lo + hi) // 2
        right = (sorted_ts[jnp.minimum(mid, n - 1)] <= t) & (lo < hi)
        lo = jnp.where(right, mid + 1, lo)
        hi = jnp.where(right | (lo >= hi), hi, mid)
    return lo


def record_ts_step(
    save_state: SaveState, ts_tau, tprev, tnext, t_end, dense_info, pred
) -> SaveState:
    """Deferred saving: records the step `[tprev, tnext]` if it covers requested
    times not yet saved and at most `t_end` (and `pred`), and advances past them."""
    deferred = save_state.deferred
    index = save_state.ts_index
    reached = _count_at_most(ts_tau, t_end).astype(index.dtype)
    covers = pred & (reached > index)
    slot = save_state.deferred_count

    def record(deferred, pred):
        def put(buffer, value):
            return _set(buffer, slot, value, pred)

        return DeferredSaves(
            tprev=put(deferred.tprev, tprev),
            tnext=put(deferred.tnext, tnext),
            first=put(deferred.first, index),
            infos=jtu.tree_map(lambda v, b: put(b, v), dense_info, deferred.infos),
        )

    if is_batched():
        recorded = record(deferred, covers)
    else:
        recorded = jax.lax.cond(
            covers, lambda d: record(d, True), lambda d: d, deferred
        )
    new_index = jnp.where(covers, reached, index)
    return SaveState(
        ts_index=new_index,
        save_index=save_state.save_index + (new_index - index),
        ts=save_state.ts,
        ys=save_state.ys,
        deferred=recorded,
        deferred_count=slot + jnp.where(covers, 1, 0),
    )


def interpolate_deferred(
    save_state: SaveState, sub: SubSaveAt, ts_tau, interpolation_cls, args, direction
) -> SaveState:
    """After the loop: the outputs at every requested time a recorded step covers,
    interpolated on that step, all at once."""
    deferred = save_state.deferred
    if deferred is None:
        return save_state
    n = ts_tau.shape[0]
    offset = int(sub.t0)
    index = jnp.arange(n, dtype=deferred.first.dtype)
    # The recorded step of each time: the last one whose first time is at most it.
    # (Used slots hold distinct increasing indices; unused ones `n`, dropped.)
    starts = jnp.zeros((n,), index.dtype).at[deferred.first].add(1, mode="drop")
    slot = jnp.clip(jnp.cumsum(starts) - 1, 0, deferred.first.shape[0] - 1)
    saved = index < save_state.ts_index

    def take(buffer):
        return buffer.at[slot].get(mode="promise_in_bounds")

    def output(tprev, tnext, info, tau):
        interpolant = interpolation_cls(t0=tprev, t1=tnext, **info)
        return sub.fn(tau * direction, interpolant.evaluate(tau), args)

    def evaluate():
        tprev = take(deferred.tprev)
        # Times not reached are evaluated (then discarded) at the start of a
        # recorded step, a state the solve did reach, so that `fn` and its
        # derivative stay finite there and add nothing to the gradients.
        taus = jnp.where(saved, ts_tau, tprev)
        values = jax.vmap(output)(
            tprev, take(deferred.tnext), jtu.tree_map(take, deferred.infos), taus
        )
        return jtu.tree_map(lambda v, b: v.astype(b.dtype), values, save_state.ys)

    # With no step recorded nothing was saved, and the buffers hold no state at all.
    values = jax.lax.cond(
        save_state.deferred_count > 0,
        evaluate,
        lambda: jtu.tree_map(lambda b: b[offset : offset + n], save_state.ys),
    )

    def place(value, buffer):
        mask = saved.reshape(saved.shape + (1,) * (value.ndim - 1))
        value = jnp.where(mask, value.astype(buffer.dtype), buffer[offset : offset + n])
        return buffer.at[offset : offset + n].set(value)

    ts = place(jnp.where(saved, ts_tau, jnp.inf), save_state.ts)
    ys = jtu.tree_map(place, values, save_state.ys)
    return SaveState(
        ts_index=save_state.ts_index,
        save_index=save_state.save_index,
        ts=ts,
        ys=ys,
    )


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
    batched = is_batched()

    def pending(ts_index):
        next_t = ts_tau[jnp.minimum(ts_index, n - 1)]
        return pred & (ts_index < n) & (next_t <= t_end)

    def body(state):
        # Under `vmap` the loop runs while some member has a time to save, and each
        # member saves only its own (see `cond`).
        write = pending(state.ts_index) if batched else True
        tau = ts_tau[state.ts_index]  # clamped by JAX where a member is done
        state = _write(
            state,
            state.save_index,
            tau,
            sub.fn(tau * direction, state_at(tau), args),
            write,
        )
        step = jnp.where(write, 1, 0) if batched else 1
        return eqx.tree_at(lambda s: s.ts_index, state, state.ts_index + step)

    def cond(state):
        going = pending(state.ts_index)
        # Reduced over the batch, the loop's predicate is not mapped, and JAX batches
        # the loop's body twice rather than three times (see `_hold_finished` in
        # loop.py); the body masks the members that have nothing to save.
        return eqxi.unvmap_any(going) if batched else going

    def run(state):
        return while_loop(
            cond,
            body,
            state,
            max_steps=n,
            buffers=lambda s: (s.ts, s.ys),
        )

    if batched:
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
    save_state: SaveState,
    sub,
    ts_tau,
    t_final,
    y_final,
    no_step,
    args,
    direction,
    with_indices: bool,
) -> SaveState:
    """After a solve that accepted no step, and so ends where it started: the
    requested times still pending are those equal to that time (times lie in
    `[t0, t1]`), and all get its one state. A masked fill of the buffers rather than
    a loop, which would be compiled into every program for this edge case. The
    indices `ts_index` and `save_index` are moved past the filled slots only with
    `with_indices` (else they are returned as they were)."""
    # The pending times are the next ones, from `ts_index`, and go to the next slots,
    # from `save_index`: slot `j` holds time `j - save_index + ts_index`. Each slot's
    # test is then elementwise (no count of the pending times, a reduction and so
    # separate kernels, unless the indices are used after this).
    num_ts, num_slots = ts_tau.shape[0], save_state.ts.shape[0]
    slots = jnp.arange(num_slots, dtype=save_state.save_index.dtype)
    if sub.t0 or sub.steps:
        index = slots - save_state.save_index + save_state.ts_index
        times = ts_tau[jnp.clip(index, 0, num_ts - 1)]
        in_range = index < num_ts
    else:
        # Only the requested times (and `t1` after them) are saved: slot `j` holds
        # time `j`.
        times = jnp.pad(ts_tau, (0, num_slots - num_ts), constant_values=jnp.inf)
        in_range = slots >= save_state.ts_index
    fill = no_step & (slots >= save_state.save_index) & in_range & (times <= t_final)
    value = sub.fn(t_final * direction, y_final, args)

    def _fill(v, buffer):
        mask = fill.reshape(fill.shape + (1,) * jnp.ndim(v))
        return jnp.where(mask, jnp.asarray(v, buffer.dtype), buffer)

    ts_index, save_index = save_state.ts_index, save_state.save_index
    if with_indices:
        count = jnp.sum(fill).astype(save_index.dtype)
        ts_index, save_index = ts_index + count, save_index + count
    return SaveState(
        ts_index=ts_index,
        save_index=save_index,
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
    okay=True,
):
    """After the loop: fills save times equal to the final time that no step covered
    (a solve that took no step and did not fail: `okay`, as Diffrax, which fills
    them for `t0 == t1` and leaves them unfilled after a failed first step), saves
    `t1`, and converts times back to `t`.

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
            (num_accepted == 0) & okay,
            args,
            direction,
            with_indices=sub.t1,
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
