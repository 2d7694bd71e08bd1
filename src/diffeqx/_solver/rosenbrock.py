"""Rosenbrock (linearly implicit) methods: `Rosenbrock23`, `Rodas4`, `Rodas5P`.

A step linearises the vector field once at its start and replaces the nonlinear
stage equations of an implicit Runge–Kutta method by linear ones, all with the same
matrix: no Newton iteration. In increments (`hf(t, y) = vf_prod(t, y, args, control)`,
the vector field times the step, with Jacobian `hJ` and time derivative `hf_t` at
`(t0, y0)`), stage `i` of a Rodas method in Hairer & Wanner's transformed variables is

    (I / gamma - hJ) u_i = hf(t0 + c_i h, y0 + sum_{j<i} a_ij u_j)
                           + sum_{j<i} C_ij u_j + d_i h hf_t,

and `y1 = y0 + sum_i m_i u_i`. The state is flattened to one vector
(`ravel_pytree`), the Jacobian taken by forward mode, and `I / gamma - hJ` factored
once per step by the linear solver, whose factorisation every stage reuses.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, final

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jax.flatten_util import ravel_pytree

from .._path.local import AbstractLocalInterpolation, _like
from .._root_finder import is_matrix_free
from .._solution import RESULTS, promote_result, succeeded, where_result
from .._term import AbstractTerm, ODETerm, _ForwardTimeTerm
from .base import AbstractAdaptiveSolver
from .runge_kutta import node_time


def _lincomb(pairs, dtype):
    """`sum w * x` over `(w, x)` pairs of Python floats and flat arrays, skipping zero
    weights; every weight is cast to `dtype`, so nothing is promoted."""
    out = None
    for w, x in pairs:
        w = float(w)
        if w == 0:
            continue
        term = x if w == 1 else jnp.asarray(w, dtype) * x
        out = term if out is None else out + term
    return out


def _unravel_stack(unravel, stacked):
    """A flat `(r, n)` array as the state's PyTree, each leaf with a leading axis."""
    return jax.vmap(unravel)(stacked)


@dataclasses.dataclass(frozen=True)
class _Linearisation:
    """One step's linearisation: the flat state, the vector field in increments, its
    Jacobian and time derivative at the step's start, and the factored matrix
    `I / gamma - hJ`."""

    y0: Any  # flat initial state
    unravel: Callable
    hf: Callable  # (t, flat y) -> flat increment
    hf0: Any  # hf(t0, y0)
    h_hf_t: Any  # h * d/dt hf(t, y0) at t0: the time-derivative term h^2 f_t
    operator: Any
    state: Any
    solver: Any

    def solve(self, rhs):
        solution = lx.linear_solve(
            self.operator, rhs, self.solver, state=self.state, throw=False
        )
        return solution.value, promote_result(solution.result)


def _user_operator(jacobian, terms, t0, t1, y0, args, gamma, n, dtype):
    """`I / gamma - h J` from the user's `jacobian(t, y, args)`: an `(n, n)` array
    for the flattened state, or a `lineax` operator (e.g. tridiagonal)."""
    # The solve loop presents terms in forward time `tau = direction * t`.
    direction = 1
    while isinstance(terms, _ForwardTimeTerm):
        if terms.direction is not None:
            direction = direction * terms.direction
        terms = terms.term
    if not isinstance(terms, ODETerm):
        raise ValueError(
            "A Rosenbrock solver's `jacobian=` is the Jacobian of an ODE's vector "
            f"field, so the terms must be an `ODETerm`; got {type(terms).__name__}. "
            "Leave `jacobian=None` to differentiate any term automatically."
        )
    t0, t1 = direction * t0, direction * t1
    h = jnp.asarray(terms.contr(t0, t1)).astype(dtype)
    inv_gamma = jnp.asarray(1 / gamma, dtype)
    jac = jacobian(t0, y0, args)
    if isinstance(jac, lx.AbstractLinearOperator):
        if jac.in_size() != n or jac.out_size() != n:
            raise ValueError(
                f"`jacobian=` returned an operator of shape ({jac.out_size()}, "
                f"{jac.in_size()}); the flattened state has {n} entries."
            )
        identity = lx.IdentityLinearOperator(
            jax.eval_shape(lambda: jnp.zeros(n, dtype))
        )
        return identity * inv_gamma - jac * h
    jac = jnp.asarray(jac)
    if jac.shape != (n, n):
        raise ValueError(
            f"`jacobian=` returned an array of shape {jac.shape}; expected ({n}, {n}) "
            "for the flattened state (`jax.flatten_util.ravel_pytree` order)."
        )
    return lx.MatrixLinearOperator(
        jnp.eye(n, dtype=dtype) * inv_gamma - h * jac.astype(dtype)
    )


