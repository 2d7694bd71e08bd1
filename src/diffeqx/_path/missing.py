"""Missing observations: `NaN` entries of a time series, and how they are filled.

Every channel (each scalar entry of each leaf's `*channels`) has its own pattern of
missing values. The functions here work on a leaf reshaped to `(times, channels)`:
for each entry they find the nearest observation at or before it and at or after
it with cumulative max/min scans, so everything stays `O(times)`, jit-able,
vmap-able and differentiable with respect to the observed values.
"""

import functools

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .global_ import check_time_axis, check_ts


def per_leaf(value, ys: PyTree, name: str) -> list:
    """`value` aligned with the leaves of `ys`: `None`, a PyTree with the structure of
    `ys`, or one array-like used for every leaf."""
    leaves, structure = jtu.tree_flatten(ys)
    if value is None:
        return [None] * len(leaves)
    value_leaves, value_structure = jtu.tree_flatten(value)
    if value_structure == structure:
        return value_leaves
    if len(value_leaves) == 1:
        return value_leaves * len(leaves)
    raise ValueError(
        f"`{name}` must have the PyTree structure of `ys` ({structure}) or be a "
        f"single array, but has structure {value_structure}."
    )


def as_channels(leaf: Array) -> Array:
    """`(times, *channels)` -> `(times, prod(channels))`."""
    return leaf.reshape(leaf.shape[0], -1)


def channel_values(value, leaf: Array, name: str) -> Array:
    """A per-channel value broadcast against `leaf`'s channels: shape `(channels,)`."""
    value = jnp.asarray(value, dtype=leaf.dtype)
    try:
        value = jnp.broadcast_to(value, leaf.shape[1:])
    except ValueError as error:
        raise ValueError(
            f"`{name}` has a leaf of shape {value.shape}, which does not broadcast "
            f"against the channels {leaf.shape[1:]} of `ys` (a leaf of shape "
            f"{leaf.shape})."
        ) from error
    return value.reshape(-1)


def neighbours(observed: Array) -> tuple[Array, Array]:
    """For each entry of a `(times, channels)` mask: the index of the last observation
    at or before it (`-1` if none) and of the first at or after it (`times` if none)."""
    # Cumulative max/min are parallel scans, right for accelerators; on a CPU a
    # sequential loop over the times is several times faster to run and to compile.
    return lax.platform_dependent(
        observed, cpu=_neighbours_sequential, default=_neighbours_parallel
    )


def _neighbours_parallel(observed: Array) -> tuple[Array, Array]:
    num_times = observed.shape[0]
    index = jnp.arange(num_times)[:, None]
    before = lax.cummax(jnp.where(observed, index, -1), axis=0)
    after = lax.cummin(jnp.where(observed, index, num_times), axis=0, reverse=True)
    return before, after


def _neighbours_sequential(observed: Array) -> tuple[Array, Array]:
    num_times = observed.shape[0]

    def latest(index, inputs):
        is_observed, i = inputs
        index = jnp.where(is_observed, i, index)
        return index, index

    inputs = (observed, jnp.arange(num_times))
    start = jnp.full(observed.shape[1:], -1)
    _, before = lax.scan(latest, start, inputs)
    end = jnp.full(observed.shape[1:], num_times)
    _, after = lax.scan(latest, end, inputs, reverse=True)
    return before, after


def gather(values: Array, index: Array) -> Array:
    """`values[index[i, c], c]`, with out-of-range indices clipped (mask them after)."""
    clipped = jnp.clip(index, 0, values.shape[0] - 1)
    return jnp.take_along_axis(values, clipped, axis=0)


@functools.partial(jax.jit, static_argnames="fill_end")
def fill_ends(y: Array, start_value, fill_end: bool) -> Array:
    """If `start_value` is given, it becomes the observation at the first time of
    each channel whose first entry is missing; if `fill_end`, the missing entries
    after a channel's last observation take its value. `y` is `(times, channels)`."""
    if start_value is not None:
        y = y.at[0].set(jnp.where(jnp.isnan(y[0]), start_value, y[0]))
    if fill_end:
        observed = ~jnp.isnan(y)
        before, after = neighbours(observed)
        last = gather(jnp.where(observed, y, 0), before)
        y = jnp.where((after >= y.shape[0]) & (before >= 0), last, y)
    return y


def _prepare(ts, ys, replace_nans_at_start, fn_name):
    ts = check_ts(ts, fn_name)
    ys = check_time_axis(ys, ts.shape[0], ts.shape, fn_name, "`ys`")
    starts = per_leaf(replace_nans_at_start, ys, "replace_nans_at_start")
    return ts, ys, starts


