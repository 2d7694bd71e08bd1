"""Diagonally implicit Runge–Kutta methods: the explicit engine's tableaus with a
non-zero diagonal, each implicit stage a nonlinear solve by an `optimistix` root
finder.

Stage `i` has increment `k_i = vf_prod(t_i, z_i, control)` at the stage value
`z_i = y0 + sum_{j<i} a_ij k_j + a_ii k_i`. An explicit stage (`a_ii = 0`) is
evaluated directly; an implicit one solves

    z - (y0 + sum_{j<i} a_ij k_j) - a_ii vf_prod(t_i, z, control) = 0

for `z`, in the state's own scale (so that the controller's tolerances apply), and
takes `k_i = (z - base) / a_ii`, which does not amplify the root finder's residual by
the stiffness as a new evaluation of the vector field would. The solution and the
error estimate combine the stages as the explicit engine does. A root find that fails
makes the step's result that failure (`RESULTS.promote`), so that the solve loop
rejects the step and shrinks it; with constant steps the solve ends with that code.

A first-same-as-last method (every tableau's first stage explicit and its last stage
at the solution: `Kvaerno3/4/5`, `Sil3`) on terms whose increment is the step's
length times the vector field starts the next step from the last stage's vector
field, `k_s / h`, in its solver state, rather than evaluating it again.
"""

from collections.abc import Callable
from typing import Any, ClassVar, final

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optimistix as optx

from .._path.local import (
    LocalLinearInterpolation,
    ThirdOrderHermitePolynomialInterpolation,
)
from .._root_finder import VeryChord, with_stepsize_controller_tols
from .._solution import RESULTS, promote_result, succeeded, where_result
from .._term import AbstractTerm, scales_vector_field
from .._transforms import batched_like
from . import implicit_coefficients as ico
from .base import (
    AbstractAdaptiveSolver,
    AbstractImplicitSolver,
    _is_sde,
    refreshed_after_jump,
    step_always_accepted,
)
from .runge_kutta import (
    AbstractRungeKutta,
    ButcherTableau,
    CalculateJacobian,
    MultiButcherTableau,
    _add,
    _combine,
    node_time,
)


def _scale(weight, tree):
    return jtu.tree_map(lambda x: jnp.asarray(weight, x.dtype) * x, tree)


def _sub(a, b):
    return jtu.tree_map(lambda x, y: x - y, a, b)


