"""The solve loop: one step per iteration of a while loop over a `LoopState`."""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._controller.ulp import ulps_below
from .._profile import scope
from .._saveat import SubSaveAt
from .._solution import RESULTS, succeeded, where_result
from .._solver.base import tracing_step
from .._transforms import differentiation_levels, is_batched
from .checks import raise_if_no_error_estimate
from .event import EventStep, check_events, locate_event, record_event
from .kernel import arrays_only
from .save import interpolate_deferred, record_ts_step, save_dense, save_in_step
from .state import LoopState


class LoopSpec(eqx.Module):
    """Everything fixed during the loop: the problem, the methods, and the output
    layout. Built once by `diffeqsolve`; the step body reads from it."""

    terms: Any
    solver: Any
    controller: Any
    args: Any
    t1: Any
    direction: Any
    subs: list[SubSaveAt]
    subs_ts: list[Any]  # each SubSaveAt's save times in integration time, or None
    error_order: Any
    max_steps: int | None = eqx.field(static=True)
    dense: bool = eqx.field(static=True)
    always_accept: bool = eqx.field(static=True)
    may_jump: bool = eqx.field(static=True)
    event_spec: Any = None  # an `EventSpec`, or None
    t0: Any = None
    progress_meter: Any = None  # None when no progress is reported
    # `1 / (t1 - t0)` when the progress fraction is computed by multiplying by it (see
    # `progress_scale` in setup.py), else None.
    progress_scale: Any = None
    # Under `jax.vmap`: whether the loop's condition is reduced over the batch ("some
    # member is going"), with the step body itself leaving finished members as they
    # are (see `_hold_finished`).
    mask_members: bool = eqx.field(static=True, default=False)


def tree_where(pred, new, old):
    return jtu.tree_map(lambda a, b: jnp.where(pred, a, b), new, old)


def all_finite(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jtu.tree_leaves(tree)]
    out = jnp.asarray(True)
    for leaf in leaves:
        out = out & leaf
    return out


def clip_to_end(tprev, tnext, t1, keep=True):
    """The one rule for ending on `t1` (as Diffrax 0.7.2): a proposed step end
    beyond, or within 100 ULPs below, `t1` becomes `t1` itself (so no step of a
    few rounding errors is left over) -- or, when the step just tried was rejected,
    halfway from `tprev` to `t1`. The first step is not snapped, only cut at `t1`."""
    near_end = tnext > ulps_below(t1, 100)
    snapped = jnp.where(keep, t1, tprev + 0.5 * (t1 - tprev))
    return jnp.where(near_end, snapped, tnext)


def take_step(spec: LoopSpec, state: LoopState, nested: bool = False):
    """The solver's step from `state`; with `nested`, under `jax.vmap` and no
    derivative, traced as a nested `jax.jit` (see `_nested_call`)."""
    made_jump = state.made_jump if spec.may_jump else False
    inputs = (
        spec.solver,
        spec.terms,
        state.tprev,
        state.tnext,
        state.y,
        spec.args,
        state.solver_state,
        made_jump,
    )
    with tracing_step(spec.always_accept):
        if nested and is_batched() and not differentiation_levels():
            return _nested_call(_step, inputs)
        return _step(*inputs)


def _step(solver, *inputs):
    return solver.step(*inputs)


def _nested_call(fn, inputs: tuple):
    """`fn(*inputs)` traced as a `jax.jit` nested in the loop's body.

    Under `jax.vmap`, JAX batches a while loop's body twice (once to find which of
    its values are mapped, once to build the mapped body), and with it every
    operation of the step; a nested `jax.jit` is batched once per set of mapped
    inputs, and the second time found in JAX's cache. XLA inlines the call: the
    adaptive loop's values came out the same bit for bit (checked on the
    benchmarks' batched adaptive solves and event solves), while the fixed-step
    scan's did not (an Euler-Maruyama solve on a tree over 10,000 steps, 1.8e-15
    apart), so only the adaptive loop nests its step. (Measured on CPU: tracing
    and lowering of the adaptive SPaRK row, 64 paths, 0.56 to 0.61 s against 0.76
    to 0.78 s; Lotka-Volterra over 1,000 initial conditions 0.41 to 0.44 s against
    0.53 to 0.54 s. Without `jax.vmap` it saved nothing. Not under a derivative:
    differentiating the nested call gave programs of up to twice the operations,
    e.g. the neural-SDE gradient's.)"""
    inner, dynamic, rebuild = arrays_only(fn, inputs)
    return rebuild(jax.jit(inner)(dynamic))


