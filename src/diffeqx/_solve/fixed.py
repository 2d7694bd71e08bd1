"""The fixed-step fast path: constant steps whose times are known at trace time run
as a fixed-length scan instead of a while loop.

Each iteration is the while loop's step with the while loop's own decision after
it (`take_step`, then `_adapt`; for a failed step, the decision for a kept one and
the failure's result code), taken while the while loop's condition holds, so the
result is the while loop's: the same steps, the same end exactly at `t1`, the same
result code and counts for a solve that stalls or becomes non-finite (tested).
What the scan carries is lean: the solution, the solver's state, where the loop is
(the next step's interval and the controller's state; under `jax.vmap` once for all
members, and per member where it stopped) and one status integer that counts the
steps taken and says why the loop stopped. The counters, result code and
other fields of the loop's state are assembled from these once, after the steps
(on CPU each scalar a loop carries, and each small operation on it, can cost a
kernel launch per iteration). The scan also has a static trip count (the last
block is padded with steps past the end, which are skipped), and, for reverse
mode, checkpoints by blocks instead of the recursive scheme.

When the steps ask a Brownian path for their increments, the increments of a block
of steps are computed before the block, from the steps' times computed at once by
the loop's own arithmetic (`_times`; see `tabulate.py`)."""

import dataclasses
import math
from typing import NamedTuple

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.extend.core import jaxpr_as_fun

from .._adjoint.base import weak_type_as
from .._controller.constant import ConstantStepSize, constant_step_count
from .._profile import aval_bytes, residual_bytes
from .._solution import RESULTS, succeeded, where_result
from .._transforms import (
    batch_size,
    differentiated_one_step_at_a_time,
    differentiation_levels,
    hashable_statics,
    is_batched,
    mapped_from_start,
)
from . import checks
from .loop import (
    LoopSpec,
    _adapt,
    all_finite,
    finish_loop,
    take_step,
    tree_where,
)
from .save import _count_at_most, fill_like, fill_value
from .state import LoopState, SaveState
from .tabulate import answering, block_samples, prepare, tabulation

# When reverse mode does not ask for blocks, steps with Brownian samples to compute
# ahead still run in blocks, whose samples hold at most `_BLOCK_NUMBERS` numbers
# (times the batch size under `vmap`), with at least `_MIN_BLOCK_STEPS` steps.
_BLOCK_NUMBERS = 2**17
_MIN_BLOCK_STEPS = 64


def fixed_step_plan(
    controller, saveat, subs, adjoint, t0, t1, dt0, max_steps, dtype, resumed,
    writes=None,
):  # fmt: skip
    """`(num_steps, block, storage, writes)` when the solve can run as a
    fixed-length scan: constant steps from a fresh controller, times known at trace
    time, outputs at `t0`, `t1` and requested times known at trace time (not at
    every step), and an adjoint that allows it (`AbstractAdjoint.fixed_step_block`,
    and `fixed_step_storage` for blocks). `writes` gives, per output, how many
    requested times a step may have to save and how (`Writes`, see
    `requested_writes`; given as `writes` when the requested times are no longer
    known here). Otherwise None."""
    if type(controller) is not ConstantStepSize or saveat.dense or resumed:
        return None
    if any(sub.steps for sub in subs):
        return None
    concrete = [checks.concrete(x) for x in (t0, t1, dt0)]
    if any(x is None for x in concrete):
        return None
    t0_c, t1_c, dt0_c = concrete
    direction = 1 if t1_c >= t0_c else -1
    if dt0_c * direction <= 0 and t1_c != t0_c:
        return None  # reported through the result code by the general path
    num_steps = _constant_step_count(
        direction * t0_c, direction * t1_c, direction * dt0_c, dtype, max_steps
    )
    if num_steps is None:
        return None
    if writes is None:
        writes = requested_writes(subs, t0_c, t1_c, dt0_c, num_steps)
    if writes is None:
        return None
    writes, shift, at_start = writes
    if any(count is not None for count in writes):
        reverse = "reverse" in differentiation_levels(strict=True)
        if not reverse and not is_batched():
            # A single solve without reverse mode saves as fast in the while loop,
            # which skips its inner loop in the steps that save nothing (measured:
            # 10,000 Euler steps with 50 saves, 5.5 ms against 6.5 ms in the scan).
            return None
    block = adjoint.fixed_step_block(num_steps)
    if block is None:
        return None
    storage = adjoint.fixed_step_storage() if block > 0 else 0
    return num_steps, block, storage, Writes(tuple(writes), shift, at_start)


# A step of the scan writes the requested times it covers with this many writes
# at most (one block); requested times more numerous than that per step, or
# not known at trace time, are saved by a loop in each step (`_LOOP`), which takes
# as many iterations as the step has times (outside reverse mode; under it the
# while loop with its deferred saves).
_MAX_WRITES = 4
_LOOP = -1
# Under reverse mode the requested times are interpolated after the scan, from every
# step's interpolation data, which the scan outputs (`_EMIT`), when that takes at
# most `_EMIT_BYTES` (counted for the whole `vmap` batch). Otherwise the blocks of
# writes for times known at trace time, and the while loop for the others (a loop
# in each step is not reverse-differentiable).
_EMIT = -2
_EMIT_BYTES = 2**24


