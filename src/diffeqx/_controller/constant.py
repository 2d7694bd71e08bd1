"""Fixed step sizes: `ConstantStepSize` and `StepTo`."""

import dataclasses
from typing import Any, ClassVar, final

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from .._solution import RESULTS
from .._times import TimesError, as_times
from .base import AbstractStepSizeController
from .ulp import next_up


@final
class ConstantStepSize(AbstractStepSizeController):
    """Fixed steps of size about `dt0`, every one accepted.

    On a finite interval the solve takes `n = ceil((t1 - t0) / dt0)` steps (`dt0`
    rounded up by one unit in the last place first, so that a `dt0` which divides
    the interval up to rounding gives the expected count). The first step has size
    `dt0`; step `k > 1` ends at `t0 + (t1 - t0) * k / n`, computed directly rather
    than by summing step sizes, and the last one exactly at `t1`. So when `dt0`
    divides `t1 - t0` every step has size `dt0`; otherwise the steps after the
    first are slightly shorter than `dt0`. This is Diffrax 0.7.2's rule. With
    `t1 = inf`, step `k + 1` ends `dt0` after step `k`.
    """

    may_jump: ClassVar[bool] = False

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        dt0 = jnp.asarray(dt0, dtype=jnp.result_type(t0))
        finite = jnp.isfinite(t1)
        num_steps = jnp.ceil((t1 - t0) / next_up(dt0)).astype(jnp.int32)
        num_steps = jnp.where(finite, num_steps, -1)
        state = ConstantState(
            index=jnp.asarray(1, jnp.int32),
            num_steps=num_steps,
            t_start=jnp.asarray(t0),
            t_end=jnp.where(finite, t1, t0),
            dt0=dt0,
        )
        return t0 + dt0, state

    def adapt_step_size(
        self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state
    ):
        state = controller_state
        index = state.index + 1
        next_t1 = grid_time(state, index, t1)
        state = dataclasses.replace(state, index=index)
        return True, t1, next_t1, False, state, RESULTS.successful


class ConstantState(eqx.Module):
    """Where `ConstantStepSize` is: step `index` ends at `grid_time(state, index)`."""

    index: Any
    num_steps: Any  # -1 for an infinite interval
    t_start: Any
    t_end: Any
    dt0: Any


def grid_time(state: ConstantState, index, t_previous):
    """Where step `index` (>= 2) ends, given that step `index - 1` ended at
    `t_previous`: `t_start + (t_end - t_start) * index / num_steps`, exactly `t_end`
    for the last step, and `t_previous + dt0` on an infinite interval."""
    dtype = jnp.result_type(state.t_end)
    fraction = index.astype(dtype) / state.num_steps.astype(dtype)
    on_grid = state.t_start + (state.t_end - state.t_start) * fraction
    on_grid = jnp.where(index == state.num_steps, state.t_end, on_grid)
    return jnp.where(state.num_steps >= 0, on_grid, t_previous + state.dt0)


def constant_step_count(t0, t1, dt0, dtype) -> int:
    """How many steps `ConstantStepSize` proposes from `t0` to a finite `t1`
    (forward time), worked out at trace time in `dtype`. The solve takes exactly
    this many unless the loop ends a step on `t1` early (a step ending within 100
    ULPs of `t1` is moved onto it), so it is an upper bound."""
    t0, t1, dt0 = (np.asarray(x, dtype=dtype) for x in (t0, t1, dt0))
    if not t1 > t0:
        return 0
    tiny = np.finfo(dtype).tiny
    up = np.nextafter(dt0, np.asarray(np.inf, dtype)) if dt0 != 0 else tiny
    return int(np.ceil((t1 - t0) / up))


def _check_step_to_ts(ts):
    ts = as_times(ts, "`StepTo(ts=...)`")
    if ts.shape[0] < 2:
        raise ValueError(
            f"`StepTo(ts=...)` needs at least two times, got shape {ts.shape}."
        )
    try:
        concrete = np.asarray(ts)
    except Exception:  # traced: checked at run time instead
        return ts
    diffs = np.diff(concrete)
    if not (np.all(diffs > 0) or np.all(diffs < 0)):
        raise TimesError(
            "`StepTo(ts=...)` must be strictly increasing (or strictly decreasing for "
            f"a backward solve); got {concrete}."
        )
    return ts


@final
class StepTo(AbstractStepSizeController):
    """Steps exactly to the given times. `ts[0]` must be `t0` and `ts[-1]` must be
    `t1`; pass `dt0=None` to `diffeqsolve`.

    **Arguments:**

    - `ts`: the step boundaries, strictly monotonic in the direction of integration.
    """

    ts: Any = eqx.field(converter=_check_step_to_ts)
    may_jump: ClassVar[bool] = False

    def wrap(self, direction):
        return eqx.tree_at(lambda s: s.ts, self, self.ts * direction)

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        ts = self.ts.astype(jnp.result_type(t0))
        ts = eqx.error_if(
            ts,
            (ts[0] != t0) | (ts[-1] != t1),
            "`StepTo(ts=...)` must start at `t0` and end at `t1`.",
        )
        return ts[1], jnp.asarray(1)

    def adapt_step_size(
        self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state
    ):
        index = jnp.minimum(controller_state + 1, self.ts.shape[0] - 1)
        next_t1 = self.ts[index].astype(jnp.result_type(t1))
        return True, t1, next_t1, False, index, RESULTS.successful
