"""Fixed step sizes: `ConstantStepSize` and `StepTo`."""

from typing import Any, ClassVar, final

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from .._solution import RESULTS
from .base import AbstractStepSizeController


@final
class ConstantStepSize(AbstractStepSizeController):
    """Steps of constant size `dt0` (the last one is shortened to end at `t1`).
    Every step is accepted."""

    may_jump: ClassVar[bool] = False

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        return t0 + dt0, dt0

    def adapt_step_size(
        self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state
    ):
        dt = controller_state
        return True, t1, t1 + dt, False, dt, RESULTS.successful


def _check_step_to_ts(ts):
    ts = jnp.asarray(ts)
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(
            f"`StepTo(ts=...)` needs a 1-D array of at least two times, got shape "
            f"{ts.shape}."
        )
    if not jnp.issubdtype(ts.dtype, jnp.floating):
        ts = ts.astype(jnp.result_type(float))
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
