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

from .._transforms import batched_like
from .base import normals, times_pow2
from .levy import (
    UNIT_SCALES,
    concat,
    remainder,
    split_at,
    split_midpoint,
    unscale,
)


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
    """The standard normals a walk consumes: `z`, shape `(m, P, levels + 2, *dims)`,
    for the root's sample, each level's split and the leaf's split; `extra`, shape
    `(m, P, *dims)`, the leaf split's further normals when there are `m > 1`
    moments."""

    z: jax.Array
    extra: jax.Array | None


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
        return normals(keys, element, cells, self.dtype)

    def with_extra(self, addresses):
        """`self(addresses)` and `self(addresses[:, -1], extra=True)`, from one hash
        of both sets of cells (half the hashing and quantile code in the program)."""
        m = self.words.shape[0] // 2
        ndim = len(self.dims)
        size = int(np.prod(self.dims, dtype=np.int64))
        slots = addresses.shape[1]
        element = jnp.arange(size, dtype=jnp.uint32).reshape((1, 1, 1) + self.dims)
        both = jnp.concatenate([addresses, addresses[:, -1:]], axis=1)
        cells = both.reshape((1,) + both.shape + (1,) * ndim)
        # Slots `0 .. slots - 1` hash with the moments' keys, the last with the
        # extra normals' keys.
        last = (np.arange(slots + 1) == slots).reshape((1, 1, slots + 1) + (1,) * ndim)
        shape = (m, 1, 1) + (1,) * ndim + (2,)
        keys = jnp.where(
            last[..., None],
            self.words[m:].reshape(shape),
            self.words[:m].reshape(shape),
        )
        z = normals(keys, element, cells, self.dtype)  # (m, P, slots + 1, *dims)
        return z[:, :, :slots], z[:, :, slots]


class Start(eqx.Module):
    """Where a walk begins when not at the root: in the cell holding each time at
    `level`, with that cell's standardised moments `eta` (a list over moments of
    `(P, *dims)`) and `W` at the cell's start, `value` (`(P, *dims)`)."""

    eta: list
    value: jax.Array
    level: int = eqx.field(static=True)


def noise_separate(grid, leaf, hasher, start: Start | None = None) -> Noise:
    """Each time's walk hashes all its own cells: from the root, or below the level
    a `start` is at (its cells' splits, then the leaf's)."""
    addresses = grid.addresses(leaf)
    if start is not None:
        addresses = addresses[:, start.level + 1 :]
    if hasher.words.shape[0] > 2:  # more than one moment: the leaf's extra normals
        return Noise(*hasher.with_extra(addresses))
    return Noise(hasher(addresses), None)  # (m, P, slots, *dims)


class Table(eqx.Module):
    """Every cell of one level of the tree, for one leaf of `shape`: the cells'
    standardised moments `eta` (a list over moments of `(2^level, *dims)`) and `W`
    at each cell's start, `value`; at the leaf level, also the normals that split
    each leaf cell at a query time (`tips`, `(m, 2^depth, *dims)`, and `extra` with
    Lévy areas).

    Built top-down with the arithmetic of a walk, so that a walk starting from the
    table (`start`) gives, bit for bit, what a walk from the root gives. A fixed-step
    solve builds it once and then answers each step's query without hashing the
    cells above it (see `VirtualBrownianTree._tabulator`)."""

    eta: list
    value: jax.Array
    tips: jax.Array | None
    extra: jax.Array | None
    level: int = eqx.field(static=True)

    def start(self, grid, leaf):
        cell = jnp.right_shift(leaf, np.uint32(grid.depth - self.level))
        return Start([x[cell] for x in self.eta], self.value[cell], self.level)

    def noise(self, leaf) -> Noise | None:
        """The leaf cells' normals, when the table is at the leaf level."""
        if self.tips is None:
            return None
        z = self.tips[:, leaf][:, :, None]  # (m, P, 1, *dims)
        return Noise(z, None if self.extra is None else self.extra[:, leaf])


