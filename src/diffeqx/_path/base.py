"""`AbstractPath`: anything that can be evaluated over time."""

import abc
from typing import Any, Generic, TypeVar

import equinox as eqx
from jaxtyping import PyTree

# The type of the path's values, as in `AbstractPath[Float[Array, "channels"]]`.
ValueT = TypeVar("ValueT")


class AbstractPath(eqx.Module, Generic[ValueT]):
    """A function of time on `[t0, t1]`.

    Subclasses provide `t0`, `t1` and `evaluate(t0, t1=None, left=True)`: the value at
    `t0`, or the increment from `t0` to `t1` when `t1` is given. `left` chooses the
    left or right limit where the path jumps. `derivative(t, left=True)` is the time
    derivative.

    `AbstractPath[ValueType]` may be written in annotations (e.g.
    `AbstractPath[Array]`); the type parameter is not checked.
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
