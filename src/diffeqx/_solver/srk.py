r"""Stochastic Runge–Kutta (SRK) methods for SDEs `dy = f(t, y) dt + g(t, y) ∘ dW`:
a `StochasticButcherTableau` and one engine, `AbstractSRK`, that runs any of them.

Over a step `[t0, t0 + h]` a method sees the time step `h`, the Brownian increment
`W` and, if its tableau asks for them, the space-time Lévy area `H` and the
space-time-time Lévy area `K` of the step (see `diffeqx.SpaceTimeLevyArea`). Write
`X` for any of `W`, `H`, `K`. Each stage `j` (of `s`) is a state `z_j` at the time
`t0 + c_j h`, built from the increments of the earlier stages:

- general noise: `z_j = y0 + Σ_i a_ji k_i + Σ_X Σ_i a^X_ji g_i·X`, where
  `k_i = h f(t_i, z_i)` and `g_i·X` is the diffusion at stage `i` applied to `X`;
  the step's result is `y1 = y0 + Σ_j b_j k_j + Σ_X Σ_j b^X_j g_j·X`;
- additive noise (`g` independent of `y`): the diffusion is evaluated once per step,
  at `t0` and `t1` (one batched evaluation), and the stages are shifted by multiples
  of `g(t0)·X`: `z_j = y0 + Σ_i a_ji k_i + Σ_X a^X_j g(t0)·X`, and
  `y1 = y0 + Σ_j b_j k_j + Σ_X b^X g(t0)·X + (g(t1) - g(t0))·(W/2 - H)`. The last
  term accounts for a diffusion that changes in time: it is the linear part of
  `∫ g(t) dW(t)`, since
  `∫ (t - t0) dW(t) = h W - ∫ (W(t) - W(t0)) dt = h (W/2 - H)`.
  (Without `H` the best guess of that integral given `W` alone, `h W / 2`, is used.)

Where the tableau has `b_error`, the error estimate is the same combination of the
stages with the `b_error` weights (for additive noise, of the drift stages only).
"""

import dataclasses
import math
from typing import Any, ClassVar, Generic, Literal, TypeVar, final

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float

from .._brownian.levy import (
    AbstractBrownianIncrement,
    AbstractSpaceTimeLevyArea,
    AbstractSpaceTimeTimeLevyArea,
)
from .._path.local import LocalLinearInterpolation, accumulation_dtype
from .._solution import RESULTS
from .._term import AbstractTerm, MultiTerm
from . import srk_coefficients as sco
from .base import AbstractAdaptiveSolver, AbstractSolver, AbstractStratonovichSolver
from .runge_kutta import _SCAN_KINDS, node_time

# ---- the tableau ---------------------------------------------------------------------


def _vector(x, what: str) -> np.ndarray:
    out = np.asarray(x, dtype=np.float64)
    if out.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {out.shape}.")
    return out


def _rows(rows, what: str) -> tuple[np.ndarray, ...]:
    """Strictly lower-triangular rows: the `i`-th of length `i + 1`."""
    out = tuple(np.asarray(row, dtype=np.float64) for row in rows)
    for i, row in enumerate(out):
        if row.shape != (i + 1,):
            raise ValueError(
                f"Row {i} of {what} must have shape ({i + 1},), got shape {row.shape}."
            )
    return out


def _lower(rows: tuple[np.ndarray, ...], s: int) -> np.ndarray:
    """The `s x s` strictly lower-triangular matrix with these rows."""
    out = np.zeros((s, s))
    for i, row in enumerate(rows):
        out[i + 1, : i + 1] = row
    return out


@final
@dataclasses.dataclass(frozen=True, eq=False)
class AdditiveCoeffs:
    """The weights of one of `W`, `H`, `K` in a method for additive noise.

    **Arguments:**

    - `a`: shape `(s,)`: stage `j` is shifted by `a[j] * g(t0)·X`.
    - `b_sol`: a number: the solution gets `b_sol * g(t0)·X`.

    The error estimate of an additive-noise method involves the drift only, so
    `b_error` is always `None`.
    """

    a: np.ndarray
    b_sol: Any

    def __post_init__(self):
        object.__setattr__(self, "a", _vector(self.a, "`AdditiveCoeffs(a=...)`"))
        b_sol = np.asarray(self.b_sol, dtype=np.float64)
        if b_sol.ndim != 0:
            raise ValueError(
                "`AdditiveCoeffs(b_sol=...)` must be a single number (the noise of an "
                f"additive-noise method is not evaluated per stage), got shape "
                f"{b_sol.shape}."
            )
        object.__setattr__(self, "b_sol", b_sol)

    @property
    def b_error(self) -> None:
        return None

    @property
    def num_stages(self) -> int:
        return self.a.shape[0]