def _linearise(
    terms, t0, t1, y0, args, gamma, solver, tags, jacobian=None
) -> _Linearisation:
    flat, unravel = ravel_pytree(y0)
    dtype = flat.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"Rosenbrock solvers need a real floating-point state, got dtype {dtype}."
        )
    control = terms.contr(t0, t1)

    def hf(t, z):
        out, _ = ravel_pytree(terms.vf_prod(t, unravel(z), args, control))
        return out.astype(dtype)

    n = flat.shape[0]
    if jacobian is not None:
        hf0, hf_t = jax.jvp(lambda t: hf(t, flat), (t0,), (jnp.ones_like(t0),))
        operator = _user_operator(jacobian, terms, t0, t1, y0, args, gamma, n, dtype)
    elif tags or is_matrix_free(solver):
        # The matrix `I / gamma - hJ` as the Jacobian of `z / gamma - hf(t0, z)`:
        # an iterative solver applies it by Jacobian-vector products (linearised
        # once per step), a structured one (e.g. `lineax.Tridiagonal` with
        # `lineax.tridiagonal_tag`) builds its few diagonals from as many products.
        # No n x n matrix is formed.
        hf0, hf_t = jax.jvp(lambda t: hf(t, flat), (t0,), (jnp.ones_like(t0),))
        inv_gamma = jnp.asarray(1 / gamma, dtype)
        operator = lx.JacobianLinearOperator(
            lambda z, _: inv_gamma * z - hf(t0, z), flat, tags=tags
        )
        if is_matrix_free(solver):
            operator = lx.linearise(operator)
    else:

        def hf_twice(t, z):
            out = hf(t, z)
            return out, out

        # One forward-mode pass gives the Jacobian in y, the derivative in t (zero
        # for an autonomous vector field) and, as its primal, the first stage.
        (hf_t, hj), hf0 = jax.jacfwd(hf_twice, argnums=(0, 1), has_aux=True)(t0, flat)
        matrix = jnp.eye(n, dtype=dtype) / jnp.asarray(gamma, dtype) - hj
        operator = lx.MatrixLinearOperator(matrix)
    return _Linearisation(
        y0=flat,
        unravel=unravel,
        hf=hf,
        hf0=hf0,
        h_hf_t=(t1 - t0).astype(dtype) * hf_t.astype(dtype),
        operator=operator,
        state=solver.init(operator, {}),
        solver=solver,
    )


def _first_failure(result, new):
    return where_result(succeeded(result), new, result)


class AbstractRosenbrock(AbstractAdaptiveSolver):
    """Base class of the Rosenbrock solvers.

    **Arguments:**

    - `linear_solver`: the `lineax` solver of the stages' linear systems, with the
      matrix `I / gamma - h J` of the flattened state. It is initialised (e.g.
      LU-factored) once per step and reused by every stage. Defaults to
      `lineax.LU()`. (Not `lineax.AutoLinearSolver(well_posed=None)`: that treats a
      1 x 1 matrix as diagonal and pseudo-inverts it, so a singular matrix would
      give a zero stage instead of a failed step.) A Krylov solver (`lineax.GMRES`,
      ...) uses Jacobian–vector products only: no matrix is formed.
    - `tags`: `lineax` structure tags of that matrix (the Jacobian's structure),
      e.g. `lineax.tridiagonal_tag` with `linear_solver=lineax.Tridiagonal()`: its
      diagonals are then built from three Jacobian–vector products rather than a
      full Jacobian. The structure must hold; it is not checked.
    - `jacobian`: optional `jacobian(t, y, args)`, the Jacobian of an `ODETerm`'s
      vector field with respect to the state, used instead of forward-mode
      autodiff: an `(n, n)` array for the state flattened in
      `jax.flatten_util.ravel_pytree` order, or a `lineax` operator (e.g. a
      `lineax.TridiagonalLinearOperator`, with `linear_solver=lineax.Tridiagonal()`).
    """

    term_structure: ClassVar[Any] = AbstractTerm
    linear_solver: lx.AbstractLinearSolver = lx.LU()
    tags: Any = eqx.field(default=frozenset(), static=True)
    jacobian: Callable | None = None

    def init(self, terms, t0, t1, y0, args):
        return None

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


