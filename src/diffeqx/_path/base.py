"""`AbstractPath`: anything that can be evaluated over time."""

import abc
from typing import Any

import equinox as eqx
from jaxtyping import PyTree


class AbstractPath(eqx.Module):
    """A function of time on `[t0, t1]`.

    Subclasses provide `t0`, `t1` and `evaluate(t0, t1=None, left=True)`: the value at
    `t0`, or the increment from `t0` to `t1` when `t1` is given. `left` chooses the
    left or right limit where the path jumps. `derivative(t, left=True)` is the time
    derivative.
    """

    t0: eqx.AbstractVar[Any]
    t1: eqx.AbstractVar[Any]

    @abc.abstractmethod
    def evaluate(self, t0, t1=None, left: bool = True) -> PyTree:
        """The value at `t0`, or the increment `value(t1) - value(t0)`."""

    def derivative(self, t, left: bool = True) -> PyTree:
        """The time derivative at `t`."""
        raise NotImplementedError(
            f"{type(self).__name__} does not implement `derivative`."
        )
