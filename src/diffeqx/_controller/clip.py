"""`ClipStepSizeController`: steps that land on given times, respect jumps, and
(optionally) revisit the ends of rejected steps."""

from typing import Any, final

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from .._solution import RESULTS, succeeded, where_result
from .._times import as_times
from .base import AbstractAdaptiveStepSizeController, AbstractStepSizeController
from .constant import ConstantStepSize, StepTo
from .ulp import next_down, next_up


def _checked_times(ts, name):
    if ts is None:
        return None
    ts = as_times(ts, f"`{name}`")
    try:
        concrete = np.asarray(ts)
    except Exception:  # traced: nothing to check now
        return ts
    if np.any(np.isnan(concrete)):
        raise ValueError(f"`{name}` contains NaN: {concrete}.")
    return ts


def _first_after(ts, t):
    """The first of the sorted times `ts` strictly after `t`, or inf."""
    if ts.shape[0] == 0:
        return jnp.asarray(jnp.inf, dtype=t.dtype)
    index = jnp.searchsorted(ts, t, side="right")
    candidate = ts[jnp.minimum(index, ts.shape[0] - 1)]
    return jnp.where(index < ts.shape[0], candidate, jnp.inf)


def _step_past(ts, t):
    """`(t', hit)`: `t` moved past any of `ts` lying on it or one ULP above it (to
    one ULP past that time), so that no step is left between `t` and such a time."""
    up = next_up(t)
    on_time = jnp.any(t == ts)
    just_before = jnp.any(up == ts)
    moved = jnp.where(on_time, up, jnp.where(just_before, next_up(up), t))
    return moved, on_time | just_before


class ClipState(eqx.Module):
    """`inner`: the wrapped controller's state. `rejected_index`, `rejected_ts`: a
    stack of the ends of rejected steps still to be stepped to (slots
    `rejected_index:` are in use, the nearest time first; None without
    `store_rejected_steps`). `pending_t1`: for a fixed-step controller, the end of
    its current step (which a step or jump time may have cut short; else None)."""

    inner: PyTree
    rejected_index: Any = None
    rejected_ts: Any = None
    pending_t1: Any = None