class _RodasInterpolation(AbstractLocalInterpolation):
    """`y(t0 + theta h) = (1 - theta) y0 + theta y1
    + theta (1 - theta) sum_r theta^r k[r]`, where `k[r]` are the step's dense-output
    combinations of its stages."""

    t0: Any
    t1: Any
    y0: Any
    y1: Any
    k: Any

    def _at(self, t):
        theta, _ = self._theta(t)

        def _leaf(y0, y1, k):
            th = _like(theta, y0)
            q = k[-1]
            for r in range(k.shape[0] - 2, -1, -1):
                q = k[r] + th * q
            return (y0 + th * ((y1 - y0) + (1 - th) * q)).astype(y0.dtype)

        return jtu.tree_map(_leaf, self.y0, self.y1, self.k)

    def derivative(self, t, left: bool = True):
        theta, dt = self._theta(t)

        def _leaf(y0, y1, k):
            th = _like(theta, y0)
            degree = k.shape[0]
            q = k[-1]
            dq = jnp.zeros_like(q)
            for r in range(degree - 2, -1, -1):
                dq = q + th * dq
                q = k[r] + th * q
            out = (y1 - y0) + (1 - 2 * th) * q + th * (1 - th) * dq
            return (out / _like(dt, y0)).astype(y0.dtype)

        return jtu.tree_map(_leaf, self.y0, self.y1, self.k)


@dataclasses.dataclass(frozen=True)
class _RodasTableau:
    """A stiffly accurate Rodas method in transformed variables: `a` and `C`
    (strictly lower triangular, `s x s`), `gamma`, the nodes `c` and the
    time-derivative weights `d` (`s`), and the dense-output rows `h` (`r x s`). The
    last row of `a` plus the last stage gives the solution, so
    `m = a[-1] + e_s`, and the last stage `u_s` is the error estimate."""

    a: np.ndarray
    C: np.ndarray
    gamma: float
    c: np.ndarray
    d: np.ndarray
    h: np.ndarray


def _lower(rows):
    s = len(rows) + 1
    out = np.zeros((s, s))
    for i, row in enumerate(rows):
        out[i + 1, : i + 1] = row
    return out


class _AbstractRodas(AbstractRosenbrock):
    tableau: eqx.AbstractClassVar[_RodasTableau]
    interpolation_cls: ClassVar = _RodasInterpolation

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        tab = self.tableau
        s = len(tab.c)
        lin = _linearise(
            terms,
            t0,
            t1,
            y0,
            args,
            tab.gamma,
            self.linear_solver,
            self.tags,
            self.jacobian,
        )
        dtype = lin.y0.dtype
        us = []
        result = RESULTS.successful
        for i in range(s):
            if i == 0:
                hf_i = lin.hf0
            else:
                z = lin.y0 + _lincomb(zip(tab.a[i, :i], us, strict=True), dtype)
                hf_i = lin.hf(node_time(tab.c[i], t0, t1), z)
            pairs = [(1.0, hf_i), (tab.d[i], lin.h_hf_t)]
            pairs += list(zip(tab.C[i, :i], us, strict=True))
            u, stage_result = lin.solve(_lincomb(pairs, dtype))
            result = _first_failure(result, stage_result)
            us.append(u)
        m = tab.a[-1].copy()
        m[-1] = 1.0
        y1 = lin.unravel(lin.y0 + _lincomb(zip(m, us, strict=True), dtype))
        y_error = lin.unravel(us[-1])
        k = jnp.stack([_lincomb(zip(row, us, strict=True), dtype) for row in tab.h])
        dense_info = dict(y0=y0, y1=y1, k=_unravel_stack(lin.unravel, k))
        return y1, y_error, dense_info, None, result


