"""Runge–Kutta methods as data: a `ButcherTableau` and one engine that runs it.

Stages are stored as vector-field values `f_i` (cheap to combine and reusable for
first-same-as-last), unless the term says its vector field is expensive to
materialise, in which case the increments `k_i = vf_prod(t_i, y_i, control)` are
stored instead. Stage `i` evaluates at `y0 + sum_j a_ij k_j`.
"""

from typing import Any, ClassVar, Literal, final

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._solution import RESULTS
from .._term import AbstractTerm
from .._transforms import differentiation_levels
from .base import AbstractAdaptiveSolver


def _as_rows(rows, name) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(row, dtype=np.float64) for row in rows)


def _check_rows(rows, name) -> None:
    for i, row in enumerate(rows):
        if row.shape != (i + 1,):
            raise ValueError(
                f"Row {i} of `{name}` must have length {i + 1}, got shape {row.shape}."
            )


def _as_vector(x, name) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(
            f"`ButcherTableau({name}=...)` must be 1-D, got shape {x.shape}."
        )
    return x


@final
class ButcherTableau:
    """The coefficients of a Runge–Kutta method with `s` stages: explicit, or diagonally
    implicit when `a_diagonal` is given.

    **Arguments:**

    - `c`: the nodes of stages `2, ..., s`; shape `(s - 1,)`.
    - `b_sol`: the weights giving the solution; shape `(s,)`.
    - `b_error`: the weights giving the error estimate (difference between the
      solution and an embedded lower-order solution); shape `(s,)`, or `None` for a
      method without an error estimate.
    - `a_lower`: the strictly lower-triangular rows of the Runge–Kutta matrix: a tuple
      of `s - 1` arrays, the `i`-th of length `i + 1`.
    - `a_diagonal`: the diagonal of the Runge–Kutta matrix, shape `(s,)`, for a
      diagonally implicit method; `None` for an explicit one.
    - `a_predictor`: for a diagonally implicit method, optional weights that predict
      each implicit stage from the previous ones (the starting guess of its nonlinear
      solve): a tuple of `s - 1` arrays, the `i`-th of length `i + 1`.
    - `c1`: the node of the first stage (0 for an explicit method).

    Each stage must be consistent: its node equals the sum of its row of the
    Runge–Kutta matrix (including the diagonal entry).

    The engine in this release runs explicit tableaus (`AbstractERK`); diagonally
    implicit ones are data for implicit solvers.

    **Example** (the classical fourth-order method):

    ```python
    rk4 = ButcherTableau(
        c=np.array([0.5, 0.5, 1.0]),
        b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
        b_error=None,
        a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
    )
    ```
    """

    c: np.ndarray
    b_sol: np.ndarray
    b_error: np.ndarray | None
    a_lower: tuple[np.ndarray, ...]
    a_diagonal: np.ndarray | None
    a_predictor: tuple[np.ndarray, ...] | None
    c1: float

    def __init__(
        self, c, b_sol, b_error, a_lower, a_diagonal=None, a_predictor=None, c1=0.0
    ):
        self.c = _as_vector(c, "c")
        self.b_sol = _as_vector(b_sol, "b_sol")
        self.b_error = None if b_error is None else _as_vector(b_error, "b_error")
        self.a_lower = _as_rows(a_lower, "a_lower")
        self.a_diagonal = (
            None if a_diagonal is None else _as_vector(a_diagonal, "a_diagonal")
        )
        self.a_predictor = (
            None if a_predictor is None else _as_rows(a_predictor, "a_predictor")
        )
        self.c1 = float(c1)
        s = len(self.b_sol)
        if len(self.c) != s - 1 or len(self.a_lower) != s - 1:
            raise ValueError(
                f"A ButcherTableau with {s} stages (len(b_sol)) needs `c` of length "
                f"{s - 1} and {s - 1} rows in `a_lower`; got len(c)={len(self.c)} and "
                f"{len(self.a_lower)} rows."
            )
        if self.b_error is not None and self.b_error.shape != (s,):
            raise ValueError(
                f"`b_error` must have shape ({s},), got {self.b_error.shape}."
            )
        if self.a_diagonal is not None and self.a_diagonal.shape != (s,):
            raise ValueError(
                f"`a_diagonal` must have shape ({s},), got {self.a_diagonal.shape}."
            )
        _check_rows(self.a_lower, "a_lower")
        if self.a_predictor is not None:
            if len(self.a_predictor) != s - 1:
                raise ValueError(
                    f"`a_predictor` needs {s - 1} rows, got {len(self.a_predictor)}."
                )
            _check_rows(self.a_predictor, "a_predictor")
        diagonal = np.zeros(s) if self.a_diagonal is None else self.a_diagonal
        for i, row in enumerate(self.a_lower):
            total = row.sum() + diagonal[i + 1]
            if not np.isclose(total, self.c[i], rtol=1e-10, atol=1e-10):
                raise ValueError(
                    f"Row {i} of `a_lower` (plus the diagonal entry) sums to {total} "
                    f"but `c[{i}]` is {self.c[i]}; a consistent method has "
                    "`sum_j a_ij == c_i`."
                )
        if not np.isclose(diagonal[0], self.c1, rtol=1e-10, atol=1e-10):
            raise ValueError(
                f"The first stage's node `c1={self.c1}` must equal its diagonal entry "
                f"{diagonal[0]} (0 for an explicit first stage)."
            )

    def __repr__(self) -> str:
        return (
            f"ButcherTableau(c={self.c!r}, b_sol={self.b_sol!r}, "
            f"b_error={self.b_error!r}, a_lower={self.a_lower!r}, "
            f"a_diagonal={self.a_diagonal!r}, a_predictor={self.a_predictor!r}, "
            f"c1={self.c1!r})"
        )

    @property
    def num_stages(self) -> int:
        return len(self.b_sol)

    @property
    def is_explicit(self) -> bool:
        return self.a_diagonal is None or not np.any(self.a_diagonal)

    @property
    def a_matrix(self) -> np.ndarray:
        s = self.num_stages
        a = np.zeros((s, s))
        for i, row in enumerate(self.a_lower):
            a[i + 1, : i + 1] = row
        if self.a_diagonal is not None:
            a[np.arange(s), np.arange(s)] = self.a_diagonal
        return a

    @property
    def c_full(self) -> np.ndarray:
        return np.concatenate([[self.c1], self.c])

    @property
    def fsal(self) -> bool:
        """First same as last: the last stage is the vector field at `(t1, y1)`."""
        s = self.num_stages
        return (
            self.is_explicit
            and s > 1
            and self.c[-1] == 1
            and self.b_sol[-1] == 0
            and np.array_equal(self.a_lower[-1], self.b_sol[:-1])
        )


