"""Runge–Kutta methods as data: a `ButcherTableau` and one engine that runs it.

Stages are stored as increments `k_i = vf_prod(t_i, y_i, control)` (the vector field
times the control, `dt * f` for an ODE) in one buffer with a leading stage axis.
Stage `i` evaluates at `y_i = y0 + sum_j a_ij k_j`, the solution is
`y0 + sum_i b_i k_i` and the error estimate is `sum_i b_error_i k_i`, each one dot
product of a coefficient row with the buffer, in the state's dtype. A
first-same-as-last method also carries the full vector field at the step's end.
"""

import enum
import weakref
from typing import Any, ClassVar, Literal, final

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._path.local import accumulation_dtype
from .._profile import aval_bytes
from .._solution import RESULTS
from .._term import AbstractTerm, MultiTerm, scales_vector_field
from .._transforms import (
    differentiation_levels,
    is_batched,
    steps_differentiated_one_at_a_time,
)
from .base import (
    AbstractAdaptiveSolver,
    refreshed_after_jump,
    step_always_accepted,
)


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
    def implicit(self) -> bool:
        """Whether any stage is implicit (a non-zero diagonal entry)."""
        return not self.is_explicit

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

    def _last_row_is_b_sol(self) -> bool:
        """Whether the last stage's weights (its row of the matrix, diagonal
        included) are the solution's weights `b_sol`."""
        if not self.a_lower:
            return False
        last_diagonal = 0.0 if self.a_diagonal is None else self.a_diagonal[-1]
        return bool(
            np.array_equal(self.a_lower[-1], self.b_sol[:-1])
            and self.b_sol[-1] == last_diagonal
        )

    @property
    def fsal(self) -> bool:
        """First same as last (as Diffrax defines it): the last stage is evaluated at
        the solution `(t1, y1)` and the first stage is explicit, so the last
        stage's vector field is the next step's first."""
        explicit_first = self.a_diagonal is None or self.a_diagonal[0] == 0
        return self._last_row_is_b_sol() and bool(explicit_first)

    @property
    def ssal(self) -> bool:
        """Solution same as last stage (as Diffrax defines it): the last stage's
        state is the solution `y1`, computed explicitly."""
        explicit_last = self.a_diagonal is None or self.a_diagonal[-1] == 0
        return self._last_row_is_b_sol() and bool(explicit_last)


@final
class MultiButcherTableau:
    """The tableaus of an additive Runge–Kutta method: one `ButcherTableau` per term
    of a `MultiTerm`, all with the same number of stages. Stage `i` evaluates every
    term at the one stage value `y_i = y0 + sum_m sum_j a^(m)_ij k^(m)_j`, where
    `k^(m)_j` is term `m`'s increment at stage `j`, each term at its own tableau's
    node `t0 + c^(m)_i (t1 - t0)`. At most one tableau may be implicit: with one
    explicit and one diagonally implicit tableau this is an implicit–explicit (IMEX)
    method, as used by `KenCarp3`, `KenCarp4`, `KenCarp5` and `Sil3`.

    **Arguments:**

    - `*tableaus`: the tableaus, in the order of the `MultiTerm`'s terms.
    """

    tableaus: tuple[ButcherTableau, ...]

    def __init__(self, *tableaus: ButcherTableau):
        if not tableaus:
            raise ValueError("`MultiButcherTableau` needs at least one tableau.")
        for i, tab in enumerate(tableaus):
            if not isinstance(tab, ButcherTableau):
                raise TypeError(
                    f"`MultiButcherTableau` expects `ButcherTableau`s; argument {i} "
                    f"is {type(tab).__name__}."
                )
        stages = [tab.num_stages for tab in tableaus]
        if len(set(stages)) > 1:
            raise ValueError(
                "The tableaus of a `MultiButcherTableau` must have the same number "
                f"of stages; got {stages}."
            )
        implicit = [i for i, tab in enumerate(tableaus) if tab.implicit]
        if len(implicit) > 1:
            raise ValueError(
                "At most one tableau of a `MultiButcherTableau` may be implicit; "
                f"tableaus {implicit} are."
            )
        self.tableaus = tuple(tableaus)

    def __repr__(self) -> str:
        return f"MultiButcherTableau{self.tableaus!r}"

    @property
    def num_stages(self) -> int:
        return self.tableaus[0].num_stages

    @property
    def implicit_index(self) -> int | None:
        """The position of the implicit tableau, or `None` if all are explicit."""
        for i, tab in enumerate(self.tableaus):
            if tab.implicit:
                return i
        return None