# Hairer & Wanner, Solving ODEs II, §IV.7: the coefficients of their code RODAS.
_RODAS4_TABLEAU = _RodasTableau(
    a=_lower(
        [
            [1.544],
            [0.9466785280815826, 0.2557011698983284],
            [3.314825187068521, 2.896124015972201, 0.9986419139977817],
            [
                1.221224509226641,
                6.019134481288629,
                12.53708332932087,
                -0.6878860361058950,
            ],
            [
                1.221224509226641,
                6.019134481288629,
                12.53708332932087,
                -0.6878860361058950,
                1.0,
            ],
        ]
    ),
    C=_lower(
        [
            [-5.6688],
            [-2.430093356833875, -0.2063599157091915],
            [-0.1073529058151375, -9.594562251023355, -20.47028614809616],
            [
                7.496443313967647,
                -10.24680431464352,
                -33.99990352819905,
                11.70890893206160,
            ],
            [
                8.083246795921522,
                -7.981132988064893,
                -31.52159432874371,
                16.31930543123136,
                -6.058818238834054,
            ],
        ]
    ),
    gamma=0.25,
    c=np.array([0.0, 0.386, 0.21, 0.63, 1.0, 1.0]),
    d=np.array([0.25, -0.1043, 0.1035, -0.0362, 0.0, 0.0]),
    h=np.array(
        [
            [
                10.12623508344586,
                -7.487995877610167,
                -34.80091861555747,
                -7.992771707568823,
                1.025137723295662,
                0.0,
            ],
            [
                -0.6762803392801253,
                6.087714651680015,
                16.43084320892478,
                24.76722511418386,
                -6.594389125716872,
                0.0,
            ],
        ]
    ),
)

# Steinebach (2023), BIT Numer. Math. 63, doi:10.1007/s10543-023-00967-x.
_RODAS5P_A5 = [
    -7.502846399306121,
    2.561846144803919,
    -11.627539656261098,
    -0.18268767659942256,
    0.030198172008377946,
]
_RODAS5P_TABLEAU = _RodasTableau(
    a=_lower(
        [
            [3.0],
            [2.849394379747939, 0.45842242204463923],
            [-6.954028509809101, 2.489845061869568, -10.358996098473584],
            [
                2.8029986275628964,
                0.5072464736228206,
                -0.3988312541770524,
                -0.04721187230404641,
            ],
            _RODAS5P_A5,
            _RODAS5P_A5 + [1.0],
            _RODAS5P_A5 + [1.0, 1.0],
        ]
    ),
    C=_lower(
        [
            [-14.155112264123755],
            [-17.97296035885952, -2.859693295451294],
            [147.12150275711716, -1.41221402718213, 71.68940251302358],
            [
                165.43517024871676,
                -0.4592823456491126,
                42.90938336958603,
                -5.961986721573306,
            ],
            [
                24.854864614690072,
                -3.0009227002832186,
                47.4931110020768,
                5.5814197821558125,
                -0.6610691825249471,
            ],
            [
                30.91273214028599,
                -3.1208243349937974,
                77.79954646070892,
                34.28646028294783,
                -19.097331116725623,
                -28.087943162872662,
            ],
            [
                37.80277123390563,
                -3.2571969029072276,
                112.26918849496327,
                66.9347231244047,
                -40.06618937091002,
                -54.66780262877968,
                -9.48861652309627,
            ],
        ]
    ),
    gamma=0.21193756319429014,
    c=np.array(
        [
            0.0,
            0.6358126895828704,
            0.4095798393397535,
            0.9769306725060716,
            0.4288403609558664,
            1.0,
            1.0,
            1.0,
        ]
    ),
    d=np.array(
        [
            0.21193756319429014,
            -0.42387512638858027,
            -0.3384627126235924,
            1.8046452872882734,
            2.325825639765069,
            0.0,
            0.0,
            0.0,
        ]
    ),
    h=np.array(
        [
            [
                25.948786856663858,
                -2.5579724845846235,
                10.433815404888879,
                -2.3679251022685204,
                0.524948541321073,
                1.1241088310450404,
                0.4272876194431874,
                -0.17202221070155493,
            ],
            [
                -9.91568850695171,
                -0.9689944594115154,
                3.0438037242978453,
                -24.495224566215796,
                20.176138334709044,
                15.98066361424651,
                -6.789040303419874,
                -6.710236069923372,
            ],
            [
                11.419903575922262,
                2.8879645146136994,
                72.92137995996029,
                80.12511834622643,
                -52.072871366152654,
                -59.78993625266729,
                -0.15582684282751913,
                4.883087185713722,
            ],
        ]
    ),
)


