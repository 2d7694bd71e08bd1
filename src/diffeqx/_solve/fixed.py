"""The fixed-step fast path: constant steps whose times are known at trace time run
as a fixed-length scan instead of a while loop.

With `ConstantStepSize` everything the loop carries apart from the solution and the
solver's state (the step's times, the controller's state, the counts, the result
code) follows from the number of steps taken, as long as every step succeeds. So the
steps run in blocks: before each block, its steps' times and the loop's decisions
after each of them are computed at once, vectorised, by the loop's own arithmetic
(`_adapt` and `cond_fun`, batched over the steps); the block is then a scan whose
iterations carry only `y`, the solver's state and whether a step has failed, and
run the solver's step and nothing else. After the block the loop's state is
assembled from the decision after its last step taken (or, after a failed step,
from `_adapt` applied to it as the while loop would), so that the result is the
while loop's: the same steps, the same end exactly at `t1`, the same result code and
counts for a solve that stalls or becomes non-finite (tested). Steps past the end
(blocks are padded to a common length) start and end at `t1`, and are skipped.

What the scan saves is the loop's bookkeeping: a static trip count, no per-step
controller or counters (on CPU, each of those is a separate tiny kernel per step),
and, for reverse mode, checkpointing by blocks instead of the recursive scheme. The
steps' Brownian samples, when there are any, are computed per block too
(`tabulate.py`)."""

import dataclasses
import math

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._controller.constant import ConstantStepSize, constant_step_count
from .._solution import RESULTS, succeeded
from .._transforms import is_batched
from . import checks
from .loop import (
    LoopSpec,
    _adapt,
    all_finite,
    finish_loop,
    stalls,
    take_step,
    tree_where,
)
from .state import LoopState
from .tabulate import answering, block_samples, prepare, tabulation

# When reverse mode does not ask for blocks, blocks of at most `_BLOCK_STEPS` steps
# (the schedule's memory), whose Brownian samples hold at most `_BLOCK_NUMBERS`
# numbers (times the batch size under `vmap`), but at least `_MIN_BLOCK_STEPS`.
_BLOCK_STEPS = 2**16
_BLOCK_NUMBERS = 2**17
_MIN_BLOCK_STEPS = 64


def fixed_step_plan(
    controller, saveat, subs, adjoint, t0, t1, dt0, max_steps, dtype, resumed
):
    """`(num_steps, block)` when the solve can run as a fixed-length scan: constant
    steps from a fresh controller, times known at trace time, only `t0`/`t1`
    outputs, and an adjoint that allows it (`AbstractAdjoint.fixed_step_block`).
    Otherwise None."""
    if type(controller) is not ConstantStepSize or saveat.dense or resumed:
        return None
    if any(sub.steps or sub.ts is not None for sub in subs):
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
    block = adjoint.fixed_step_block(num_steps)
    if block is None:
        return None
    return num_steps, block


