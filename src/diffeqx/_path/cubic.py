"""`CubicInterpolation`: a piecewise-cubic path given by its coefficients."""

from typing import final

import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._eager import compiled_query
from .global_ import AbstractGlobalInterpolation, check_time_axis, check_ts

_COEFFS_FORM = (
    "`coeffs` must be a tuple `(a, b, c, d)` of four PyTrees of the same structure, "
    "such that on `[ts[i], ts[i + 1]]` the path is "
    "`a[i] s**3 + b[i] s**2 + c[i] s + d[i]` with `s = t - ts[i]`"
)


def _check_coeffs(ts, coeffs) -> tuple:
    if not isinstance(coeffs, (tuple, list)) or len(coeffs) != 4:
        raise ValueError(
            _COEFFS_FORM
            + f"; got {type(coeffs).__name__}"
            + (
                f" of length {len(coeffs)}."
                if isinstance(coeffs, (tuple, list))
                else "."
            )
            + " Compute them with e.g. `backward_hermite_coefficients(ts, ys)`."
        )
    structures = [jtu.tree_structure(c) for c in coeffs]
    if any(s != structures[0] for s in structures[1:]):
        raise ValueError(_COEFFS_FORM + f"; got structures {structures}.")
    num_intervals = ts.shape[0] - 1
    checked = tuple(
        check_time_axis(
            c,
            num_intervals,
            ts.shape,
            "CubicInterpolation",
            f"coefficient `{name}`",
            axis="interval axis (one entry per interval between consecutive `ts`)",
        )
        for c, name in zip(coeffs, "abcd", strict=True)
    )
    for leaves in zip(*(jtu.tree_leaves(c) for c in checked), strict=True):
        shapes = [leaf.shape for leaf in leaves]
        if any(shape != shapes[0] for shape in shapes[1:]):
            raise ValueError(
                "`CubicInterpolation`: the coefficients `(a, b, c, d)` must have "
                f"leaves of equal shapes, but got shapes {shapes}."
            )
    return checked


@final
class CubicInterpolation(AbstractGlobalInterpolation):
    """A piecewise-cubic path: on `[ts[i], ts[i + 1]]`, with `s = t - ts[i]`,

    `x(t) = a[i] s³ + b[i] s² + c[i] s + d[i]`.

    **Arguments:**

    - `ts`: the knots, shape `(times,)`, strictly increasing, no NaN.
    - `coeffs`: the tuple `(a, b, c, d)`: four PyTrees of the same structure whose
      leaves have shape `(times - 1, *channels)`, one entry per interval. Usually
      computed from data by [`diffeqx.backward_hermite_coefficients`][] (or
      [`diffeqx.natural_cubic_spline_coefficients`][]).

    A path is unbatched: for a batch of series, compute the coefficients and build
    the path under `jax.vmap`. A leaf with an extra leading batch axis raises a
    `ValueError` naming both shapes rather than being broadcast.

    `evaluate(t0)` is the value at `t0`, `evaluate(t0, t1)` the increment from `t0`
    to `t1`, and `derivative(t)` the time derivative. Outside `[ts[0], ts[-1]]` the
    cubics of the first and last intervals are extrapolated.

    **Example:**

    ```python
    ts = jnp.linspace(0.0, 1.0, 20)
    ys = jnp.stack([jnp.sin(ts), jnp.cos(ts)], axis=-1)  # (times, channels)
    path = diffeqx.CubicInterpolation(ts, diffeqx.backward_hermite_coefficients(ts, ys))
    path.evaluate(0.5)      # approximately [sin(0.5), cos(0.5)]
    ```
    """

    ts: Array
    coeffs: tuple[PyTree[Array], PyTree[Array], PyTree[Array], PyTree[Array]]

    def __init__(self, ts, coeffs):
        self.ts = check_ts(ts, "CubicInterpolation")
        self.coeffs = _check_coeffs(self.ts, coeffs)

    @compiled_query
    def evaluate(self, t0, t1=None, left: bool = True) -> PyTree[Array]:
        if t1 is not None:
            start = self.evaluate(t0, left=left)
            end = self.evaluate(t1, left=left)
            return jtu.tree_map(lambda x, y: y - x, start, end)
        index, s = self._interpret_t(t0, left)

        def _leaf(a, b, c, d):
            value = d[index] + s * (c[index] + s * (b[index] + s * a[index]))
            return value.astype(d.dtype)

        return jtu.tree_map(_leaf, *self.coeffs)

    @compiled_query
    def derivative(self, t, left: bool = True) -> PyTree[Array]:
        index, s = self._interpret_t(t, left)

        def _leaf(a, b, c, d):
            slope = c[index] + s * (2 * b[index] + 3 * s * a[index])
            return slope.astype(d.dtype)

        return jtu.tree_map(_leaf, *self.coeffs)