class Writes(NamedTuple):
    """What the scan's steps write of the requested times: per output the most
    times a step may save (`counts`, see `requested_writes`), and how far past
    the end of a step (in forward time) a time is still saved by it (`shift`).

    The shift is for times on the steps' grid, the usual request (`ts` every
    step, or every few): a time computed as a step's end may round to just past
    the end the loop computes, and counted with a margin every such time could
    fall to either of two steps, so every step would write two times. Saved by
    the step whose end is at most `shift` before it, each falls to one step, far
    from the edges of the margin. A time within `shift` past a step's end is
    then interpolated on that step, just beyond its end, where the while loop
    (and Diffrax) interpolate on the next step, just after its start: both
    approximate the solution there to the interpolation's accuracy, and differ
    by far less (`shift` is 128 units in the last place of the times). Blocks of
    writes only: the loop in each step (`_LOOP`) and the interpolation after
    the scan (`_EMIT`) save as the while loop does."""

    counts: tuple
    shift: float
    # Per output, how many of its times are `t0` itself (None without times):
    # saved before the first step, from `y0`, so that the first step, which
    # would save them with its own end, writes no more times than the others.
    at_start: tuple = ()


def _resolution(subs, t0, t1, dt0) -> float:
    """The spacing of representable times near the solve's times: `eps` of the
    coarsest of the given times' dtypes (the default floating dtype for Python
    numbers), times the largest of `|t0|`, `|t1|` and `|dt0|`."""
    dtypes = [np.dtype(jnp.result_type(float))] + [
        np.asarray(x).dtype
        for x in (t0, t1, dt0, *(sub.ts for sub in subs if sub.ts is not None))
        if not isinstance(x, (int, float, jax.core.Tracer))
    ]
    eps = max(
        float(jnp.finfo(d).eps) for d in dtypes if jnp.issubdtype(d, jnp.floating)
    )
    t0, t1, dt0 = (float(np.asarray(x)) for x in (t0, t1, dt0))
    return eps * max(abs(t0), abs(t1), abs(dt0))


