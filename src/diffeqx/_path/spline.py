"""Cubic-spline coefficients from data, for `CubicInterpolation`.

Both functions return `(a, b, c, d)`: PyTrees like `ys` with leaves of shape
`(times - 1, *channels)`, such that on `[ts[i], ts[i + 1]]`, with `s = t - ts[i]`,
the path is `a[i] s³ + b[i] s² + c[i] s + d[i]`.
"""

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.lax.linalg import tridiagonal_solve
from jaxtyping import Array, PyTree

from .global_ import check_time_axis, check_ts
from .missing import (
    as_channels,
    channel_values,
    fill_ends,
    gather,
    neighbours,
    per_leaf,
)


def backward_hermite_coefficients(
    ts,
    ys: PyTree,
    *,
    deriv0=None,
    replace_nans_at_start=None,
    fill_forward_nans_at_end: bool = False,
) -> tuple[PyTree, PyTree, PyTree, PyTree]:
    """Coefficients of the Hermite cubic spline with backward differences.

    Between consecutive observations `(t_j, y_j)` and `(t_k, y_k)` of a channel, the
    path is the cubic with value `y_j` and slope `m_j` at `t_j`, and value `y_k` and
    slope `(y_k - y_j) / (t_k - t_j)` (the backward difference) at `t_k`; `m_j` is
    the backward difference that arrived at `t_j`, so the path is continuously
    differentiable. Up to the next observation, the path depends on no later data,
    which suits online prediction with neural CDEs (Morrill et al., 2021,
    arXiv:2106.11028). Its error for smooth data is `O(h²)` in the spacing `h`.

    Missing values (`NaN`) are skipped, channel by channel: the path is the one built
    from that channel's observations alone, re-expanded on every interval of `ts`.

    **Arguments:**

    - `ts`: the observation times, shape `(times,)`, strictly increasing.
    - `ys`: the observations, a PyTree of arrays of shape `(times, *channels)`; `NaN`
      marks a missing value.
    - `deriv0`: the slope at each channel's first observation (a PyTree like `ys`
      whose leaves broadcast against `*channels`, or one array for every leaf). By
      default, the forward difference to the channel's next observation.
    - `replace_nans_at_start`: by default, intervals before a channel's first
      observation have `NaN` coefficients. If given (like `deriv0`), it is taken as
      the observation at `ts[0]` of every channel that is missing there.
    - `fill_forward_nans_at_end`: by default, intervals after a channel's last
      observation have `NaN` coefficients. If `True`, the missing values there take
      the value of the last observation, as observations.

    **Returns:**

    The tuple `(a, b, c, d)` for [`diffeqx.CubicInterpolation`][].

    **Example:**

    ```python
    coeffs = diffeqx.backward_hermite_coefficients(ts, ys)
    path = diffeqx.CubicInterpolation(ts, coeffs)
    ```
    """
    ts = check_ts(ts, "backward_hermite_coefficients")
    ys = check_time_axis(
        ys, ts.shape[0], ts.shape, "backward_hermite_coefficients", "`ys`"
    )
    leaves, structure = jtu.tree_flatten(ys)
    starts = per_leaf(replace_nans_at_start, ys, "replace_nans_at_start")
    slopes0 = per_leaf(deriv0, ys, "deriv0")
    per_leaf_coeffs = []
    for leaf, start, slope0 in zip(leaves, starts, slopes0, strict=True):
        if start is not None:
            start = channel_values(start, leaf, "replace_nans_at_start")
        if slope0 is not None:
            slope0 = channel_values(slope0, leaf, "deriv0")
        y = fill_ends(as_channels(leaf), start, fill_forward_nans_at_end)
        coeffs = _backward_hermite(ts, y, slope0)
        shape = (leaf.shape[0] - 1,) + leaf.shape[1:]
        per_leaf_coeffs.append([x.reshape(shape).astype(leaf.dtype) for x in coeffs])
    return tuple(
        jtu.tree_unflatten(structure, [coeffs[n] for coeffs in per_leaf_coeffs])
        for n in range(4)
    )