class StepDecision(eqx.Module):
    """What `_adapt` decides about the step just taken."""

    keep: Any  # whether the step is accepted
    next_t0: Any  # where the next step starts
    next_t1: Any  # where it ends
    made_jump: Any  # whether the next step starts past a discontinuity
    controller_state: Any
    result: Any


def stalls(next_t0, next_t1, t1):
    """Whether the loop stops at a next step `[next_t0, next_t1]` of zero length
    before `t1`: it would repeat forever (Diffrax runs into `max_steps` then); it is
    reported at once instead (`RESULTS.dt_min_reached`)."""
    return (next_t1 <= next_t0) & (next_t0 < t1)


def _adapt(
    spec: LoopSpec, state: LoopState, y1, y_error, step_ok, solver_result
) -> StepDecision:
    """Accept or reject the step, choose the next one and the new result code."""
    raise_if_no_error_estimate(spec.solver, spec.controller, y_error, y1)
    if y_error is not None:
        # A failed or non-finite step is rejected by giving it an infinite error
        # (and, as Diffrax, a NaN error estimate counts as infinite).
        y_error = jtu.tree_map(
            lambda e: jnp.where(step_ok & ~jnp.isnan(e), e, jnp.inf), y_error
        )
    keep, next_t0, next_t1, made_jump, controller_state, result = (
        spec.controller.adapt_step_size(
            state.tprev,
            state.tnext,
            state.y,
            y1,
            spec.args,
            y_error,
            spec.error_order,
            state.controller_state,
        )
    )
    accepted_bad_step = jnp.asarray(keep) & ~step_ok
    keep = jnp.asarray(keep) & step_ok
    # A step may start one ULP past a jump at `t1`; the solve still ends at `t1`.
    next_t0 = jnp.minimum(next_t0, spec.t1)
    next_t1 = clip_to_end(next_t0, next_t1, spec.t1, keep)
    stalled = stalls(next_t0, next_t1, spec.t1)
    result = where_result(stalled, RESULTS.dt_min_reached, result)
    # A bad step that could not be rejected ends the solve with the solver's own
    # failure code if it gave one, else as non-finite.
    failure = where_result(
        succeeded(solver_result), RESULTS.non_finite_state, solver_result
    )
    result = where_result(accepted_bad_step | stalled & ~step_ok, failure, result)
    if spec.may_jump:
        # A rejected step is tried again from the same start: still past the jump
        # (as in Diffrax).
        made_jump = jnp.where(keep, jnp.asarray(made_jump), state.made_jump)
    else:
        made_jump = jnp.asarray(False)
    return StepDecision(
        keep=keep,
        next_t0=next_t0,
        next_t1=next_t1,
        made_jump=jnp.asarray(made_jump),
        controller_state=controller_state,
        result=result,
    )


def _save(
    spec: LoopSpec,
    state: LoopState,
    interpolant,
    dense_info,
    y1,
    keep,
    inner_while_loop,
    t_end,
):
    """The saves of the step `[state.tprev, t_end]`, for every output."""
    return [
        record_ts_step(
            sub_state, ts_tau, state.tprev, state.tnext, t_end, dense_info, keep
        )
        if sub_state.deferred is not None
        else save_in_step(
            sub_state,
            sub,
            ts_tau,
            interpolant,
            t_end,
            y1,
            keep,
            state.num_accepted_steps,
            spec.args,
            spec.direction,
            inner_while_loop,
        )
        for sub, ts_tau, sub_state in zip(
            spec.subs, spec.subs_ts, state.save_state, strict=True
        )
    ]


