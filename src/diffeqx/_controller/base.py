"""The step-size controller protocol."""

import abc
from typing import Any, ClassVar

import equinox as eqx
from jaxtyping import PyTree


class AbstractStepSizeController(eqx.Module):
    """Base class for step-size controllers. The protocol, which `diffeqsolve` drives:

    - `wrap(direction)`: the same controller for integration time `direction * t`
      (any stored times are multiplied by `direction`); time then runs forwards.
    - `init(terms, t0, t1, y0, dt0, args, func, error_order) -> (t1_next, state)`:
      where the first step ends.
    - `adapt_step_size(t0, t1, y0, y1_candidate, args, y_error, error_order, state)
      -> (keep_step, next_t0, next_t1, made_jump, state, result)`: accept or reject
      the step just taken and choose the next one.
    """

    # Whether `adapt_step_size` may report `made_jump=True`. Solvers that reuse the
    # last stage of a step (first-same-as-last) must re-evaluate it after a jump, so
    # knowing statically that no jump can happen saves work.
    may_jump: ClassVar[bool] = True

    def wrap(self, direction) -> "AbstractStepSizeController":
        """The controller for integration time `direction * t`."""
        return self

    @abc.abstractmethod
    def init(
        self, terms, t0, t1, y0, dt0, args, func, error_order
    ) -> tuple[Any, PyTree]:
        """The end of the first step and the initial controller state."""

    @abc.abstractmethod
    def adapt_step_size(
        self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state
    ):
        """Accept or reject the step `[t0, t1]` and propose the next one."""


class AbstractAdaptiveStepSizeController(AbstractStepSizeController):
    """A controller that adapts the step size to an error estimate, with relative
    and absolute tolerances `rtol` and `atol`. Requires an adaptive solver."""

    rtol: eqx.AbstractVar[Any]
    atol: eqx.AbstractVar[Any]
