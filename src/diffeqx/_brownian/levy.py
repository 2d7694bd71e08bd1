r"""Lévy-area types, and the algebra of Brownian increments with their Lévy areas.

For a Brownian motion `W` on an interval `[s, t]` of width `h = t - s`, write
`B_u = W_u - W_s - (u - s)/h (W_t - W_s)` for its Brownian bridge. The types here hold

- `W = W_t - W_s`, the increment, distributed `N(0, h)`;
- `H = (1/h) ∫_s^t B_u du`, the space-time Lévy area, distributed `N(0, h/12)`;
- `K = (1/h²) ∫_s^t B_u (h/2 - (u - s)) du`, the space-time-time Lévy area,
  distributed `N(0, h/720)`;

the normalisation Diffrax's stochastic Runge–Kutta coefficients assume. `W`, `H` and
`K` of one interval are independent. Time-reversal (the interval traversed from `t`
to `s`) negates `dt`, `W` and `K` and keeps `H`.

The private functions below work on "moments": a tuple `(W,)`, `(W, H)` or
`(W, H, K)` of arrays of one dtype, for an interval whose width is given separately.
Concatenating two adjacent intervals gives exact formulas for the moments of their
union; they are what keeps the Lévy areas of a Brownian path consistent across
intervals (the moments of `[a, c]` are those of `[a, b]` and `[b, c]` combined).
They follow from `∫ (W_u - W_s) du = hH + hW/2` and
`∫ (u - s)(W_u - W_s) du = h²(H/2 + W/3 - K)` over each interval, and are free of
divisions in the scaled moments `(W, hH, h²K)`.
"""

import math
from typing import final

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree


class AbstractBrownianIncrement(eqx.Module):
    """Base class of the values a Brownian path returns with `use_levy=True`: the
    time increment `dt` and the Brownian increment `W`, each a PyTree with the
    structure of the path's `shape` (`dt` has a scalar for each leaf)."""

    dt: eqx.AbstractVar[PyTree]
    W: eqx.AbstractVar[PyTree]


class AbstractSpaceTimeLevyArea(AbstractBrownianIncrement):
    """A Brownian increment together with its space-time Lévy area `H`."""

    H: eqx.AbstractVar[PyTree]


class AbstractSpaceTimeTimeLevyArea(AbstractSpaceTimeLevyArea):
    """A Brownian increment together with its space-time Lévy area `H` and its
    space-time-time Lévy area `K`."""

    K: eqx.AbstractVar[PyTree]


@final
class BrownianIncrement(AbstractBrownianIncrement):
    """The time increment `dt` and the Brownian increment `W = W(t1) - W(t0)`.

    As the `levy_area` of a Brownian path, it asks the path for increments only.
    """

    dt: PyTree
    W: PyTree


@final
class SpaceTimeLevyArea(AbstractSpaceTimeLevyArea):
    r"""The time increment `dt`, the Brownian increment `W` and the space-time Lévy
    area `H = (1/dt) ∫ (W_u - W_{t0} - (u - t0)/dt · W) du` over `[t0, t1]`.

    `H` is independent of `W` and distributed `N(0, dt/12)`. Some stochastic
    Runge–Kutta solvers need it; as the `levy_area` of a Brownian path, it asks the
    path to sample `H` alongside `W`.
    """

    dt: PyTree
    W: PyTree
    H: PyTree


@final
class SpaceTimeTimeLevyArea(AbstractSpaceTimeTimeLevyArea):
    r"""The time increment `dt`, the Brownian increment `W`, the space-time Lévy area
    `H` (see [`diffeqx.SpaceTimeLevyArea`][]) and the space-time-time Lévy area
    `K = (1/dt²) ∫ (W_u - W_{t0} - (u - t0)/dt · W)(dt/2 - (u - t0)) du` over
    `[t0, t1]`.

    `W`, `H` and `K` are independent; `K` is distributed `N(0, dt/720)`.
    """

    dt: PyTree
    W: PyTree
    H: PyTree
    K: PyTree


LEVY_AREAS = (BrownianIncrement, SpaceTimeLevyArea, SpaceTimeTimeLevyArea)

# Standard deviations of W, H, K over an interval of unit width.
UNIT_SCALES = (1.0, 1.0 / math.sqrt(12.0), 1.0 / math.sqrt(720.0))


