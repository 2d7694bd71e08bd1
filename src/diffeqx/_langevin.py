r"""Terms of the underdamped Langevin equation.

The state is a pair `(x, v)`, position and velocity, two PyTrees of the same
structure and shapes, and the equation is

    dx = v dt,
    dv = -gamma v dt - u grad_f(x) dt + sqrt(2 gamma u) dW,

with `gamma` (friction) and `u` (inverse mass) diagonal: each is a scalar, or a
PyTree whose structure is a prefix of that of `x` and whose leaves broadcast to the
matching leaves of `x`. `W` is a Brownian motion with the structure and shapes of
`x`.

The equation is split as Diffrax splits it, into a drift term (`dt`) and a
diffusion term (`dW`), so that `MultiTerm(drift, diffusion)` can be solved by any
SDE solver (e.g. `Euler`, `Heun`), and by the dedicated solvers `ALIGN`, `ShOULD`
and `QUICSORT`, which read `gamma`, `u` and `grad_f` from the terms.
"""

from collections.abc import Callable
from typing import Any, final

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from ._brownian.base import AbstractBrownianPath
from ._brownian.levy import AbstractBrownianIncrement
from ._term import AbstractTerm


class LangevinArgumentError(ValueError, RuntimeError):
    """A malformed underdamped Langevin problem (structures or shapes that do not
    fit). Diffrax raises `RuntimeError` for these, so this error is both a
    `ValueError` and a `RuntimeError`: catchable either way."""


def _structure(tree) -> str:
    return str(jtu.tree_structure(tree))


def _shapes(tree) -> list:
    return [tuple(jnp.shape(leaf)) for leaf in jtu.tree_leaves(tree)]


def split_state(y, owner: str) -> tuple[PyTree, PyTree]:
    """`(x, v)` from the state `y`, after checking that it is such a pair."""
    if not (isinstance(y, (tuple, list)) and len(y) == 2):
        raise LangevinArgumentError(
            f"`{owner}`: the state of an underdamped Langevin equation must be a "
            f"pair `(x, v)` of position and velocity, but got {type(y).__name__} "
            f"with structure {_structure(y)}."
        )
    x, v = y
    if jtu.tree_structure(x) != jtu.tree_structure(v) or _shapes(x) != _shapes(v):
        raise LangevinArgumentError(
            f"`{owner}`: the position `x` and the velocity `v` must have the same "
            f"PyTree structure and shapes, but `x` has structure {_structure(x)} "
            f"and shapes {_shapes(x)}, `v` has structure {_structure(v)} and shapes "
            f"{_shapes(v)}."
        )
    return x, v


def _float_dtype(leaf):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
        # An integer position is promoted the way `jnp.asarray(x, float)` would.
        dtype = jnp.result_type(float)
    return dtype


def per_leaf(param, x, name: str, owner: str, full_shape: bool = False) -> PyTree:
    """The friction or inverse mass `param` (`name` is "gamma" or "u") as one array
    per leaf of `x`, in that leaf's dtype.

    `param` is a scalar, or a PyTree whose structure is a prefix of that of `x` and
    whose leaves broadcast to the leaves of `x` below them. A scalar leaf stays a
    scalar (so that whatever is computed from it is computed once) unless
    `full_shape`; any other leaf is broadcast to the shape of its `x` leaf."""

    def one(p, x_leaf):
        p = jnp.asarray(p)
        target = jnp.shape(x_leaf)
        try:
            broadcast = jnp.broadcast_shapes(p.shape, target)
        except ValueError:
            broadcast = None
        if broadcast != target:
            raise LangevinArgumentError(
                f"`{owner}`: `{name}` has a leaf of shape {p.shape}, which does not "
                f"broadcast to the shape {target} of the position leaf it applies "
                "to. Each leaf of `gamma` and `u` must be a scalar or broadcast to "
                "the shape of the matching leaf of `x`."
            )
        p = p.astype(_float_dtype(x_leaf))
        if p.shape == target or (p.ndim == 0 and not full_shape):
            return p
        return jnp.broadcast_to(p, target)

    def subtree(p, x_sub):
        return jtu.tree_map(lambda x_leaf: one(p, x_leaf), x_sub)

    try:
        return jtu.tree_map(subtree, param, x)
    except LangevinArgumentError:
        raise
    except (ValueError, TypeError) as e:
        raise LangevinArgumentError(
            f"`{owner}`: the PyTree structure of `{name}` ({_structure(param)}) must "
            "be a prefix of that of the position `x` (e.g. a scalar, or a PyTree "
            f"like `x`), but `x` has structure {_structure(x)}."
        ) from e