@jax.jit
def _backward_hermite(ts: Array, y: Array, slope0) -> tuple[Array, ...]:
    """`y` is `(times, channels)`; returns `(a, b, c, d)`, each `(times - 1, channels)`."""
    num_times = y.shape[0]
    observed = ~jnp.isnan(y)
    y_safe = jnp.where(observed, y, 0)  # keeps NaN out of gradients
    before, after = neighbours(observed)
    # Interval i lies inside the piece from observation j to observation k.
    j, k = before[:-1], after[1:]
    valid = (j >= 0) & (k < num_times)
    t_j, t_k = ts[jnp.clip(j, 0)], ts[jnp.clip(k, 0, num_times - 1)]
    y_j, y_k = gather(y_safe, j), gather(y_safe, k)
    width = jnp.where(valid, t_k - t_j, 1)
    secant = (y_k - y_j) / width
    # The slope at t_j: the backward difference from the observation before j.
    previous = gather(before, j - 1)
    has_previous = (j >= 1) & (previous >= 0)
    t_prev, y_prev = ts[jnp.clip(previous, 0)], gather(y_safe, previous)
    incoming = (y_j - y_prev) / jnp.where(has_previous, t_j - t_prev, 1)
    first = secant if slope0 is None else jnp.broadcast_to(slope0, secant.shape)
    m = jnp.where(has_previous, incoming, first)
    # The piece, in powers of (t - t_j): y_j + m u + B u² + A u³.
    quadratic = 2 * (secant - m) / width
    cubic = (m - secant) / width**2
    # Re-expanded in powers of s = t - ts[i], with ts[i] = t_j + delta.
    delta = ts[:-1, None] - t_j
    d = y_j + delta * (m + delta * (quadratic + delta * cubic))
    c = m + delta * (2 * quadratic + 3 * delta * cubic)
    b = quadratic + 3 * delta * cubic
    a = cubic
    return tuple(jnp.where(valid, x, jnp.nan) for x in (a, b, c, d))


def natural_cubic_spline_coefficients(ts, ys: PyTree) -> tuple[PyTree, ...]:
    """Coefficients of the natural cubic spline through the observations.

    The spline is twice continuously differentiable, has zero second derivative at
    `ts[0]` and `ts[-1]`, and for smooth data its error is `O(h⁴)` in the spacing
    `h` away from the ends (and `O(h²)` near an end where the data's second
    derivative is not zero). Unlike [`diffeqx.backward_hermite_coefficients`][], its
    value at any time depends on every observation, later ones too: use it when the
    whole series is known in advance. Not in Diffrax.

    **Arguments:**

    - `ts`: the observation times, shape `(times,)`, strictly increasing.
    - `ys`: the observations, a PyTree of arrays of shape `(times, *channels)`. They
      must not contain `NaN` (a `NaN` spreads to its whole channel): fill missing
      values first, e.g. with [`diffeqx.linear_interpolation`][].

    **Returns:**

    The tuple `(a, b, c, d)` for [`diffeqx.CubicInterpolation`][].
    """
    ts = check_ts(ts, "natural_cubic_spline_coefficients")
    ys = check_time_axis(
        ys, ts.shape[0], ts.shape, "natural_cubic_spline_coefficients", "`ys`"
    )
    leaves, structure = jtu.tree_flatten(ys)
    per_leaf_coeffs = []
    for leaf in leaves:
        coeffs = _natural_spline(ts, as_channels(leaf))
        shape = (leaf.shape[0] - 1,) + leaf.shape[1:]
        per_leaf_coeffs.append([x.reshape(shape).astype(leaf.dtype) for x in coeffs])
    return tuple(
        jtu.tree_unflatten(structure, [coeffs[n] for coeffs in per_leaf_coeffs])
        for n in range(4)
    )


@jax.jit
def _natural_spline(ts: Array, y: Array) -> tuple[Array, ...]:
    """`y` is `(times, channels)`; returns `(a, b, c, d)`, each `(times - 1, channels)`."""
    widths = jnp.diff(ts)
    secants = jnp.diff(y, axis=0) / widths[:, None]
    channels = y.shape[1]
    if y.shape[0] == 2:
        second = jnp.zeros((2, channels), secants.dtype)
    else:
        # Continuity of the first derivative at each interior knot, for the second
        # derivatives M there (M = 0 at both ends): a tridiagonal system.
        rhs = 6 * (secants[1:] - secants[:-1])
        h_inner = widths[1:-1].astype(rhs.dtype)
        zero = jnp.zeros((1,), rhs.dtype)
        lower = jnp.concatenate([zero, h_inner])
        upper = jnp.concatenate([h_inner, zero])
        diagonal = (2 * (widths[:-1] + widths[1:])).astype(rhs.dtype)
        inner = tridiagonal_solve(lower, diagonal, upper, rhs)
        edge = jnp.zeros((1, channels), inner.dtype)
        second = jnp.concatenate([edge, inner, edge])
    h = widths[:, None]
    a = (second[1:] - second[:-1]) / (6 * h)
    b = second[:-1] / 2
    c = secants - h * (2 * second[:-1] + second[1:]) / 6
    d = y[:-1]
    return a, b, c, d