@final
@dataclasses.dataclass(frozen=True, eq=False)
class GeneralCoeffs:
    """The weights of one of `W`, `H`, `K` in a method for general (state-dependent)
    noise: rows like the drift's.

    **Arguments:**

    - `a`: `s - 1` arrays, the `i`-th of shape `(i + 1,)`: the weights of the earlier
      stages' `g·X` in stage `i + 1`.
    - `b_sol`: shape `(s,)`: the weights of the stages' `g·X` in the solution.
    - `b_error`: shape `(s,)` or `None`: their weights in the error estimate.
    """

    a: tuple[np.ndarray, ...]
    b_sol: np.ndarray
    b_error: np.ndarray | None = None

    def __post_init__(self):
        object.__setattr__(self, "a", _rows(self.a, "`GeneralCoeffs(a=...)`"))
        b_sol = _vector(self.b_sol, "`GeneralCoeffs(b_sol=...)`")
        object.__setattr__(self, "b_sol", b_sol)
        if len(self.a) + 1 != b_sol.shape[0]:
            raise ValueError(
                f"`GeneralCoeffs` with {b_sol.shape[0]} stages (len(b_sol)) needs "
                f"{b_sol.shape[0] - 1} rows in `a`, got {len(self.a)}."
            )
        if self.b_error is not None:
            b_error = _vector(self.b_error, "`GeneralCoeffs(b_error=...)`")
            if b_error.shape != b_sol.shape:
                raise ValueError(
                    f"`GeneralCoeffs(b_error=...)` must have shape {b_sol.shape} like "
                    f"`b_sol`, got {b_error.shape}."
                )
            object.__setattr__(self, "b_error", b_error)

    @property
    def num_stages(self) -> int:
        return self.b_sol.shape[0]


_Coeffs = TypeVar("_Coeffs", AdditiveCoeffs, GeneralCoeffs)


def _stage_mask(mask, s: int, what: str) -> np.ndarray | None:
    if mask is None:
        return None
    out = np.asarray(mask)
    if out.shape != (s,) or out.dtype != np.bool_:
        raise ValueError(
            f"`{what}` must be a boolean array of shape ({s},) (one entry per stage), "
            f"got {out!r}."
        )
    return out