def _arguments(matrix: str) -> str:
    """The `**Arguments:**` section shared by the Rosenbrock solvers' docstrings."""
    return f"""

    **Arguments:**

    - `linear_solver`: the `lineax` solver of the stages' linear systems (matrix
      `{matrix}` of the flattened state), initialised once per step and reused by
      every stage. Default `lineax.LU()`. A Krylov solver (`lineax.GMRES`, ...) uses
      Jacobian–vector products only: no matrix is formed.
    - `tags`: `lineax` structure tags of that matrix (the Jacobian's structure),
      e.g. `lineax.tridiagonal_tag` with `linear_solver=lineax.Tridiagonal()`: its
      diagonals are then built from three Jacobian–vector products rather than a
      full Jacobian. The structure must hold; it is not checked.
    - `jacobian`: optional `jacobian(t, y, args)`, the Jacobian of an `ODETerm`'s
      vector field with respect to the state, used instead of forward-mode
      autodiff: an `(n, n)` array for the state flattened in
      `jax.flatten_util.ravel_pytree` order, or a `lineax` operator (e.g. a
      `lineax.TridiagonalLinearOperator`, with `linear_solver=lineax.Tridiagonal()`).
    """


@final
class Rodas4(_AbstractRodas):
    __doc__ = """Hairer & Wanner's Rodas: a Rosenbrock method of order 4 with an embedded
    order-3 error estimate, 6 stages (each one linear solve with the same
    factorisation, 5 evaluations of the vector field plus one Jacobian per step).
    Stiffly accurate and L-stable, as is its embedded method. Dense output: its own
    cubic interpolant from the stages.

    For stiff problems at moderate tolerances (around `rtol=1e-3` to `1e-7`) whose
    state is small enough for a dense Jacobian and its LU factorisation every step.

    Reference: E. Hairer and G. Wanner, *Solving Ordinary Differential Equations II:
    Stiff and Differential-Algebraic Problems*, 2nd ed., Springer (1996), §IV.7.""" + _arguments(
        "I / gamma - h J"
    )

    tableau: ClassVar[_RodasTableau] = _RODAS4_TABLEAU

    def order(self, terms):
        return 4


@final
class Rodas5P(_AbstractRodas):
    __doc__ = """Steinebach's Rodas5P: a Rosenbrock method of order 5 with an embedded order-4
    error estimate, 8 stages (each one linear solve with the same factorisation, 7
    evaluations of the vector field plus one Jacobian per step). Stiffly accurate and
    L-stable, as is its embedded method. Dense output: its own quartic interpolant
    from the stages, of higher order than Rodas4's.

    For stiff problems at moderate to tight tolerances (around `rtol=1e-5` to
    `1e-10`) whose state is small enough for a dense Jacobian and its LU
    factorisation every step.

    Reference: G. Steinebach, *Construction of Rosenbrock–Wanner method Rodas5P and
    numerical benchmarks within the Julia Differential Equations package*, BIT
    Numerical Mathematics 63 (2023), doi:10.1007/s10543-023-00967-x.""" + _arguments(
        "I / gamma - h J"
    )

    tableau: ClassVar[_RodasTableau] = _RODAS5P_TABLEAU

    def order(self, terms):
        return 5


_R23_D = 1.0 / (2.0 + np.sqrt(2.0))
_R23_E32 = 6.0 + np.sqrt(2.0)