@scope("loop")
def step_body(
    spec: LoopSpec, state: LoopState, inner_while_loop: Callable
) -> LoopState:
    """One iteration: step, accept or reject, save, count."""
    going = _going(spec, state) if spec.mask_members else None
    with scope("step"):
        y1, y_error, dense_info, solver_state, solver_result = take_step(
            spec, state, nested=True
        )
    step_ok = all_finite(y1) & succeeded(solver_result)
    with scope("controller"):
        decision = _adapt(spec, state, y1, y_error, step_ok, solver_result)
    keep, next_t0, next_t1 = decision.keep, decision.next_t0, decision.next_t1
    if going is not None:
        # A finished member keeps nothing: no state, no save, no event.
        keep = keep & going
    result = decision.result
    if spec.always_accept and going is None:
        # Fixed steps: no step is ever rejected, so no selects are needed.
        y = y1
        new_solver_state = solver_state
    elif spec.always_accept:
        # Fixed steps under `jax.vmap`: a member that has finished keeps its state.
        y = tree_where(going, y1, state.y)
        new_solver_state = tree_where(going, solver_state, state.solver_state)
    else:
        y = tree_where(keep, y1, state.y)
        new_solver_state = tree_where(keep, solver_state, state.solver_state)
    needs_interpolant = spec.event_spec is not None or any(
        ts is not None and sub_state.deferred is None
        for ts, sub_state in zip(spec.subs_ts, state.save_state, strict=True)
    )
    interpolant = (
        spec.solver.interpolation_cls(t0=state.tprev, t1=state.tnext, **dense_info)
        if needs_interpolant
        else None
    )
    # As Diffrax, a kept step's saves run up to where the next step starts: one
    # ULP past a jump rather than one before it.
    step_end = jnp.where(keep, next_t0, state.tnext)
    event_state = state.event_state
    save_keep = keep
    if spec.event_spec is not None:
        with scope("events"):
            events = _events(spec, state, y1, next_t0, result, keep, dense_info)
        save_keep, next_t0, result = events.save_keep, events.next_t0, events.result
        event_state = events.event_state
    with scope("save"):
        save_state = _save(
            spec,
            state,
            interpolant,
            dense_info,
            y1,
            save_keep,
            inner_while_loop,
            step_end,
        )
        dense_state = state.dense_state
        if spec.dense:
            dense_state = save_dense(dense_state, state.tnext, dense_info, keep)
    result = where_result(succeeded(state.result), result, state.result)
    new_state = LoopState(
        y=y,
        tprev=next_t0,
        tnext=next_t1,
        made_jump=decision.made_jump if spec.may_jump else state.made_jump,
        solver_state=new_solver_state,
        controller_state=decision.controller_state,
        result=result,
        num_steps=state.num_steps + 1,
        num_accepted_steps=state.num_accepted_steps + jnp.where(keep, 1, 0),
        save_state=save_state,
        dense_state=dense_state,
        event_state=event_state,
        event_mask=state.event_mask,
        progress_state=_progress(spec, state.progress_state, next_t0),
    )
    if going is not None:
        new_state = _hold_finished(going, new_state, state)
    return new_state


def _hold_finished(going, new_state: LoopState, state: LoopState) -> LoopState:
    """`new_state` for the members still going, `state` for the others.

    Under `jax.vmap` the while loop's own predicate would do this (Equinox's loop
    selects each value by it), but that predicate is carried from one iteration to
    the next, and JAX, which batches a loop's body until the set of batched values
    stops growing, then batches it once more, would batch the step three times
    rather than two, since the carried predicate starts unbatched. With the
    condition reduced over the batch (`cond_fun`) the loop's predicate is the same
    for every member, and the selection is made here instead, for what `keep` does
    not already hold: one batching pass fewer."""
    from .state import buffers

    # What a step keeps is already held through `keep`, which includes `going`: the
    # solution, the solver's state and every save (indices and buffers).
    held = (
        new_state.y,
        new_state.solver_state,
        new_state.num_accepted_steps,
        new_state.save_state,
        new_state.dense_state,
    )
    skip = {id(x) for x in jtu.tree_leaves(held)}
    skip |= {id(x) for x in jtu.tree_leaves(buffers(new_state))}

    def _select(new, old):
        if new is old or id(new) in skip:
            return new
        return jnp.where(going, new, old)

    return jtu.tree_map(_select, new_state, state)


