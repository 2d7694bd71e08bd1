"""Walking down a `VirtualBrownianTree` to one or two times: the normals each walk
consumes, the bisection itself, and assembling values and Lévy areas from it.

Arrays carry a leading axis over the times walked to (`P = 1` or `2`; with two, the
earlier time comes first), then the dimensions of one leaf of the path's `shape`.
"""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np

from .base import normals
from .levy import UNIT_SCALES, concat, remainder, split_at, split_midpoint


def pick(cond, a: list, b: list) -> list:
    """`jnp.where` over lists of arrays; `cond` may be a Python bool."""
    if cond is True:
        return a
    if cond is False:
        return b
    return [jnp.where(cond, x, y) for x, y in zip(a, b, strict=True)]


def _bit_length(x):
    return 32 - lax.clz(x).astype(jnp.int32)


def common_level(grid, leaf):
    """The deepest level whose cell holds both times (`depth` if they share a leaf)."""
    return grid.depth - _bit_length(leaf[0] ^ leaf[1])


class Noise(eqx.Module):
    """The standard normals a walk consumes: the root's sample, each level's split
    and the leaf's split, each a list over moments of `(P, *dims)` arrays."""

    root: list
    levels: list
    leaf: list


class _Hasher(eqx.Module):
    """Normals of one leaf of `shape`, addressed by cell."""

    words: jax.Array  # (2m, 2): key words, one pair per moment and leaf extra
    dtype: np.dtype = eqx.field(static=True)
    dims: tuple = eqx.field(static=True)

    def __call__(self, addresses, extra: bool = False):
        """Normals `(m, *addresses.shape, *dims)` at the cells `addresses`; the
        leaf's extra normals (moments `m..2m-1`) if `extra`."""
        m = self.words.shape[0] // 2
        ndim = len(self.dims)
        size = int(np.prod(self.dims, dtype=np.int64))
        element = jnp.arange(size, dtype=jnp.uint32).reshape(self.dims)
        element = element.reshape((1,) * (addresses.ndim + 1) + self.dims)
        cells = addresses.reshape((1,) + addresses.shape + (1,) * ndim)
        words = self.words[m:] if extra else self.words[:m]
        keys = words.reshape((m,) + (1,) * (addresses.ndim + ndim) + (2,))
        # A barrier, so that XLA computes the hash once into a buffer rather than
        # fusing it (and so recomputing it) into each of its many readers.
        return lax.optimization_barrier(normals(keys, element, cells, self.dtype))


def _as_noise(z, extra) -> Noise:
    """`z`: normals `(m, P, levels + 2, *dims)` for the root, each level and the leaf
    cell; `extra`: the leaf cell's extra normals `(m, P, *dims)` (or `None`)."""
    m, levels = z.shape[0], z.shape[2] - 2
    root = [z[c, :, 0] for c in range(m)]
    splits = [[z[c, :, 1 + lv] for c in range(m)] for lv in range(levels)]
    tips = [z[c, :, levels + 1] for c in range(m)]
    if extra is not None:
        tips += list(extra)
    return Noise(root, splits, tips)


def noise_separate(grid, leaf, hasher) -> Noise:
    """Each time's walk hashes all its own cells."""
    addresses = grid.addresses(leaf)
    z = hasher(addresses)  # (m, P, levels + 2, *dims)
    extra = hasher(addresses[:, -1], extra=True) if z.shape[0] > 1 else None
    return _as_noise(z, extra)


class Walk(eqx.Module):
    """Standardised moments met walking down to each time: both halves of the cell
    holding it at each level, and the parts of its leaf cell before and after it."""

    halves: list
    before: list
    after: list


def walk(grid, leaf, lam, noise: Noise) -> Walk:
    ndim = noise.root[0].ndim - 1

    def per_time(x):
        return x.reshape(x.shape + (1,) * ndim)

    eta = noise.root
    halves = []
    for level in range(grid.levels):
        left, right = split_midpoint(eta, noise.levels[level])
        halves.append((left, right))
        go_right = per_time(grid.in_right_half(leaf, level))
        eta = pick(grid.active(level), pick(go_right, right, left), eta)
    before, after = split_at(per_time(lam.astype(eta[0].dtype)), eta, noise.leaf)
    return Walk(halves, before, after)