def _constant_step_count(t0, t1, dt0, dtype, max_steps) -> int | None:
    """An upper bound on the steps `ConstantStepSize` takes from `t0` to a finite
    `t1` (forward time); the guarded body makes any extra iterations no-ops. None
    if that is more than `max_steps`."""
    if not np.isfinite(t1):
        return None
    num_steps = constant_step_count(t0, t1, dt0, dtype)
    if num_steps > min(10**7 if max_steps is None else max_steps, 2**31 // _TAKEN):
        return None
    return num_steps


class _Bookkeeping(eqx.Module):
    """What the loop's state holds about where it is, apart from the solution."""

    tprev: jax.Array
    tnext: jax.Array
    controller_state: object
    result: object
    num_steps: jax.Array

    def on(self, state: LoopState) -> LoopState:
        return dataclasses.replace(
            state,
            tprev=self.tprev,
            tnext=self.tnext,
            controller_state=self.controller_state,
            result=self.result,
            num_steps=self.num_steps,
        )


def _before_step(state: LoopState, k, tprev, tnext, result) -> _Bookkeeping:
    """Where the loop is before step `k` from `state`, when the steps before it
    were taken."""
    controller = state.controller_state
    return _Bookkeeping(
        tprev,
        tnext,
        dataclasses.replace(controller, index=controller.index + k),
        result,
        state.num_steps + k.astype(state.num_steps.dtype),
    )


def _repeated(tree, length: int):
    """`tree` repeated along a new leading axis, behind an optimization barrier, so
    that XLA sees an array of values rather than a broadcast scalar. Batched
    arithmetic with it is then elementwise, as the while loop's scalar arithmetic
    is; with a broadcast scalar XLA may rewrite it (a division becomes a
    multiplication by a rounded reciprocal), and round the steps' times otherwise
    than the while loop does."""
    return lax.optimization_barrier(
        jtu.tree_map(lambda x: jnp.broadcast_to(x, (length,) + jnp.shape(x)), tree)
    )


# Each step carries one integer besides the solution: `taken * _TAKEN + code`,
# `taken` the steps taken and `code` 0 while they succeed, `1 + r` after a step
# failed with result code `r`, and `_STOPPED` when the loop stopped before a step
# without taking it (one scalar: on CPU each scalar a loop carries can cost its own
# kernel launch per iteration). A step runs while the code is 0 and it starts before
# `t1`; once one does not, no later one does (the steps' times increase).
_TAKEN = 32
_STOPPED = _TAKEN - 1
assert len(RESULTS._name_to_item) < _STOPPED


def _schedule(spec: LoopSpec, state: LoopState, first, length: int):
    """The times `(length, 2)` of steps `first, ..., first + length - 1` from
    `state`, as the while loop computes them while every step succeeds.

    `ConstantStepSize` proposes each step's end from the step's index alone (on a
    finite interval), so the ends come from `_adapt` batched over the indices."""
    dtype = state.controller_state.index.dtype
    # Step indices `first - 1, ..., first + length - 1`.
    index = jnp.asarray(first, dtype) - 1 + jnp.arange(length + 1, dtype=dtype)
    repeated, tprev0, tnext0 = _repeated(
        (state.controller_state, state.tprev, state.tnext), length + 1
    )
    repeated = dataclasses.replace(repeated, index=repeated.index + index - 1)

    def end(k, controller, tprev, tnext):
        # The end of step `k >= 1`: proposed after step `k - 1`.
        at = dataclasses.replace(
            _before_step(state, k - 1, tprev, tnext, state.result).on(state),
            controller_state=controller,
        )
        decision = _adapt(spec, at, at.y, None, jnp.asarray(True), RESULTS.successful)
        return jnp.where(k == 0, state.tnext, decision.next_t1)

    ends = jax.vmap(end)(index, repeated, tprev0, tnext0)
    k = index[1:]
    tprev = jnp.where(k == 0, state.tprev, jnp.minimum(ends[:-1], spec.t1))
    return jnp.stack([tprev, ends[1:]], axis=-1)


def _state_after(spec, state, last_times, y, solver_state, status):
    """The loop's state after the steps `status` says were taken, from `state`
    before them, given the last step's times: where the loop was before that step,
    then `_adapt` on it, as the while loop decides about it."""
    taken, code = status // _TAKEN, status % _TAKEN
    failed = (code > 0) & (code != _STOPPED)
    last = jnp.maximum(taken - 1, 0).astype(state.controller_state.index.dtype)
    # A step is only taken after successful ones.
    before = _before_step(state, last, last_times[0], last_times[1], state.result)
    at = dataclasses.replace(before.on(state), y=y, solver_state=solver_state)
    step_result = jtu.tree_unflatten(
        jtu.tree_structure(RESULTS.successful), [jnp.maximum(code - 1, 0)]
    )
    decision = _adapt(spec, at, y, None, ~failed, step_result)
    accepted = taken - failed.astype(taken.dtype)
    after = dataclasses.replace(
        state,
        y=y,
        tprev=decision.next_t0,
        tnext=decision.next_t1,
        solver_state=solver_state,
        controller_state=decision.controller_state,
        result=decision.result,
        num_steps=state.num_steps + taken.astype(state.num_steps.dtype),
        num_accepted_steps=state.num_accepted_steps
        + accepted.astype(state.num_accepted_steps.dtype),
    )
    # No step taken: nothing changes (in particular a failed solve stays failed).
    return tree_where(taken > 0, after, state)


def _sample_size(tabulators: list, state: LoopState) -> int:
    """How many numbers the Brownian samples of one step hold."""
    one = jnp.zeros((1,), jnp.result_type(state.tprev))
    shapes = jax.eval_shape(
        lambda: [
            [tabulate(one, one) for tabulate in per_path.values()]
            for per_path in tabulators
        ]
    )
    return sum(int(np.prod(x.shape)) for x in jtu.tree_leaves(shapes))


def run_fixed_steps(spec: LoopSpec, init_state: LoopState, num_steps: int, block: int):
    """At most `num_steps` steps of the loop, as a scan (see the module's
    docstring). Called outside any transformation (eagerly), compiled as one
    program: op by op, the steps' schedule alone would be a few dozen programs to
    compile."""
    traced = any(
        isinstance(x, jax.core.Tracer) for x in jtu.tree_leaves((spec, init_state))
    )
    if traced:
        return _run_fixed_steps(spec, init_state, num_steps, block)
    return _run_fixed_steps_jitted(spec, init_state, num_steps, block)


def _run_fixed_steps(spec: LoopSpec, init_state: LoopState, num_steps: int, block: int):
    """`run_fixed_steps`.

    The steps run in blocks, each a scan whose schedule (its steps' times, and
    which of them the loop takes) and Brownian samples are computed before it, so
    that memory does not grow with the number of steps. `block > 0` makes them
    rematerialised blocks (`jax.checkpoint`) of that many steps, as reverse mode asks
    for: it then stores one state per block plus one block's worth of steps.
    Otherwise blocks are as long as their schedule and samples allow
    (`_BLOCK_STEPS`, `_BLOCK_NUMBERS`). The last block is padded with steps that are
    not taken, so the program holds one copy of the step. Between blocks only the
    solution, the solver's state, the status and the last step's times are carried;
    the loop's state is assembled once, after the last block.

    A step that is not taken (past the end, or after a failure) is skipped by a
    `lax.cond` on CPU for a single solve (a branch costs a few nanoseconds there);
    under `vmap`, where a branch would run both sides anyway, and on other backends
    (where a branch may wait for the host) it runs and its result is discarded by a
    select."""
    assert spec.always_accept and spec.event_spec is None and not spec.dense
    if num_steps == 0:
        return finish_loop(spec, init_state)
    plan = tabulation(spec, init_state)
    tabulators = prepare(plan, num_steps) if plan is not None else None
    if block > 0:
        size = min(block, num_steps)
    else:
        most = _BLOCK_STEPS
        if plan is not None:
            per_step = _sample_size(tabulators, init_state)
            most = min(most, max(_BLOCK_NUMBERS // max(per_step, 1), _MIN_BLOCK_STEPS))
        size = math.ceil(num_steps / math.ceil(num_steps / most))
    num_blocks = math.ceil(num_steps / size)
    branch = jax.default_backend() == "cpu" and not is_batched()

    def step(inputs, y, solver_state):
        times, row = inputs
        step_spec = spec if row is None else answering(spec, plan, row)
        at = dataclasses.replace(
            init_state, tprev=times[0], tnext=times[1], y=y, solver_state=solver_state
        )
        y1, _, _, solver_state1, solver_result = take_step(step_spec, at)
        ok = all_finite(y1) & succeeded(solver_result)
        failure = 1 + jtu.tree_leaves(solver_result)[0].astype(jnp.int32)
        return y1, solver_state1, _TAKEN + jnp.where(ok, 0, failure)

    def skip(inputs, y, solver_state):
        return y, solver_state, jnp.asarray(0, jnp.int32)

    def body(carry, inputs):
        y, solver_state, status = carry
        times = inputs[0]
        # As `cond_fun`: the loop goes on while no step failed and the next starts
        # before `t1` (`max_steps` is at least `num_steps` here), and stops at a
        # zero-length step, the only failure the controller decides alone (the
        # first step is never one: `diffeqsolve` checks `dt0`).
        stalled = stalls(times[0], times[1], spec.t1) & (status > 0)
        run = (status % _TAKEN == 0) & (times[0] < spec.t1) & ~stalled
        if branch:
            y, solver_state, change = lax.cond(run, step, skip, inputs, y, solver_state)
        else:
            y1, solver_state1, change = step(inputs, y, solver_state)
            y = tree_where(run, y1, y)
            solver_state = tree_where(run, solver_state1, solver_state)
            change = jnp.where(run, change, 0)
        change = jnp.where(stalled & (status % _TAKEN == 0), _STOPPED, change)
        return (y, solver_state, status + change), None

    def run_block(carry, first):
        y, solver_state, status, last_times = carry
        times = _schedule(spec, init_state, first, size)
        rows = None
        if tabulators is not None:
            rows = block_samples(tabulators, times[:, 0], times[:, 1])
        inner = (y, solver_state, status)
        y, solver_state, after = lax.scan(body, inner, (times, rows))[0]
        # The times of the last step taken, if this block took any.
        last = jnp.clip(after // _TAKEN - 1 - first, 0, size - 1)
        last_times = jnp.where(
            after // _TAKEN > status // _TAKEN, times[last], last_times
        )
        return y, solver_state, after, last_times

    if block > 0:
        run_block = jax.checkpoint(run_block)
    dtype = jnp.result_type(init_state.tprev)
    # A solve that has already failed takes no step.
    status = jnp.where(succeeded(init_state.result), 0, _STOPPED).astype(jnp.int32)
    carry = (init_state.y, init_state.solver_state, status, jnp.zeros((2,), dtype))
    if num_blocks == 1:
        carry = run_block(carry, 0)
    else:
        firsts = jnp.arange(num_blocks, dtype=jnp.int32) * size
        carry = lax.scan(lambda c, f: (run_block(c, f), None), carry, firsts)[0]
    final = _state_after(spec, init_state, carry[3], *carry[:3])
    return finish_loop(spec, final)


_run_fixed_steps_jitted = eqx.filter_jit(_run_fixed_steps)
