"""Control terms: `ControlTerm` and `WeaklyDiagonalControlTerm`, for controlled
differential equations `dy = f(t, y, args) dX(t)` driven by a path `X`."""

import sys
import warnings
from collections.abc import Callable
from typing import final

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from ._brownian.base import AbstractBrownianPath
from ._path.base import AbstractPath
from ._term import VFT, AbstractTerm, ControlT, ODETerm


def _is_linear_operator(x) -> bool:
    # Lineax is only consulted if the user has imported it: nobody can have built a
    # Lineax operator otherwise, and importing it here would slow `import diffeqx`.
    lineax = sys.modules.get("lineax")
    return lineax is not None and isinstance(x, lineax.AbstractLinearOperator)


class _FunctionControl(AbstractPath):
    """A control given as a function `(t0, t1) -> increment over [t0, t1]`."""

    fn: Callable[..., PyTree]

    @property
    def t0(self):
        return -jnp.inf

    @property
    def t1(self):
        return jnp.inf

    def evaluate(self, t0, t1=None, left: bool = True) -> PyTree:
        if t1 is None:
            raise ValueError(
                "This control was given as a function of `(t0, t1)`: it has "
                "increments but no values; call `evaluate(t0, t1)`."
            )
        return self.fn(t0, t1)

    def derivative(self, t, left: bool = True) -> PyTree:
        raise ValueError(
            "This control was given as a function of `(t0, t1)`, which has no "
            "derivative, so `to_ode()` cannot be used; pass an `AbstractPath` such "
            "as `CubicInterpolation` as the control instead."
        )


def _as_control(control, cls_name: str) -> AbstractPath:
    if isinstance(control, AbstractPath):
        return control
    if callable(control):
        return _FunctionControl(control)
    raise TypeError(
        f"The control of a `{cls_name}` must be an `AbstractPath` (e.g. "
        "`LinearInterpolation(ts, ys)`, `CubicInterpolation(ts, coeffs)`) or a "
        f"function `(t0, t1) -> increment`, but got {control!r} of type "
        f"{type(control).__name__}."
    )


def _pair_with_control(vf: PyTree, control: PyTree, cls_name: str) -> tuple:
    """Leaves of `vf` and of `control`, paired: leaf by leaf if they have the same
    structure, else one control array shared by every leaf of `vf`."""
    vf_leaves, vf_structure = jtu.tree_flatten(vf)
    control_leaves, control_structure = jtu.tree_flatten(control)
    if control_structure == vf_structure:
        pairs = zip(vf_leaves, control_leaves, strict=True)
    elif len(control_leaves) == 1:
        pairs = ((leaf, control_leaves[0]) for leaf in vf_leaves)
    else:
        raise ValueError(
            f"`{cls_name}`: the control has PyTree structure {control_structure}, "
            f"which neither matches that of the vector field ({vf_structure}) nor "
            "is a single array."
        )
    pairs = [(jnp.asarray(v), jnp.asarray(c)) for v, c in pairs]
    return pairs, vf_structure


def _check_vf_is_like_y(y, vf, cls_name: str) -> None:
    y_structure, vf_structure = jtu.tree_structure(y), jtu.tree_structure(vf)
    if y_structure != vf_structure:
        raise ValueError(
            f"The vector field of a `{cls_name}` must return a PyTree with the "
            f"structure of `y`. `y` has structure {y_structure} but the vector "
            f"field returned structure {vf_structure}."
        )


def _check_control_vf_shapes(y, vf, control) -> None:
    """A `ControlTerm`'s vector field must have shape (*y_shape, *control_shape) for
    every state leaf; the error names all three shapes."""
    _check_vf_is_like_y(y, vf, "ControlTerm")
    vf_leaves, vf_structure = jtu.tree_flatten(vf)
    control_leaves, control_structure = jtu.tree_flatten(control)
    if control_structure != vf_structure and len(control_leaves) != 1:
        _pair_with_control(vf, control, "ControlTerm")  # raises the structure error
    if control_structure != vf_structure:
        control_leaves = control_leaves * len(vf_leaves)
    for y_leaf, v, c in zip(jtu.tree_leaves(y), vf_leaves, control_leaves, strict=True):
        y_shape = jnp.shape(y_leaf)
        v = jnp.asarray(v)
        expected = y_shape + tuple(c.shape)
        if v.shape != expected:
            hint = ""
            if v.shape == tuple(c.shape) + y_shape:
                hint = " It looks transposed: put the state axes first."
            raise ValueError(
                f"`ControlTerm`: for a state leaf of shape {y_shape} and a control of "
                f"shape {tuple(c.shape)}, the vector field must return shape "
                f"{expected} (state axes, then control axes), but it returned shape "
                f"{v.shape}.{hint}"
            )