@final
@dataclasses.dataclass(frozen=True, eq=False)
class StochasticButcherTableau(Generic[_Coeffs]):
    """The coefficients of a stochastic Runge–Kutta method with `s` stages, run by
    [`diffeqx.AbstractSRK`][] (see there for the formulas).

    **Arguments:**

    - `a`: the drift's strictly lower-triangular rows: `s - 1` arrays, the `i`-th of
      shape `(i + 1,)`.
    - `b_sol`: shape `(s,)`: the drift weights of the solution; they sum to 1.
    - `b_error`: shape `(s,)`, or `None` for a method without an error estimate: the
      drift weights of the error estimate itself (not of an embedded solution).
    - `c`: shape `(s - 1,)`: the nodes of stages `2, ..., s` (the first is at `t0`).
    - `coeffs_w`: the weights of the Brownian increment `W`: an `AdditiveCoeffs` for
      a method for additive noise, a `GeneralCoeffs` otherwise (both in
      `diffeqx._solver.srk`).
    - `coeffs_hh`: the weights of the space-time Lévy area `H`, of the same kind, or
      `None` if the method does not use it.
    - `coeffs_kk`: the weights of the space-time-time Lévy area `K`, or `None`; a
      method using `K` also uses `H`.
    - `ignore_stage_f`: `None`, or a boolean array of shape `(s,)`: the stages at
      which the drift is not evaluated. Their drift values must have weight zero in
      `a`, `b_sol` and `b_error`.
    - `ignore_stage_g`: likewise for the diffusion (for general noise; an
      additive-noise method does not evaluate the diffusion at its stages). No stage
      may skip both.

    Inconsistent shapes or weights raise a `ValueError` naming the argument.
    """

    a: list[np.ndarray]
    b_sol: np.ndarray
    b_error: np.ndarray | None
    c: np.ndarray
    coeffs_w: _Coeffs
    coeffs_hh: _Coeffs | None
    coeffs_kk: _Coeffs | None
    ignore_stage_f: np.ndarray | None
    ignore_stage_g: np.ndarray | None

    def __post_init__(self):
        b_sol = _vector(self.b_sol, "`StochasticButcherTableau(b_sol=...)`")
        s = b_sol.shape[0]
        if s == 0:
            raise ValueError("A `StochasticButcherTableau` needs at least one stage.")
        a = list(_rows(self.a, "`StochasticButcherTableau(a=...)`"))
        c = _vector(self.c, "`StochasticButcherTableau(c=...)`")
        if len(a) != s - 1 or c.shape != (s - 1,):
            raise ValueError(
                f"A `StochasticButcherTableau` with {s} stages (len(b_sol)) needs "
                f"{s - 1} rows in `a` and `c` of shape ({s - 1},); got {len(a)} rows "
                f"and `c` of shape {c.shape}."
            )
        if not math.isclose(b_sol.sum(), 1.0, rel_tol=1e-12, abs_tol=1e-12):
            raise ValueError(
                f"`StochasticButcherTableau(b_sol=...)` must sum to 1 (a consistent "
                f"drift), but sums to {b_sol.sum()}."
            )
        b_error = self.b_error
        if b_error is not None:
            b_error = _vector(b_error, "`StochasticButcherTableau(b_error=...)`")
            if b_error.shape != (s,):
                raise ValueError(
                    f"`StochasticButcherTableau(b_error=...)` must have shape ({s},), "
                    f"got {b_error.shape}."
                )
        for name, value in (("a", a), ("b_sol", b_sol), ("b_error", b_error), ("c", c)):
            object.__setattr__(self, name, value)
        self._check_noise_coeffs(s)
        f_mask = _stage_mask(self.ignore_stage_f, s, "ignore_stage_f")
        g_mask = _stage_mask(self.ignore_stage_g, s, "ignore_stage_g")
        object.__setattr__(self, "ignore_stage_f", f_mask)
        object.__setattr__(self, "ignore_stage_g", g_mask)
        if f_mask is not None and g_mask is not None and np.any(f_mask & g_mask):
            raise ValueError(
                "`ignore_stage_f` and `ignore_stage_g` both skip the stages "
                f"{np.flatnonzero(f_mask & g_mask).tolist()}; a stage must evaluate "
                "the drift or the diffusion."
            )
        self._check_skipped_stages_unused(f_mask, g_mask)

    def _check_noise_coeffs(self, s: int) -> None:
        kind = type(self.coeffs_w)
        if kind not in (AdditiveCoeffs, GeneralCoeffs):
            raise ValueError(
                "`coeffs_w` must be an `AdditiveCoeffs` or a `GeneralCoeffs`, got "
                f"{self.coeffs_w!r}."
            )
        if self.coeffs_kk is not None and self.coeffs_hh is None:
            raise ValueError(
                "A tableau that uses the space-time-time Lévy area `K` (`coeffs_kk`) "
                "must also use the space-time Lévy area `H` (`coeffs_hh`)."
            )
        for name in ("coeffs_w", "coeffs_hh", "coeffs_kk"):
            coeffs = getattr(self, name)
            if coeffs is None:
                continue
            if type(coeffs) is not kind:
                raise ValueError(
                    f"`{name}` is a {type(coeffs).__name__} but `coeffs_w` is a "
                    f"{kind.__name__}: all noise weights of a tableau are of one kind."
                )
            if coeffs.num_stages != s:
                raise ValueError(
                    f"`{name}` has {coeffs.num_stages} stages but the tableau has {s} "
                    "(len(b_sol))."
                )
            if (
                self.b_error is not None
                and kind is GeneralCoeffs
                and coeffs.b_error is None
            ):
                raise ValueError(
                    f"The tableau has an error estimate (`b_error`) but `{name}` has "
                    "no `b_error`: for general noise every weight set needs one."
                )

    def _check_skipped_stages_unused(self, f_mask, g_mask) -> None:
        s = self.num_stages
        if f_mask is not None:
            uses = [("a", _lower(tuple(self.a), s)), ("b_sol", self.b_sol[None])]
            if self.b_error is not None:
                uses.append(("b_error", self.b_error[None]))
            _check_unused(uses, f_mask, "ignore_stage_f", "drift")
        if g_mask is not None and not self.is_additive_noise():
            uses = []
            for name, coeffs in self.noise_coeffs():
                uses.append((f"{name}.a", _lower(coeffs.a, s)))
                uses.append((f"{name}.b_sol", coeffs.b_sol[None]))
                if coeffs.b_error is not None:
                    uses.append((f"{name}.b_error", coeffs.b_error[None]))
            _check_unused(uses, g_mask, "ignore_stage_g", "diffusion")

    # -- derived quantities

    def is_additive_noise(self) -> bool:
        """Whether the method is for additive noise (`AdditiveCoeffs`)."""
        return isinstance(self.coeffs_w, AdditiveCoeffs)

    @property
    def num_stages(self) -> int:
        return self.b_sol.shape[0]

    @property
    def c_full(self) -> np.ndarray:
        """The nodes of all stages, the first (0) included."""
        return np.concatenate([[0.0], self.c])

    @property
    def a_matrix(self) -> np.ndarray:
        """The drift's tableau as an `s x s` strictly lower-triangular matrix."""
        return _lower(tuple(self.a), self.num_stages)

    def noise_coeffs(self) -> list[tuple[str, Any]]:
        """`(name, coefficients)` of the noise moments the method uses, in the order
        `W`, `H`, `K`."""
        out = [("coeffs_w", self.coeffs_w)]
        if self.coeffs_hh is not None:
            out.append(("coeffs_hh", self.coeffs_hh))
        if self.coeffs_kk is not None:
            out.append(("coeffs_kk", self.coeffs_kk))
        return out