def _raw(width, zeta):
    """Moments of an interval of `width` from its standardised moments."""
    root = jnp.sqrt(width)
    return tuple(root * scale * z for scale, z in zip(UNIT_SCALES, zeta, strict=False))


def _expand(x, like):
    return x.reshape(x.shape + (1,) * (like.ndim - x.ndim))


def values(grid, path: Walk, leaf, lam):
    """`W` from the tree's start to each time, shape `(P, *dims)`."""
    first = path.before[0]
    width = _expand(lam.astype(first.dtype), first) * grid.leaf_width(first.dtype)
    value = jnp.sqrt(width) * first
    for level, (left, _) in enumerate(path.halves):
        take = grid.in_right_half(leaf, level)
        if grid.active(level) is not True:
            take = take & grid.active(level)
        g = grid.half_width(level, first.dtype)
        value = value + jnp.where(_expand(take, first), jnp.sqrt(g) * left[0], 0)
    return value


def _chain(grid, path: Walk, leaf, lam, i: int, forwards: bool) -> list:
    """For time `i`, `(width, moments)` of the part of its cell at each level (index =
    level; the last is its leaf cell) before the time (`forwards`) or after it."""

    def at(xs):
        return [x[i] for x in xs]

    dtype = path.before[0].dtype
    lam_i = lam[i].astype(dtype)
    fraction = lam_i if forwards else 1 - lam_i
    width = fraction * grid.leaf_width(dtype)
    moments = _raw(width, at(path.before if forwards else path.after))
    out = [(width, moments)]
    for level in reversed(range(grid.levels)):
        right = grid.in_right_half(leaf[i], level)
        take = right if forwards else ~right
        if grid.active(level) is not True:
            take = take & grid.active(level)
        g = grid.half_width(level, dtype)
        sibling = _raw(g, at(path.halves[level][0 if forwards else 1]))
        if forwards:
            joined = concat(g, sibling, width, moments)
        else:
            joined = concat(width, moments, g, sibling)
        moments = tuple(pick(take, list(joined), list(moments)))
        width = jnp.where(take, g + width, width)
        out.append((width, moments))
    return out[::-1]


def moments_from_start(grid, path: Walk, leaf, lam) -> list:
    """The moments over `[start, time]` of a walk to one time."""
    return list(_chain(grid, path, leaf, lam, 0, forwards=True)[0][1])


def moments_between(grid, path: Walk, leaf, lam) -> list:
    """The moments over the interval between the two times of a walk."""
    prefix = _chain(grid, path, leaf, lam, 1, forwards=True)
    suffix = _chain(grid, path, leaf, lam, 0, forwards=False)
    # Below the deepest cell holding both times, the part of the earlier time's cell
    # after it and the part of the later time's cell before it are adjacent.
    common = common_level(grid, leaf)
    w_s, s_moments = suffix[-1][0], list(suffix[-1][1])
    w_p, p_moments = prefix[-1][0], list(prefix[-1][1])
    for level in range(1, grid.levels):
        here = common + 1 == level
        w_s = jnp.where(here, suffix[level][0], w_s)
        w_p = jnp.where(here, prefix[level][0], w_p)
        s_moments = pick(here, list(suffix[level][1]), s_moments)
        p_moments = pick(here, list(prefix[level][1]), p_moments)
    across = concat(w_s, tuple(s_moments), w_p, tuple(p_moments))
    # In one leaf cell: the part between them, from the parts before each.
    dtype = w_s.dtype
    w_lo, w_hi = (lam[i].astype(dtype) * grid.leaf_width(dtype) for i in (0, 1))
    gap = w_hi - w_lo
    safe_gap = jnp.where(gap > 0, gap, jnp.ones_like(gap))
    before = [[x[i] for x in path.before] for i in (0, 1)]
    inside = remainder(w_lo, _raw(w_lo, before[0]), safe_gap, _raw(w_hi, before[1]))
    inside = [jnp.where(gap > 0, x, jnp.zeros_like(x)) for x in inside]
    return pick(common >= grid.depth, inside, list(across))