def num_moments(levy_area: type) -> int:
    """How many of W, H, K a `levy_area` type holds."""
    return LEVY_AREAS.index(levy_area) + 1


def check_levy_area(levy_area, owner: str) -> type:
    if not (isinstance(levy_area, type) and levy_area in LEVY_AREAS):
        raise ValueError(
            f"`{owner}(..., levy_area=...)` must be one of the classes "
            "`BrownianIncrement`, `SpaceTimeLevyArea` or `SpaceTimeTimeLevyArea` "
            f"(the class itself, not an instance), but got {levy_area!r}."
        )
    return levy_area


def require_levy_area(path, needed: type, who: str) -> None:
    """Raises a `ValueError` unless the Brownian path `path` samples the Lévy area
    `needed` (an abstract Lévy-area class, e.g. `AbstractSpaceTimeLevyArea`), for
    use by solvers that need `H` or `K`; `who` names the solver."""
    levy_area = getattr(path, "levy_area", None)
    if not (isinstance(levy_area, type) and issubclass(levy_area, needed)):
        want = {
            AbstractBrownianIncrement: "BrownianIncrement",
            AbstractSpaceTimeLevyArea: "SpaceTimeLevyArea",
            AbstractSpaceTimeTimeLevyArea: "SpaceTimeTimeLevyArea",
        }.get(needed, needed.__name__)
        have = getattr(levy_area, "__name__", repr(levy_area))
        raise ValueError(
            f"{who} needs a Brownian path that samples `{want}`, but the path "
            f"{type(path).__name__} was built with `levy_area={have}`. Build it with "
            f"`levy_area=diffeqx.{want}` (or a richer Lévy area)."
        )


def make_levy(levy_area: type, dt: PyTree, moments: list) -> PyTree:
    """A `levy_area` instance from `dt` and `moments`: one PyTree per moment."""
    return levy_area(dt, *moments)


# ---- the algebra of moments over intervals -------------------------------------------
#
# Over an interval of width h the formulas are division-free in the "scaled" moments
# (W, hH, h^2 K); `scale` and `unscale` convert.


def scale(h, moments: tuple) -> tuple:
    """`(W, H, K)` (or a prefix of it) of an interval of width `h` to the scaled
    moments `(W, hH, h^2 K)`."""
    return tuple(x * h**i for i, x in enumerate(moments))


def unscale(h, scaled: tuple) -> tuple:
    """The inverse of `scale`; zero moments for an interval of zero width."""
    safe = jnp.where(h == 0, jnp.ones_like(h), h)
    return tuple(
        jnp.where(h == 0, jnp.zeros_like(x), x / safe**i) for i, x in enumerate(scaled)
    )


def concat(h1, left: tuple, h2, right: tuple) -> tuple:
    """The scaled moments of `[a, c]` from those of `[a, b]` (width `h1`) and
    `[b, c]` (width `h2`). Exact; no quantity is formed as a difference of larger
    ones."""
    w1, w2 = left[0], right[0]
    skew = h2 * w1 - h1 * w2
    out = [w1 + w2]
    if len(left) > 1:
        out.append(left[1] + right[1] + 0.5 * skew)
    if len(left) > 2:
        out.append(
            left[2]
            + right[2]
            + 0.5 * (h2 * left[1] - h1 * right[1])
            + (h2 - h1) * skew / 12.0
        )
    return tuple(out)


def remainder(h1, left: tuple, h2, whole: tuple) -> tuple:
    """The scaled moments of `[b, c]` (width `h2`) from those of `[a, b]` (width
    `h1`) and `[a, c]`: the inverse of `concat` in its second argument."""
    w1 = left[0]
    w2 = whole[0] - w1
    skew = h2 * w1 - h1 * w2
    out = [w2]
    if len(left) > 1:
        out.append(whole[1] - left[1] - 0.5 * skew)
    if len(left) > 2:
        out.append(
            whole[2]
            - left[2]
            - 0.5 * (h2 * left[1] - h1 * out[1])
            - (h2 - h1) * skew / 12.0
        )
    return tuple(out)


def reverse(moments: tuple) -> tuple:
    """The moments of an interval traversed backwards in time."""
    signs = (-1.0, 1.0, -1.0)
    return tuple(
        jtu.tree_map(lambda leaf, sign=sign: sign * leaf, x)
        for sign, x in zip(signs, moments, strict=False)
    )