def requested_writes(subs, t0, t1, dt0, num_steps=None) -> Writes:
    """Per output, the most requested times one of the constant steps from `t0` to
    `t1` may save (None for an output without requested times), from the values of
    the times; `_LOOP` where the requested times are not known, or are too many
    for one step (`_MAX_WRITES`): then a loop in each step saves them. With the
    shift past a step's end to which its writes reach (`Writes`)."""
    if all(sub.ts is None for sub in subs):
        # Nothing to write (and nothing for an eager call's key to hold but that).
        return Writes((None,) * len(subs), 0.0, (None,) * len(subs))
    # The loop's times round in their own dtype: the coarsest of the given ones
    # bounds the margin.
    resolution = _resolution(subs, t0, t1, dt0)
    if num_steps is None:
        # As the loop counts them: in the times' dtype (`promote_inputs`).
        with jax.numpy_dtype_promotion("standard"):
            dtype = jnp.result_type(
                t0, t1, dt0, *(sub.ts for sub in subs if sub.ts is not None)
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            dtype = jnp.result_type(float)
        sign = 1.0 if float(np.asarray(t1)) >= float(np.asarray(t0)) else -1.0
        num_steps = constant_step_count(
            *(sign * np.asarray(x, np.float64) for x in (t0, t1, dt0)), dtype
        )
    t0, t1, dt0 = (float(np.asarray(x)) for x in (t0, t1, dt0))
    direction = 1.0 if t1 >= t0 else -1.0
    num_steps = max(num_steps, 1)
    shift = 128 * resolution
    writes, at_start = [], []
    for sub in subs:
        ts = None
        if sub.ts is not None and not isinstance(sub.ts, jax.core.Tracer):
            ts = checks.concrete(sub.ts)
        if ts is None:
            writes.append(None if sub.ts is None else _LOOP)
            at_start.append(None)
            continue
        count, first = _writes_per_step(
            direction * ts.astype(np.float64), direction * t0, direction * t1,
            direction * dt0, num_steps, shift, 64 * resolution,
        )  # fmt: skip
        writes.append(_LOOP if count > _MAX_WRITES else count)
        at_start.append(first)
    return Writes(tuple(writes), shift, tuple(at_start))


def _writes_per_step(ts, t0, t1, dt0, num_steps, shift, margin) -> tuple:
    """`(count, first)`: the most requested times `ts` (forward time, ascending)
    that one of the `num_steps` constant steps from `t0` may save, and how many of
    them are `t0` itself (saved before the first step, see `Writes`). Counted at
    trace time from the steps' ends as exact arithmetic places them: a step saves
    the times after `shift` past the previous step's end up to `shift` past its
    own (`Writes`), each bound widened by `margin`, far beyond the rounding of the
    loop's own times (a time near a bound counts for both steps). The first step
    also saves the times just after `t0` (a time equal to `t0` here is equal to
    it in any dtype the loop's times round to; one that only rounds to it is
    saved by the first step, and counted in it)."""
    if ts.size == 0:
        return 0, 0
    first = int(np.searchsorted(ts, t0, side="right"))
    ends = _step_ends(t0, t1, dt0, num_steps, 4 * margin)
    after = np.searchsorted(ts, ends + shift + margin, side="right")
    before = np.searchsorted(ts, ends + shift - margin, side="right")
    before = np.concatenate([[first], before[:-1]])
    return int(np.max(after - before)), first


def _step_ends(t0, t1, dt0, n, near):
    """Where `ConstantStepSize`'s `n` steps from `t0` to `t1` end (forward time,
    exact arithmetic): the first after `dt0`, step `k` at `t0 + (t1 - t0) k / n`,
    the last at `t1`, and any within `near` of `t1` on it (the loop moves a step
    ending that close onto `t1`)."""
    ends = t0 + (t1 - t0) * np.arange(1, n + 1, dtype=np.float64) / n
    ends[0] = min(t0 + dt0, t1)
    ends[-1] = t1
    ends[np.abs(t1 - ends) <= near] = t1
    return ends


def _constant_step_count(t0, t1, dt0, dtype, max_steps) -> int | None:
    """An upper bound on the steps `ConstantStepSize` takes from `t0` to a finite
    `t1` (forward time); the guarded body makes any extra iterations no-ops. None
    if that is more than `max_steps`, or than the status integer can count."""
    if not np.isfinite(t1):
        return None
    num_steps = constant_step_count(t0, t1, dt0, dtype)
    if num_steps > min(10**7 if max_steps is None else max_steps, 2**31 // _TAKEN):
        return None
    return num_steps


class _Place(eqx.Module):
    """Where the loop is: the next step's interval and the controller's state."""

    tprev: jax.Array
    tnext: jax.Array
    controller_state: object

    def on(self, state: LoopState, y, solver_state) -> LoopState:
        return dataclasses.replace(
            state,
            tprev=self.tprev,
            tnext=self.tnext,
            controller_state=self.controller_state,
            y=y,
            solver_state=solver_state,
        )


# Each step carries one integer besides the solution and the loop's place: `taken *
# _TAKEN + code`, `taken` the steps taken and `code` 0 while the loop goes on, else
# why it stopped: `1 + r` after a step that was kept, `1 + r + _REJECTED` after one
# that was not, `r` the value of the result code (one scalar: on CPU each scalar a
# loop carries can cost its own kernel launch per iteration, where the loop is not
# compiled into one function).
_REJECTED = 32
_TAKEN = 2 * _REJECTED
assert len(RESULTS._name_to_item) < _REJECTED


def _repeated(tree, length: int):
    """`tree` repeated along a new leading axis, behind an optimization barrier, so
    that XLA sees an array of values rather than a broadcast scalar. Batched
    arithmetic with it is then elementwise, as the loop's scalar arithmetic is; with
    a broadcast scalar XLA may rewrite it (a division becomes a multiplication by a
    rounded reciprocal), and round the steps' times otherwise than the loop does."""
    return lax.optimization_barrier(
        jtu.tree_map(lambda x: jnp.broadcast_to(x, (length,) + jnp.shape(x)), tree)
    )


def _times(spec: LoopSpec, state: LoopState, place: _Place, length: int):
    """The intervals `(tprev, tnext)` of the next `length` steps from `place`, as the
    loop computes them while every step succeeds. `ConstantStepSize` proposes each
    step's end from the step's index alone (on a finite interval), so these come from
    `_adapt` batched over the indices."""
    controller = place.controller_state
    offsets = jnp.arange(length, dtype=controller.index.dtype)
    repeated = _repeated(place, length)
    repeated = dataclasses.replace(
        repeated,
        controller_state=dataclasses.replace(
            repeated.controller_state, index=repeated.controller_state.index + offsets
        ),
    )

    def end_after(at: _Place):
        # The end of the step after the one at `at` (whose times do not matter).
        decision = _adapt(
            spec,
            at.on(state, state.y, state.solver_state),
            state.y,
            None,
            jnp.asarray(True),
            RESULTS.successful,
        )
        return decision.next_t1

    ends = jax.vmap(end_after)(repeated)
    tnext = jnp.concatenate([place.tnext[None], ends[:-1]])
    tprev = jnp.concatenate([place.tprev[None], jnp.minimum(tnext[:-1], spec.t1)])
    return tprev, tnext


def _state_after(state: LoopState, place: _Place, y, solver_state, status):
    """The loop's state after the steps that `status` says were taken from `state`,
    which led to `place`."""
    # `status` is never negative and both constants are powers of two: shifts and
    # masks, rather than the sign-correcting arithmetic of `//` and `%` on signed
    # integers (compiled after the loop, where each such value took a kernel of
    # about 30 operations).
    taken = jnp.right_shift(status, _TAKEN.bit_length() - 1)
    code = status & (_TAKEN - 1)
    rejected = code > _REJECTED
    value = jnp.where(code == 0, 0, (code - 1) & (_REJECTED - 1))
    result = jtu.tree_unflatten(jtu.tree_structure(RESULTS.successful), [value])
    accepted = taken - rejected.astype(taken.dtype)
    return dataclasses.replace(
        place.on(state, y, solver_state),
        result=where_result(taken > 0, result, state.result),
        # The counters keep the weak type they start with, as Diffrax's do.
        num_steps=weak_type_as(
            state.num_steps + taken.astype(state.num_steps.dtype), state.num_steps
        ),
        num_accepted_steps=weak_type_as(
            state.num_accepted_steps + accepted.astype(state.num_accepted_steps.dtype),
            state.num_accepted_steps,
        ),
    )


def _traced_body(body, carry, row):
    """`body` traced once, at the size of one solve, for a step's samples of shapes
    `row` (`Tabulation.row_shapes`): `(jaxpr, replay)`, where
    `replay(carry, row)` evaluates the jaxpr (so that a scan over it does not trace
    the step again)."""
    closed, out_shape = jax.make_jaxpr(body, return_shape=True)(carry, row)
    out_structure = jtu.tree_structure(out_shape)
    evaluate = jaxpr_as_fun(closed)

    def replay(carry, row):
        return jtu.tree_unflatten(
            out_structure, evaluate(*jtu.tree_leaves((carry, row)))
        )

    return closed, replay


def _stored_bytes(jaxpr, num_steps: int) -> float:
    """The memory reverse mode uses through `num_steps` runs of the step `jaxpr`
    (traced at the size of one solve) without rematerialisation: what the step's
    linearisation keeps of each run (`residual_bytes`), times the steps and the size
    of the batch. Infinite where that cannot be bounded."""
    batch = batch_size()
    if batch is None:
        return float("inf")
    return residual_bytes(jaxpr) * num_steps * batch


def _carried_bytes(carry, num_steps: int) -> float:
    """The memory of `num_steps` copies of the scan's carry (one solve's values,
    times the size of the batch): what blocks of one step store for reverse mode."""
    batch = batch_size()
    if batch is None:
        return float("inf")
    per_step = sum(aval_bytes(jax.typeof(x)) for x in jtu.tree_leaves(carry))
    return per_step * num_steps * batch


class _Saves(eqx.Module):
    """One output's requested-time saves in the scan: the buffers, the next time to
    save (`index`: under `jax.vmap` once for all members, as where the loop is) and,
    under `jax.vmap` or with times saved before the first step, the next time
    each member has kept (`own`, which stops where the member stops)."""

    index: jax.Array
    own: jax.Array | None
    ts: jax.Array
    ys: object


def _save_requested(spec, writes, shift, saves, at: LoopState, dense_info, end, mask):
    """The requested times a step `[at.tprev, at.tnext]` covers (those at most
    `shift` past `end`, where the next step starts, not yet saved; see `Writes`):
    the next `writes` times of each output, those due interpolated on the step,
    written as one block (the buffers have `writes` spare slots at their end, see
    `_padded`), whether or not the step is kept (`mask` says where it is: a
    step not kept advances no output's `own` index, see `_advance_saves`)."""
    interpolant = spec.solver.interpolation_cls(t0=at.tprev, t1=at.tnext, **dense_info)
    out = []
    for sub, ts_tau, count, save in zip(
        spec.subs, spec.subs_ts, writes, saves, strict=True
    ):
        if save is None or count in (0, _EMIT):
            out.append(save)
            continue
        if count == _LOOP:
            out.append(_save_in_loop(spec, sub, ts_tau, save, interpolant, end, mask))
            continue
        # The step covers at most `count` times (`_writes_per_step`), so its own are
        # the next ones: a comparison each (a count over all the times took three
        # kernels per step). Past the last time, +inf: never due.
        # (Scalars, not arrays of `count`: a reduction over an array is a kernel of
        # its own on CPU, and this runs in every step.)
        padded = jnp.concatenate([ts_tau, jnp.full((count,), jnp.inf, ts_tau.dtype)])
        taus = [
            lax.dynamic_index_in_dim(padded, save.index + j, keepdims=False)
            for j in range(count)
        ]
        due = [tau <= end + jnp.asarray(shift, end.dtype) for tau in taus]
        reached = save.index
        for j in range(count):
            reached = reached + due[j].astype(reached.dtype)
        slot = save.index + int(sub.t0)
        taus = jnp.stack(taus)

        # The times not due are evaluated (then discarded) at the step's start, a
        # state the solve reached, so that `fn` and its derivatives stay finite
        # there (past the last time, `+inf`, they would not) and add nothing to
        # the gradients.
        at_taus = jnp.where(jnp.stack(due), taus, at.tprev)

        def put(buffers, sub=sub, taus=taus, at_taus=at_taus, slot=slot):
            # All `count` slots, due or not: those not due lie at or past where
            # the next time due will be written, which overwrites them, and
            # `_final_save_state` fills those never overwritten. So no slot's
            # value is read back and nothing is selected.
            outputs = [
                sub.fn(tau * spec.direction, interpolant.evaluate(tau), spec.args)
                for tau in at_taus
            ]
            values = jtu.tree_map(lambda *xs: jnp.stack(xs), *outputs)
            return jtu.tree_map(
                lambda v, b: _put_block(b, slot, v), (taus, values), buffers
            )

        buffers = (save.ts, save.ys)
        if is_batched():
            buffers = put(buffers)
        else:
            # A single solve saves in few of its steps: on CPU a branch around the
            # writes costs less than making them, masked, in every step (measured:
            # 10,000 Euler steps with 50 saves, 5.9 ms with the masked writes, as
            # fast as the while loop with the branch).
            any_write = due[0]
            for j in range(1, count):
                any_write = any_write | due[j]
            buffers = lax.cond(any_write & mask, put, lambda b: b, buffers)
        out.append(_Saves(reached, save.own, *buffers))
    return out


def _save_at_start(spec, init_state: LoopState, writes, at_start, saves):
    """The requested times equal to `t0` (the first `at_start` of each output
    written in blocks, see `Writes`) written from `y0` before the first step: the
    value the first step's interpolant takes there. As in the while loop, they
    count as saved once the first step is kept: until then the output's own
    index (`_Saves.own`, per member under `jax.vmap`) stays before them."""
    out = []
    for sub, ts_tau, count, first, save in zip(
        spec.subs, spec.subs_ts, writes, at_start, saves, strict=True
    ):
        if save is None or count in (_LOOP, _EMIT) or not first:
            out.append(save)
            continue
        taus = lax.dynamic_slice_in_dim(ts_tau, save.index, first)
        outputs = [
            sub.fn(taus[j] * spec.direction, init_state.y, spec.args)
            for j in range(first)
        ]
        values = jtu.tree_map(lambda *xs: jnp.stack(xs), *outputs)
        slot = save.index + int(sub.t0)
        ts, ys = jtu.tree_map(
            lambda v, b, slot=slot: _put_block(b, slot, v),
            (taus, values),
            (save.ts, save.ys),
        )
        out.append(_Saves(save.index + first, save.index, ts, ys))
    return out


def _save_in_loop(spec, sub, ts_tau, save, interpolant, end, mask):
    """`_save_requested` for one output whose times a step may cover any number
    of: a loop over those the step covers. Its test reads only where the loop is
    (under `jax.vmap` the same for every member, unless the times are mapped), so
    it runs as often as the step has times to save, for every member at once.

    The writes are not masked: a member whose step is not kept (`mask`) advances
    no index of its own (`_advance_saves`), and `_final_save_state` fills every
    slot past a member's last save, whatever was written there. (Masked, each
    write read the slot's old value back: under `jax.vmap` a kernel of its own
    per write, which XLA did not fuse into the in-place update.)"""
    n = ts_tau.shape[0]
    offset = int(sub.t0)

    def pending(carry):
        index = carry[0]
        return (index < n) & (ts_tau[jnp.minimum(index, n - 1)] <= end)

    def write(carry):
        index, buffers = carry
        tau = ts_tau[index]
        value = sub.fn(tau * spec.direction, interpolant.evaluate(tau), spec.args)
        buffers = jtu.tree_map(
            lambda v, b: _put_block(b, index + offset, v[None]),
            (tau, value),
            buffers,
        )
        return index + 1, buffers

    def run(carry):
        return lax.while_loop(pending, write, carry)

    carry = (save.index, (save.ts, save.ys))
    if is_batched():
        index, buffers = run(carry)
    else:
        # A single solve saves in few of its steps: a branch skips the loop in
        # the others (as the while loop's `save_pending_ts`), and in a step not
        # kept.
        index, buffers = lax.cond(pending(carry) & mask, run, lambda c: c, carry)
    return _Saves(index, save.own, *buffers)


def _put_block(buffer, slot, values):
    """`buffer[slot + j] = values[j]`: one dynamic update of a block (under
    `jax.vmap`, at the same slot for every member, so no scatter)."""
    values = values.astype(buffer.dtype)
    return lax.dynamic_update_slice_in_dim(buffer, values, slot, 0)


def _padded(buffers, count: int, written: bool):
    """A fresh solve's save buffers with `count` spare slots at their end (for
    `_put_block`), filled as the unwritten slots are (`save.fill_like`): made
    anew where nothing has been `written` in them yet (nothing is saved at
    `t0`)."""
    if not written:
        return jtu.tree_map(
            lambda b: fill_like(
                jax.ShapeDtypeStruct(b.shape[1:], b.dtype), len(b) + count
            ),
            buffers,
        )

    def pad(buffer):
        widths = [(0, count)] + [(0, 0)] * (buffer.ndim - 1)
        return jnp.pad(buffer, widths, constant_values=fill_value(buffer.dtype))

    return jtu.tree_map(pad, buffers)


def _advance_saves(saves, new, run, kept, shared_run):
    """The saves after a step that ran where `run` and kept its state where `kept`
    (`shared_run`: whether the step ran for any member, under `jax.vmap`)."""
    out = []
    for save, after in zip(saves, new, strict=True):
        if save is None:
            out.append(None)
            continue
        if save.own is None:
            index, own = jnp.where(run & kept, after.index, save.index), None
        else:
            shared = run if shared_run is None else shared_run
            index = jnp.where(shared, after.index, save.index)
            own = jnp.where(run & kept, after.index, save.own)
        out.append(_Saves(index, own, after.ts, after.ys))
    return out


def _final_save_state(init: list, saves: list) -> list:
    """The solve's save states after the scan."""
    out = []
    for state, save in zip(init, saves, strict=True):
        if save is None:
            out.append(state)
            continue
        index = save.index if save.own is None else save.own
        size = state.ts.shape[0]
        saved = state.save_index + (index - state.ts_index)
        written = jnp.arange(size) < saved

        def kept(buffer, size=size, written=written):
            # The slots from `saved` on hold the fill, whatever the blocks of
            # writes left there (see `_save_requested`).
            mask = written.reshape((size,) + (1,) * (buffer.ndim - 1))
            return jnp.where(mask, buffer[:size], fill_value(buffer.dtype))

        out.append(
            SaveState(
                ts_index=index,
                save_index=saved,
                ts=kept(save.ts),
                ys=jtu.tree_map(kept, save.ys),
            )
        )
    return out


def run_fixed_steps(
    spec: LoopSpec,
    init_state: LoopState,
    num_steps: int,
    block: int,
    storage: int = 0,
    writes: Writes = Writes((), 0.0, ()),
):
    """At most `num_steps` steps of the loop, as a scan (see the module's
    docstring). Called outside any transformation (eagerly), compiled as one
    program: op by op, it would be a few dozen programs to compile."""
    traced = any(
        isinstance(x, jax.core.Tracer) for x in jtu.tree_leaves((spec, init_state))
    )
    if traced or not hashable_statics((spec, init_state)):
        # (Something static that cannot be hashed, e.g. an unhashable object in
        # `args`: op by op, as the rest of such a call.)
        return _run_fixed_steps(spec, init_state, num_steps, block, storage, writes)
    return _run_fixed_steps_jitted(spec, init_state, num_steps, block, storage, writes)


def _run_fixed_steps(
    spec: LoopSpec,
    init_state: LoopState,
    num_steps: int,
    block: int,
    storage: int,
    writes: Writes,
):
    """`run_fixed_steps`: `_scan_fixed_steps`, traced as a loop that keeps every
    step's values (or a block's) for reverse mode, even inside the body of a loop
    that differentiates one step at a time (a solve in a vector field)."""
    with differentiated_one_step_at_a_time(False):
        return _scan_fixed_steps(spec, init_state, num_steps, block, storage, writes)


def _scan_fixed_steps(
    spec: LoopSpec,
    init_state: LoopState,
    num_steps: int,
    block: int,
    storage: int,
    writes: Writes,
):
    """`run_fixed_steps`.

    `block > 0` groups the steps into rematerialised blocks (`jax.checkpoint`) of
    that many steps, as reverse mode asks for, so that it stores one state per block
    plus one block's worth of steps -- unless what reverse mode keeps of the steps
    takes at most `storage` bytes (`_stored_bytes`), when it keeps it all and
    recomputes nothing; or else unless every step's carry takes at most that
    (`_carried_bytes`), when the blocks are of one step each. Otherwise the steps
    are one scan, or, when they have
    Brownian samples to compute ahead, blocks whose samples hold at most
    `_BLOCK_NUMBERS` numbers. The last block is padded with steps that are not
    taken, so the program holds one copy of the step.

    A step that is not taken (past the end, or after a failure) is skipped by a
    `lax.cond` on CPU for a single solve in blocks (of Brownian samples, or for
    reverse mode), whose last block may be padded with many such steps. Otherwise it
    runs and its result is discarded by a select: under `vmap`, where a branch would
    run both sides anyway; on other backends, where a branch may wait for the host;
    and on CPU for a single solve without blocks, where only a failure leaves steps
    untaken and the branch costs more than the select (measured: 10,000 Euler steps,
    1.24x a hand-written scan with the branch, 1.14x with the select). A solve that
    fails part-way then computes, and discards, its remaining steps."""
    assert spec.always_accept and spec.event_spec is None and not spec.dense
    shift, at_start = writes.shift, writes.at_start
    writes = writes.counts
    if num_steps == 0:
        return finish_loop(spec, init_state)
    plan = tabulation(spec, init_state)
    tabulators = prepare(plan, num_steps) if plan is not None else None
    branch = False  # (set below; `body` reads it when traced)

    if any(count is not None for count in writes) and "reverse" in (
        differentiation_levels()
    ):
        # Each step's interval and interpolation data, as outputs of the scan.
        dense_shape = jax.eval_shape(lambda: take_step(spec, init_state)[2])
        batch = batch_size()
        per_step = sum(aval_bytes(x) for x in jtu.tree_leaves(dense_shape))
        if batch is not None and per_step * num_steps * batch <= _EMIT_BYTES:
            writes = tuple(None if count is None else _EMIT for count in writes)
        elif _LOOP in writes:
            return None
    saving = any(count is not None and count != _EMIT for count in writes)
    emitting = _EMIT in writes

    def step(row, y, solver_state, place, saves, mask):
        step_spec = spec if row is None else answering(spec, plan, row)
        at = place.on(init_state, y, solver_state)
        y1, _, dense_info, solver_state1, solver_result = take_step(step_spec, at)
        ok = all_finite(y1) & succeeded(solver_result)
        # As the while loop's body: the controller's decision, and the solve's
        # result code after the step. `ConstantStepSize` keeps every step that
        # succeeds, and a step that fails ends the loop with its own result code:
        # the decision is made as for a kept step. (After a failed step the while
        # loop's decision differs only in where the next step would end near `t1`,
        # which nothing after the loop reads here. Making both decisions in every
        # step took 1.2x the run time of 10,000 Euler steps.)
        decision = _adapt(spec, at, y1, None, jnp.asarray(True), solver_result)
        failure = where_result(
            succeeded(solver_result), RESULTS.non_finite_state, solver_result
        )
        result = where_result(ok, decision.result, failure)
        value = jtu.tree_leaves(result)[0].astype(jnp.int32)
        code = jnp.where(value == 0, 0, 1 + value + jnp.where(ok, 0, _REJECTED))
        place = _Place(decision.next_t0, decision.next_t1, decision.controller_state)
        if saving:
            # A failed step saves nothing (as in the while loop).
            new_saves = _save_requested(
                spec, writes, shift, saves, at, dense_info, decision.next_t0, mask & ok
            )
            shared = eqxi.unvmap_any(mask) if is_batched() else None
            saves = _advance_saves(saves, new_saves, mask, ok, shared)
        emitted = None
        if emitting:
            emitted = (at.tprev, at.tnext, decision.next_t0, dense_info)
        return y1, solver_state1, _TAKEN + code, place, saves, emitted

    def skip(row, y, solver_state, place, saves, mask):
        emitted = None
        if emitting:
            # A step not taken: an end past every time, so that no time is
            # interpolated on it.
            emitted = (
                place.tprev,
                place.tnext,
                jnp.full_like(place.tprev, jnp.inf),
                jtu.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), dense_shape),
            )
        return y, solver_state, jnp.asarray(0, jnp.int32), place, saves, emitted

    def body(carry, row):
        y, solver_state, status, place, stopped, saves = carry
        # As `cond_fun` (`max_steps` is at least `num_steps` here).
        run = (status & (_TAKEN - 1) == 0) & (place.tprev < spec.t1)
        if branch:
            y, solver_state, change, place, saves, emitted = lax.cond(
                run, step, skip, row, y, solver_state, place, saves, True
            )
        else:
            # A step that does not run advances no output's index of saved times
            # (`_advance_saves`), whatever it wrote.
            new = step(row, y, solver_state, place, saves, run)
            y, solver_state, change = tree_where(
                run, new[:3], (y, solver_state, jnp.asarray(0, jnp.int32))
            )
            saves, emitted = new[4], new[5]
            if emitted is not None:
                # (Under `jax.vmap`: a step taken by any member.)
                taken = run if stopped is None else eqxi.unvmap_any(run)
                end = jnp.where(taken, emitted[2], jnp.inf)
                emitted = (emitted[0], emitted[1], end, emitted[3])
            if stopped is None:
                place = tree_where(run, new[3], place)
            else:
                # Under `jax.vmap` the members' steps have the same times until a
                # member fails: where the loop is goes on once for all of them while
                # any runs, and each member's place is kept as it stops (computed
                # per member, the times took 1.1x the run time of 1,000 paths of
                # 10,000 Euler–Maruyama steps). So are the requested times' saves:
                # at one index for all members, so that each is a dynamic update
                # and not a scatter.
                stopped = tree_where(run, new[3], stopped)
                place = tree_where(eqxi.unvmap_any(run), new[3], place)
        return (y, solver_state, status + change, place, stopped, saves), emitted

    place = _Place(init_state.tprev, init_state.tnext, init_state.controller_state)
    # A solve that has already failed takes no step.
    status = jnp.where(succeeded(init_state.result), 0, 1).astype(jnp.int32)
    single_on_cpu = jax.default_backend() == "cpu" and not is_batched()
    saves = [
        None
        if count is None or count == _EMIT
        else _Saves(
            state.ts_index,
            state.ts_index if is_batched() else None,
            *_padded((state.ts, state.ys), max(count, 0), sub.t0),
        )
        for sub, count, state in zip(
            spec.subs, writes, init_state.save_state, strict=True
        )
    ]
    if saving:
        saves = _save_at_start(spec, init_state, writes, at_start, saves)
    y, solver_state, stopped = init_state.y, init_state.solver_state, None
    if is_batched():
        # The state, the status, each member's stopping place and its saves mapped
        # from the start where the solve's inputs are (`batched_as`), as they are
        # after one step: JAX then batches the step once at trace time (three
        # times with only a Brownian path's key mapped). The times where the loop
        # is and the saves' shared index stay unmapped.
        # (Of the saves, each member's index and buffer; not the index shared by
        # all.)
        own = [None if s is None else (s.own, s.ys) for s in saves]
        y, solver_state, status, stopped, own = mapped_from_start(
            (y, solver_state, status, place, own), spec.terms, spec.args, y
        )
        saves = [
            None if s is None else eqx.tree_at(lambda s: (s.own, s.ys), s, mine)
            for s, mine in zip(saves, own, strict=True)
        ]
    carry = (y, solver_state, status, place, stopped, saves)
    scan_body, row = body, None
    if block > 0 and storage > 0:
        # Traced as it runs without blocks (see `branch` below), which is also how it
        # runs in blocks unless there are no samples, on CPU outside `vmap`.
        branch = plan is not None and single_on_cpu
        row = None if plan is None else plan.row_shapes()
        jaxpr, replay = _traced_body(body, carry, row)
        if _stored_bytes(jaxpr, num_steps) <= storage:
            block, scan_body = 0, replay
        else:
            if _carried_bytes(carry, num_steps) <= storage:
                # Every step's carry fits: blocks of one step, each recomputed once
                # in the backward pass, which keeps one step's values at a time.
                block = 1
            if branch == single_on_cpu:
                scan_body = replay
    if block > 0:
        size = min(block, num_steps)
    elif plan is not None:
        if row is None:
            row = plan.row_shapes()
        per_step = sum(int(np.prod(x.shape)) for x in jtu.tree_leaves(row))
        most = max(_BLOCK_NUMBERS // max(per_step, 1), _MIN_BLOCK_STEPS)
        size = math.ceil(num_steps / math.ceil(num_steps / most))
    else:
        size = num_steps
    num_blocks = math.ceil(num_steps / size)
    branch = (block > 0 or plan is not None) and single_on_cpu

    def run_block(carry, _):
        rows = None
        if tabulators is not None:
            tprev, tnext = _times(spec, init_state, carry[3], size)
            rows = block_samples(tabulators, tprev, tnext)
        return lax.scan(scan_body, carry, rows, length=size)

    if block > 0:
        run_block = jax.checkpoint(run_block)
    if num_blocks == 1:
        carry, emitted = run_block(carry, None)
    else:
        carry, emitted = lax.scan(run_block, carry, length=num_blocks)
        # (blocks, steps of a block, ...) -> (steps, ...)
        emitted = jtu.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), emitted)
    y, solver_state, status, place, stopped, saves = carry
    place = place if stopped is None else stopped
    final = _state_after(init_state, place, y, solver_state, status)
    if saving or emitting:
        save_state = _final_save_state(init_state.save_state, saves)
        if emitting:
            kept = final.num_accepted_steps - init_state.num_accepted_steps
            save_state = [
                _interpolate_emitted(spec, sub, ts_tau, state, emitted, kept)
                if count == _EMIT
                else state
                for sub, ts_tau, count, state in zip(
                    spec.subs, spec.subs_ts, writes, save_state, strict=True
                )
            ]
        final = dataclasses.replace(final, save_state=save_state)
    return finish_loop(spec, final)