# Diffrax's values of `scan_kind`. It chooses there how the stage loop is built for
# reverse-mode differentiation; here the engine picks unrolled or looped stages
# itself (see `AbstractERK`), so every value runs the same program.
_SCAN_KINDS = (None, "lax", "checkpointed", "bounded")


class AbstractRungeKutta(AbstractAdaptiveSolver):
    """Base class for Runge–Kutta solvers defined by a tableau.

    **Arguments:**

    - `scan_kind`: accepted for compatibility with Diffrax: `None` (default), `"lax"`,
      `"checkpointed"` or `"bounded"`. In Diffrax it selects the kind of loop over the
      stages (a plain `lax.scan`, or one that checkpoints / bounds it for
      reverse-mode differentiation). diffeqx chooses how the stages run by itself
      (unrolled for small vector fields, one loop for large ones and under second
      derivatives), and any loop it builds is differentiable in every mode, so every
      value gives the same program and the same results.
    """

    tableau: eqx.AbstractClassVar[ButcherTableau]
    scan_kind: None | Literal["lax", "checkpointed", "bounded"] = eqx.field(
        default=None, static=True
    )

    def __check_init__(self):
        if self.scan_kind not in _SCAN_KINDS:
            raise ValueError(
                f"`{type(self).__name__}(scan_kind=...)` must be one of None, 'lax', "
                f"'checkpointed' or 'bounded'; got {self.scan_kind!r}."
            )


