"""The fixed-step fast path: constant steps whose times are known at trace time run
as a fixed-length scan instead of a while loop."""

import dataclasses
import math

import jax
import jax.lax as lax
import jax.numpy as jnp

from .._adjoint.checkpoint import RecursiveCheckpointAdjoint
from .._adjoint.direct import DirectAdjoint
from .._adjoint.forward import ForwardMode
from .._controller.constant import ConstantStepSize, constant_step_count
from .._solution import RESULTS
from . import checks
from .loop import LoopSpec, all_finite, clip_to_end, take_step, tree_where
from .state import LoopState


def fixed_step_plan(controller, saveat, subs, adjoint, t0, t1, dt0, max_steps, dtype):
    """`(num_steps, block)` when the solve can run as a fixed-length scan: constant
    steps, times known at trace time, and only `t0`/`t1` outputs. Otherwise None."""
    if type(controller) is not ConstantStepSize or saveat.dense:
        return None
    if any(sub.steps or sub.ts is not None for sub in subs):
        return None
    if isinstance(adjoint, RecursiveCheckpointAdjoint):
        checkpoints = adjoint.checkpoints
    elif isinstance(adjoint, (DirectAdjoint, ForwardMode)):
        checkpoints = 0
    else:
        return None
    concrete = [checks._concrete(x) for x in (t0, t1, dt0)]
    if any(x is None for x in concrete):
        return None
    t0_c, t1_c, dt0_c = concrete
    direction = 1 if t1_c >= t0_c else -1
    if dt0_c * direction <= 0 and t1_c != t0_c:
        return None  # reported through the result code by the general path
    num_steps = constant_step_count(
        direction * t0_c, direction * t1_c, direction * dt0_c, dtype
    )
    if max_steps is not None and num_steps > max_steps:
        return None
    if checkpoints == 0:
        block = 0
    elif checkpoints is None:
        block = _block_size(num_steps, math.isqrt(num_steps))
    else:
        block = _block_size(num_steps, -(-num_steps // checkpoints))
    return num_steps, block


def _block_size(num_steps, target):
    """A checkpointing block size near `target`: a divisor of `num_steps` within a
    factor of two if there is one (so that no padded steps are computed), else
    `target` itself."""
    target = max(1, target)
    for offset in range(target):
        for candidate in (target - offset, target + offset):
            if target // 2 <= candidate <= 2 * target and num_steps % candidate == 0:
                return candidate
    return target


def run_fixed_steps(spec: LoopSpec, init_state: LoopState, num_steps: int, block: int):
    """The fixed-step fast path: exactly `num_steps` steps as a `lax.scan`, with no
    while-loop predicate to evaluate (on accelerators, a loop with a static trip count
    also needs no host round trip per step).

    `block > 0` groups the steps into rematerialised blocks of that many steps
    (`jax.checkpoint`), so that reverse mode stores one state per block plus one
    block's worth of steps; `block == 0` is a plain scan."""

    def one_step(state):
        return _fixed_step_body(spec, state)

    if num_steps == 0:
        final = init_state
    elif block == 0 or block >= num_steps:
        final, _ = lax.scan(
            lambda s, _: (one_step(s), None), init_state, length=num_steps
        )
    else:
        num_blocks = -(-num_steps // block)
        padded = num_blocks * block != num_steps

        @jax.checkpoint
        def run_block(state, block_index):
            def inner(s, j):
                new = one_step(s)
                if padded:
                    live = block_index * block + j < num_steps
                    new = tree_where(live, new, s)
                return new, None

            return lax.scan(inner, state, jnp.arange(block))[0]

        final, _ = lax.scan(
            lambda s, b: (run_block(s, b), None), init_state, jnp.arange(num_blocks)
        )
    # Non-finite values propagate to the end of a fixed-step solve, so one check of
    # the final state stands in for a check after every step.
    finite = all_finite(final.y)
    result = RESULTS.where(
        (final.result == RESULTS.successful) & ~finite,
        RESULTS.non_finite_state,
        final.result,
    )
    steps = jnp.asarray(num_steps)
    return dataclasses.replace(
        final, result=result, num_steps=steps, num_accepted_steps=steps
    )


def _fixed_step_body(spec: LoopSpec, state: LoopState) -> LoopState:
    """One step of the fixed-step fast path: no acceptance test, no per-step result
    bookkeeping (counts are known statically), only the step and the next times."""
    y1, _, _, solver_state, solver_result = take_step(spec, state)
    _, next_t0, next_t1, _, controller_state, _ = spec.controller.adapt_step_size(
        state.tprev,
        state.tnext,
        state.y,
        y1,
        spec.args,
        None,
        spec.error_order,
        state.controller_state,
    )
    next_t1 = clip_to_end(next_t0, next_t1, spec.t1)
    result = RESULTS.where(
        state.result == RESULTS.successful, solver_result, state.result
    )
    return dataclasses.replace(
        state,
        y=y1,
        result=result,
        tprev=next_t0,
        tnext=next_t1,
        solver_state=solver_state,
        controller_state=controller_state,
    )