def _check_unused(uses, mask, mask_name: str, what: str) -> None:
    for name, matrix in uses:
        used = np.flatnonzero(np.any(matrix[:, mask] != 0, axis=0))
        if used.size:
            stages = np.flatnonzero(mask)[used].tolist()
            raise ValueError(
                f"`{mask_name}` skips the {what} at stages {stages}, but `{name}` "
                "gives them a non-zero weight."
            )


# ---- the engine ----------------------------------------------------------------------


def _state_dtype(y0):
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(*jtu.tree_leaves(y0))


def _cast_like(y0, tree):
    """`tree` (a PyTree like `y0`) with each leaf cast to the dtype of `y0`'s."""
    return jtu.tree_map(lambda y, x: jnp.asarray(x, dtype=jnp.result_type(y)), y0, tree)


def _add_weighted(y0, pairs):
    """`y0 + Σ w x` over `(w, x)` in `pairs` (`w` a Python number, `x` a PyTree like
    `y0`), leaving out zero weights: elementwise sums that XLA fuses. Computed in the
    state's `accumulation_dtype` (float32 for float16 and bfloat16 states) and
    rounded to the state's dtype once."""
    pairs = [(float(w), x) for w, x in pairs if w != 0]
    if not pairs:
        return y0

    def leaf(y, *xs):
        dtype = accumulation_dtype(y.dtype)
        out = y.astype(dtype)
        for (w, _), x in zip(pairs, xs, strict=True):
            out = out + jnp.asarray(w, dtype=dtype) * x.astype(dtype)
        return out.astype(y.dtype)

    return jtu.tree_map(leaf, y0, *(x for _, x in pairs))


def _weighted(weights, stages):
    """The `(weight, stage)` pairs of a row of weights and the stages' values; a
    skipped stage (`None`) has weight zero (checked by the tableau)."""
    return [(w, x) for w, x in zip(weights, stages, strict=False) if x is not None]


def _zeros_like(y0):
    return jtu.tree_map(jnp.zeros_like, y0)


_DRIFT_AND_DIFFUSION = MultiTerm[
    tuple[AbstractTerm[Any, Float[Array, ""]], AbstractTerm]
]