class _StageList:
    """Stage values kept as a Python list (unrolled stages), not stacked."""

    def __init__(self, values):
        self.values = values


def _weighted_sum(weights, stages):
    """`sum_i weights[i] * stages[i]` over the leading stage axis of every leaf.

    `weights` is a static NumPy vector (zero entries are skipped) or a traced one;
    `stages` is stacked along a leading axis, or a `_StageList`."""
    if isinstance(stages, _StageList):
        # Python floats (weakly typed) take the dtype of the stages they multiply.
        nonzero = [(i, float(w)) for i, w in enumerate(weights) if w != 0]
        values = stages.values

        def _combine(*leaves):
            if not nonzero:
                return jnp.zeros_like(leaves[0])
            out = nonzero[0][1] * leaves[nonzero[0][0]]
            for i, w in nonzero[1:]:
                out = out + w * leaves[i]
            return out.astype(leaves[0].dtype)

        return jtu.tree_map(_combine, *values)
    if isinstance(weights, np.ndarray):
        nonzero = [(i, float(w)) for i, w in enumerate(weights) if w != 0]

        def _leaf(x):
            if not nonzero:
                return jnp.zeros(x.shape[1:], x.dtype)
            out = nonzero[0][1] * x[nonzero[0][0]]
            for i, w in nonzero[1:]:
                out = out + w * x[i]
            return out.astype(x.dtype)

    else:

        def _leaf(x):
            return jnp.tensordot(weights.astype(x.dtype), x, axes=1)

    return jtu.tree_map(_leaf, stages)


# A vector field counts as large (so that Runge–Kutta stages are scanned rather than
# unrolled) when it contains a matrix product or this many primitive operations.
_LARGE_FUNCTION_EQUATIONS = 64


def _is_large_function(fn, *example_args) -> bool:
    """Whether `fn` is expensive enough that tracing it once per stage would dominate
    compile time. Decided from its jaxpr, which costs one extra trace."""
    jaxpr = jax.make_jaxpr(fn)(*example_args).jaxpr
    count = 0
    stack = [jaxpr]
    while stack:
        current = stack.pop()
        for eqn in current.eqns:
            count += 1
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                return True
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", None)
                if inner is not None:
                    stack.append(getattr(inner, "jaxpr", inner))
    return count >= _LARGE_FUNCTION_EQUATIONS


def _add(y, dy):
    return jtu.tree_map(lambda a, b: (a + b).astype(a.dtype), y, dy)