@final
class ClipStepSizeController(AbstractStepSizeController):
    """Wraps another controller so that steps land exactly on `step_ts`, and end
    just before each of `jump_ts` (discontinuities of the vector field); the next
    step then starts just after the jump, and first-same-as-last solvers
    re-evaluate their first stage (`made_jump`). As in Diffrax: a step ends one ULP
    before a jump time, the next starts one ULP after it, and a step that starts on
    or one ULP before a step time starts one ULP past it instead.

    **Arguments:**

    - `controller`: the controller to wrap.
    - `step_ts`: times that steps must land on.
    - `jump_ts`: times at which the vector field may be discontinuous.
    - `store_rejected_steps`: if an integer `n`, the end of every rejected step is
      remembered (up to `n` at once) and later steps land on it, as adaptive SDE
      solves with non-commutative noise need (so that the Brownian path is sampled
      at the same times); more than `n` outstanding ends stop the solve with
      `RESULTS.max_steps_rejected`.

    **Extension over Diffrax**: Diffrax only clips adaptive controllers. Here a
    `ConstantStepSize` or `StepTo` may be wrapped too. A step cut short by a step or
    jump time is followed by one to the end of the step that was cut, after which
    the fixed grid resumes: with `ConstantStepSize` the steps keep ending at
    `t0 + (t1 - t0) * k / n` (see `ConstantStepSize`), so no step is longer than
    `dt0`. E.g. `dt0=0.1` on `[0, 1]` with `step_ts=[0.05]` gives steps ending at
    `0.05, 0.1, 0.2, ..., 1`.
    """

    controller: AbstractStepSizeController
    step_ts: Any = None
    jump_ts: Any = None
    store_rejected_steps: int | None = eqx.field(static=True, default=None)

    def __init__(
        self, controller, step_ts=None, jump_ts=None, store_rejected_steps=None
    ):
        if not isinstance(controller, AbstractStepSizeController):
            raise TypeError(
                "`ClipStepSizeController(controller)` expects a step-size controller, "
                f"got {controller!r}."
            )
        if store_rejected_steps is not None and (
            isinstance(store_rejected_steps, bool)
            or not isinstance(store_rejected_steps, (int, np.integer))
            or store_rejected_steps < 1
        ):
            raise ValueError(
                "`store_rejected_steps` must be a positive integer or None, got "
                f"{store_rejected_steps!r}."
            )
        self.controller = controller
        self.step_ts = _checked_times(step_ts, "step_ts")
        self.jump_ts = _checked_times(jump_ts, "jump_ts")
        self.store_rejected_steps = (
            None if store_rejected_steps is None else int(store_rejected_steps)
        )

    @property
    def norm(self):
        """The wrapped controller's norm (as Diffrax's attribute)."""
        return self.controller.norm

    @property
    def may_jump(self) -> bool:
        return self.jump_ts is not None or self.controller.may_jump

    @property
    def rtol(self):
        return getattr(self.controller, "rtol", None)

    @property
    def atol(self):
        return getattr(self.controller, "atol", None)

    @property
    def _fixed_grid(self) -> bool:
        return isinstance(self.controller, (ConstantStepSize, StepTo))

    def wrap(self, direction):
        def _wrap(ts):
            if ts is None:
                return None
            direction_ = jnp.asarray(direction)
            return jnp.sort(ts.astype(direction_.dtype) * direction_)

        return ClipStepSizeController(
            self.controller.wrap(direction),
            _wrap(self.step_ts),
            _wrap(self.jump_ts),
            self.store_rejected_steps,
        )

    def _times(self, ts, t):
        return None if ts is None else ts.astype(jnp.result_type(t))

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        t1_next, inner_state = self.controller.init(
            terms, t0, t1, y0, dt0, args, func, error_order
        )
        t1_next = jnp.asarray(t1_next)
        clipped = t1_next
        step_ts = self._times(self.step_ts, t0)
        if step_ts is not None:
            clipped = jnp.minimum(_first_after(step_ts, t0), clipped)
        jump_ts = self._times(self.jump_ts, t0)
        if jump_ts is not None:
            clipped = jnp.minimum(next_down(_first_after(jump_ts, t0)), clipped)
        rejected_index = rejected_ts = pending_t1 = None
        if self.store_rejected_steps is not None:
            rejected_index = jnp.asarray(self.store_rejected_steps, jnp.int32)
            rejected_ts = jnp.zeros((self.store_rejected_steps,), t1_next.dtype)
        if self._fixed_grid:
            pending_t1 = t1_next
        state = ClipState(inner_state, rejected_index, rejected_ts, pending_t1)
        return clipped, state

    def adapt_step_size(
        self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state
    ):
        state = controller_state
        keep, next_t0, next_t1, made_jump, inner_state, result = (
            self.controller.adapt_step_size(
                t0, t1, y0, y1_candidate, args, y_error, error_order, state.inner
            )
        )
        next_t0 = jnp.asarray(next_t0)
        next_t1 = jnp.asarray(next_t1, dtype=next_t0.dtype)
        pending_t1 = state.pending_t1
        if self._fixed_grid:
            # The step just taken was cut short of the fixed step it stood for:
            # finish that step before the fixed controller moves on.
            resumed, _ = self._jump_past(next_t0)
            unfinished = resumed < pending_t1
            next_t1 = jnp.where(unfinished, pending_t1, next_t1)
            inner_state = _tree_where(unfinished, state.inner, inner_state)
            pending_t1 = next_t1
        rejected_index, rejected_ts = state.rejected_index, state.rejected_ts
        if self.store_rejected_steps is not None:
            rejected_index, rejected_ts, result = self._remember_rejected(
                keep, next_t0, t1, rejected_index, rejected_ts, result
            )
        step_ts = self._times(self.step_ts, next_t0)
        if step_ts is not None:
            after, _ = _step_past(step_ts, next_t0)
            next_t1 = jnp.minimum(_first_after(step_ts, after), next_t1)
        if self.store_rejected_steps is not None:
            next_t1 = jnp.minimum(_stack_top(rejected_index, rejected_ts), next_t1)
        jump_ts = self._times(self.jump_ts, next_t0)
        if jump_ts is not None:
            next_t0, jumped = _step_past(jump_ts, next_t0)
            made_jump = jnp.asarray(made_jump) | jumped
            next_t1 = jnp.maximum(next_up(next_t0), next_t1)
            next_t1 = jnp.minimum(next_down(_first_after(jump_ts, next_t0)), next_t1)
        state = ClipState(
            inner=inner_state,
            rejected_index=rejected_index,
            rejected_ts=rejected_ts,
            pending_t1=pending_t1,
        )
        return keep, next_t0, next_t1, made_jump, state, result

    def _jump_past(self, t):
        jump_ts = self._times(self.jump_ts, t)
        if jump_ts is None:
            return t, jnp.asarray(False)
        return _step_past(jump_ts, t)

    def _remember_rejected(self, keep, next_t0, t1, index, ts, result):
        """Pops the nearest remembered end once reached; pushes the end of a rejected
        step. Overflowing the stack ends the solve."""
        count = self.store_rejected_steps
        reached = next_t0 == _stack_top(index, ts)
        index = index + jnp.where(reached, 1, 0)
        # A rejected step that ended on the nearest remembered end (it was clipped
        # to it) adds nothing: remembering it twice would later ask for a step of
        # length zero.
        t1 = t1.astype(ts.dtype)
        push = ~jnp.asarray(keep) & (t1 != _stack_top(index, ts))
        index = (index - jnp.where(push, 1, 0)).astype(jnp.int32)
        slot = jnp.clip(index, 0, count - 1)
        ts = jnp.where(push & (index >= 0), ts.at[slot].set(t1), ts)
        overflow = index < 0
        result = where_result(
            overflow & succeeded(result),
            RESULTS.max_steps_rejected,
            result,
        )
        return index, ts, result


def _stack_top(index, ts):
    count = ts.shape[0]
    top = ts[jnp.clip(index, 0, count - 1)]
    return jnp.where((index >= 0) & (index < count), top, jnp.inf)


def _tree_where(pred, on_true, on_false):
    return jtu.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def is_adaptive_controller(controller) -> bool:
    """Whether a controller (possibly clipped) adapts to error estimates."""
    return isinstance(unwrap_controller(controller), AbstractAdaptiveStepSizeController)


def unwrap_controller(controller):
    while isinstance(controller, ClipStepSizeController):
        controller = controller.controller
    return controller