@final
class CalculateJacobian(enum.IntEnum):
    """When a diagonally implicit Runge–Kutta method computes (and factorises) the
    Jacobian of its stage equations, with a root finder that can reuse it
    (`VeryChord`; other `optimistix` root finders compute their own):

    - `never`: no implicit stage (explicit methods).
    - `every_stage`: afresh for every implicit stage (needed when the diagonal
      entries differ, as the stage matrices `I - a_ii h J` then differ).
    - `first_stage`: once per step, at the first stage, and reused for every
      other stage of the step (singly diagonally implicit methods).
    - `second_stage`: once per step, at the second stage (the first implicit stage
      of a method whose first stage is explicit), and reused for the later stages.
    """

    never = 0
    every_stage = 1
    first_stage = 2
    second_stage = 3


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

    As in Diffrax, a method can subclass this class directly: it sets `tableau` (a
    `ButcherTableau`, or a `MultiButcherTableau` for a `MultiTerm` of as many terms),
    `calculate_jacobian`, `interpolation_cls` and `order`, and, when a tableau is
    implicit, declares the fields `root_finder` and `root_find_max_steps`. Its
    `term_structure` follows from the tableau unless it sets one. An explicit
    `ButcherTableau` runs as an `AbstractERK` does; otherwise each stage evaluates
    every term at the stage value, each term at its own tableau's nodes, solving
    for the stage with `root_finder` when the implicit tableau's diagonal entry is
    non-zero. The dense output's `k` is then the tuple of each term's stage
    increments.
    """

    tableau: eqx.AbstractClassVar[ButcherTableau | MultiButcherTableau]
    scan_kind: None | Literal["lax", "checkpointed", "bounded"] = eqx.field(
        default=None, static=True
    )

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        tableau = cls.__dict__.get("tableau")
        if tableau is not None and not hasattr(cls, "term_structure"):
            if isinstance(tableau, MultiButcherTableau):
                parts = (AbstractTerm,) * len(tableau.tableaus)
                cls.term_structure = MultiTerm[tuple[parts]]
            else:
                cls.term_structure = AbstractTerm

    def __check_init__(self):
        if self.scan_kind not in _SCAN_KINDS:
            raise ValueError(
                f"`{type(self).__name__}(scan_kind=...)` must be one of None, 'lax', "
                f"'checkpointed' or 'bounded'; got {self.scan_kind!r}."
            )

    # The protocol for a method subclassing this class directly (the engines,
    # `AbstractERK` and `AbstractDIRK`, define their own).

    def init(self, terms, t0, t1, y0, args):
        engine = _explicit_engine(self)
        if engine is not None:
            return engine.init(terms, t0, t1, y0, args)
        from .implicit import init_first_same_as_last

        return init_first_same_as_last(self.tableau, terms, t0, t1, y0, args, None)

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        engine = _explicit_engine(self)
        if engine is not None:
            return engine.step(terms, t0, t1, y0, args, solver_state, made_jump)
        from .implicit import additive_step

        tableau = self.tableau
        tableaus = getattr(tableau, "tableaus", (tableau,))
        if any(tab.implicit for tab in tableaus) and not hasattr(self, "root_finder"):
            raise ValueError(
                f"{type(self).__name__} has an implicit tableau, so it needs a root "
                "finder for its stages: declare the fields `root_finder` (e.g. "
                "`diffeqx.VeryChord(rtol=1e-6, atol=1e-6)`) and "
                "`root_find_max_steps`."
            )
        return additive_step(
            self,
            terms,
            t0,
            t1,
            y0,
            args,
            solver_state,
            made_jump,
            parts_in_k=isinstance(tableau, MultiButcherTableau),
        )


# Per class subclassing `AbstractRungeKutta` directly with an explicit
# `ButcherTableau`: the `AbstractERK` that runs its steps (weakly keyed, so that
# classes defined in a loop or a test can still be collected).
_EXPLICIT_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _explicit_engine(solver):
    """An `AbstractERK` with `solver`'s tableau when that is one explicit
    `ButcherTableau`, else `None`."""
    tableau = solver.tableau
    if not isinstance(tableau, ButcherTableau) or tableau.implicit:
        return None
    cls = type(solver)
    engine = _EXPLICIT_ENGINES.get(cls)
    if engine is None:
        engine = type(
            f"_{cls.__name__}Stages",
            (AbstractERK,),
            {
                "__module__": __name__,
                "tableau": tableau,
                "interpolation_cls": None,  # the subclass's own is used
                "order": lambda self, terms: None,
            },
        )
        _EXPLICIT_ENGINES[cls] = engine
    return engine()


def _weighted_sum(weights, stages: list, scale=None):
    """`sum_i weights[i] * stages[i]` over a list of stage PyTrees, skipping the zero
    weights: elementwise operations that XLA fuses with the stages around them (a
    dot product stays a separate operation). Rounds differently from `_combine`.
    With a scalar `scale`, the weights are `weights[i] * scale` instead."""
    terms = [(float(w), k) for w, k in zip(weights, stages, strict=True) if w != 0]

    def _leaf(*xs):
        if not terms:
            return jnp.zeros_like(xs[0])
        out = None
        dtype = accumulation_dtype(xs[0].dtype)
        for (w, _), x in zip(terms, xs, strict=True):
            weight = jnp.asarray(w, dtype)
            if scale is not None:
                weight = weight * jnp.asarray(scale, dtype)
            term = weight * x.astype(dtype)
            out = term if out is None else out + term
        return out.astype(xs[0].dtype)

    if not terms:
        return jtu.tree_map(_leaf, stages[0])
    return jtu.tree_map(_leaf, *[k for _, k in terms])


def _fuse_batched(y0) -> bool:
    """Whether a step of `y0` (all float64) is traced under `jax.vmap` for a CPU, where
    its stages are combined by elementwise sums (see `AbstractERK.step`). Not in
    lower precision: there the error estimate's rounding, amplified by the
    cancellation in it, moves the next step size visibly (by up to about 1e-4
    relative in float32), where in float64 the solve takes Diffrax's steps, with
    values agreeing to about 1e-13 with constant steps and, as the error estimate
    moves adaptive step sizes in their last digits, to 2.4e-10 relative at worst in
    a sweep of the compatibility cases (docs/migration.md)."""
    return (
        jax.default_backend() == "cpu"
        and is_batched()
        and all(jnp.result_type(x) == jnp.float64 for x in jtu.tree_leaves(y0))
    )


def _fold_control(terms) -> bool:
    """Whether constant steps fold the control into the stage weights: when the
    terms' product with the control is the control (a step length) times the vector
    field (`scales_vector_field`), and not under reverse mode, whose checkpointed
    steps would store every weight times `dt` (a scalar per stage and step) for the
    backward pass, where `sum_j a_ij (dt f_j)` stores one `dt` per step."""
    return scales_vector_field(terms) and "reverse" not in differentiation_levels()


def _combine(weights, stages):
    """`sum_i weights[i] * stages[i]` over the leading (stage) axis of every leaf.

    Always one dot product of the full weight row (zeros included, cast to the
    stages' dtype) with the full stage buffer, the operation Diffrax uses, whether
    the stages run unrolled or in a loop. XLA compiles that product in its context,
    so the last bit can still differ between the two forms, and from Diffrax
    (measured on CPU in float64, Tsit5 on a linear system: identical for states of
    2, 3 and 8 elements, 1e-16 apart for 1 and 5; tests/compat compares to a few
    hundred ULP). (Small vector fields under `vmap` on CPU in float64, and constant
    steps, use `_weighted_sum` instead.)"""

    def _leaf(x):
        dtype = accumulation_dtype(x.dtype)
        w = jnp.asarray(weights).astype(dtype)
        out = jnp.tensordot(w, x.astype(dtype), axes=1, precision=lax.Precision.HIGHEST)
        return out.astype(x.dtype)

    return jtu.tree_map(_leaf, stages)


# A vector field counts as large (so that Runge–Kutta stages are scanned rather than
# unrolled) when it contains a matrix product or this many primitive operations.
_LARGE_FUNCTION_EQUATIONS = 64


def _function_size(fn, *example_args) -> tuple[bool, int]:
    """`(large, io_bytes)` for `fn`, from its jaxpr (one extra trace): `large` when
    tracing it once per stage would dominate compile time (a matrix product or
    convolution, or `_LARGE_FUNCTION_EQUATIONS` operations, nested bodies included);
    `io_bytes` the bytes it reads and returns (its inputs, the arrays it closes
    over, its outputs)."""
    closed = jax.make_jaxpr(fn)(*example_args)
    jaxpr = closed.jaxpr
    io_bytes = sum(
        aval_bytes(getattr(var, "aval", None))
        for var in (*jaxpr.invars, *jaxpr.constvars, *jaxpr.outvars)
    )
    count = 0
    for eqn in _nested_equations(jaxpr):
        count += 1
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            return True, io_bytes
    return count >= _LARGE_FUNCTION_EQUATIONS, io_bytes


# XLA's CPU compiler runs a while loop as one compiled kernel when one iteration
# reads and writes less than 1 KiB (its `xla_cpu_small_while_loop_byte_threshold`),
# rather than dispatching each of its operations separately. A Runge–Kutta stage
# loop reads the stage buffer, the state and what the vector field reads, and writes
# one stage: measured on CPU, in float64 with elementwise vector fields, Tsit5's
# loop is one kernel up to 6 states (stages and the field's inputs and outputs
# 440 bytes) and not from 8 (584 bytes), Dopri8's up to 3 states (392) and not
# from 4 (520). Below this bound (with a margin under those measurements) small
# vector fields run their stages in a loop; above it, unrolled.
_ONE_KERNEL_STAGE_BYTES = 416


def _tree_bytes(tree) -> int:
    return sum(jnp.size(x) * jnp.result_type(x).itemsize for x in jtu.tree_leaves(tree))


def _stage_loop_is_one_kernel(num_stages: int, io_bytes: int, y0) -> bool:
    """Whether a plain (unbatched, not differentiated) adaptive solve on CPU runs its
    stages as a loop that XLA compiles into one kernel (see
    `_ONE_KERNEL_STAGE_BYTES`): then that loop is faster than unrolled stages, each
    of whose operations is dispatched on its own (measured on 2 CPU cores, with
    the whole solve: 0.88-0.97x the run time of Tsit5 and Dopri5 on 2 to 4 states,
    Lotka-Volterra with Tsit5 0.90x; Lorenz with Dopri8, 13 stages, 0.71x, and
    0.71x the compile time)."""
    if not _one_kernel_loops_possible():
        return False
    return num_stages * _tree_bytes(y0) + io_bytes <= _ONE_KERNEL_STAGE_BYTES


def _one_kernel_loops_possible() -> bool:
    """The conditions of `_stage_loop_is_one_kernel` that do not need the sizes."""
    return not (
        jax.default_backend() != "cpu"
        or differentiation_levels()
        or is_batched()
        or step_always_accepted()
    )


# Under reverse mode in a loop that keeps every step's values for the backward pass
# (`DirectAdjoint`'s, a fixed-step solve's blocks), the stage loop's body is
# rematerialised when the values it would keep over all its stages exceed this.
_REMAT_STACK_BYTES = 1 << 20


def _intermediate_bytes(fn, *example_args) -> int:
    """The bytes of the values `fn` computes (every equation's outputs, nested
    bodies included), as traced: under `jax.vmap`, per batch element."""
    return sum(
        aval_bytes(getattr(var, "aval", None))
        for eqn in _equations(fn, *example_args)
        for var in eqn.outvars
    )


def _equations(fn, *example_args):
    """The equations of `fn`'s jaxpr, nested bodies included (one extra trace)."""
    return _nested_equations(jax.make_jaxpr(fn)(*example_args).jaxpr)


def _nested_equations(jaxpr):
    """The equations of `jaxpr`, nested bodies included."""
    stack = [jaxpr]
    while stack:
        current = stack.pop()
        for eqn in current.eqns:
            yield eqn
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", None)
                if inner is not None:
                    stack.append(getattr(inner, "jaxpr", inner))


def node_time(c_i: float, t0, t1):
    """The time of a stage with node `c_i` in the step `[t0, t1]`: exactly `t0` for a
    node of 0 and `t1` for a node of 1 (`t0 + 1 * (t1 - t0)` need not round to `t1`),
    else `t0 + c_i * (t1 - t0)` in the dtype of the step's times."""
    if c_i == 0:
        return t0
    if c_i == 1:
        return t1
    return t0 + jnp.asarray(c_i, dtype=jnp.result_type(t0)) * (t1 - t0)


def _shape_of(x, weak_type=None) -> jax.ShapeDtypeStruct:
    """`x`'s shape and dtype (and weak type, unless `weak_type` is given)."""
    weak = getattr(x, "weak_type", False) if weak_type is None else weak_type
    return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), weak_type=weak)