class AbstractERK(AbstractRungeKutta):
    """Explicit Runge–Kutta method. A concrete method sets `tableau`,
    `interpolation_cls` and `order`; the engine does the rest (embedded error
    estimate, first-same-as-last reuse, dense output information).

    Stages run either as a `lax.fori_loop` over the stage index (the vector field is
    traced once, which keeps compile times low when it is large, e.g. a neural
    network), or unrolled in Python with the tableau's zeros skipped (fastest at run
    time for small vector fields). `scan_stages` picks one: `True`, `False`, or `None`
    to decide from the size of the vector field.
    """

    term_structure: ClassVar[Any] = AbstractTerm
    scan_stages: ClassVar[bool | None] = None

    def __check_init__(self):
        if not self.tableau.is_explicit:
            raise NotImplementedError(
                f"{type(self).__name__} is an `AbstractERK`, whose engine runs "
                "explicit tableaus only, but its tableau has a non-zero `a_diagonal`."
            )

    def _store_vf(self, terms, t0, t1, y0, args) -> bool:
        return not terms.is_vf_expensive(t0, t1, y0, args)

    def _use_scan(self, evaluate, t0, f0, y0) -> bool:
        if self.scan_stages is not None:
            return self.scan_stages
        if len(differentiation_levels()) >= 2:
            # Second derivatives replicate the step many times over, so program size
            # (compile time) matters more than the unrolled stages' speed (measured:
            # a 4-parameter Hessian compiles 2x faster with the stages in a loop).
            return True
        return _is_large_function(evaluate, t0, y0)

    def init(self, terms, t0, t1, y0, args):
        # First-same-as-last methods carry the vector field at the end of the step
        # (a full matrix for a control term), so that the next step's first stage
        # is a product with the new control increment rather than a new evaluation.
        if self.tableau.fsal:
            return terms.vf(t0, y0, args)
        return None

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        tableau = self.tableau
        s = tableau.num_stages
        store_vf = self._store_vf(terms, t0, t1, y0, args)
        use_fsal = tableau.fsal
        # Storing increments: the last stage of a first-same-as-last method is still
        # evaluated as a full vector field, to be carried to the next step.
        fsal_vf_last = use_fsal and not store_vf
        control = terms.contr(t0, t1)
        dt = t1 - t0

        if store_vf:

            def increment(weights, stages):
                return terms.prod(_weighted_sum(weights, stages), control)

            def evaluate(t, y):
                return terms.vf(t, y, args)

        else:

            def increment(weights, stages):
                return _weighted_sum(weights, stages)

            def evaluate(t, y):
                return terms.vf_prod(t, y, args, control)

        def stage_time(c_i):
            # Stage times keep the dtype of the step's times (the tableau's
            # coefficients are float64 NumPy values).
            return t0 + jnp.asarray(c_i, dtype=dt.dtype) * dt

        def stage_value(i, weights, c_i, stages):
            y_i = _add(y0, increment(weights, stages))
            return evaluate(stage_time(c_i), y_i)

        if use_fsal:
            if made_jump is False:
                vf0 = solver_state
            else:
                vf0 = lax.cond(
                    made_jump,
                    lambda: terms.vf(t0, y0, args),
                    lambda: solver_state,
                )
            f0 = vf0 if store_vf else terms.prod(vf0, control)
        else:
            f0 = evaluate(t0, y0)
        # Stages computed by the loop below; the last one may be done separately.
        loop_end = s - 1 if fsal_vf_last else s

        def last_stage(weights, stages):
            y_last = _add(y0, increment(weights, stages))
            vf_last = terms.vf(stage_time(c[s - 1]), y_last, args)
            return vf_last, terms.prod(vf_last, control)

        a = tableau.a_matrix
        c = tableau.c_full
        if self._use_scan(evaluate, t0, f0, y0):
            stages = jtu.tree_map(
                lambda x: (
                    jnp.zeros((s,) + jnp.shape(x), jnp.result_type(x)).at[0].set(x)
                ),
                f0,
            )
            a_jnp = jnp.asarray(a)
            c_jnp = jnp.asarray(c)

            def body(i, stages):
                f_i = stage_value(i, a_jnp[i], c_jnp[i].astype(dt.dtype), stages)
                return jtu.tree_map(lambda buf, x: buf.at[i].set(x), stages, f_i)

            stages = lax.fori_loop(1, loop_end, body, stages)
            if fsal_vf_last:
                last, k_last = last_stage(a[s - 1], stages)
                stages = jtu.tree_map(lambda b, x: b.at[s - 1].set(x), stages, k_last)
            else:
                last = jtu.tree_map(lambda x: x[-1], stages)
            combine = stages
        else:
            # Unrolled: each stage combines the previous ones with static weights,
            # skipping the tableau's zeros, and nothing is written to a buffer.
            values = [f0]
            for i in range(1, loop_end):
                stacked = _StageList(values)
                values.append(stage_value(i, a[i, :i], c[i], stacked))
            if fsal_vf_last:
                last, k_last = last_stage(a[s - 1, : s - 1], _StageList(values))
                values.append(k_last)
            else:
                last = values[-1]
            stages = jtu.tree_map(lambda *xs: jnp.stack(xs), *values)
            combine = _StageList(values)
        y1 = _add(y0, increment(tableau.b_sol, combine))
        if tableau.b_error is None:
            y_error = None
        else:
            y_error = increment(tableau.b_error, combine)
        if store_vf:
            # (`axis_size` given, so that an empty state is accepted too.)
            k = jax.vmap(
                lambda f: terms.prod(f, control), axis_size=tableau.num_stages
            )(stages)
        else:
            k = stages
        dense_info = dict(y0=y0, y1=y1, k=k)
        if use_fsal:
            new_state = last
        else:
            new_state = None
        return y1, y_error, dense_info, new_state, RESULTS.successful