class AbstractSRK(AbstractSolver):
    r"""A stochastic Runge–Kutta method given by a class attribute `tableau`, a
    [`diffeqx.StochasticButcherTableau`][]. It solves the Stratonovich SDE
    `dy = f(t, y) dt + g(t, y) ∘ dW` from
    `terms = MultiTerm(ODETerm(f), ControlTerm(g, brownian_motion))`.

    With `H` the space-time Lévy area of the step (and `K` the space-time-time one,
    if the tableau uses it), a step of size `h` evaluates the stages

    $z_j = y_0 + \sum_{i<j} a_{ji} h f(t_0 + c_i h, z_i)
    + \sum_{i<j} (a^W_{ji} W + a^H_{ji} H) g(t_0 + c_i h, z_i)$

    and returns $y_1 = y_0 + \sum_j b_j h f_j + \sum_j (b^W_j W + b^H_j H) g_j$.
    For a tableau made of `AdditiveCoeffs` (additive noise: `g` must not depend on
    `y`, which is checked when the solve starts) the diffusion is evaluated at the
    step's ends only: the stages are shifted by $(a^W_j W + a^H_j H) g(t_0)$, the
    solution gets $(b^W W + b^H H) g(t_0)$, plus $(g(t_1) - g(t_0))(W/2 - H)$ for a
    diffusion that varies in time.

    The Brownian motion must provide the Lévy areas the tableau uses:
    `minimal_levy_area` is `AbstractSpaceTimeTimeLevyArea` if it uses `K`,
    `AbstractSpaceTimeLevyArea` if it uses `H`, else `AbstractBrownianIncrement`;
    `diffeqsolve` checks the path's `levy_area` against it. With `b_error` in the
    tableau the step returns an error estimate, so the method can be used with
    `PIDController`. Dense output is linear between the steps' ends.

    **Arguments:**

    - `scan_kind`: accepted for compatibility with Diffrax (`None`, `"lax"`,
      `"checkpointed"`, `"bounded"`), where it chooses the loop over the stages.
      Here the stages are always unrolled (there are at most a handful, and the
      tableau says statically which vector fields each needs), so the value does
      not change the program.
    """

    tableau: eqx.AbstractClassVar[StochasticButcherTableau]
    scan_kind: None | Literal["lax", "checkpointed", "bounded"] = eqx.field(
        default=None, static=True
    )

    term_structure: ClassVar[Any] = _DRIFT_AND_DIFFUSION
    interpolation_cls: ClassVar = LocalLinearInterpolation

    def __check_init__(self):
        if self.scan_kind not in _SCAN_KINDS:
            raise ValueError(
                f"`{type(self).__name__}(scan_kind=...)` must be one of None, 'lax', "
                f"'checkpointed' or 'bounded'; got {self.scan_kind!r}."
            )

    @property
    def minimal_levy_area(self) -> type:
        """The least Lévy area the Brownian motion must provide."""
        if self.tableau.coeffs_kk is not None:
            return AbstractSpaceTimeTimeLevyArea
        if self.tableau.coeffs_hh is not None:
            return AbstractSpaceTimeLevyArea
        return AbstractBrownianIncrement

    def init(self, terms, t0, t1, y0, args):
        if self.tableau.is_additive_noise():
            _, diffusion = terms.terms
            if _depends_on_state(lambda y: diffusion.vf(t0, y, args), y0):
                raise ValueError(
                    f"{type(self).__name__} is a method for additive noise: the "
                    "diffusion's vector field must not depend on `y`, but it does. "
                    "Use a solver for general noise (e.g. `GeneralShARK`, `SPaRK`, "
                    "`SlowRK` for commutative noise)."
                )
        return None

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

    def _levy_moments(self, diffusion, t0, t1, y0) -> list:
        """`[W]`, `[W, H]` or `[W, H, K]`, as the tableau uses them, in the state's
        dtype."""
        levy = diffusion.contr(t0, t1, use_levy=True)
        needed = self.minimal_levy_area
        if not isinstance(levy, needed):
            raise ValueError(
                f"{type(self).__name__} needs the diffusion's control to return "
                f"`{needed.__name__}` with `use_levy=True`, but it returned "
                f"{type(levy).__name__}. Use a Brownian motion built with a richer "
                "`levy_area` (e.g. `levy_area=diffeqx.SpaceTimeLevyArea`)."
            )
        moments = [levy.W]
        if self.tableau.coeffs_hh is not None:
            moments.append(levy.H)
        if self.tableau.coeffs_kk is not None:
            moments.append(levy.K)
        dtype = _state_dtype(y0)
        return [jtu.tree_map(lambda x: jnp.asarray(x, dtype=dtype), m) for m in moments]

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        drift, diffusion = terms.terms
        h = drift.contr(t0, t1)
        moments = self._levy_moments(diffusion, t0, t1, y0)
        if self.tableau.is_additive_noise():
            y1, y_error = self._additive_step(
                drift, diffusion, t0, t1, h, y0, args, moments
            )
        else:
            y1, y_error = self._general_step(
                drift, diffusion, t0, t1, h, y0, args, moments
            )
        return y1, y_error, dict(y0=y0, y1=y1), None, RESULTS.successful

    def _drift_stage(self, drift, t, z, args, h, y0):
        return _cast_like(y0, drift.vf_prod(t, z, args, h))

    def _general_step(self, drift, diffusion, t0, t1, h, y0, args, moments):
        tab = self.tableau
        s = tab.num_stages
        a, c = tab.a_matrix, tab.c_full
        noise = [coeffs for _, coeffs in tab.noise_coeffs()]
        noise_a = [_lower(coeffs.a, s) for coeffs in noise]
        skip_f = np.zeros(s, bool) if tab.ignore_stage_f is None else tab.ignore_stage_f
        skip_g = np.zeros(s, bool) if tab.ignore_stage_g is None else tab.ignore_stage_g
        # The stages' drift increments h f_j, and for each noise moment X its
        # increments g_j·X; `None` where the tableau skips the evaluation.
        fs: list = [None] * s
        gs: list[list] = [[None] * s for _ in moments]

        def stage_pairs(rows_f, rows_g, j):
            pairs = _weighted(rows_f[j, :j], fs[:j])
            for rows, g_x in zip(rows_g, gs, strict=True):
                pairs += _weighted(rows[j, :j], g_x[:j])
            return pairs

        for j in range(s):
            z = _add_weighted(y0, stage_pairs(a, noise_a, j))
            t = node_time(c[j], t0, t1)
            if not skip_f[j]:
                fs[j] = self._drift_stage(drift, t, z, args, h, y0)
            if not skip_g[j]:
                if len(moments) == 1:
                    products = [diffusion.vf_prod(t, z, args, moments[0])]
                else:
                    # One evaluation of the diffusion, applied to each moment.
                    g = diffusion.vf(t, z, args)
                    products = [diffusion.prod(g, x) for x in moments]
                for g_x, product in zip(gs, products, strict=True):
                    g_x[j] = _cast_like(y0, product)

        def combine(b_f, b_g):
            pairs = _weighted(b_f, fs)
            for weights, g_x in zip(b_g, gs, strict=True):
                pairs += _weighted(weights, g_x)
            return pairs

        y1 = _add_weighted(y0, combine(tab.b_sol, [co.b_sol for co in noise]))
        if tab.b_error is None:
            return y1, None
        error_pairs = combine(tab.b_error, [co.b_error for co in noise])
        return y1, _add_weighted(_zeros_like(y0), error_pairs)

    def _additive_step(self, drift, diffusion, t0, t1, h, y0, args, moments):
        tab = self.tableau
        s = tab.num_stages
        a, c = tab.a_matrix, tab.c_full
        noise = [coeffs for _, coeffs in tab.noise_coeffs()]
        skip_f = np.zeros(s, bool) if tab.ignore_stage_f is None else tab.ignore_stage_f
        # The diffusion at both ends of the step, in one (batched) evaluation.
        ends = jnp.stack([jnp.asarray(t0), jnp.asarray(t1, dtype=jnp.result_type(t0))])
        g_ends = jax.vmap(lambda t: diffusion.vf(t, y0, args))(ends)
        g0 = jtu.tree_map(lambda g: g[0], g_ends)
        g_change = jtu.tree_map(lambda g: g[1] - g[0], g_ends)
        # g(t0)·X for each moment X: every stage is shifted by multiples of these.
        shifts = [_cast_like(y0, diffusion.prod(g0, x)) for x in moments]

        fs: list = [None] * s
        for j in range(s):
            pairs = _weighted(a[j, :j], fs[:j])
            pairs += [(co.a[j], shift) for co, shift in zip(noise, shifts, strict=True)]
            z = _add_weighted(y0, pairs)
            if not skip_f[j]:
                fs[j] = self._drift_stage(
                    drift, node_time(c[j], t0, t1), z, args, h, y0
                )

        # ∫ (t - t0) dW / h = W/2 - H (or its mean W/2 given W alone).
        w = moments[0]
        if len(moments) > 1:
            weighted_in_time = jtu.tree_map(
                lambda w_, h_: jnp.asarray(0.5, dtype=w_.dtype) * w_ - h_,
                w,
                moments[1],
            )
        else:
            weighted_in_time = jtu.tree_map(
                lambda w_: jnp.asarray(0.5, w_.dtype) * w_, w
            )
        time_change = _cast_like(y0, diffusion.prod(g_change, weighted_in_time))

        pairs = _weighted(tab.b_sol, fs)
        pairs += [
            (float(co.b_sol), shift) for co, shift in zip(noise, shifts, strict=True)
        ]
        pairs.append((1.0, time_change))
        y1 = _add_weighted(y0, pairs)
        if tab.b_error is None:
            return y1, None
        return y1, _add_weighted(_zeros_like(y0), _weighted(tab.b_error, fs))