@scope("progress")
def _progress(spec: LoopSpec, progress_state, tprev):
    if spec.progress_meter is None:
        return progress_state
    if spec.progress_scale is not None:
        fraction = (tprev - spec.t0) * spec.progress_scale
    else:
        span = spec.t1 - spec.t0
        fraction = (tprev - spec.t0) / jnp.where(span > 0, span, 1)
    return spec.progress_meter.step(progress_state, jnp.clip(fraction, 0, 1))


class StepEvents(eqx.Module):
    """What the events of one step change in the loop."""

    save_keep: Any  # whether the step's saves are made in the loop
    next_t0: Any
    result: Any
    event_state: Any


def _events(spec: LoopSpec, state: LoopState, y1, next_t0, result, keep, dense_info):
    """Checks the event conditions after a step (`check_events`). A non-terminating
    event is located and recorded now. A terminating one stops the loop at the end of
    the step, which is kept; it is located after the loop (`locate_event`, in
    `diffeqsolve`), so that root finding runs once per solve rather than in every step
    in which some member of a `vmap` batch has an event."""
    espec = spec.event_spec
    live = keep & succeeded(state.result)
    check = check_events(
        espec,
        state.event_state.values,
        spec.direction * state.tnext,
        y1,
        spec.args,
        live,
    )
    step = EventStep(
        tprev=state.tprev, tnext=state.tnext, dense_info=dense_info, mask=check.mask
    )
    if not espec.event.terminate:
        location = locate_event(
            espec, step, y1, spec.solver.interpolation_cls, spec.args, spec.direction
        )
        event_state = record_event(
            espec, state.event_state, check, location, spec.direction
        )
        return StepEvents(
            save_keep=keep, next_t0=next_t0, result=result, event_state=event_state
        )
    stop = check.fired & succeeded(result)
    last = tree_where(stop, step, state.event_state.last)
    event_state = dataclasses.replace(state.event_state, values=check.values, last=last)
    # With a root finder the event lies somewhere inside the step: its saves are made
    # once the event has been located, up to the event. Without one the solve ends at
    # the step's end, and the step is saved as usual.
    save_keep = keep & ~stop if espec.event.root_finder is not None else keep
    return StepEvents(
        save_keep=save_keep,
        next_t0=jnp.where(stop, state.tnext, next_t0),
        result=where_result(stop, RESULTS.event_occurred, result),
        event_state=event_state,
    )


def _going(spec: LoopSpec, state: LoopState):
    """Whether the solve (each member, under `vmap`) still has steps to take."""
    going = (state.tprev < spec.t1) & succeeded(state.result)
    if spec.max_steps is not None:
        going = going & (state.num_steps < spec.max_steps)
    return going


@scope("loop")
def cond_fun(spec: LoopSpec, state: LoopState):
    going = _going(spec, state)
    if spec.mask_members:
        # Some member is going; the step body holds the finished ones.
        return eqxi.unvmap_any(going)
    return going


def run_loop(spec: LoopSpec, init_state: LoopState, outer_while_loop, inner_while_loop):
    """Runs the loop with the while-loop implementations chosen by the adjoint."""
    from .._adjoint.base import HeldMembersLoop
    from .state import buffers

    if isinstance(outer_while_loop, HeldMembersLoop):
        outer_while_loop = outer_while_loop.for_body(spec.mask_members)
    final = outer_while_loop(
        lambda s: cond_fun(spec, s),
        lambda s: step_body(spec, s, inner_while_loop),
        init_state,
        max_steps=spec.max_steps,
        buffers=buffers,
    )
    return finish_loop(spec, final)


def finish_loop(spec: LoopSpec, final: LoopState) -> LoopState:
    """A loop that ended before `t1` without a failure ran out of steps."""
    unfinished = (final.tprev < spec.t1) & succeeded(final.result)
    result = where_result(unfinished, RESULTS.max_steps_reached, final.result)
    with scope("save"):
        save_state = [
            interpolate_deferred(
                sub_state,
                sub,
                ts_tau,
                spec.solver.interpolation_cls,
                spec.args,
                spec.direction,
            )
            for sub, ts_tau, sub_state in zip(
                spec.subs, spec.subs_ts, final.save_state, strict=True
            )
        ]
    return dataclasses.replace(final, result=result, save_state=save_state)