class _AbstractControlTerm(AbstractTerm[VFT, ControlT]):
    vector_field: Callable[..., PyTree]
    control: AbstractPath

    def __init__(self, vector_field: Callable[..., PyTree], control):
        if not callable(vector_field):
            raise TypeError(
                f"`{type(self).__name__}(vector_field, control)`: `vector_field` "
                f"must be a callable `(t, y, args) -> ...`, got {vector_field!r}."
            )
        self.vector_field = vector_field
        self.control = _as_control(control, type(self).__name__)

    def vf(self, t, y, args):
        return self.vector_field(t, y, args)

    def contr(self, t0, t1, **kwargs):
        return self.control.evaluate(t0, t1, **kwargs)

    def to_ode(self) -> ODETerm:
        """The equivalent `ODETerm`: `dy/dt = vf(t, y, args) · dX/dt(t)`, using the
        control's `derivative`. It solves the same equation, as an ODE: useful with
        solvers or adjoints that want one. The control must be smooth enough for an
        ODE solver (e.g. `CubicInterpolation`): a `LinearInterpolation`'s derivative
        jumps at every knot."""
        return ODETerm(_ControlledVectorField(self))


class _ControlledVectorField(eqx.Module):
    term: _AbstractControlTerm

    def __call__(self, t, y, args):
        return self.term.vf_prod(t, y, args, self.term.control.derivative(t))


@final
class ControlTerm(_AbstractControlTerm[VFT, ControlT]):
    r"""The term `f(t, y, args) dX(t)` of a controlled differential equation, in
    which the vector field is a matrix and acts on the increments of the control `X`
    by a matrix-vector product.

    **Arguments:**

    - `vector_field`: a callable `(t, y, args) -> vf`. For a state `y` of shape
      `(m,)` and a control of shape `(n,)`, `vf` has shape `(m, n)`. In general, for
      each leaf of `y` of shape `y_shape` and control of shape `c_shape`, the leaf
      of `vf` has shape `(*y_shape, *c_shape)`, and the `c_shape` axes are
      contracted against the control. It may instead return a Lineax linear
      operator, which is applied to the control with `.mv`.
    - `control`: the path `X`, an [`diffeqx.AbstractPath`][] (e.g.
      [`diffeqx.LinearInterpolation`][], [`diffeqx.CubicInterpolation`][], a
      Brownian motion), or a function `(t0, t1) -> X(t1) - X(t0)`. Its increments
      are a PyTree with the structure of `y`, or a single array used for every leaf.

    Over a step `[t0, t1]` the change in `y` is `vf(t, y, args) @ (X(t1) - X(t0))`.
    The vector field is a matrix; as in Diffrax, `is_vf_expensive` is `False`, so a
    first-same-as-last method (e.g. `Tsit5`) carries it from the end of one step to
    the start of the next rather than evaluating it again.

    A wrongly shaped vector field raises a `ValueError` naming the state, control and
    vector-field shapes.

    **Example** (a neural CDE driven by interpolated data):

    ```python
    ts = jnp.linspace(0.0, 1.0, 50)
    xs = jnp.stack([ts, jnp.sin(ts)], axis=-1)                   # (50, 2)
    control = diffeqx.CubicInterpolation(
        ts, diffeqx.backward_hermite_coefficients(ts, xs)
    )
    field = lambda t, y, args: jnp.tanh(args @ y).reshape(4, 2)  # (4,) -> (4, 2)
    term = diffeqx.ControlTerm(field, control)
    sol = diffeqx.diffeqsolve(term, diffeqx.Tsit5(), ts[0], ts[-1], 0.02,
                              jnp.zeros(4), args=jnp.ones((8, 4)))
    ```
    """

    def prod(self, vf, control):
        if _is_linear_operator(vf):
            return vf.mv(control)
        pairs, structure = _pair_with_control(vf, control, "ControlTerm")
        outs = []
        for v, c in pairs:
            if v.ndim < c.ndim or v.shape[v.ndim - c.ndim :] != c.shape:
                raise ValueError(
                    f"`ControlTerm`: the vector field returned a leaf of shape "
                    f"{v.shape}, which does not end in the control's shape "
                    f"{c.shape}; it must have shape (*y_shape, *control_shape)."
                )
            outs.append(jnp.tensordot(v, c.astype(v.dtype), axes=c.ndim))
        return jtu.tree_unflatten(structure, outs)

    def vf(self, t, y, args):
        vf = self.vector_field(t, y, args)
        if not _is_linear_operator(vf):
            control = self._control_struct(t)
            _check_control_vf_shapes(y, vf, control)
        return vf

    def _control_struct(self, t):
        """The shapes and dtypes of the control's increments (nothing evaluated)."""
        # A Brownian path states it (in the normalised form its `__init__` gives);
        # the query then stays out of the program's trace altogether.
        shape = getattr(self.control, "shape", None)
        leaves = jtu.tree_leaves(shape)
        if (
            isinstance(self.control, AbstractBrownianPath)
            and leaves
            and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
        ):
            return shape
        return jax.eval_shape(lambda: self.contr(t, t))

    def vf_prod(self, t, y, args, control):
        vf = self.vf(t, y, args)
        if _is_linear_operator(vf):
            return vf.mv(control)
        pairs, structure = _pair_with_control(vf, control, "ControlTerm")
        outs = []
        for y_leaf, (v, c) in zip(jtu.tree_leaves(y), pairs, strict=True):
            # The control is cast to the vector field's dtype (e.g. a float32
            # Brownian path driving a float64 state), the result to the state's.
            out = jnp.tensordot(v, c.astype(v.dtype), axes=c.ndim)
            outs.append(out.astype(jnp.result_type(y_leaf)))
        return jtu.tree_unflatten(structure, outs)