def _interpolate_emitted(spec, sub, ts_tau, state: SaveState, emitted, kept):
    """After the scan: the requested times of one output, interpolated on the steps
    that cover them, from the steps' intervals and interpolation data that the scan
    output (`emitted`), where the solve kept the steps (`kept` of them, per member).
    A time is saved by the first step whose end (where the next starts) is at or
    past it, as in the while loop."""
    tprev, tnext, ends, infos = emitted
    n, num_steps = ts_tau.shape[0], ends.shape[0]
    offset = int(sub.t0)
    # Per member: the times up to the end of its last kept step.
    last_end = jnp.where(kept > 0, ends[jnp.maximum(kept - 1, 0)], -jnp.inf)
    index = jnp.where(kept > 0, _count_at_most(ts_tau, last_end), state.ts_index)
    index = index.astype(state.ts_index.dtype)
    saved = jnp.arange(n, dtype=index.dtype) < index
    covering = jnp.minimum(jnp.searchsorted(ends, ts_tau, side="left"), num_steps - 1)

    def output(tprev, tnext, info, tau, saved):
        # Times not saved are evaluated (then discarded) at the step's start, a
        # state the solve reached, so that `fn` and its derivatives stay finite.
        tau = jnp.where(saved, tau, tprev)
        interpolant = spec.solver.interpolation_cls(t0=tprev, t1=tnext, **info)
        return sub.fn(tau * spec.direction, interpolant.evaluate(tau), spec.args)

    values = jax.vmap(output)(
        tprev[covering],
        tnext[covering],
        jtu.tree_map(lambda x: x[covering], infos),
        ts_tau,
        saved,
    )

    def place(value, buffer):
        mask = saved.reshape(saved.shape + (1,) * (value.ndim - 1))
        current = buffer[offset : offset + n]
        return buffer.at[offset : offset + n].set(
            jnp.where(mask, value.astype(buffer.dtype), current)
        )

    return SaveState(
        ts_index=index,
        save_index=state.save_index + (index - state.ts_index),
        ts=place(jnp.where(saved, ts_tau, jnp.inf), state.ts),
        ys=jtu.tree_map(place, values, state.ys),
    )


_run_fixed_steps_jitted = eqx.filter_jit(_run_fixed_steps)
