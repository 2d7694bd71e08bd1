"""`ClipStepSizeController`: steps that land on given times and respect jumps."""

from typing import Any, final

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from .._times import as_times
from .base import AbstractAdaptiveStepSizeController, AbstractStepSizeController


def _sorted_times(ts, name):
    if ts is None:
        return None
    ts = as_times(ts, f"`{name}`")
    try:
        concrete = np.asarray(ts)
    except Exception:
        return ts
    if np.any(np.isnan(concrete)):
        raise ValueError(f"`{name}` contains NaN: {concrete}.")
    return ts


def _next_time_after(ts, t):
    """The first time in `ts` strictly after `t` (ts sorted ascending), or inf."""
    if ts.shape[0] == 0:
        return jnp.asarray(jnp.inf, dtype=jnp.result_type(t))
    index = jnp.searchsorted(ts, t, side="right")
    candidate = ts[jnp.minimum(index, ts.shape[0] - 1)].astype(jnp.result_type(t))
    return jnp.where(index < ts.shape[0], candidate, jnp.inf)


@final
class ClipStepSizeController(AbstractStepSizeController):
    """Wraps another controller so that steps land exactly on `step_ts`, and end just
    before each of `jump_ts` (discontinuities of the vector field), the following
    step starting at the jump. After a jump, first-same-as-last solvers re-evaluate
    their first stage instead of reusing the last one.

    **Arguments:**

    - `controller`: the controller to wrap.
    - `step_ts`: times that steps must land on.
    - `jump_ts`: times at which the vector field may be discontinuous.
    """

    controller: AbstractStepSizeController
    step_ts: Any = eqx.field(default=None)
    jump_ts: Any = eqx.field(default=None)

    def __init__(self, controller, step_ts=None, jump_ts=None):
        if not isinstance(controller, AbstractStepSizeController):
            raise TypeError(
                "`ClipStepSizeController(controller)` expects a step-size controller, "
                f"got {controller!r}."
            )
        self.controller = controller
        self.step_ts = _sorted_times(step_ts, "step_ts")
        self.jump_ts = _sorted_times(jump_ts, "jump_ts")

    @property
    def may_jump(self) -> bool:
        return self.jump_ts is not None or self.controller.may_jump

    @property
    def rtol(self):
        return getattr(self.controller, "rtol", None)

    @property
    def atol(self):
        return getattr(self.controller, "atol", None)

    def wrap(self, direction):
        def _wrap(ts):
            return None if ts is None else jnp.sort(ts * direction)

        return ClipStepSizeController(
            self.controller.wrap(direction), _wrap(self.step_ts), _wrap(self.jump_ts)
        )

    def _clip(self, t0, t1):
        """Shortens the step `[t0, t1]` to the next step time or jump time."""
        ends_at_jump = jnp.asarray(False)
        if self.step_ts is not None:
            t1 = jnp.minimum(t1, _next_time_after(self.step_ts, t0))
        if self.jump_ts is not None:
            jump = _next_time_after(self.jump_ts, t0)
            ends_at_jump = jump <= t1
            # End the step one floating-point number before the jump, so that no stage
            # sees the vector field on the far side of the discontinuity.
            t1 = jnp.where(ends_at_jump, jnp.nextafter(jump, -jnp.inf), t1)
        return t1, ends_at_jump

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        t1_next, inner_state = self.controller.init(
            terms, t0, t1, y0, dt0, args, func, error_order
        )
        t1_next, ends_at_jump = self._clip(t0, t1_next)
        return t1_next, (inner_state, ends_at_jump)

    def adapt_step_size(
        self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state
    ):
        inner_state, ends_at_jump = controller_state
        keep, next_t0, next_t1, made_jump, inner_state, result = (
            self.controller.adapt_step_size(
                t0, t1, y0, y1_candidate, args, y_error, error_order, inner_state
            )
        )
        jumped = keep & ends_at_jump
        # After a jump the next step starts on the jump itself.
        after_jump = jnp.nextafter(t1, jnp.inf)
        dt_next = next_t1 - next_t0
        next_t0 = jnp.where(jumped, after_jump, next_t0)
        next_t1 = jnp.where(jumped, after_jump + dt_next, next_t1)
        next_t1, next_ends_at_jump = self._clip(next_t0, next_t1)
        made_jump = jnp.asarray(made_jump) | jumped
        return (
            keep,
            next_t0,
            next_t1,
            made_jump,
            (inner_state, next_ends_at_jump),
            result,
        )


def is_adaptive_controller(controller) -> bool:
    """Whether a controller (possibly clipped) adapts to error estimates."""
    while isinstance(controller, ClipStepSizeController):
        controller = controller.controller
    return isinstance(controller, AbstractAdaptiveStepSizeController)


def unwrap_controller(controller):
    while isinstance(controller, ClipStepSizeController):
        controller = controller.controller
    return controller