@final
class WeaklyDiagonalControlTerm(_AbstractControlTerm):
    r"""The term `f(t, y, args) dX(t)` in which the vector field is a diagonal matrix,
    stored as its diagonal: `vf` has the shape of `y` and multiplies the control's
    increments elementwise.

    "Weakly" because each diagonal entry may depend on all of `y`, not only on the
    matching entry.

    **Arguments:**

    - `vector_field`: a callable `(t, y, args) -> vf`, with `vf` a PyTree of the
      structure and shapes of `y`.
    - `control`: the path `X`, as for [`diffeqx.ControlTerm`][]; its increments have
      the shapes of `y` (a PyTree like `y`, or a single array for every leaf).

    Over a step `[t0, t1]` the change in `y` is `vf(t, y, args) * (X(t1) - X(t0))`.

    **Example:**

    ```python
    control = diffeqx.LinearInterpolation(ts, xs)      # xs: (times, 3)
    term = diffeqx.WeaklyDiagonalControlTerm(lambda t, y, args: -y, control)
    ```

    Deprecated, as in Diffrax: constructing one emits a `UserWarning` (the category
    Diffrax uses). The replacement is a `ControlTerm` whose vector field returns
    `lineax.DiagonalLinearOperator(diagonal)`.
    """

    def __init__(self, vector_field: Callable[..., PyTree], control):
        warnings.warn(
            "`WeaklyDiagonalControlTerm` is now deprecated (as it is in Diffrax). Use "
            "`ControlTerm(vector_field, control)` with a vector field that returns "
            "`lineax.DiagonalLinearOperator(diagonal)`, where `diagonal` is what "
            "this vector field returns now.",
            UserWarning,
            stacklevel=4,
        )
        super().__init__(vector_field, control)

    def prod(self, vf, control):
        pairs, structure = _pair_with_control(vf, control, "WeaklyDiagonalControlTerm")
        outs = []
        for v, c in pairs:
            if v.shape != c.shape:
                raise ValueError(
                    "`WeaklyDiagonalControlTerm`: the vector field returned a leaf "
                    f"of shape {v.shape} but the control has shape {c.shape}; they "
                    "must be equal (use `ControlTerm` for a full matrix)."
                )
            outs.append((v * c).astype(v.dtype))
        return jtu.tree_unflatten(structure, outs)

    def vf_prod(self, t, y, args, control):
        vf = self.vf(t, y, args)
        _check_vf_is_like_y(y, vf, "WeaklyDiagonalControlTerm")
        for y_leaf, v in zip(jtu.tree_leaves(y), jtu.tree_leaves(vf), strict=True):
            if jnp.shape(v) != jnp.shape(y_leaf):
                raise ValueError(
                    "`WeaklyDiagonalControlTerm`: the vector field must return the "
                    f"shape of `y`, {jnp.shape(y_leaf)}, but returned shape "
                    f"{jnp.shape(v)} (use `ControlTerm` for a full matrix)."
                )
        return self.prod(vf, control)


def is_control_term(x) -> bool:
    """Whether `x` is a control term (`ControlTerm`, `WeaklyDiagonalControlTerm`)."""
    return isinstance(x, _AbstractControlTerm)
