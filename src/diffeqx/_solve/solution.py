"""Turning the loop's final state into a `Solution`."""

import jax.tree_util as jtu

from .._path.dense import DenseInterpolation
from .._saveat import SubSaveAt, is_subsaveat
from .._solution import Solution, is_okay
from .save import finish_save_state


def _saved_outputs(spec, saveat, final):
    """`(ts, ys)` with the structure of `saveat.subs` (None if nothing was saved)."""
    if saveat.subs is None:
        return None, None
    outputs = [
        finish_save_state(
            state,
            sub,
            ts_tau,
            final.tprev,
            final.y,
            final.num_accepted_steps,
            spec.args,
            spec.direction,
            is_okay(final.result),
        )
        for state, sub, ts_tau in zip(
            final.save_state, spec.subs, spec.subs_ts, strict=True
        )
    ]
    if isinstance(saveat.subs, SubSaveAt):
        return outputs[0]
    treedef = jtu.tree_structure(saveat.subs, is_leaf=is_subsaveat)
    ts = jtu.tree_unflatten(treedef, [out[0] for out in outputs])
    ys = jtu.tree_unflatten(treedef, [out[1] for out in outputs])
    return ts, ys


def _dense_output(spec, saveat, final, t0, y0):
    if not saveat.dense:
        return None
    dense = final.dense_state
    return DenseInterpolation(
        ts=dense.ts,
        ts_size=dense.save_index + 1,
        infos=dense.infos,
        interpolation_cls=spec.solver.interpolation_cls,
        direction=spec.direction,
        t0_if_trivial=t0,
        y0_if_trivial=y0,
    )


def raise_if_failed(solution: Solution, failed) -> Solution:
    """`solution`, with an error raised at run time when `failed`: threaded through
    every field, so that it is raised whichever of them is used first. (A host
    callback in the program costs some run time on CPU; `throw=False` avoids it.)"""
    return solution.result.error_if(solution, failed)


def assemble_solution(spec, saveat, final, t0, t1, y0, max_steps, event) -> Solution:
    """The `Solution` of the loop's final state `final`, raising nothing."""
    ts, ys = _saved_outputs(spec, saveat, final)
    result = final.result
    event_mask = event_ts = event_ys = None
    if event is not None:
        if event.terminate:
            # `Solution.t1` stays the `t1` asked for, as in Diffrax: the event time
            # is the last saved time.
            event_mask = final.event_mask
        else:
            event_mask = final.event_state.masks
            event_ts = final.event_state.ts
            event_ys = final.event_state.ys
    return Solution(
        t0=t0,
        t1=t1,
        ts=ts,
        ys=ys,
        interpolation=_dense_output(spec, saveat, final, t0, y0),
        stats=dict(
            num_steps=final.num_steps,
            num_accepted_steps=final.num_accepted_steps,
            # Every step is accepted or rejected, so the loop counts two of the three.
            num_rejected_steps=final.num_steps - final.num_accepted_steps,
            max_steps=max_steps,
        ),
        result=result,
        solver_state=final.solver_state if saveat.solver_state else None,
        controller_state=final.controller_state if saveat.controller_state else None,
        # A controller that never jumps (and no `made_jump` given to resume from):
        # `False` itself, known when the program is traced, as in Diffrax.
        made_jump=(final.made_jump if spec.may_jump else False)
        if saveat.made_jump
        else None,
        event_mask=event_mask,
        event_ts=event_ts,
        event_ys=event_ys,
    )