def evaluate_gradient(grad_f, x, args, owner: str) -> PyTree:
    """`grad_f(x, args)`, checked to have the structure and shapes of `x`, and cast
    to the dtypes of `x`."""
    out = grad_f(x, args)
    if jtu.tree_structure(out) != jtu.tree_structure(x) or _shapes(out) != _shapes(x):
        raise LangevinArgumentError(
            f"`{owner}`: `grad_f(x, args)` must return a PyTree with the structure "
            f"and shapes of the position `x` (structure {_structure(x)}, shapes "
            f"{_shapes(x)}), but it returned structure {_structure(out)} and shapes "
            f"{_shapes(out)}."
        )
    return jtu.tree_map(
        lambda g, x_leaf: jnp.asarray(g).astype(_float_dtype(x_leaf)), out, x
    )


@final
class UnderdampedLangevinDriftTerm(AbstractTerm):
    r"""The drift of the underdamped Langevin equation

    \begin{align*}
        \mathrm{d} x(t) &= v(t) \, \mathrm{d}t \\
        \mathrm{d} v(t) &= - \gamma \, v(t) \, \mathrm{d}t - u \,
        \nabla \! f( x(t) ) \, \mathrm{d}t + \sqrt{2 \gamma u} \, \mathrm{d} w(t),
    \end{align*}

    that is, the `dt` part: `(v, -gamma v - u grad_f(x))`. The state is the pair
    `y = (x, v)`; `x` may be any PyTree of arrays, and `v` has its structure and
    shapes.

    **Arguments:**

    - `gamma`: the friction, the diagonal of a diagonal matrix: a scalar, or a
      PyTree whose structure is a prefix of that of `x` and whose leaves broadcast
      to the leaves of `x`.
    - `u`: the inverse mass, likewise.
    - `grad_f`: the gradient of the potential, `grad_f(x, args)`, returning a PyTree
      with the structure and shapes of `x`.

    Use it with [`diffeqx.UnderdampedLangevinDiffusionTerm`][] (with the same `gamma`
    and `u`) as `MultiTerm(drift, diffusion)`, the form [`diffeqx.ALIGN`][],
    [`diffeqx.ShOULD`][] and [`diffeqx.QUICSORT`][] take; any SDE solver accepts it
    too.

    Structures or shapes that do not fit raise an error that is both a
    `ValueError` and a `RuntimeError` (Diffrax raises `RuntimeError`), naming them.
    """

    gamma: PyTree
    u: PyTree
    grad_f: Callable[..., PyTree]

    def __init__(self, gamma: PyTree, u: PyTree, grad_f: Callable[..., PyTree]):
        if not callable(grad_f):
            raise TypeError(
                "`UnderdampedLangevinDriftTerm(gamma, u, grad_f)`: `grad_f` must be a "
                f"callable `(x, args) -> gradient`, got {grad_f!r}."
            )
        self.gamma = gamma
        self.u = u
        self.grad_f = grad_f

    def vf(self, t, y, args):
        owner = "UnderdampedLangevinDriftTerm"
        x, v = split_state(y, owner)
        gamma = per_leaf(self.gamma, v, "gamma", owner)
        u = per_leaf(self.u, v, "u", owner)
        force = jtu.tree_map(
            lambda f, v_: f.astype(jnp.result_type(v_)),
            evaluate_gradient(self.grad_f, x, args, owner),
            v,
        )
        dv = jtu.tree_map(
            lambda g, u_, v_, f: -g * v_ - u_ * f,
            gamma,
            u,
            v,
            force,
        )
        return v, dv

    def contr(self, t0, t1, **kwargs):
        return t1 - t0

    def prod(self, vf, control):
        return jtu.tree_map(
            lambda leaf: jnp.asarray(control, dtype=jnp.result_type(leaf)) * leaf, vf
        )