def _depends_on_state(fn, y0) -> bool:
    """Whether `fn(y)` depends on `y`, decided symbolically: a forward-mode derivative
    whose outputs are all symbolic zeros means it does not."""
    tangents = jtu.tree_map(jnp.ones_like, y0)
    _, out_tangents = eqx.filter_jvp(fn, (y0,), (tangents,))
    return len(jtu.tree_leaves(out_tangents)) > 0


# ---- the methods ---------------------------------------------------------------------


def _tableau(data: dict) -> StochasticButcherTableau:
    s = len(data["b_sol"])

    def coeffs(d):
        if d is None:
            return None
        if data["noise"] == "additive":
            return AdditiveCoeffs(a=d["a"], b_sol=d["b_sol"])
        return GeneralCoeffs(a=d["a"], b_sol=d["b_sol"], b_error=d["b_error"])

    def mask(stages):
        if stages is None:
            return None
        out = np.zeros(s, dtype=bool)
        out[list(stages)] = True
        return out

    return StochasticButcherTableau(
        a=data["a"],
        b_sol=data["b_sol"],
        b_error=data["b_error"],
        c=data["c"],
        coeffs_w=coeffs(data["w"]),
        coeffs_hh=coeffs(data.get("hh")),
        coeffs_kk=coeffs(data.get("kk")),
        ignore_stage_f=mask(data.get("skip_drift")),
        ignore_stage_g=mask(data.get("skip_diffusion")),
    )