def _all_finite(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jtu.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _stage_residual(terms, t, base, diagonal, args, control):
    def residual(z, _):
        k = terms.vf_prod(t, z, args, control)
        return _sub(_sub(z, base), _scale(diagonal, k))

    return residual


def implicit_stage(
    root_finder,
    max_steps,
    terms,
    t,
    base,
    diagonal,
    args,
    control,
    guess,
    jacobian_state=None,
):
    """The increment `k` and value `z` of an implicit stage `z = base + diagonal * k`,
    `k = vf_prod(t, z, control)`, and the root find's result as a diffeqx result.
    `jacobian_state`, from `stage_jacobian`, is a factorised Jacobian to reuse."""
    residual = _stage_residual(terms, t, base, diagonal, args, control)
    options = {} if jacobian_state is None else {"init_state": jacobian_state}
    solution = optx.root_find(
        residual,
        root_finder,
        guess,
        options=options,
        max_steps=max_steps,
        throw=False,
    )
    z = solution.value
    k = _scale(1.0 / diagonal, _sub(z, base))
    result = promote_result(solution.result)
    # A root find that "succeeds" on a non-finite iterate has failed.
    result = where_result(
        succeeded(result) & ~_all_finite(z),
        RESULTS.nonlinear_divergence,
        result,
    )
    return k, z, result


def _holds_operator(tree) -> bool:
    def is_operator(x):
        return isinstance(x, lx.AbstractLinearOperator)

    return any(is_operator(x) for x in jtu.tree_leaves(tree, is_leaf=is_operator))


def stage_jacobian(root_finder, terms, t, base, diagonal, args, control, guess):
    """The factorised Jacobian of an implicit stage's equation at `guess`, for reuse
    by later stages with the same diagonal entry; `None` when `root_finder` cannot
    reuse one (only `VeryChord` can) or when its linear solver keeps no
    factorisation (an iterative one recomputes Jacobian–vector products anyway)."""
    if not isinstance(root_finder, VeryChord):
        return None
    residual = _stage_residual(terms, t, base, diagonal, args, control)
    state = root_finder.init(
        lambda z, a: (residual(z, a), None),
        guess,
        None,
        {},
        jax.eval_shape(lambda: guess),
        None,
        frozenset(),
    )
    if _holds_operator(state.linear_state):
        return None
    # The chord matrix only steers the iteration (its solution solves the stage
    # equation whatever matrix was used), so it carries no derivative.
    return jtu.tree_map(lambda x: lax.stop_gradient(x) if eqx.is_array(x) else x, state)


# Across steps (`reuse_jacobian=True`), a factorised stage matrix `I - a h J` is
# reused until it is this many steps old, or until the step size has changed by more
# than this fraction since it was formed (the limits of SUNDIALS' ARKODE, whose
# implicit solvers reuse their Newton matrices in the same way).
_MAX_JACOBIAN_AGE = 20
_MAX_STEP_SIZE_CHANGE = 0.2


class _ReusedJacobian(eqx.Module):
    """The solver state of a diagonally implicit method that reuses its factorised
    stage matrix across steps."""

    chord_state: Any  # `VeryChord`'s state holding the factorisation
    step_size: Any  # the step size it was formed for
    age: Any  # the number of steps that have used it


def _reuse_or_refresh(state: _ReusedJacobian, fresh, step_size, made_jump):
    """The factorisation for this step: the carried one while it is recent and was
    formed for a step size close to this one (and no jump in the vector field lies
    between), else a new one from `fresh()`."""
    change = jnp.abs(step_size - state.step_size)
    stale = (
        (state.age >= _MAX_JACOBIAN_AGE)
        | ~(change <= _MAX_STEP_SIZE_CHANGE * jnp.abs(step_size))
        | jnp.asarray(made_jump)
    )
    chord_state = lax.cond(stale, fresh, lambda: state.chord_state)
    new_state = _ReusedJacobian(
        chord_state=chord_state,
        step_size=jnp.where(stale, step_size, state.step_size).astype(
            state.step_size.dtype
        ),
        age=jnp.where(stale, 1, state.age + 1).astype(state.age.dtype),
    )
    return chord_state, new_state


class _FirstSameAsLast(eqx.Module):
    """The solver state of a first-same-as-last Runge–Kutta method run by
    `additive_step`: the vector field of every part at the step's start (from the
    previous step's last stage), and the reused factorisation, if any."""

    vf: tuple  # one vector field per part of the method
    jacobian: Any  # a `_ReusedJacobian`, or None


def first_same_as_last(tableau, terms) -> bool:
    """Whether `additive_step` carries the last stage's vector fields to the next
    step: every tableau is first same as last (its last stage is evaluated at the
    solution, its first is explicit) and every part's product with its control is
    the step's length times the vector field, so that the vector field is the last
    stage's increment over the step's length. For an implicit last stage that is the
    value the root find settled on, `(z - base) / (a_ss h)`, with no new evaluation
    (as Diffrax carries it)."""
    tableaus, parts, _ = _parts(tableau, terms)
    return all(tab.fsal for tab in tableaus) and all(
        scales_vector_field(part) for part in parts
    )


def init_first_same_as_last(tableau, terms, t0, t1, y0, args, jacobian):
    """The initial solver state of `additive_step`: `jacobian` (a `_ReusedJacobian`
    or None) as it is, or with the parts' vector fields at `(t0, y0)` for a
    first-same-as-last method whose terms do not report their vector field as
    expensive (`is_vf_expensive`, as Diffrax reads it: the first stage is then
    evaluated afresh at every step)."""
    if not first_same_as_last(tableau, terms) or terms.is_vf_expensive(
        t0, t1, y0, args
    ):
        return jacobian
    _, parts, _ = _parts(tableau, terms)
    return _FirstSameAsLast(
        vf=tuple(part.vf(t0, y0, args) for part in parts), jacobian=jacobian
    )


def _parts(tableau, terms):
    """The tableaus, the terms they apply to, and the position of the implicit one."""
    if isinstance(tableau, MultiButcherTableau):
        return tableau.tableaus, tuple(terms.terms), tableau.implicit_index
    return (tableau,), (terms,), 0


def _sum(trees):
    out = trees[0]
    for tree in trees[1:]:
        out = _add(out, tree)
    return out


def _combine_parts(rows, ks):
    """`sum_m sum_j rows[m][j] ks[m][j]`: one weight row per part's stage buffer."""
    return _sum([_combine(row, k) for row, k in zip(rows, ks, strict=True)])


def additive_step(
    solver, terms, t0, t1, y0, args, solver_state, made_jump, *, parts_in_k=False
):
    """One step of the Runge–Kutta method `solver.tableau`: a `ButcherTableau`, or a
    `MultiButcherTableau` applied to the parts of a `MultiTerm`, with at most one
    diagonally implicit tableau (solved for with `solver.root_finder`) and any
    number of explicit ones. Each part is evaluated at its own tableau's nodes.
    `parts_in_k` gives the dense output the stage increments of each part (a
    tuple, as Diffrax's generic Runge–Kutta methods do) rather than their sum."""
    tableaus, parts, implicit = _parts(solver.tableau, terms)
    s = tableaus[0].num_stages
    cs = [tab.c_full for tab in tableaus]
    a = [tab.a_matrix for tab in tableaus]
    controls = [part.contr(t0, t1) for part in parts]
    reuse = implicit is not None and getattr(solver, "calculate_jacobian", None) in (
        CalculateJacobian.first_stage,
        CalculateJacobian.second_stage,
    )

    ks = [
        jtu.tree_map(lambda x: jnp.zeros((s,) + jnp.shape(x), jnp.result_type(x)), y0)
        for _ in parts
    ]
    fsal = isinstance(solver_state, _FirstSameAsLast)
    if fsal:
        # The first stage's vector fields are the previous step's last (or new ones
        # after a jump in the vector field).
        vf0 = refreshed_after_jump(
            made_jump,
            lambda: tuple(part.vf(t0, y0, args) for part in parts),
            solver_state.vf,
        )
        jacobian_in = solver_state.jacobian
    else:
        jacobian_in = solver_state
    diagonals = np.zeros(s) if implicit is None else a[implicit].diagonal()
    predictor = _predictor_matrix(solver.tableau)

    def stage_time(c_i):
        if isinstance(c_i, float):
            return node_time(c_i, t0, t1)
        # A traced node (stage loop): exactly t1 for a node of 1, as node_time.
        dtype = jnp.result_type(t0)
        return jnp.where(c_i == 1, t1, t0 + c_i.astype(dtype) * (t1 - t0))

    def stage_setup(i, ks, diagonal):
        rows = [a_m[i] for a_m in a]
        base = _add(y0, _combine_parts(rows, ks))
        guess = _add(base, _scale(diagonal, _combine(predictor[i], ks[implicit])))
        stage_args = (
            parts[implicit],
            stage_time(cs[implicit][i]),
            base,
            diagonal,
            args,
            controls[implicit],
        )
        return stage_args, guess

    def set_stage(ks, i, z, k_implicit):
        # Every part at the stage value `z`, each at its own tableau's node.
        new = []
        for m, part in enumerate(parts):
            if m == implicit and k_implicit is not None:
                k_m = k_implicit
            else:
                k_m = part.vf_prod(stage_time(cs[m][i]), z, args, controls[m])
            new.append(jtu.tree_map(lambda buf, x: buf.at[i].set(x), ks[m], k_m))
        return new

    def implicit_step(i, ks, diagonal, jacobian_state):
        stage_args, guess = stage_setup(i, ks, diagonal)
        k_i, z, stage_result = implicit_stage(
            solver.root_finder,
            solver.root_find_max_steps,
            *stage_args,
            guess,
            jacobian_state,
        )
        return set_stage(ks, i, z, k_i), stage_result

    def explicit_step(i, ks):
        rows = [a_m[i] for a_m in a]
        base = y0 if i == 0 else _add(y0, _combine_parts(rows, ks))
        return set_stage(ks, i, base, None)

    def first_failure(result, new):
        return where_result(succeeded(result), new, result)

    implicit_stages = [i for i in range(s) if diagonals[i] != 0]
    # With no implicit stage (every tableau explicit), all of them run below.
    first = implicit_stages[0] if implicit_stages else s
    # The implicit stages run in one loop when they are contiguous (traced once:
    # the root find is the bulk of a step's program; measured on Robertson and
    # HIRES, Kvaerno5/KenCarp4 compile in 1.2-1.7 s instead of 2.0-3.3 s, at the
    # same run time), else unrolled.
    loop = bool(implicit_stages) and implicit_stages == list(range(first, s))
    result = RESULTS.successful
    for i in range(first):
        if i == 0 and fsal:
            ks = [
                jtu.tree_map(lambda buf, x: buf.at[0].set(x), k_m, part.prod(f, c))
                for k_m, part, f, c in zip(ks, parts, vf0, controls, strict=True)
            ]
        else:
            ks = explicit_step(i, ks)
    jacobian_state = None
    new_solver_state = jacobian_in
    if reuse:
        # One factorisation per step, at the first implicit stage's guess.
        stage_args, guess = stage_setup(first, ks, float(diagonals[first]))

        def fresh():
            return stage_jacobian(solver.root_finder, *stage_args, guess)

        if isinstance(jacobian_in, _ReusedJacobian) and not step_always_accepted():
            jacobian_state, new_solver_state = _reuse_or_refresh(
                jacobian_in, fresh, t1 - t0, made_jump
            )
        else:
            jacobian_state = fresh()
    if loop:
        # The closures above read these as arrays indexed by the traced stage.
        a = [jnp.asarray(a_m) for a_m in a]
        cs = [jnp.asarray(c_m) for c_m in cs]
        predictor = jnp.asarray(predictor)
        diagonal_array = jnp.asarray(diagonals)

        def body(i, carry):
            ks, result = carry
            ks, stage_result = implicit_step(i, ks, diagonal_array[i], jacobian_state)
            return ks, first_failure(result, stage_result)

        # The result code starts mapped where the stages are (`batched_like`): under
        # `jax.vmap` JAX then batches the stage loop's body once less.
        result_leaves, result_tree = jtu.tree_flatten(result)
        result_leaves = [jnp.asarray(x) for x in result_leaves]
        first_k = jtu.tree_leaves(ks)[:1] * len(result_leaves)
        if first_k:
            result_leaves = batched_like(result_leaves, first_k)
        result = jtu.tree_unflatten(result_tree, result_leaves)
        ks, result = lax.fori_loop(first, s, body, (ks, result))
    else:
        for i in range(first, s):
            if diagonals[i] == 0:
                ks = explicit_step(i, ks)
                continue
            ks, stage_result = implicit_step(i, ks, float(diagonals[i]), jacobian_state)
            result = first_failure(result, stage_result)
    y1 = _add(y0, _combine_parts([tab.b_sol for tab in tableaus], ks))
    if any(tab.b_error is None for tab in tableaus):
        y_error = None
    else:
        y_error = _combine_parts([tab.b_error for tab in tableaus], ks)
    dense_info = dict(y0=y0, y1=y1, k=tuple(ks) if parts_in_k else _sum(ks))
    if fsal:
        new_solver_state = _FirstSameAsLast(
            vf=tuple(
                _vf_of_last_stage(k_m, f, c)
                for k_m, f, c in zip(ks, vf0, controls, strict=True)
            ),
            jacobian=new_solver_state,
        )
    return y1, y_error, dense_info, new_solver_state, result


def _vf_of_last_stage(ks, vf0, control):
    """The vector field of the last stage, its increment over the step's length
    `control`; `vf0` (the first stage's) for a step of length zero, whose stages
    are all at the step's start."""

    def _leaf(k, f):
        c = jnp.asarray(control, k.dtype)
        safe = jnp.where(c == 0, jnp.ones_like(c), c)
        return jnp.where(c == 0, f, (k[-1] / safe).astype(f.dtype))

    return jtu.tree_map(_leaf, ks, vf0)


def _predictor_matrix(tableau) -> np.ndarray:
    """Row `i`: the weights of the earlier stages' increments that predict stage
    `i`'s increment (zero without a predictor: the guess is then the stage's
    explicit part)."""
    if isinstance(tableau, MultiButcherTableau):
        index = tableau.implicit_index
        if index is None:
            return np.zeros((tableau.num_stages, tableau.num_stages))
        tableau = tableau.tableaus[index]
    s = tableau.num_stages
    matrix = np.zeros((s, s))
    if tableau.a_predictor is not None:
        for i, row in enumerate(tableau.a_predictor, start=1):
            matrix[i, :i] = row
    return matrix


class AbstractDIRK(AbstractRungeKutta, AbstractImplicitSolver):
    """Diagonally implicit Runge–Kutta method: a `ButcherTableau` with `a_diagonal`,
    or an additive (IMEX) method: a `MultiButcherTableau` with one diagonally
    implicit tableau and explicit ones, applied to the parts of a `MultiTerm`.

    Every stage with a non-zero diagonal entry is a nonlinear solve by `root_finder`
    (at most `root_find_max_steps` iterations) for the stage value, started from the
    tableau's stage predictor (`a_predictor`, whose rows combine the earlier stages'
    increments into a guess of this stage's increment) when it has one, else from
    the stage's explicit part. Explicit terms are evaluated at the solved stage
    value. With `VeryChord`, `calculate_jacobian` says when the stage equations'
    Jacobian is computed and factorised (see `CalculateJacobian`).

    A concrete method sets `tableau`, `calculate_jacobian`, `interpolation_cls` and
    `order`, and declares the fields `root_finder` and `root_find_max_steps` with
    their defaults.
    """

    term_structure: ClassVar[Any] = AbstractTerm
    calculate_jacobian: ClassVar[CalculateJacobian] = CalculateJacobian.every_stage
    root_finder: eqx.AbstractVar[optx.AbstractRootFinder]
    root_find_max_steps: eqx.AbstractVar[int]

    def __check_init__(self):
        tableau = self.tableau
        name = type(self).__name__
        if isinstance(tableau, MultiButcherTableau):
            index = tableau.implicit_index
            if index is None:
                raise ValueError(
                    f"{name} is an `AbstractDIRK`, whose `MultiButcherTableau` needs "
                    "one implicit tableau."
                )
            implicit = tableau.tableaus[index]
        else:
            implicit = tableau
        diagonal = implicit.a_diagonal
        if diagonal is None or not np.any(diagonal):
            raise ValueError(
                f"{name} is an `AbstractDIRK`, whose tableau needs a non-zero "
                "`a_diagonal`."
            )
        mode = self.calculate_jacobian
        if mode == CalculateJacobian.never:
            raise ValueError(
                f"{name} has implicit stages, so its `calculate_jacobian` cannot be "
                "`CalculateJacobian.never`."
            )
        if getattr(self, "reuse_jacobian", False) and mode not in (
            CalculateJacobian.first_stage,
            CalculateJacobian.second_stage,
        ):
            raise ValueError(
                f"{name}(reuse_jacobian=True): {name} computes a new Jacobian for "
                f"every implicit stage (`CalculateJacobian.{mode.name}`: its diagonal "
                f"entries {diagonal} differ), so it has no one factorisation to "
                "reuse across steps. `reuse_jacobian` applies to methods with one "
                "Jacobian per step, e.g. Kvaerno3/4/5 and KenCarp3/4/5."
            )
        if mode in (CalculateJacobian.first_stage, CalculateJacobian.second_stage):
            first = 0 if mode == CalculateJacobian.first_stage else 1
            entries = set(diagonal[first:].tolist())
            if len(entries) != 1 or 0.0 in entries:
                raise ValueError(
                    f"{name} reuses one Jacobian from stage {first + 1} on "
                    f"(`CalculateJacobian.{mode.name}`), which needs every diagonal "
                    f"entry from there on equal and non-zero; got {diagonal}."
                )

    def init(self, terms, t0, t1, y0, args):
        jacobian = self._init_jacobian(terms, t0, t1, y0, args)
        return init_first_same_as_last(self.tableau, terms, t0, t1, y0, args, jacobian)

    def _init_jacobian(self, terms, t0, t1, y0, args):
        # `reuse_jacobian` (a field of the concrete methods; `__check_init__` has
        # checked that the method forms one Jacobian per step).
        if not getattr(self, "reuse_jacobian", False):
            return None
        _, parts, implicit = _parts(self.tableau, terms)
        part = parts[implicit]
        control = part.contr(t0, t1)
        structure = jax.eval_shape(
            lambda: stage_jacobian(
                self.root_finder, part, t0, y0, 1.0, args, control, y0
            )
        )
        if structure is None:
            # A root finder or linear solver that keeps no factorisation.
            return None
        placeholder = jtu.tree_map(
            lambda s: (
                jnp.zeros(s.shape, s.dtype)
                if isinstance(s, jax.ShapeDtypeStruct)
                else s
            ),
            structure,
            is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
        )
        # An age past the limit: the first step computes its own Jacobian.
        return _ReusedJacobian(
            chord_state=placeholder,
            step_size=jnp.zeros((), jnp.result_type(t1 - t0)),
            age=jnp.asarray(_MAX_JACOBIAN_AGE, jnp.int32),
        )

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        return additive_step(self, terms, t0, t1, y0, args, solver_state, made_jump)

    def _predictor_matrix(self) -> np.ndarray:
        return _predictor_matrix(self.tableau)


class AbstractSDIRK(AbstractDIRK):
    """Singly diagonally implicit Runge–Kutta method: every diagonal entry equal."""


class AbstractESDIRK(AbstractDIRK):
    """Singly diagonally implicit Runge–Kutta method whose first stage is explicit
    (the vector field at the step's start)."""


def _default_root_finder():
    return with_stepsize_controller_tols(VeryChord)()


@final
class ImplicitEuler(AbstractImplicitSolver, AbstractAdaptiveSolver):
    """The implicit (backward) Euler method, `y1 = y0 + h f(t1, y1)`: first order,
    L-stable, for stiff problems at loose tolerances. Its error estimate is the
    difference from the trapezoidal rule, `(h f(t1, y1) - h f(t0, y0)) / 2`, so that
    `PIDController` can drive it. Linear interpolation for dense output.

    **Arguments:**

    - `root_finder`: the `optimistix` root finder of the step's equation. By default
      `optimistix.Chord` with the step-size controller's `rtol`, `atol` and `norm`
      (`with_stepsize_controller_tols(optimistix.Chord)()`), as in Diffrax; with a
      controller that has no tolerances (`ConstantStepSize`) pass one with its own,
      e.g. `VeryChord(rtol=1e-8, atol=1e-8)`.
    - `root_find_max_steps`: the most iterations per step (10 by default); a step
      whose equation has not converged by then fails, and an adaptive controller
      rejects it and retries with a smaller step.
    """

    term_structure: ClassVar[Any] = AbstractTerm
    interpolation_cls: ClassVar[Callable[..., Any]] = LocalLinearInterpolation
    root_finder: optx.AbstractRootFinder = eqx.field(
        default_factory=lambda: with_stepsize_controller_tols(optx.Chord)()
    )
    root_find_max_steps: int = eqx.field(default=10, static=True)

    def order(self, terms):
        return 1

    def init(self, terms, t0, t1, y0, args):
        return None

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

    def error_order(self, terms):
        # The error estimate compares with the trapezoidal rule (second order), so
        # it is a local error of order 2 for an ODE. Driven by Brownian motion the
        # method has no known strong order, so no error order either (as Diffrax).
        if _is_sde(terms):
            return None
        return 2

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        control = terms.contr(t0, t1)
        k0 = terms.vf_prod(t0, y0, args, control)
        # Started from the explicit Euler step.
        k1, _, result = implicit_stage(
            self.root_finder,
            self.root_find_max_steps,
            terms,
            t1,
            y0,
            1.0,
            args,
            control,
            _add(y0, k0),
        )
        y1 = _add(y0, k1)
        # y1 minus the trapezoidal rule's y0 + (k0 + k1) / 2.
        y_error = _scale(0.5, _sub(k1, k0))
        return y1, y_error, dict(y0=y0, y1=y1), None, result


DIRK_ARGUMENTS = """

    **Arguments:**

    - `scan_kind`: accepted for compatibility with Diffrax; it does not change the
      computation.
    - `root_finder`: the `optimistix` root finder of the stage equations. By default
      `VeryChord` with the step-size controller's `rtol`, `atol` and `norm`
      (`with_stepsize_controller_tols(VeryChord)()`); with a controller that has no
      tolerances (`ConstantStepSize`) pass one with its own, e.g.
      `VeryChord(rtol=1e-8, atol=1e-8)`.
    - `root_find_max_steps`: the most iterations per stage (10 by default); a stage
      that has not converged by then fails the step, and an adaptive controller
      rejects it and retries with a smaller step.
    """

REUSE_JACOBIAN_ARGUMENT = """- `reuse_jacobian`: whether one step's factorised stage matrix `I - a h J` serves
      later steps (not in Diffrax; `False` by default, which computes and factorises
      it once per step as Diffrax does). With `True` it is kept until it has served
      20 steps, the step size has changed by more than 20% since it was formed, or
      the step starts at a jump in the vector field; a step whose stage equations
      then fail to converge is rejected, and its smaller retry forms a new one. The
      stage equations are solved to the same tolerances either way. This pays for
      systems of a few hundred unknowns or more with the default dense linear
      solver (see the Stiff problems page for measurements); for small systems a
      Jacobian is cheap and reusing it costs more iterations than it saves. It needs
      `VeryChord` with a linear solver that keeps a factorisation (dense, or a
      structured one), and applies to adaptive steps only: with constant steps, where
      a failed stage cannot be retried, every step forms its own.
"""


class _AbstractKvaerno(AbstractESDIRK, AbstractAdaptiveSolver):
    __doc__ = (
        """Kværnø's ESDIRK methods (A. Kværnø, BIT Numerical Mathematics 44 (2004)
    489–502): stiffly accurate and L-stable, with an embedded error estimate for
    adaptive steps and third-order Hermite dense output. For stiff problems."""
        + DIRK_ARGUMENTS
        + REUSE_JACOBIAN_ARGUMENT
    )

    calculate_jacobian: ClassVar[CalculateJacobian] = CalculateJacobian.second_stage
    interpolation_cls: ClassVar[Callable[..., Any]] = (
        ThirdOrderHermitePolynomialInterpolation.from_k
    )
    root_finder: optx.AbstractRootFinder = eqx.field(
        default_factory=_default_root_finder
    )
    root_find_max_steps: int = eqx.field(default=10, static=True)
    reuse_jacobian: bool = eqx.field(default=False, static=True)


@final
class Kvaerno3(_AbstractKvaerno):
    __doc__ = (
        "Kværnø's third-order method, with a second-order embedded one: 4 stages, "
        "3 of them implicit.\n\n" + _AbstractKvaerno.__doc__
    )
    tableau: ClassVar[ButcherTableau] = ico.KVAERNO_TABLEAUS["Kvaerno3"]

    def order(self, terms):
        return 3


@final
class Kvaerno4(_AbstractKvaerno):
    __doc__ = (
        "Kværnø's fourth-order method, with a third-order embedded one: 5 stages, "
        "4 of them implicit.\n\n" + _AbstractKvaerno.__doc__
    )
    tableau: ClassVar[ButcherTableau] = ico.KVAERNO_TABLEAUS["Kvaerno4"]

    def order(self, terms):
        return 4


@final
class Kvaerno5(_AbstractKvaerno):
    __doc__ = (
        "Kværnø's fifth-order method, with a fourth-order embedded one: 7 stages, "
        "6 of them implicit.\n\n" + _AbstractKvaerno.__doc__
    )
    tableau: ClassVar[ButcherTableau] = ico.KVAERNO_TABLEAUS["Kvaerno5"]

    def order(self, terms):
        return 5