def _add(y, dy):
    return jtu.tree_map(lambda a, b: (a + b).astype(a.dtype), y, dy)


class AbstractERK(AbstractRungeKutta):
    """Explicit Runge–Kutta method. A concrete method sets `tableau`,
    `interpolation_cls` and `order`; the engine does the rest (embedded error
    estimate, first-same-as-last reuse, dense output information).

    Stages run either as a `lax.fori_loop` over the stage index (the vector field is
    traced once, which keeps compile times low when it is large, e.g. a neural
    network, or when the loop is small enough that XLA's CPU compiler makes it one
    kernel), or unrolled in Python (fastest at run time for other small vector
    fields). Both do the same arithmetic (see `_combine`), though XLA may round the two
    forms differently in the last bit; except under `jax.vmap` on CPU in float64,
    where unrolled stages are combined by elementwise sums (faster there than the
    dot products of the weights with the stages), which round differently (see
    docs/migration.md for by how much). Under reverse mode (first derivatives), the
    loop is traced once but compiled unrolled, which makes its backward pass
    faster; except when the vector field's intermediate values over the stages
    would exceed 1 MiB (e.g. a network applied to a large batch held in the state)
    and the loop over the steps keeps every step's values for the backward pass
    (`DirectAdjoint`, a fixed-step solve's blocks): then the loop stays a loop and
    its body is rematerialised, the backward pass recomputing those values from each
    stage's input instead of storing them. (The default adjoint's adaptive loop
    differentiates one step at a time, so there it stays unrolled.)

    **Arguments:**

    - `scan_stages`: `True` for the loop, `False` for unrolled stages, or `None` (the
      default) to decide from the vector field: a loop for one with a matrix product
      or at least 64 operations, under second derivatives, and, on CPU, for an
      adaptive solve (not under `jax.vmap` or a derivative) whose stages and
      vector field's inputs and outputs take at most 416 bytes (e.g. Tsit5 on up to
      five float64 states without parameters; XLA compiles such a loop into one
      kernel, which runs faster than unrolled stages). `False` traces the
      vector field once per stage, which costs compile time (measured on CPU, the
      gradient of a neural-ODE loss with a 64-wide MLP: 1.07x the compile time of
      the default for one trajectory, at about the same run time, since the
      default compiles the loop unrolled there).
    """

    term_structure: ClassVar[Any] = AbstractTerm
    calculate_jacobian: ClassVar[CalculateJacobian] = CalculateJacobian.never
    scan_stages: bool | None = eqx.field(default=None, static=True, kw_only=True)

    def __check_init__(self):
        if self.scan_stages not in (None, True, False):
            raise ValueError(
                f"`{type(self).__name__}(scan_stages=...)` must be True, False or None; "
                f"got {self.scan_stages!r}."
            )
        if not self.tableau.is_explicit:
            raise NotImplementedError(
                f"{type(self).__name__} is an `AbstractERK`, whose engine runs "
                "explicit tableaus only, but its tableau has a non-zero `a_diagonal`."
            )

    def _stage_plan(self, terms, evaluate, t0, y0) -> tuple[bool, bool]:
        """`(loop, last_in_loop)`: whether the stages run in a loop, and whether a
        first-same-as-last method runs its last stage in that loop too (carrying
        the solution and the vector field there out of it; only where the loop,
        with those, is still compiled into one kernel on CPU, see
        `_ONE_KERNEL_STAGE_BYTES`: a loop that is not runs each of its iterations'
        operations on their own, and carrying more values through it then measured
        up to 7x slower)."""
        if self.scan_stages is False:
            return False, False
        if len(differentiation_levels()) >= 2:
            # Second derivatives replicate the step many times over, so program size
            # (compile time) matters more than the unrolled stages' speed (measured:
            # a 4-parameter Hessian compiles 2x faster with the stages in a loop).
            return True, False
        may_carry_last = (
            self.tableau.fsal
            and scales_vector_field(terms)
            and _one_kernel_loops_possible()
        )
        if self.scan_stages and not may_carry_last:
            return True, False  # no need to trace the vector field to decide
        large, io_bytes = _function_size(evaluate, t0, y0)
        num_stages = self.tableau.num_stages
        last_in_loop = may_carry_last and _stage_loop_is_one_kernel(
            num_stages, io_bytes + 2 * _tree_bytes(y0), y0
        )
        if self.scan_stages:
            return True, last_in_loop
        loop = large or _stage_loop_is_one_kernel(num_stages, io_bytes, y0)
        return loop, loop and last_in_loop

    def init(self, terms, t0, t1, y0, args):
        # First-same-as-last methods carry the vector field at the end of the step
        # (a full matrix for a control term), so that the next step's first stage
        # is a product with the new control increment rather than a new evaluation;
        # not for terms that report their vector field as expensive
        # (`is_vf_expensive`, read as Diffrax reads it), whose first stage `step`
        # then evaluates afresh.
        if self.tableau.fsal and not terms.is_vf_expensive(t0, t1, y0, args):
            return terms.vf(t0, y0, args)
        return None

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

    def _dense_info_shape(self, terms, t0, t1, y0, args):
        """The shapes and dtypes of the dense output information `step` returns
        (`dict(y0=..., y1=..., k=...)`, `k` holding the stages' increments), found
        by tracing the vector field once rather than the whole step: what
        `eqx.filter_eval_shape` of this class's own `step` gives (tested), for the
        buffers a solve sets up before its loop (dense output, events, saves
        deferred under reverse mode)."""
        increment = eqx.filter_eval_shape(
            lambda: terms.vf_prod(t0, y0, args, terms.contr(t0, t1))
        )
        num_stages = self.tableau.num_stages
        return dict(
            y0=jtu.tree_map(_shape_of, y0),
            y1=jtu.tree_map(lambda x: _shape_of(x, weak_type=False), y0),
            k=jtu.tree_map(
                lambda x: jax.ShapeDtypeStruct((num_stages,) + x.shape, x.dtype),
                increment,
            ),
        )

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        tableau = self.tableau
        fresh = None
        if tableau.fsal and solver_state is None:
            # No carried vector field (as Diffrax's `init` gives for a term whose
            # `is_vf_expensive` is True): the first stage is evaluated afresh and,
            # as in Diffrax, nothing is carried to the next step either. (An empty
            # state's vector field is None too: then there is nothing to carry.)
            fresh = terms.vf(t0, y0, args)
        if fresh is not None:
            y1, y_error, dense_info, _, result = self.step(
                terms, t0, t1, y0, args, fresh, False
            )
            return y1, y_error, dense_info, None, result
        s = tableau.num_stages
        a = tableau.a_matrix
        c = tableau.c_full
        control = terms.contr(t0, t1)

        def stage_time(i):
            return node_time(c[i], t0, t1)

        if tableau.fsal:
            vf0 = refreshed_after_jump(
                made_jump, lambda: terms.vf(t0, y0, args), solver_state
            )
        elif _fold_control(terms):
            vf0 = terms.vf(t0, y0, args)
        else:
            vf0 = None
        if vf0 is None:
            k0 = terms.vf_prod(t0, y0, args, control)
        else:
            k0 = terms.prod(vf0, control)
        # The increments k_i (vector field times control) of all stages, stacked;
        # stages not yet computed are zero, so each stage's state is one dot product
        # of its full row of the Runge–Kutta matrix with this buffer.
        ks = jtu.tree_map(
            lambda x: jnp.zeros((s,) + jnp.shape(x), jnp.result_type(x)).at[0].set(x),
            k0,
        )

        def stage_state(row, ks):
            return _add(y0, _combine(row, ks))

        def set_stage(ks, i, k_i):
            return jtu.tree_map(lambda buf, x: buf.at[i].set(x), ks, k_i)

        # First-same-as-last: the last stage is the vector field at the step's end
        # (its state is the solution), evaluated in full and carried to the next step.
        loop_end = s - 1 if tableau.fsal else s
        loop, last_in_loop = self._stage_plan(
            terms, lambda t, y: terms.vf_prod(t, y, args, control), t0, y0
        )
        if loop:
            a_jnp = jnp.asarray(a)
            t_nodes = jnp.stack([stage_time(i) for i in range(s)])

            # First-same-as-last with a term whose increment is the step's length
            # times the vector field, and a loop compiled into one kernel: the last
            # stage (the solution and the vector field there) runs in the loop too,
            # rather than being traced and compiled once more after it (measured on
            # CPU, Lotka-Volterra with Tsit5: 0.84x the compile time, 0.96x the run
            # time, the same values).
            if last_in_loop:
                loop_end = s

                def body(i, carry):
                    ks, _, _ = carry
                    y_i = stage_state(a_jnp[i], ks)
                    vf_i = terms.vf(t_nodes[i], y_i, args)
                    return set_stage(ks, i, terms.prod(vf_i, control)), y_i, vf_i

                carry = (ks, y0, vf0)
            else:

                def body(i, ks):
                    y_i = stage_state(a_jnp[i], ks)
                    k_i = terms.vf_prod(t_nodes[i], y_i, args, control)
                    return set_stage(ks, i, k_i)

                carry = ks

            unroll = False
            if differentiation_levels() == ["reverse"]:
                if (
                    not steps_differentiated_one_at_a_time()
                    and (loop_end - 1)
                    * _intermediate_bytes(
                        lambda t, y: terms.vf_prod(t, y, args, control), t0, y0
                    )
                    > _REMAT_STACK_BYTES
                ):
                    # A vector field whose intermediate values (a network's
                    # activations) are large, in a loop that keeps every step's
                    # values for the backward pass (`DirectAdjoint`, fixed steps'
                    # blocks): kept for every stage of every step they would take
                    # memory in proportion to the steps, so the body is
                    # rematerialised, keeping each stage's input only.
                    body = jax.checkpoint(body, prevent_cse=False)
                else:
                    # The body is still traced once, but compiled as straight-line
                    # code, whose backward pass reads each stage's values directly
                    # rather than through stacks indexed by a loop counter
                    # (measured on CPU, with a 64-wide network: the gradient of one
                    # trajectory 0.66x the run time, of a `vmap` over 32 0.76x, of
                    # a neural CDE 0.68x; compile 1.04-1.07x). Large intermediate
                    # values too, where the loop over the steps differentiates one
                    # step at a time (the default adjoint's): they are kept for one
                    # step only (measured on CPU, a neural-ODE gradient over 256
                    # trajectories in one state: 0.86x the run time of a
                    # rematerialised body, which recomputes each stage's network,
                    # with the same compile time and values).
                    unroll = True
            carry = lax.fori_loop(1, loop_end, body, carry, unroll=unroll)
            if last_in_loop:
                ks, y1, new_state = carry
                return self._finish(ks, y0, y1, new_state)
            ks = carry
        elif step_always_accepted() or _fuse_batched(y0):
            # Constant steps: no accept/reject decision hangs on the last bit of the
            # error estimate, so the stages combine as fused elementwise sums rather
            # than Diffrax's dot products (on CPU a solve whose loop is then small
            # enough runs as one compiled kernel: measured 3-10x faster for small
            # states). The stages stay in a list; the buffer is only for dense output.
            # Under `vmap` on CPU in float64 too: there a dot product of the stage
            # weights with the batched stages needs the stages transposed first (a
            # copy of all of them per stage), and it does not round as the unbatched
            # one does anyway (measured: Lotka-Volterra over 1,000 initial
            # conditions runs in 0.5x the time, the same steps).
            f0 = vf0 if _fold_control(terms) else k0
            return self._step_fused(
                terms, t0, t1, y0, args, control, f0, loop_end, stage_time
            )
        else:
            for i in range(1, loop_end):
                y_i = stage_state(a[i], ks)
                ks = set_stage(ks, i, terms.vf_prod(stage_time(i), y_i, args, control))
        if tableau.fsal:
            y1 = stage_state(a[s - 1], ks)
            new_state = terms.vf(t1, y1, args)
            ks = set_stage(ks, s - 1, terms.prod(new_state, control))
        else:
            y1 = stage_state(tableau.b_sol, ks)
            new_state = None
        return self._finish(ks, y0, y1, new_state)

    def _finish(self, ks, y0, y1, new_state):
        """The step's outputs from its stages `ks`, solution `y1` and new state."""
        if self.tableau.b_error is None:
            y_error = None
        else:
            # The embedded error estimate, sum_i b_error[i] k_i, taken directly from
            # the stages (not as the difference of two solutions, which loses bits).
            y_error = _combine(self.tableau.b_error, ks)
        dense_info = dict(y0=y0, y1=y1, k=ks)
        return y1, y_error, dense_info, new_state, RESULTS.successful

    def _step_fused(self, terms, t0, t1, y0, args, control, f0, loop_end, stage_time):
        """The unrolled stages of `step`, combined by `_weighted_sum`. `f0` is the
        first stage's increment, or, when `_fold_control(terms)`, its vector field:
        the stages are then combined as `sum_j (a_ij dt) f_j`, with each weight
        times `dt` computed once per step, rather than as `sum_j a_ij (dt f_j)`,
        one multiplication less between one stage and the next."""
        tableau = self.tableau
        a = tableau.a_matrix
        scale = control if _fold_control(terms) else None
        if scale is None:
            evaluate = terms.vf_prod
        else:

            def evaluate(t, y, args, control):
                return terms.vf(t, y, args)

        fs = [f0]
        for i in range(1, loop_end):
            y_i = _add(y0, _weighted_sum(a[i, :i], fs, scale))
            fs.append(evaluate(stage_time(i), y_i, args, control))
        if tableau.fsal:
            y1 = _add(y0, _weighted_sum(a[-1, :-1], fs, scale))
            new_state = terms.vf(t1, y1, args)
            fs.append(
                new_state if scale is not None else terms.prod(new_state, control)
            )
        else:
            y1 = _add(y0, _weighted_sum(tableau.b_sol, fs, scale))
            new_state = None
        ks = fs if scale is None else [terms.prod(f, control) for f in fs]
        y_error = (
            None if tableau.b_error is None else _weighted_sum(tableau.b_error, ks)
        )
        stacked = jtu.tree_map(lambda *xs: jnp.stack(xs), *ks)
        dense_info = dict(y0=y0, y1=y1, k=stacked)
        return y1, y_error, dense_info, new_state, RESULTS.successful