@final
class SEA(AbstractSRK, AbstractStratonovichSolver):
    """Shifted Euler method for additive noise, `dy = f(t, y) dt + g(t) dW`.

    One drift evaluation per step, taken not at `y0` but at `y0 + g (W/2 + H)`, where
    the Brownian path is on average over the step; the diffusion is evaluated once
    per step (at both ends, for its change in time). Strong order 1 (as
    Euler–Maruyama on additive noise) but with a smaller error constant, and first
    order on ODEs. Needs the space-time Lévy area: build the Brownian motion with
    `levy_area=diffeqx.SpaceTimeLevyArea`. No error estimate.

    Reference: Foster, dos Reis & Strange (2023), arXiv:2210.17543, eq. (5.8).
    """

    tableau: ClassVar[StochasticButcherTableau] = _tableau(sco.SEA)

    def order(self, terms):
        return 1

    def strong_order(self, terms):
        return 1


@final
class SRA1(AbstractSRK, AbstractStratonovichSolver):
    """Rößler's SRA1 method for additive noise, `dy = f(t, y) dt + g(t) dW` (for
    additive noise the Itô and Stratonovich solutions coincide).

    Two drift evaluations per step and one (batched) evaluation of the diffusion at
    the step's ends. Strong order 1.5, second order on ODEs. Needs the space-time Lévy
    area (`levy_area=diffeqx.SpaceTimeLevyArea`). Embedded error estimate of the
    drift, so it can run with `PIDController`. Very close to [`diffeqx.ShARK`][].

    Reference: A. Rößler, SIAM J. Numer. Anal. 48(3), 2010.
    """

    tableau: ClassVar[StochasticButcherTableau] = _tableau(sco.SRA1)

    def order(self, terms):
        return 2

    def strong_order(self, terms):
        return 1.5


