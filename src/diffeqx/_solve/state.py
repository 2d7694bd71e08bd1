"""The named state carried through the solve loop."""

from typing import Any

import equinox as eqx
from jaxtyping import Array, Bool, Int, PyTree

from .._solution import RESULTS


class DeferredSaves(eqx.Module):
    """The steps in which requested times fall, recorded during the loop so that the
    outputs at those times are interpolated after it (`SaveState.deferred`); all
    write-once buffers, slot `k` for the `k`-th such step.

    Each slot holds the step's interval, its interpolation data and the index of the
    first requested time it covers. Unused slots of `first` hold the number of
    requested times, so that `first` stays sorted."""

    tprev: Array
    tnext: Array
    first: Array
    infos: PyTree[Array]


class SaveState(eqx.Module):
    """Buffers for one `SubSaveAt` output. Times are in integration time
    (`direction * t`) until the solve finishes."""

    ts_index: Int[Array, ""]  # next entry of `SubSaveAt.ts` to save
    save_index: Int[Array, ""]  # next free slot of `ts`/`ys`
    ts: Array
    ys: PyTree[Array]
    # The requested times' steps, while the loop runs, when they are interpolated
    # after the loop rather than in it (see `save.defer_ts`); else None. Then
    # `deferred_count` counts the slots used.
    deferred: DeferredSaves | None = None
    deferred_count: Int[Array, ""] | None = None


class DenseState(eqx.Module):
    """Buffers for dense output: step boundaries and per-step interpolation data.
    Present (not `None`) only when `SaveAt(dense=True)`."""

    save_index: Int[Array, ""] | None  # number of accepted steps stored
    ts: Array | None
    infos: PyTree[Array]


class LoopState(eqx.Module):
    """Everything that changes from one step to the next."""

    y: PyTree[Array]
    tprev: Array
    tnext: Array
    made_jump: Bool[Array, ""]
    solver_state: PyTree
    controller_state: PyTree
    result: RESULTS
    num_steps: Int[Array, ""]
    num_accepted_steps: Int[Array, ""]
    save_state: PyTree[SaveState]
    dense_state: DenseState
    event_state: Any  # an `EventState`; its fields are None without an event
    event_mask: Any  # which conditions of a terminating event fired
    progress_state: Any  # the progress meter's state


def buffers(state: LoopState) -> Any:
    """The write-once arrays of the state (filled by index, never read in the loop)."""
    # No branching on the structure here: this is also called on wrapped copies of
    # the state whose leaves are not arrays.
    save_buffers = [(s.ts, s.ys, s.deferred) for s in _leaves(state.save_state)]
    events = state.event_state
    return (
        save_buffers,
        state.dense_state.ts,
        state.dense_state.infos,
        (events.ts, events.ys, events.masks),
    )


def _leaves(save_state):
    import jax.tree_util as jtu

    return jtu.tree_leaves(save_state, is_leaf=lambda x: isinstance(x, SaveState))