class _Rosenbrock23Interpolation(AbstractLocalInterpolation):
    """Shampine & Reichelt's continuous extension:
    `y(t0 + s h) = y0 + (s (1 - s) k1 + s (s - 2 d) k2) / (1 - 2 d)`."""

    t0: Any
    t1: Any
    y0: Any
    k: Any

    def _at(self, t):
        theta, _ = self._theta(t)

        def _leaf(y0, k):
            s = _like(theta, y0)
            scale = jnp.asarray(1.0 / (1.0 - 2.0 * _R23_D), y0.dtype)
            two_d = jnp.asarray(2.0 * _R23_D, y0.dtype)
            out = y0 + scale * (s * (1 - s) * k[0] + s * (s - two_d) * k[1])
            return out.astype(y0.dtype)

        return jtu.tree_map(_leaf, self.y0, self.k)

    def derivative(self, t, left: bool = True):
        theta, dt = self._theta(t)

        def _leaf(y0, k):
            s = _like(theta, y0)
            scale = jnp.asarray(1.0 / (1.0 - 2.0 * _R23_D), y0.dtype)
            two_d = jnp.asarray(2.0 * _R23_D, y0.dtype)
            out = scale * ((1 - 2 * s) * k[0] + (2 * s - two_d) * k[1])
            return (out / _like(dt, y0)).astype(y0.dtype)

        return jtu.tree_map(_leaf, self.y0, self.k)


@final
class Rosenbrock23(AbstractRosenbrock):
    __doc__ = """Shampine & Reichelt's modified Rosenbrock method, the method of MATLAB's
    `ode23s`: order 2, advancing with an L-stable formula (`d = 1 / (2 + sqrt(2))`),
    with an error estimate against a companion formula of order 3, so the estimate
    is `O(h^3)` and `error_order` is 3. The order-2 formula is a W-method: its order
    does not depend on the Jacobian being exact. Per step: one Jacobian, three
    linear solves with one factorisation, and two further evaluations of the vector
    field (the one at the step's end serves only the error estimate). Dense output:
    its own quadratic continuous extension.

    For stiff problems at loose tolerances (around `rtol=1e-2` to `1e-4`) whose
    state is small enough for a dense Jacobian and its LU factorisation every step.

    Reference: L. F. Shampine and M. W. Reichelt, *The MATLAB ODE Suite*, SIAM J.
    Sci. Comput. 18(1), 1–22 (1997).""" + _arguments("I / d - h J")

    interpolation_cls: ClassVar = _Rosenbrock23Interpolation

    def order(self, terms):
        return 2

    def error_order(self, terms):
        # The estimate is the difference of the order-2 and order-3 solutions, whose
        # local error is O(h^3).
        return 3

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        # The solver's matrix is I/d - hJ = W/d with Shampine & Reichelt's
        # W = I - d hJ, so W^{-1} v is a solve against v/d.
        lin = _linearise(
            terms,
            t0,
            t1,
            y0,
            args,
            _R23_D,
            self.linear_solver,
            self.tags,
            self.jacobian,
        )
        dtype = lin.y0.dtype
        inv_d = 1.0 / _R23_D
        hf0 = lin.hf0
        k1, r1 = lin.solve(_lincomb([(inv_d, hf0), (1.0, lin.h_hf_t)], dtype))
        t_half = node_time(0.5, t0, t1)
        hf1 = lin.hf(t_half, lin.y0 + jnp.asarray(0.5, dtype) * k1)
        w2, r2 = lin.solve(_lincomb([(inv_d, hf1), (-inv_d, k1)], dtype))
        k2 = w2 + k1
        y1_flat = lin.y0 + k2
        hf2 = lin.hf(t1, y1_flat)
        rhs3 = _lincomb(
            [
                (inv_d, hf2),
                (-inv_d * _R23_E32, k2),
                (inv_d * _R23_E32, hf1),
                (-2.0 * inv_d, k1),
                (2.0 * inv_d, hf0),
                (1.0, lin.h_hf_t),
            ],
            dtype,
        )
        k3, r3 = lin.solve(rhs3)
        result = _first_failure(_first_failure(r1, r2), r3)
        y_error = _lincomb([(1 / 6, k1), (-2 / 6, k2), (1 / 6, k3)], dtype)
        y1 = lin.unravel(y1_flat)
        k = _unravel_stack(lin.unravel, jnp.stack([k1, k2]))
        dense_info = dict(y0=y0, k=k)
        return y1, lin.unravel(y_error), dense_info, None, result