@final
class ShARK(AbstractSRK, AbstractStratonovichSolver):
    """Shifted additive-noise Runge–Kutta method, the first choice for additive noise,
    `dy = f(t, y) dt + g(t) dW`.

    Two drift evaluations per step, both from the state shifted by `g H`, and one
    (batched) evaluation of the diffusion at the step's ends. Strong order 1.5,
    second order on ODEs. Needs the space-time Lévy area
    (`levy_area=diffeqx.SpaceTimeLevyArea`). Embedded error estimate of the drift.
    For noise that depends on the state use [`diffeqx.GeneralShARK`][].

    Reference: Foster, dos Reis & Strange (2023), arXiv:2210.17543, eq. (6.1).
    """

    tableau: ClassVar[StochasticButcherTableau] = _tableau(sco.SHARK)

    def order(self, terms):
        return 2

    def strong_order(self, terms):
        return 1.5


@final
class GeneralShARK(AbstractSRK, AbstractStratonovichSolver):
    """ShARK for Stratonovich SDEs with any noise, `dy = f(t, y) dt + g(t, y) ∘ dW`.

    Two drift and three diffusion evaluations per step. Strong order 1.5 for additive
    noise (where [`diffeqx.ShARK`][] is cheaper), 1 for commutative noise (where
    [`diffeqx.SlowRK`][] reaches 1.5) and 0.5 for general noise (`strong_order`);
    second order on ODEs. As accurate per step as [`diffeqx.SPaRK`][] on general
    noise with one drift evaluation fewer, so a good choice when the drift is
    expensive; it has no error estimate, though (use `SPaRK` for adaptive steps).
    Needs the space-time Lévy area (`levy_area=diffeqx.SpaceTimeLevyArea`).

    Reference: Foster, dos Reis & Strange (2023), arXiv:2210.17543, eq. (6.1).
    """

    tableau: ClassVar[StochasticButcherTableau] = _tableau(sco.GENERAL_SHARK)

    def order(self, terms):
        return 2

    def strong_order(self, terms):
        return 0.5


@final
class SlowRK(AbstractSRK, AbstractStratonovichSolver):
    """SLOW-RK, for Stratonovich SDEs with commutative noise (the noise vector fields
    `g_i` commute: `g_i' g_j = g_j' g_i`; e.g. scalar or diagonal noise).

    Two drift and five diffusion evaluations per step: half a step of drift, the
    classical fourth-order Runge–Kutta method along `W` for the diffusion, and the
    rest of the drift. Strong order 1.5 for commutative noise, 0.5 for general
    noise (prefer [`diffeqx.GeneralShARK`][] or [`diffeqx.SPaRK`][] there); second
    order on ODEs. Needs the space-time Lévy area
    (`levy_area=diffeqx.SpaceTimeLevyArea`). No error estimate.

    Reference: Foster, dos Reis & Strange (2023), arXiv:2210.17543, eq. (6.2).
    """

    tableau: ClassVar[StochasticButcherTableau] = _tableau(sco.SLOW_RK)

    def order(self, terms):
        return 2

    def strong_order(self, terms):
        return 1.5


@final
class SPaRK(AbstractSRK, AbstractStratonovichSolver, AbstractAdaptiveSolver):
    """Splitting path Runge–Kutta method, for Stratonovich SDEs with any noise, with
    an embedded error estimate: the choice for adaptive steps (`PIDController`).

    Three drift and three diffusion evaluations per step, at the start, middle and end
    of the step. Strong order 1.5 for additive noise, 1 for commutative noise and 0.5
    for general noise (`strong_order`); second order on ODEs. The embedded solution
    averages the first and last stages (a trapezoidal rule) and leaves out `H`.
    With constant steps [`diffeqx.GeneralShARK`][] is as accurate with fewer
    evaluations. Needs the space-time Lévy area
    (`levy_area=diffeqx.SpaceTimeLevyArea`).

    Reference: J. Foster (2023), "On the convergence of adaptive approximations for
    stochastic differential equations", arXiv:2311.14201, Definition 1.6.
    """

    tableau: ClassVar[StochasticButcherTableau] = _tableau(sco.SPARK)

    def order(self, terms):
        return 2

    def strong_order(self, terms):
        return 0.5
