"""`LinearInterpolation`: the piecewise-linear path through observations."""

from typing import final

import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._eager import compiled_query
from .global_ import AbstractGlobalInterpolation, check_time_axis, check_ts


@final
class LinearInterpolation(AbstractGlobalInterpolation):
    """The piecewise-linear path through the points `(ts[i], ys[i])`.

    **Arguments:**

    - `ts`: the observation times, shape `(times,)`, strictly increasing, no NaN.
    - `ys`: the observations: a PyTree whose every leaf has shape
      `(times, *channels)`. It must not contain NaN; fill missing values first, e.g.
      with [`diffeqx.linear_interpolation`][] or
      [`diffeqx.rectilinear_interpolation`][].

    A path is unbatched. For a batch of series, build and use it under `jax.vmap`:
    a leaf with an extra leading batch axis raises a `ValueError` naming both
    shapes rather than being broadcast.

    `evaluate(t0)` is the value at `t0`; `evaluate(t0, t1)` the increment from `t0`
    to `t1`; `derivative(t)` the slope of the piece holding `t`. At a knot, the
    derivative is that of the interval to the left (`left=True`) or to the right
    (`left=False`). Outside `[ts[0], ts[-1]]` the first and last pieces are
    extended linearly.

    !!! warning

        As the control of a [`diffeqx.ControlTerm`][], this path has a kink at every
        knot. With an adaptive step-size controller, tell it where they are so that
        steps land on them: `ClipStepSizeController(PIDController(...), jump_ts=ts)`.

    **Example:**

    ```python
    ts = jnp.array([0.0, 1.0, 3.0])
    ys = jnp.array([[0.0, 1.0], [2.0, 1.0], [2.0, 5.0]])  # (times, channels)
    path = diffeqx.LinearInterpolation(ts, ys)
    path.evaluate(2.0)          # [2.0, 3.0]
    path.evaluate(0.0, 2.0)     # [2.0, 2.0]
    path.derivative(0.5)        # [2.0, 0.0]
    ```
    """

    ts: Array
    ys: PyTree[Array]

    def __init__(self, ts, ys):
        self.ts = check_ts(ts, "LinearInterpolation")
        self.ys = check_time_axis(
            ys, self.ts.shape[0], self.ts.shape, "LinearInterpolation", "`ys`"
        )

    def _piece(self, t, left):
        index, offset = self._interpret_t(t, left)
        width = self.ts[index + 1] - self.ts[index]
        return index, offset, width

    @compiled_query
    def evaluate(self, t0, t1=None, left: bool = True) -> PyTree[Array]:
        if t1 is not None:
            start = self.evaluate(t0, left=left)
            end = self.evaluate(t1, left=left)
            return jtu.tree_map(lambda a, b: b - a, start, end)
        index, offset, width = self._piece(t0, left)
        theta = offset / width

        def _leaf(ys):
            y_left, y_right = ys[index], ys[index + 1]
            return (y_left + theta * (y_right - y_left)).astype(ys.dtype)

        return jtu.tree_map(_leaf, self.ys)

    @compiled_query
    def derivative(self, t, left: bool = True) -> PyTree[Array]:
        index, _, width = self._piece(t, left)

        def _leaf(ys):
            return ((ys[index + 1] - ys[index]) / width).astype(ys.dtype)

        return jtu.tree_map(_leaf, self.ys)