def table(grid, hasher, level: int) -> Table:
    """The `Table` of the cells at `level` (the tree's depth must be static)."""
    at_leaves = level == grid.depth
    # Heap numbers 0 (the root's sample) to 2^level - 1 (the cells above `level`),
    # then the leaf cells when the table is at the leaf level: one hash.
    count = 2 ** (level + 1) if at_leaves else 2**level
    z = hasher(np.arange(count, dtype=np.uint32))  # (m, count, *dims)
    m, dims = z.shape[0], z.shape[2:]
    split = np.array([False, True]).reshape((1, 2) + (1,) * len(dims))
    eta = [z[c, :1] for c in range(m)]
    value = jnp.zeros_like(eta[0])
    for lv in range(level):
        cells = 2**lv
        left, right = split_midpoint(eta, [z[c, cells : 2 * cells] for c in range(m)])
        g = grid.half_width(lv, z.dtype)
        # Each child as a walk into it computes it: the parent's value, plus the
        # left half's increment for a right child.
        value = value[:, None] + jnp.where(split, jnp.sqrt(g) * left[0][:, None], 0)
        value = value.reshape((2 * cells,) + dims)
        eta = [
            jnp.where(split, r[:, None], x[:, None]).reshape((2 * cells,) + dims)
            for x, r in zip(left, right, strict=True)
        ]
    tips = extra = None
    if at_leaves:
        leaves = np.arange(2**level, 2 ** (level + 1), dtype=np.uint32)
        tips = z[:, 2**level :]
        extra = hasher(leaves, extra=True) if m > 1 else None
    # Computed once, into memory: otherwise XLA may fuse the last levels into each
    # query's lookup, and recompute them per query.
    return lax.optimization_barrier(Table(eta, value, tips, extra, level))


class Walk(eqx.Module):
    """Standardised moments met walking down to each time: the left and right halves
    of the cell holding it at each level, shape `(levels, m, P, *dims)`, and the
    parts of its leaf cell before and after it (lists over moments)."""

    left: jax.Array
    right: jax.Array
    before: list
    after: list


def walk(grid, leaf, lam, noise: Noise, start: Start | None = None) -> Walk:
    """Down the tree to each located time, from the root or from `start` (whose
    `noise` then holds only the cells below it). Unrolled with one moment (`W`
    alone: the fast path); a `lax.scan` over the levels with Lévy areas, which
    keeps compilation short."""
    m = noise.z.shape[0]
    ndim = noise.z.ndim - 3
    first = 0 if start is None else start.level
    levels = grid.levels - first  # the levels walked

    def per_time(x):
        return x.reshape(x.shape + (1,) * ndim)

    if start is None:
        eta, slots = [noise.z[c, :, 0] for c in range(m)], noise.z[:, :, 1:]
    else:
        eta, slots = list(start.eta), noise.z
    go_right = grid.right_halves(leaf, first)

    def down(eta, inputs):
        xi, right_half = inputs
        left, right = split_midpoint(list(eta), list(xi))
        chosen = pick(per_time(right_half), right, left)
        return tuple(chosen), (jnp.stack(left), jnp.stack(right))

    xis = jnp.moveaxis(slots[:, :, :levels], 2, 0)  # (levels, m, P, *dims)
    if m == 1 or levels == 0:
        lefts, rights = [], []
        for i in range(levels):
            eta, (left, right) = down(eta, (xis[i], go_right[i]))
            lefts.append(left)
            rights.append(right)
        shape = (0, m) + noise.z.shape[1:2] + noise.z.shape[3:]
        stack = lambda xs: jnp.stack(xs) if xs else jnp.zeros(shape, noise.z.dtype)  # noqa: E731
        lefts, rights = stack(lefts), stack(rights)
    else:
        eta, (lefts, rights) = lax.scan(down, tuple(eta), (xis, go_right))
    tips = [slots[c, :, levels] for c in range(m)]
    if noise.extra is not None:
        tips += list(noise.extra)
    before, after = split_at(per_time(lam.astype(eta[0].dtype)), list(eta), tips)
    return Walk(lefts, rights, before, after)


def _scaled(width, zeta):
    """Scaled moments `(W, hH, h^2 K)` of an interval of `width` from its
    standardised moments."""
    root = jnp.sqrt(width)
    return tuple(
        root * width**i * scale * z
        for i, (scale, z) in enumerate(zip(UNIT_SCALES, zeta, strict=False))
    )


def _expand(x, like):
    return x.reshape(x.shape + (1,) * (like.ndim - x.ndim))


def values(grid, path: Walk, leaf, lam, start: Start | None = None):
    """`W` from the tree's start to each time, shape `(P, *dims)`: the increments of
    the cells left of the time, from the root down (from `start`'s value when the
    walk began there), then the part of its leaf cell before it."""
    first = path.before[0]
    top = 0 if start is None else start.level
    value = jnp.zeros_like(first) if start is None else start.value
    rights = grid.right_halves(leaf, top)
    roots = jnp.sqrt(grid.half_widths(top, first.dtype))
    for i in range(grid.levels - top):
        take = rights[i]
        value = value + jnp.where(_expand(take, first), roots[i] * path.left[i][0], 0)
    width = _expand(lam.astype(first.dtype), first) * grid.leaf_width(first.dtype)
    return value + jnp.sqrt(width) * first