# ---- splitting an interval, in standardised coordinates ------------------------------
#
# Standardised moments of an interval of width h are (W, H, K) / (sqrt(h) * UNIT_SCALES):
# independent N(0, 1) variables. Splitting an interval at the fraction `lam` of its
# width, the standardised moments `eta` of the whole are `Q(lam) @ zeta`, where `zeta`
# stacks those of the left part and then those of the right part. The rows of Q are
# orthonormal (checked in the tests), so given `eta`, the parts are exactly
# `zeta = Q^T eta + P xi`, with `xi` standard normal and `P` any matrix with `P P^T`
# the projector `I - Q^T Q` onto the kernel of Q.


def split_matrix(lam, m: int, sqrt) -> list[list]:
    """`Q(lam)` restricted to the first `m` moments: `m` rows; columns are the left
    part's `m` moments, then the right part's. `sqrt` is `math.sqrt` or `jnp.sqrt`."""
    a, b = sqrt(lam), sqrt(1 - lam)
    s3, s5, s15 = math.sqrt(3.0), math.sqrt(5.0), math.sqrt(15.0)
    rows = [[a, 0.0, 0.0, b, 0.0, 0.0]]
    rows.append([s3 * a * b * b, a**3, 0.0, -s3 * a * a * b, b**3, 0.0])
    c = 1 - 2 * lam
    rows.append(
        [
            s5 * a * b * b * c,
            s15 * a**3 * b * b,
            a**5,
            -s5 * a * a * b * c,
            -s15 * a * a * b**3,
            b**5,
        ]
    )
    return [row[:m] + row[3 : 3 + m] for row in rows[:m]]


# For the split at the midpoint, an explicit orthonormal basis of Q's kernel (rows):
# `zeta = Q^T eta + N^T xi` with `m` standard normals `xi`.
_R2, _R6, _R30 = math.sqrt(2.0), math.sqrt(6.0), math.sqrt(30.0)
MIDPOINT_KERNEL = {
    1: [[-_R2 / 2, _R2 / 2]],
    2: [[-_R2 / 4, _R6 / 4, _R2 / 4, _R6 / 4], [0.0, -_R2 / 2, 0.0, _R2 / 2]],
    3: [
        [-_R2 / 4, _R6 / 4, 0.0, _R2 / 4, _R6 / 4, 0.0],
        [0.0, -_R2 / 8, _R30 / 8, 0.0, _R2 / 8, _R30 / 8],
        [0.0, 0.0, -_R2 / 2, 0.0, 0.0, _R2 / 2],
    ],
}
MIDPOINT_SPLIT = {m: split_matrix(0.5, m, math.sqrt) for m in (1, 2, 3)}


def _lincomb(coeffs: list, xs: list):
    """`sum(c * x)` over the nonzero coefficients (Python floats or arrays)."""
    total = None
    for c, x in zip(coeffs, xs, strict=True):
        if isinstance(c, float) and c == 0.0:
            continue
        term = c * x
        total = term if total is None else total + term
    return total if total is not None else 0.0 * xs[0]


def split_midpoint(eta: list, xi: list) -> tuple[list, list]:
    """Standardised moments of the two halves of an interval with standardised
    moments `eta`, using the `len(eta)` standard normals `xi`."""
    m = len(eta)
    q, n = MIDPOINT_SPLIT[m], MIDPOINT_KERNEL[m]
    parts = [
        _lincomb([q[r][j] for r in range(m)] + [n[r][j] for r in range(m)], eta + xi)
        for j in range(2 * m)
    ]
    return parts[:m], parts[m:]


def split_at(lam, eta: list, xi: list) -> tuple[list, list]:
    """Standardised moments of the parts of an interval split at the fraction `lam`
    (a scalar array) of its width, given the whole's standardised moments `eta`.
    Uses one standard normal in `xi` for one moment, else `2 * len(eta)` of them
    (projected onto the kernel of `Q(lam)`)."""
    m = len(eta)
    q = split_matrix(lam, m, jnp.sqrt)
    if m == 1:
        a, b = q[0]
        return [a * eta[0] + b * xi[0]], [b * eta[0] - a * xi[0]]
    q_xi = [_lincomb(q[r], xi) for r in range(m)]
    parts = [
        _lincomb([q[r][j] for r in range(m)], eta)
        + xi[j]
        - _lincomb([q[r][j] for r in range(m)], q_xi)
        for j in range(2 * m)
    ]
    return parts[:m], parts[m:]