@final
class UnderdampedLangevinDiffusionTerm(AbstractTerm):
    r"""The diffusion of the underdamped Langevin equation

    \begin{align*}
        \mathrm{d} x(t) &= v(t) \, \mathrm{d}t \\
        \mathrm{d} v(t) &= - \gamma \, v(t) \, \mathrm{d}t - u \,
        \nabla \! f( x(t) ) \, \mathrm{d}t + \sqrt{2 \gamma u} \, \mathrm{d} w(t),
    \end{align*}

    that is, the `dW` part, which moves only the velocity: `(0, sqrt(2 gamma u) dW)`.

    **Arguments:**

    - `gamma`: the friction, as for [`diffeqx.UnderdampedLangevinDriftTerm`][].
    - `u`: the inverse mass, likewise.
    - `bm`: the Brownian motion `W`, an [`diffeqx.AbstractBrownianPath`][] whose
      `shape` has the structure and shapes of the position `x`. The dedicated
      solvers need it to sample Lévy areas: `levy_area=diffeqx.SpaceTimeLevyArea`
      for `ALIGN`, `diffeqx.SpaceTimeTimeLevyArea` for `ShOULD` and `QUICSORT`.

    `vf` returns `sqrt(2 gamma u)` with the structure and shapes of `x` (the
    diagonal of the noise matrix of the velocity); `prod` multiplies it by the
    Brownian increment and returns the pair `(0, sqrt(2 gamma u) * dW)`. The Brownian
    path is the field `control`, as in Diffrax.
    """

    gamma: PyTree
    u: PyTree
    control: AbstractBrownianPath

    def __init__(self, gamma: PyTree, u: PyTree, bm: AbstractBrownianPath):
        if not isinstance(bm, AbstractBrownianPath):
            raise TypeError(
                "`UnderdampedLangevinDiffusionTerm(gamma, u, bm)`: `bm` must be an "
                "`AbstractBrownianPath` (e.g. `diffeqx.VirtualBrownianTree`), got "
                f"{bm!r} of type {type(bm).__name__}."
            )
        self.gamma = gamma
        self.u = u
        self.control = bm

    def vf(self, t, y, args):
        owner = "UnderdampedLangevinDiffusionTerm"
        _, v = split_state(y, owner)
        gamma = per_leaf(self.gamma, v, "gamma", owner, full_shape=True)
        u = per_leaf(self.u, v, "u", owner, full_shape=True)
        return jtu.tree_map(lambda g, u_: jnp.sqrt(2 * g * u_), gamma, u)

    def contr(self, t0, t1, **kwargs):
        return self.control.evaluate(t0, t1, **kwargs)

    def prod(self, vf, control):
        if isinstance(control, AbstractBrownianIncrement):
            control = control.W
        if jtu.tree_structure(control) != jtu.tree_structure(vf) or _shapes(
            control
        ) != _shapes(vf):
            raise LangevinArgumentError(
                "`UnderdampedLangevinDiffusionTerm`: the Brownian motion must have "
                "the PyTree structure and shapes of the position `x` (structure "
                f"{_structure(vf)}, shapes {_shapes(vf)}), but its increments have "
                f"structure {_structure(control)} and shapes {_shapes(control)}."
            )
        dv = jtu.tree_map(
            lambda s, dw: s * jnp.asarray(dw, dtype=jnp.result_type(s)), vf, control
        )
        return jtu.tree_map(jnp.zeros_like, dv), dv


def _unwrap(term: Any) -> Any:
    # The solve hands the solver its terms wrapped (in forward time, or answering
    # Brownian queries fetched ahead), each wrapper holding the term it wraps as
    # `.term`; the parameters live on the innermost term.
    langevin = (UnderdampedLangevinDriftTerm, UnderdampedLangevinDiffusionTerm)
    while not isinstance(term, langevin) and isinstance(
        getattr(term, "term", None), AbstractTerm
    ):
        term = term.term
    return term


def langevin_terms(terms, owner: str):
    """`(drift, diffusion)`: the underdamped Langevin terms inside `terms` (a
    `MultiTerm` of the two, each possibly wrapped for the time direction)."""
    parts = getattr(terms, "terms", None)
    if parts is None or len(parts) != 2:
        raise TypeError(
            f"`{owner}` solves `MultiTerm(UnderdampedLangevinDriftTerm(...), "
            f"UnderdampedLangevinDiffusionTerm(...))`, but got {terms!r}."
        )
    drift, diffusion = (_unwrap(p) for p in parts)
    if not isinstance(drift, UnderdampedLangevinDriftTerm) or not isinstance(
        diffusion, UnderdampedLangevinDiffusionTerm
    ):
        raise TypeError(
            f"`{owner}` solves `MultiTerm(UnderdampedLangevinDriftTerm(...), "
            "UnderdampedLangevinDiffusionTerm(...))`, but got a MultiTerm of "
            f"{type(drift).__name__} and {type(diffusion).__name__}."
        )
    return drift, diffusion


def is_concrete(tree) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jtu.tree_leaves(tree))