def _ends_to_depth(grid, leaf, hasher):
    """The normals of a walk's first and last splits when the depth is known only at
    run time: the root's sample and the leaf cell's split (lists over moments of
    `(P, *dims)`), with the leaf's extra normals when there are several moments."""
    leaf_cell = jnp.left_shift(jnp.uint32(1), grid._shift(grid.depth)) + leaf
    ends = hasher(jnp.stack([jnp.zeros_like(leaf), leaf_cell], axis=-1))
    m = ends.shape[0]
    root, tips = [ends[c, :, 0] for c in range(m)], [ends[c, :, 1] for c in range(m)]
    if m > 1:
        tips += list(hasher(leaf_cell, extra=True))
    return root, tips


def _level_to_depth(grid, leaf, lv, hasher, eta):
    """One level of a walk whose depth is known only at run time: the halves of the
    cell holding each time at level `lv` (traced), whether each time is in the
    right half, and the halves' width."""
    shift = grid._shift(grid.depth - lv)
    cell = jnp.left_shift(jnp.uint32(1), lv.astype(jnp.uint32)) + jnp.right_shift(
        leaf, shift
    )
    left, right = split_midpoint(list(eta), list(hasher(cell)))
    go_right = jnp.right_shift(leaf, shift - 1) & 1 == 1
    half = times_pow2(grid.span, -(lv + 1))
    return left, right, go_right, half


def _per_time(x, like):
    return x.reshape(x.shape + (1,) * (like.ndim - x.ndim))


def values_to_depth(grid, leaf, lam, hasher):
    """`values` of a walk from the root when the depth is known only at run time:
    a loop over the tree's actual levels (hashing each level's cells in turn), in
    place of all `grid.levels` levels masked beyond the depth (`_MAX_DEPTH` of
    them: about four times the work at a depth of 7). `W` alone (one moment).

    Each level does the arithmetic of `walk` and `values` at that level (the same
    split, the same sum from the root down), so the path is the one a tree of
    static depth gives, to rounding."""
    (root,), (tip,) = _ends_to_depth(grid, leaf, hasher)

    def level(lv, carry):
        eta, value = carry
        (left,), (right,), go_right, half = _level_to_depth(
            grid, leaf, lv, hasher, [eta]
        )
        go_right = _per_time(go_right, eta)
        value = value + jnp.where(go_right, jnp.sqrt(half.astype(eta.dtype)) * left, 0)
        return jnp.where(go_right, right, left), value

    # The sum starts mapped where the walk is (`batched_like`): under `jax.vmap`
    # JAX then batches the loop's body once.
    (zero,) = batched_like([jnp.zeros_like(root)], [root])
    eta, value = lax.fori_loop(0, grid.depth, level, (root, zero))
    lam = _per_time(lam.astype(eta.dtype), eta)
    (before,), _ = split_at(lam, [eta], [tip])
    return value + jnp.sqrt(lam * grid.leaf_width(eta.dtype)) * before


def moments_to_depth(grid, leaf, lam, hasher, pair: bool) -> list:
    """`moments_between` (`pair`) or `moments_from_start` when the depth is known
    only at run time: one loop over the tree's actual levels that walks down and
    gathers, on the way, the cells beside the walk that the interval covers (top
    down, where `_part` gathers them bottom up: the concatenation is associative,
    so the moments are the same, to rounding)."""
    root, tips = _ends_to_depth(grid, leaf, hasher)
    dtype = root[0].dtype
    below = common_level(grid, leaf) if pair else jnp.int32(-1)
    zero_w = jnp.zeros((), dtype)
    empty = tuple(jnp.zeros_like(x[-1]) for x in root)

    def level(lv, carry):
        eta, (w_b, back), (w_f, front) = carry
        left, right, go_right, half = _level_to_depth(grid, leaf, lv, hasher, eta)
        g = half.astype(dtype)
        inside = lv > below
        # The later time's part of its cell before it: the left halves it passes
        # on the right, from the top down.
        take = go_right[-1] & inside
        joined = concat(w_f, front, g, _scaled(g, [x[-1] for x in left]))
        front = tuple(pick(take, list(joined), list(front)))
        w_f = jnp.where(take, w_f + g, w_f)
        if pair:  # the earlier time's part after it: the right halves it passes.
            take = ~go_right[0] & inside
            joined = concat(g, _scaled(g, [x[0] for x in right]), w_b, back)
            back = tuple(pick(take, list(joined), list(back)))
            w_b = jnp.where(take, w_b + g, w_b)
        eta = pick(_per_time(go_right, eta[0]), right, left)
        return eta, (w_b, back), (w_f, front)

    # The gathered moments start mapped where the walk is (`batched_like`).
    zero_w, *empty = batched_like([zero_w, *empty], [root[0]] * (1 + len(empty)))
    empty = tuple(empty)
    carry = (root, (zero_w, empty), (zero_w, empty))
    eta, (w_b, back), (w_f, front) = lax.fori_loop(0, grid.depth, level, carry)
    before, after = split_at(_per_time(lam.astype(dtype), eta[0]), eta, tips)
    leaf_w = grid.leaf_width(dtype)
    lam_last = lam[-1].astype(dtype)
    w_p = lam_last * leaf_w
    w_f, front = (
        w_f + w_p,
        concat(w_f, front, w_p, _scaled(w_p, [x[-1] for x in before])),
    )
    if not pair:
        return list(unscale(w_f, front))
    w_s = (1 - lam[0].astype(dtype)) * leaf_w
    w_b, back = w_s + w_b, concat(w_s, _scaled(w_s, [x[0] for x in after]), w_b, back)
    return _between(grid, leaf, lam, below, (w_b, back), (w_f, front), before)