def linear_interpolation(
    ts,
    ys: PyTree,
    *,
    fill_forward_nans_at_end: bool = False,
    replace_nans_at_start=None,
) -> PyTree:
    """Fills missing values (`NaN`) by linear interpolation in time.

    Each missing entry is replaced by the value, at its time, of the straight line
    between the nearest observations of the same channel before and after it.
    Channels are filled independently, so each may have its own missing entries.

    **Arguments:**

    - `ts`: the observation times, shape `(times,)`, strictly increasing.
    - `ys`: the observations, a PyTree of arrays of shape `(times, *channels)`, with
      `NaN` marking a missing value.
    - `fill_forward_nans_at_end`: by default, `NaN`s after a channel's last
      observation stay `NaN`. If `True`, they take the value of that observation.
    - `replace_nans_at_start`: by default, `NaN`s before a channel's first
      observation stay `NaN`. If given (a PyTree like `ys` whose leaves broadcast
      against `*channels`, or one array for every leaf), it becomes the value at
      `ts[0]` of every channel that is missing there, and the `NaN`s between then
      and the first observation are interpolated like any others.

    **Returns:**

    `ys` with its missing values filled; same structure, shapes and dtypes.

    **Example:**

    ```python
    ts = jnp.array([0.0, 1.0, 2.0, 3.0])
    ys = jnp.array([jnp.nan, 1.0, jnp.nan, 3.0])
    diffeqx.linear_interpolation(ts, ys, replace_nans_at_start=0.0)  # [0, 1, 2, 3]
    ```
    """
    ts, ys, starts = _prepare(ts, ys, replace_nans_at_start, "linear_interpolation")
    leaves, structure = jtu.tree_flatten(ys)
    filled = []
    for leaf, start in zip(leaves, starts, strict=True):
        if start is not None:
            start = channel_values(start, leaf, "replace_nans_at_start")
        y = fill_ends(as_channels(leaf), start, fill_forward_nans_at_end)
        filled.append(_fill_interior_linearly(ts, y).reshape(leaf.shape))
    return jtu.tree_unflatten(structure, filled)


@jax.jit
def _fill_interior_linearly(ts: Array, y: Array) -> Array:
    observed = ~jnp.isnan(y)
    y_safe = jnp.where(observed, y, 0)
    before, after = neighbours(observed)
    has_both = (before >= 0) & (after < y.shape[0])
    t_before, t_after = ts[jnp.clip(before, 0)], ts[jnp.clip(after, 0, len(ts) - 1)]
    width = jnp.where(has_both & ~observed, t_after - t_before, 1)
    theta = (ts[:, None] - t_before) / width
    y_before, y_after = gather(y_safe, before), gather(y_safe, after)
    interpolated = y_before + theta * (y_after - y_before)
    return jnp.where(observed, y, jnp.where(has_both, interpolated, jnp.nan))


def rectilinear_interpolation(ts, ys: PyTree, replace_nans_at_start=None):
    """Turns a series into one that a linear interpolation makes rectilinear: time
    advances with the data held fixed, then the data advances with time held fixed.

    Given `ts = [t0, t1, t2]` and `ys = [y0, y1, y2]`, returns
    `new_ts = [t0, t1, t1, t2, t2]` and `new_ys = [y0, y0, y1, y1, y2]`. A
    [`diffeqx.LinearInterpolation`][] of `jnp.concatenate([new_ts[:, None], new_ys],
    -1)` over a strictly increasing parameter, e.g. `jnp.arange(2 * len(ts) - 1)`,
    then only ever depends on observations already made: the path to use for a neural
    CDE making predictions online (Morrill et al., 2021, arXiv:2106.11028).

    Missing values (`NaN`) are filled forward with the last observation of the same
    channel, so the path does not depend on the future.

    **Arguments:**

    - `ts`: the observation times, shape `(times,)`, strictly increasing.
    - `ys`: the observations, a PyTree of arrays of shape `(times, *channels)`, with
      `NaN` marking a missing value.
    - `replace_nans_at_start`: by default, `NaN`s before a channel's first
      observation stay `NaN`. If given (a PyTree like `ys` whose leaves broadcast
      against `*channels`, or one array for every leaf), it becomes the value at
      `ts[0]` of every channel that is missing there, and is filled forward.

    **Returns:**

    `(new_ts, new_ys)`, of lengths `2 * times - 1` along the time axis.
    """
    ts, ys, starts = _prepare(
        ts, ys, replace_nans_at_start, "rectilinear_interpolation"
    )
    leaves, structure = jtu.tree_flatten(ys)
    new_leaves = []
    for leaf, start in zip(leaves, starts, strict=True):
        if start is not None:
            start = channel_values(start, leaf, "replace_nans_at_start")
        y = fill_ends(as_channels(leaf), start, fill_end=False)
        forward = _fill_forward(y).reshape(leaf.shape)
        new_leaves.append(jnp.repeat(forward, 2, axis=0)[:-1])
    new_ts = jnp.repeat(ts, 2)[1:]
    return new_ts, jtu.tree_unflatten(structure, new_leaves)


@jax.jit
def _fill_forward(y: Array) -> Array:
    observed = ~jnp.isnan(y)
    before, _ = neighbours(observed)
    forward = gather(jnp.where(observed, y, 0), before)
    return jnp.where(before >= 0, forward, jnp.nan)
