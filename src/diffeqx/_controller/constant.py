"""Fixed step sizes: `ConstantStepSize` and `StepTo`."""

from typing import Any, ClassVar, final

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from .._solution import RESULTS
from .._times import as_times
from .base import AbstractStepSizeController


@final
class ConstantStepSize(AbstractStepSizeController):
    """Steps of constant size `dt0` (the last one is shortened to end at `t1`).
    Every step is accepted.

    Step `k` ends at `t0 + k * dt0`, computed directly rather than by summing step
    sizes, so no rounding error accumulates over many steps.
    """

    may_jump: ClassVar[bool] = False

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        return t0 + dt0, (t0, dt0, jnp.asarray(1))

    def adapt_step_size(
        self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state
    ):
        start, dt, index = controller_state
        index = index + 1
        next_t1 = start + index.astype(jnp.result_type(dt)) * dt
        return True, t1, next_t1, False, (start, dt, index), RESULTS.successful


def constant_step_count(t0, t1, dt0, dtype) -> int:
    """The number of steps `ConstantStepSize` takes from `t0` to `t1` (forward time),
    reproducing the solve loop's arithmetic in `dtype`, including its snapping of a
    negligible final step onto `t1`."""
    t0, t1, dt0 = (np.asarray(x, dtype=dtype) for x in (t0, t1, dt0))
    if not t1 > t0:
        return 0
    eps = np.finfo(dtype).eps

    def reaches_end(k):
        # Mirrors `clip_to_end`: the step ending at t0 + k dt0 is snapped onto t1.
        end = t0 + np.asarray(k, dtype=dtype) * dt0
        previous = t0 + np.asarray(k - 1, dtype=dtype) * dt0
        tolerance = 100 * eps * max(abs(previous), abs(t1))
        return end >= t1 - tolerance

    k = max(1, int(np.ceil(float((t1 - t0) / dt0))))
    while k > 1 and reaches_end(k - 1):
        k -= 1
    while not reaches_end(k):
        k += 1
    return k


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
        raise ValueError(
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