def _part(grid, path: Walk, leaf, lam, i: int, below, forwards: bool):
    """For time `i`: `(width, scaled moments)` of the part of its cell at level
    `below + 1` before the time (`forwards`) or after it. `below` (traced) is a
    level above which nothing is taken; -1 for the whole interval.

    A `lax.scan` up the levels: unrolled, this chain of concatenations is what
    made compiling a query with Lévy areas slow (seconds)."""
    dtype = path.before[0].dtype
    lam_i = lam[i].astype(dtype)
    width = (lam_i if forwards else 1 - lam_i) * grid.leaf_width(dtype)
    moments = _scaled(width, [x[i] for x in (path.before if forwards else path.after)])
    if grid.levels == 0:
        return width, moments
    levels = np.arange(grid.levels, dtype=np.int32)
    leaf_i = leaf[i]
    halves = (path.left if forwards else path.right)[:, :, i]  # (levels, m, *dims)
    widths = grid.half_widths(0, dtype)

    def up(carry, level_inputs):
        width, moments = carry
        level, g, sibling = level_inputs
        right = grid.right_half(leaf_i, level)
        take = (right if forwards else ~right) & (level > below)
        sibling = _scaled(g, list(sibling))
        if forwards:
            joined = concat(g, sibling, width, moments)
        else:
            joined = concat(width, moments, g, sibling)
        moments = tuple(pick(take, list(joined), list(moments)))
        return (jnp.where(take, g + width, width), moments), None

    (width, moments), _ = lax.scan(
        up, (width, moments), (levels, widths, halves), reverse=True
    )
    return width, moments


def moments_from_start(grid, path: Walk, leaf, lam) -> list:
    """The moments over `[start, time]` of a walk to one time."""
    width, scaled = _part(grid, path, leaf, lam, 0, -1, forwards=True)
    return list(unscale(width, scaled))


def moments_between(grid, path: Walk, leaf, lam) -> list:
    """The moments over the interval between the two times of a walk."""
    # Below the deepest cell holding both times, the part of the earlier time's cell
    # after it and the part of the later time's cell before it are adjacent.
    common = common_level(grid, leaf)
    after = _part(grid, path, leaf, lam, 0, common, forwards=False)
    before = _part(grid, path, leaf, lam, 1, common, forwards=True)
    return _between(grid, leaf, lam, common, after, before, path.before)


def _between(grid, leaf, lam, common, after, before, leaf_parts) -> list:
    """The moments between two times from `(width, scaled moments)` of the part of
    the earlier time's cell after it (`after`) and of the later time's cell before
    it (`before`), below the deepest cell holding both (`common`); when both are
    in one leaf cell, from the standardised moments of the parts of that cell
    before each (`leaf_parts`)."""
    (w_s, after), (w_p, before) = after, before
    across = concat(w_s, after, w_p, before)
    # In one leaf cell: the part between them, from the parts before each.
    dtype = w_s.dtype
    w_lo, w_hi = (lam[i].astype(dtype) * grid.leaf_width(dtype) for i in (0, 1))
    parts = [_scaled(w, [x[i] for x in leaf_parts]) for i, w in ((0, w_lo), (1, w_hi))]
    inside = remainder(w_lo, parts[0], w_hi - w_lo, parts[1])
    same_leaf = common >= grid.depth
    width = jnp.where(same_leaf, w_hi - w_lo, w_s + w_p)
    return list(unscale(width, tuple(pick(same_leaf, list(inside), list(across)))))
