r"""Stochastic Runge–Kutta methods for the underdamped Langevin equation

    dx = v dt,    dv = -gamma v dt - u grad_f(x) dt + rho dW,    rho = sqrt(2 gamma u),

with diagonal `gamma` and `u` (see `diffeqx._langevin`).

**Where the methods come from.** Over one step of size `h`, freeze the force
`g(s) = u grad_f(x(s))` to a known function of time and replace the Brownian motion
by the polynomial path `omega` with the same increment `W`, space-time Lévy area `H`
and (for the third-order methods) space-time-time Lévy area `K`:

    omega(s) = s W / h + 6 H s (h - s) / h^2 + 60 K s (h - s) (h - 2 s) / h^3.

The remaining equation is linear (an Ornstein–Uhlenbeck equation in `v`) and is
integrated exactly: with `beta(s) = exp(-gamma s)`,

    v(h) = beta(h) v0 + ∫ beta(h - s) (rho omega'(s) - g(s)) ds,
    x(h) = x0 + (1 - beta(h)) / gamma v0
              + ∫ (1 - beta(h - s)) / gamma (rho omega'(s) - g(s)) ds.

Every weight is `h^p` times a combination of the functions
`phi_k(z) = sum_n z^n / (n + k)!` at `z = -gamma h` (or a fraction of it), e.g.

    ∫ beta(h - s) ds = h phi_1(z),     ∫ (1 - beta(h - s)) / gamma ds = h^2 phi_2(z),

and the noise integrals are `rho (phi_1 W - gamma (chh H + ckk K))` for `v` and
`rho (h phi_2 W + chh H + ckk K)` for `x`, with

    chh = 6 h (phi_2 - 2 phi_3),    ckk = 60 h z (phi_3 - 6 phi_4 + 12 phi_5).

The methods differ in how they approximate the force integrals (Foster, Lyons &
Oberhauser, "The shifted ODE method for underdamped Langevin MCMC", 2021):

- `ALIGN`: the force is interpolated linearly between the step's ends; the new
  position uses the force at the start only, the new velocity the interpolation.
  Their difference in `v` is the error estimate.
- `ShOULD`: the position at the midpoint from the force at the start, then the
  position at the end with the weights `(1/3, 2/3)` on the forces at the start and
  the midpoint (exact for linear forces under the weight `h - s`), and the velocity
  by Simpson's rule with the exponential weights.
- `QUICSORT`: two-point Gauss–Legendre quadrature of the force, at the nodes
  `l, r = 1/2 ∓ sqrt(3)/6`, in "shifted" variables: the velocity is shifted by
  `rho (H + 6 K)` at the start and by `-rho (H - 6 K)` at the end, after which the
  polynomial path acts as the straight line of slope `(W - 12 K) / h`. (The shift
  makes the free motion exact at the step's end.) The stage at `r` takes the force
  at `l` with weight `h^2/3`, which makes the errors of the two stages cancel in
  the velocity (the stage at `l` ignores the force), the idea of the UBU splitting
  of Chada, Leimkuhler, Paulin & Whalley (2024).

**The functions `phi_k`.** They depend on `gamma h` only. For `|gamma h|` below
`taylor_threshold`, and below 1 whatever the threshold, they are summed as their
Taylor series, with enough terms for the dtype's rounding (the weights of `H` and
`K`, which are combinations of `phi_2 ... phi_5`, have their own series with
positive coefficients, summed below 3 whatever the threshold). Beyond, they come
from `exp` and `expm1` by `phi_{k+1} = (phi_k - 1/k!) / z`, and the weights of
`H` and `K` from their forms in `exp(z)`. Those closed forms cancel for small
`|gamma h|` (relative errors about `eps / |gamma h|^k`: the weight of `K` lost
half its value in float32 at `gamma h = 0.12` when the closed forms started at
the threshold), which is why the series reach further. The coefficients are
computed in the wider of the state's and the times' dtypes, and in at least
float32, then rounded to the state's dtype, or to float32 for a float16 or
bfloat16 state, whose step is computed in float32 and rounded once (see
`_in_accumulation_dtype`). They are computed once per step size and kept in the
solver state: a step whose size differs from the last one's by no more than the
rounding of its end times reuses them.
"""

import abc
import math
from typing import Any, ClassVar, final

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._brownian.levy import (
    AbstractBrownianIncrement,
    AbstractSpaceTimeLevyArea,
    AbstractSpaceTimeTimeLevyArea,
)
from .._langevin import (
    LangevinArgumentError,
    UnderdampedLangevinDiffusionTerm,
    UnderdampedLangevinDriftTerm,
    evaluate_gradient,
    is_concrete,
    langevin_terms,
    per_leaf,
    split_state,
)
from .._path.local import LocalLinearInterpolation, accumulation_dtype
from .._solution import RESULTS
from .._term import MultiTerm
from .base import AbstractAdaptiveSolver, AbstractStratonovichSolver

# ---- the functions phi_k -------------------------------------------------------------

# The series are summed for `|z|` below these whatever `taylor_threshold` says (see
# `_phis` and `_area_weights`).
_MODERATE = 1.0
_LARGE = 3.0


def _taylor_length(threshold: float, dtype) -> int:
    """How many terms of the series below make the truncation error, relative to
    the value, below the dtype's rounding for `|z| <= threshold` (two to spare)."""
    eps = float(jnp.finfo(dtype).eps)
    r = abs(float(threshold))
    n, term = 1, r
    while term > eps / 4 and n < 64:
        n += 1
        term *= r / n
    return n + 2


def _split(z, threshold: float):
    """Where to sum a series (`|z|` below the threshold, or `z == 0`), and `z` made
    harmless for each branch where the other is used, so that neither the values
    nor the derivatives of the discarded branch are NaN or infinite."""
    small = (jnp.abs(z) < threshold) | (z == 0)
    z_series = jnp.where(small, z, jnp.zeros_like(z))
    z_closed = jnp.where(small, -jnp.ones_like(z), z)
    return small, z_series, z_closed


def _horner(z, coefficients: list):
    """`sum_m coefficients[m] z^m`."""
    out = coefficients[-1]
    for c in reversed(coefficients[:-1]):
        out = out * z + c
    return out


def _phis(z, kmax: int, threshold: float) -> list:
    """`[phi_0(z), ..., phi_kmax(z)]`, elementwise, in the dtype of `z`."""
    # Below `|z| = 1` the closed forms lose up to `eps / |z|^k` relative to
    # cancellation (phi_2: 20 roundings at `|z| = 0.1`): the series is summed there
    # whatever the threshold.
    threshold = max(float(threshold), _MODERATE)
    small, z_series, z_closed = _split(z, threshold)
    n = _taylor_length(threshold, jnp.result_type(z))
    top = _horner(z_series, [1.0 / math.factorial(m + kmax) for m in range(n)])
    series = [top]
    for k in range(kmax - 1, -1, -1):
        # phi_k = 1/k! + z phi_{k+1}: no cancellation for small z.
        series.insert(0, 1.0 / math.factorial(k) + z_series * series[0])
    closed = _phis_closed(z_closed, kmax)
    return [jnp.where(small, s, c) for s, c in zip(series, closed, strict=True)]


def _phis_closed(z, kmax: int) -> list:
    # phi_{k+1} = (phi_k - 1/k!) / z: no cancellation for large |z|.
    out = [jnp.exp(z), jnp.expm1(z) / z]
    for k in range(1, kmax):
        out.append((out[k] - 1.0 / math.factorial(k)) / z)
    return out[: kmax + 1]


def _area_weights(z, threshold: float, with_k: bool) -> list:
    """`[psi_h(z)]` or `[psi_h(z), psi_k(z)]`: the weights of the Lévy areas `H` and
    `K` (up to powers of `h`),

        psi_h = phi_2 - 2 phi_3 = sum_m (m + 1) z^m / (m + 3)!
              = (2 + z - e^z (2 - z)) / z^3,
        psi_k = phi_3 - 6 phi_4 + 12 phi_5 = sum_m (m + 1)(m + 2) z^m / (m + 5)!
              = (e^z (z^2 - 6 z + 12) - (z^2 + 6 z + 12)) / z^5.

    The series below the threshold and below `|z| = 3`, the forms in `exp(z)`
    beyond: they cancel to about `eps / |z|^5` relative in `psi_k` (half its value
    in float32 at `|z| = 0.12`), as the combinations of phi's do."""
    threshold = max(float(threshold), _LARGE)
    small, z_series, z_closed = _split(z, threshold)
    n = _taylor_length(threshold, jnp.result_type(z))
    e = jnp.exp(z_closed)
    out = [
        jnp.where(
            small,
            _horner(z_series, [(m + 1) / math.factorial(m + 3) for m in range(n)]),
            (2 + z_closed - e * (2 - z_closed)) / z_closed**3,
        )
    ]
    if with_k:
        series = [(m + 1) * (m + 2) / math.factorial(m + 5) for m in range(n)]
        zc = z_closed
        closed = (e * (zc * (zc - 6) + 12) - (zc * (zc + 6) + 12)) / zc**5
        out.append(jnp.where(small, _horner(z_series, series), closed))
    return out


# ---- leafwise arithmetic -------------------------------------------------------------


def _each(fn, *lists) -> list:
    return [fn(*items) for items in zip(*lists, strict=True)]


def _in_accumulation_dtype(update, dtypes, c, x0, v0, noise, params, grad, f0):
    """`update(c, x0, v0, noise, params, grad, f0)` (a method's `_update`), with the
    leaves of a narrower float dtype than float32 (float16, bfloat16) combined in
    float32 and rounded to their dtype once at the end, as the Runge-Kutta and SDE
    solvers combine their stages: every intermediate value of the step (the shifted
    velocity, the stages' positions, each partial sum) rounded to half precision
    would add a rounding each. The gradient is still evaluated at positions in the
    state's dtype, and returns in it."""
    work = [accumulation_dtype(d) for d in dtypes]
    if work == list(dtypes):
        return update(c, x0, v0, noise, params, grad, f0)

    def up(leaves):
        if leaves is None:
            return None
        return [
            jtu.tree_map(lambda a, w=w: jnp.asarray(a).astype(w), leaf)
            for leaf, w in zip(leaves, work, strict=True)
        ]

    def down(leaves):
        if leaves is None:
            return None
        return [jnp.asarray(a).astype(d) for a, d in zip(leaves, dtypes, strict=True)]

    def grad_up(xs):
        return up(grad(down(xs)))

    noise = _Noise(W=up(noise.W), H=up(noise.H), K=up(noise.K))
    params = dict(
        params,
        **{k: up(params[k]) for k in ("gamma", "u", "rho", "uh")},
    )
    x1, v1, f1, error = update(up(c), up(x0), up(v0), noise, params, grad_up, up(f0))
    error = None if error is None else tuple(down(e) for e in error)
    return down(x1), down(v1), down(f1), error


def _two_gradients(grad, first, second, like, loop: bool):
    """The gradients at two points taken in turn: `x_a = first()`, then `x_b =
    second(grad(x_a))` (lists of leaves shaped like `like`). Returns `(x_a, g_a,
    x_b, g_b)`.

    With `loop`, a `lax.scan` of two iterations evaluates `grad` (so the user's
    gradient is traced, and compiled, once per step rather than twice); each
    iteration forms both points, which is cheap elementwise arithmetic, and keeps
    the one it needs. Both ways do the same arithmetic."""
    if not loop:
        x_a = first()
        g_a = grad(x_a)
        x_b = second(g_a)
        return x_a, g_a, x_b, grad(x_b)

    def body(g_prev, index):
        x = _each(
            lambda a, b: jnp.where(index == 0, a, b), first(), second(list(g_prev))
        )
        g = grad(x)
        return tuple(g), (tuple(x), tuple(g))

    start = tuple(jnp.zeros_like(leaf) for leaf in like)
    _, (xs, gs) = lax.scan(body, start, jnp.arange(2))
    return (
        [x[0] for x in xs],
        [g[0] for g in gs],
        [x[1] for x in xs],
        [g[1] for g in gs],
    )


class _Noise(eqx.Module):
    """The Brownian increment and Lévy areas of a step, as lists of leaves of the
    state's dtypes (`K` is `None` for a method that does not use it)."""

    W: list
    H: list
    K: list | None


class _LangevinState(eqx.Module):
    h: Any  # the step size `coeffs` were computed for
    coeffs: tuple  # one dict of coefficient arrays per leaf of x
    gradient: tuple | None  # grad_f at the start of the next step (FSAL), by leaf


class AbstractFosterLangevinSRK(AbstractStratonovichSolver[_LangevinState]):
    r"""Base class of the stochastic Runge–Kutta methods for the underdamped
    Langevin equation

    \begin{align*}
        \mathrm{d} x(t) &= v(t) \, \mathrm{d}t \\
        \mathrm{d} v(t) &= - \gamma \, v(t) \, \mathrm{d}t - u \,
        \nabla \! f( x(t) ) \, \mathrm{d}t + \sqrt{2 \gamma u} \, \mathrm{d} w(t),
    \end{align*}

    given as `MultiTerm(UnderdampedLangevinDriftTerm(gamma, u, grad_f),
    UnderdampedLangevinDiffusionTerm(gamma, u, bm))` with the state `y0 = (x0, v0)`:
    [`diffeqx.ALIGN`][], [`diffeqx.ShOULD`][] and [`diffeqx.QUICSORT`][].

    They integrate the linear part (friction and noise) exactly, against the Lévy
    areas of the Brownian motion, and approximate only the force `grad_f`. So they
    stay accurate for large friction, and reach strong orders 2 and 3 with one or
    two evaluations of `grad_f` per step. The step's coefficients depend on
    `gamma * h` and are computed once per step size (see `taylor_threshold`).

    They converge to the solution of the SDE (the noise is additive, so Itô and
    Stratonovich agree); they are marked as Stratonovich solvers, as in Diffrax.
    The terms' `gamma` and `u` must be the same in the drift and the diffusion.
    Backward solves (`t1 < t0`) run the method with a negative step, driven by the
    time-reversed Brownian motion.

    Dense output is linear between the steps' ends.

    A subclass provides `minimal_levy_area`, `taylor_threshold`, `_fsal` (whether
    the gradient at the step's end is kept for the next step), `_coefficients(h,
    gamma)` (a dict of arrays for one leaf) and `_update(...)` (the step on lists
    of leaves).
    """

    term_structure: ClassVar[Any] = MultiTerm[
        tuple[UnderdampedLangevinDriftTerm, UnderdampedLangevinDiffusionTerm]
    ]
    interpolation_cls: ClassVar = LocalLinearInterpolation
    minimal_levy_area: eqx.AbstractClassVar[type[AbstractBrownianIncrement]]
    taylor_threshold: eqx.AbstractVar[float]
    _fsal: eqx.AbstractClassVar[bool]

    def error_order(self, terms):
        # The terms always carry a Brownian motion: the SDE convention of Diffrax,
        # local order `strong_order + 1/2`.
        order = self.strong_order(terms)
        return None if order is None else order + 0.5

    # -- to be provided by each method ---------------------------------------------

    @abc.abstractmethod
    def _coefficients(self, h, gamma) -> dict:
        """The coefficients of a step of size `h` (an array of the leaf's dtype) for
        one leaf of the friction `gamma` (a scalar or an array)."""

    @abc.abstractmethod
    def _update(self, c, x0, v0, noise, params, grad, f0):
        """One step on lists of leaves. `c`: the coefficient dicts; `params`: the
        dict of lists `gamma`, `u`, `rho`, `uh` (`u * h`), and `loop` (whether two
        gradient evaluations run in a loop, `_two_gradients`); `grad(xs)`: the gradient
        at the positions `xs`; `f0`: the gradient at `x0` if `_fsal`, else None.
        Returns `(x1, v1, f1, error)`: `f1` the gradient at `x1` if `_fsal` (else
        None), `error` a pair of lists `(x_error, v_error)` or None."""

    # -- shared machinery ----------------------------------------------------------

    def __check_init__(self):
        if getattr(self, "scan_stages", False) not in (True, False):
            raise ValueError(
                f"`{type(self).__name__}(scan_stages=...)` must be True or False; got "
                f"{self.scan_stages!r}."
            )
        threshold = self.taylor_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            try:
                threshold = float(threshold)
            except (TypeError, ValueError):
                threshold = None
        if threshold is None or not math.isfinite(threshold) or threshold < 0:
            raise ValueError(
                f"`{type(self).__name__}(taylor_threshold=...)` must be a "
                f"non-negative finite number, got {self.taylor_threshold!r}."
            )

    def _phis(self, z, kmax: int) -> list:
        return _phis(z, kmax, float(self.taylor_threshold))

    def _area_weights(self, z, with_k: bool) -> list:
        return _area_weights(z, float(self.taylor_threshold), with_k)

    def _parameters(self, terms, x0, check: bool) -> dict:
        """`gamma`, `u` (from the drift) and `rho = sqrt(2 gamma u)` (from the
        diffusion) as lists of leaves of `x0`'s dtypes; scalars stay scalars."""
        name = type(self).__name__
        drift, diffusion = langevin_terms(terms, name)
        gamma = per_leaf(drift.gamma, x0, "gamma", name)
        u = per_leaf(drift.u, x0, "u", name)
        gamma_d = per_leaf(diffusion.gamma, x0, "gamma", name)
        u_d = per_leaf(diffusion.u, x0, "u", name)
        if check:
            gamma = _check_same(gamma, drift.gamma, diffusion.gamma, x0, "gamma", name)
            u = _check_same(u, drift.u, diffusion.u, x0, "u", name)
        leaves = jtu.tree_leaves
        return dict(
            gamma=leaves(gamma),
            u=leaves(u),
            rho=_each(lambda g, u_: jnp.sqrt(2 * g * u_), leaves(gamma_d), leaves(u_d)),
            grad_f=drift.grad_f,
        )

    def _all_coefficients(self, h, gammas) -> tuple:
        # Compiled as one program: `init` runs outside the solve's loop, where
        # these few hundred elementwise operations would otherwise be dispatched
        # (and, the first time, compiled) one by one.
        return _coefficients_program(self, h, tuple(gammas))

    def init(self, terms, t0, t1, y0, args):
        name = type(self).__name__
        x0, v0 = split_state(y0, name)
        for leaf_x, leaf_v in zip(
            jtu.tree_leaves(x0), jtu.tree_leaves(v0), strict=True
        ):
            dx, dv = jnp.result_type(leaf_x), jnp.result_type(leaf_v)
            if dx != dv or not jnp.issubdtype(dx, jnp.floating):
                raise LangevinArgumentError(
                    f"`{name}`: the leaves of `x0` and `v0` must have the same real "
                    f"floating dtype, but got {dx} and {dv}."
                )
        params = self._parameters(terms, x0, check=True)
        h = terms.terms[0].contr(t0, t1)
        h = jnp.asarray(h, dtype=jnp.result_type(h))
        coeffs = self._all_coefficients(h, params["gamma"])
        if self._fsal:
            gradient = tuple(
                jtu.tree_leaves(evaluate_gradient(params["grad_f"], x0, args, name))
            )
        else:
            # Checks the structure and shapes of the gradient without computing it.
            eqx.filter_eval_shape(evaluate_gradient, params["grad_f"], x0, args, name)
            gradient = None
        return _LangevinState(h=h, coeffs=coeffs, gradient=gradient)

    def _noise(self, levy, treedef, dtypes, shapes) -> _Noise:
        if not isinstance(levy, self.minimal_levy_area):
            raise ValueError(
                f"`{type(self).__name__}` needs a Brownian motion that samples "
                f"`{self.minimal_levy_area.__name__}`, but its increments came as "
                f"{type(levy).__name__}. Build the path with "
                "`levy_area=diffeqx.SpaceTimeLevyArea` (ALIGN) or "
                "`levy_area=diffeqx.SpaceTimeTimeLevyArea` (ShOULD, QUICSORT)."
            )

        def leaves(tree):
            try:
                out = [jnp.asarray(w) for w in treedef.flatten_up_to(tree)]
            except (ValueError, TypeError):
                out = None
            if out is None or [w.shape for w in out] != shapes:
                raise LangevinArgumentError(
                    f"`{type(self).__name__}`: the Brownian motion must have the "
                    f"PyTree structure and shapes of the position `x` (structure "
                    f"{treedef}, shapes {shapes}), but its increments have "
                    f"structure {jtu.tree_structure(tree)} and shapes "
                    f"{[jnp.shape(w) for w in jtu.tree_leaves(tree)]}."
                )
            return [w.astype(d) for w, d in zip(out, dtypes, strict=True)]

        uses_k = issubclass(self.minimal_levy_area, AbstractSpaceTimeTimeLevyArea)
        return _Noise(
            W=leaves(levy.W),
            H=leaves(levy.H),
            K=leaves(levy.K) if uses_k else None,
        )

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        name = type(self).__name__
        state = solver_state
        x0, v0 = split_state(y0, name)
        x_leaves, treedef = jtu.tree_flatten(x0)
        v_leaves = treedef.flatten_up_to(v0)
        dtypes = [jnp.result_type(leaf) for leaf in x_leaves]
        params = self._parameters(terms, x0, check=False)
        drift, diffusion = terms.terms

        # The step size, signed: negative for a backward solve, whose terms present
        # the path in reversed time.
        h = drift.contr(t0, t1)
        # Reuse the coefficients unless the step size changed by more than the
        # rounding of the step's end times.
        h = jnp.asarray(h, dtype=jnp.result_type(state.h))
        eps = float(jnp.finfo(h.dtype).eps)
        scale = jnp.maximum(jnp.maximum(jnp.abs(t0), jnp.abs(t1)), jnp.abs(h))
        unchanged = jnp.abs(h - state.h) <= (8 * eps) * scale.astype(h.dtype)
        coeffs, h_coeffs = lax.cond(
            eqxi.unvmap_all(unchanged),
            lambda: (state.coeffs, state.h),
            lambda: (self._all_coefficients(h, params["gamma"]), h),
        )

        shapes = [jnp.shape(leaf) for leaf in x_leaves]
        levy = diffusion.contr(t0, t1, use_levy=True)
        noise = self._noise(levy, treedef, dtypes, shapes)
        grad_f = params["grad_f"]

        def grad(xs):
            g = evaluate_gradient(grad_f, jtu.tree_unflatten(treedef, xs), args, name)
            return treedef.flatten_up_to(g)

        if not self._fsal:
            f0 = None
        elif made_jump is False:
            f0 = list(state.gradient)
        else:
            # After a discontinuity the state may have jumped: recompute.
            f0 = lax.cond(
                eqxi.unvmap_any(made_jump),
                lambda: grad(x_leaves),
                lambda: list(state.gradient),
            )

        h_leaves = [jnp.asarray(h, dtype=d) for d in dtypes]
        params = dict(
            gamma=params["gamma"],
            u=params["u"],
            rho=params["rho"],
            uh=_each(lambda u_, hl: u_ * hl, params["u"], h_leaves),
        )
        params["loop"] = self._loop_gradients()
        x1, v1, f1, error = _in_accumulation_dtype(
            self._update, dtypes, coeffs, x_leaves, v_leaves, noise, params, grad, f0
        )
        unflatten = lambda leaves: jtu.tree_unflatten(treedef, leaves)
        y1 = (unflatten(x1), unflatten(v1))
        y_error = None if error is None else tuple(unflatten(e) for e in error)
        new_state = _LangevinState(
            h=h_coeffs,
            coeffs=coeffs,
            gradient=tuple(f1) if self._fsal else None,
        )
        return y1, y_error, dict(y0=y0, y1=y1), new_state, RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

    def _loop_gradients(self) -> bool:
        """Whether a method with two gradient evaluations per step runs them in a
        loop (`_two_gradients`): as its `scan_stages` says."""
        return bool(getattr(self, "scan_stages", False))


@eqx.filter_jit
def _coefficients_program(solver, h, gammas) -> tuple:
    out = []
    for g in gammas:
        dtype = jnp.result_type(g)
        # Computed in the wider of the leaf's and the times' dtypes, and in at least
        # single precision, then rounded to the leaf's dtype (float32 for a half-
        # precision leaf, whose step is computed in float32): in half precision the
        # closed forms cancel to nothing (phi_2 of gamma h = 3e-4 is 0 in float16,
        # and phi_5 overflows), and coefficients rounded to it would add the same
        # error to every step (measured: float16 solves 6 to 7 epsilons off
        # after 61 steps rather than 2.2 to 2.6).
        work = max(
            accumulation_dtype(dtype),
            jnp.dtype(jnp.result_type(h)),
            key=lambda d: jnp.finfo(d).bits,
        )
        c = solver._coefficients(jnp.asarray(h, dtype=work), jnp.asarray(g, dtype=work))
        out.append({k: v.astype(accumulation_dtype(dtype)) for k, v in c.items()})
    return tuple(out)


def _check_same(value, a, b, x0, what: str, owner: str):
    """`value` (`a` as used), after checking that the parameters `a` (of the drift)
    and `b` (of the diffusion) agree on every leaf of `x0`: at trace time when both
    are known then, else when the solve runs."""
    message = (
        f"`{owner}`: the drift and the diffusion term must have the same `{what}`."
    )
    if is_concrete((a, b)):
        with jax.ensure_compile_time_eval():
            pairs = zip(
                jtu.tree_leaves(per_leaf(a, x0, what, owner)),
                jtu.tree_leaves(per_leaf(b, x0, what, owner)),
                strict=True,
            )
            if any(bool(jnp.any(x != y)) for x, y in pairs):
                raise LangevinArgumentError(message)
        return value
    b = per_leaf(b, x0, what, owner)
    return jtu.tree_map(
        lambda x, y: eqx.error_if(x, jnp.any(x != y), message), value, b
    )


# ---- the methods -----------------------------------------------------------------------


@final
class ALIGN(AbstractFosterLangevinSRK, AbstractAdaptiveSolver):
    r"""ALIGN (Adaptive Langevin via Interpolated Gradients and Noise), James
    Foster's second-order method for the underdamped Langevin equation; see
    [`diffeqx.AbstractFosterLangevinSRK`][] for the equation and the terms.

    The friction and the noise are integrated exactly (against `W` and the
    space-time Lévy area `H`); the force is interpolated linearly over the step, and
    the new position uses the force at the start. The difference the interpolation
    makes to the velocity is the error estimate, so it works with
    [`diffeqx.PIDController`][]. One evaluation of `grad_f` per step (the one at
    the step's end is reused by the next step).

    Strong order 2. Needs a Brownian motion with
    `levy_area=diffeqx.SpaceTimeLevyArea` (or richer).

    **Arguments:**

    - `taylor_threshold`: below this value of `|gamma * h|` the coefficients are
      summed as Taylor series (to the dtype's rounding), above it computed from
      exponentials. Where those would cancel (`|gamma * h|` below 1, and below 3
      for the weights of the Lévy areas) the series is summed whatever the
      threshold: with the default or any smaller threshold every coefficient is
      within a few roundings for `|gamma * h|` below 3 (relative: 1e-15 in
      float64, 3e-7 in float32); beyond, the rounding of `gamma * h` itself, which
      `exp` amplifies by `|gamma * h|`, dominates.

    ??? cite "Reference"

        A modification of the splitting method of Definition 4.2 in

        ```bibtex
        @misc{foster2021shiftedode,
            title={The shifted ODE method for underdamped Langevin MCMC},
            author={James Foster and Terry Lyons and Harald Oberhauser},
            year={2021},
            eprint={2101.03446},
            archivePrefix={arXiv},
            primaryClass={math.NA},
        }
        ```
    """

    minimal_levy_area: ClassVar = AbstractSpaceTimeLevyArea
    taylor_threshold: float = eqx.field(static=True, default=0.1)
    _fsal: ClassVar[bool] = True

    def order(self, terms):
        return 2

    def strong_order(self, terms):
        return 2.0

    def _coefficients(self, h, gamma):
        z = -gamma * h
        p0, p1, p2 = self._phis(z, 2)
        (psi_h,) = self._area_weights(z, with_k=False)
        return dict(
            beta=p0,  # exp(-gamma h)
            a=h * p1,  # (1 - beta) / gamma
            b=h * p2,  # (gamma h - 1 + beta) / (gamma^2 h)
            aa=p1,  # a / h
            chh=6 * h * psi_h,
        )

    def _update(self, c, x0, v0, noise, params, grad, f0):
        gamma, u, rho, uh = params["gamma"], params["u"], params["rho"], params["uh"]

        def position(c, x, v, w, hh, r, uh_, f):
            return x + c["a"] * v + c["b"] * (r * w - uh_ * f) + c["chh"] * (r * hh)

        x1 = _each(position, c, x0, v0, noise.W, noise.H, rho, uh, f0)
        f1 = grad(x1)

        def velocity(c, v, w, hh, g, u_, r, fa, fb):
            force = (c["a"] - c["b"]) * fa + c["b"] * fb
            return c["beta"] * v - u_ * force + r * (c["aa"] * w - g * c["chh"] * hh)

        v1 = _each(velocity, c, v0, noise.W, noise.H, gamma, u, rho, f0, f1)
        v_error = _each(lambda c, u_, fa, fb: -u_ * c["b"] * (fb - fa), c, u, f0, f1)
        x_error = [jnp.zeros_like(x) for x in x1]
        return x1, v1, f1, (x_error, v_error)


@final
class ShOULD(AbstractFosterLangevinSRK):
    r"""ShOULD, James Foster's third-order shifted-ODE method for the underdamped
    Langevin equation; see
    [`diffeqx.AbstractFosterLangevinSRK`][] for the equation and the terms.

    The friction and the noise are integrated exactly (against `W`, `H` and the
    space-time-time Lévy area `K`); the force is evaluated at the step's start, at
    a midpoint stage and at the end, and integrated by Simpson's rule with the
    exponential weights. Two evaluations of `grad_f` per step (the one at the end is
    reused by the next step). No error estimate: use constant steps.

    Strong order 3. Needs a Brownian motion with
    `levy_area=diffeqx.SpaceTimeTimeLevyArea`.

    **Arguments:**

    - `taylor_threshold`: as for [`diffeqx.ALIGN`][].
    - `scan_stages`: `True` evaluates the two gradients of a step in a loop of two
      iterations, so that `grad_f` is traced and compiled once per step rather
      than twice; `False` (the default) evaluates them one after the other.
      Measured on CPU with MLP potentials (widths 64 and 256), the loop changed
      compile time by less than 10% and made steps up to 12% slower: it is for
      gradients whose compilation dominates the solve's.

    ??? cite "Reference"

        Based on Definition 7.1 of

        ```bibtex
        @misc{foster2021shiftedode,
            title={The shifted ODE method for underdamped Langevin MCMC},
            author={James Foster and Terry Lyons and Harald Oberhauser},
            year={2021},
            eprint={2101.03446},
            archivePrefix={arXiv},
            primaryClass={math.NA},
        }
        ```
    """

    minimal_levy_area: ClassVar = AbstractSpaceTimeTimeLevyArea
    taylor_threshold: float = eqx.field(static=True, default=0.1)
    scan_stages: bool = eqx.field(default=False, static=True, kw_only=True)
    _fsal: ClassVar[bool] = True

    def order(self, terms):
        return 3

    def strong_order(self, terms):
        return 3.0

    def _coefficients(self, h, gamma):
        z = -gamma * h
        p0, p1, p2 = self._phis(z, 2)
        psi_h, psi_k = self._area_weights(z, with_k=True)
        q0, q1, q2 = self._phis(z / 2, 2)
        return dict(
            beta_half=q0,
            a_half=(h / 2) * q1,
            b_half=(h / 4) * q2,
            beta=p0,
            a=h * p1,
            b=h * p2,
            aa=p1,
            chh=6 * h * psi_h,
            ckk=60 * h * z * psi_k,
        )

    def _update(self, c, x0, v0, noise, params, grad, f0):
        gamma, rho, uh = params["gamma"], params["rho"], params["uh"]

        def midpoint(c, x, v, w, hh, kk, r, uh_, f):
            # Shifted velocity; the path acts as a line of slope (W - 12 K) / h.
            v_shift = v + r * (hh + 6 * kk)
            return (
                x + c["a_half"] * v_shift + c["b_half"] * (r * (w - 12 * kk) - uh_ * f)
            )

        def position(c, x, v, w, hh, kk, r, uh_, fa, fm):
            force = c["b"] * (fa + 2 * fm) / 3
            area = c["chh"] * hh + c["ckk"] * kk
            return x + c["a"] * v + r * (c["b"] * w + area) - uh_ * force

        _, f_mid, x1, f1 = _two_gradients(
            grad,
            lambda: _each(midpoint, c, x0, v0, noise.W, noise.H, noise.K, rho, uh, f0),
            lambda f_mid: _each(
                position, c, x0, v0, noise.W, noise.H, noise.K, rho, uh, f0, f_mid
            ),
            x0,
            params["loop"],
        )

        def velocity(c, v, w, hh, kk, g, r, uh_, fa, fm, fb):
            force = (c["beta"] * fa + 4 * c["beta_half"] * fm + fb) / 6
            area = c["chh"] * hh + c["ckk"] * kk
            return c["beta"] * v - uh_ * force + r * (c["aa"] * w - g * area)

        v1 = _each(
            velocity,
            c,
            v0,
            noise.W,
            noise.H,
            noise.K,
            gamma,
            rho,
            uh,
            f0,
            f_mid,
            f1,
        )
        return x1, v1, f1, None


_GAUSS_L = 0.5 - math.sqrt(3.0) / 6
_GAUSS_R = 0.5 + math.sqrt(3.0) / 6


@final
class QUICSORT(AbstractFosterLangevinSRK):
    r"""QUICSORT (QUadrature Inspired and Contractive Shifted ODE with Runge–Kutta
    Three), by James Foster and Daire O'Kane: a third-order method for the
    underdamped Langevin equation; see [`diffeqx.AbstractFosterLangevinSRK`][] for
    the equation and the terms.

    The friction and the noise are integrated exactly (against `W`, `H` and the
    space-time-time Lévy area `K`), in variables where the velocity is shifted by
    the Lévy areas; the force is integrated by two-point Gauss–Legendre quadrature.
    Two evaluations of `grad_f` per step. No error estimate: use constant steps.

    Strong order 3. Needs a Brownian motion with
    `levy_area=diffeqx.SpaceTimeTimeLevyArea`.

    **Arguments:**

    - `taylor_threshold`: as for [`diffeqx.ALIGN`][].
    - `scan_stages`: as for [`diffeqx.ShOULD`][].

    ??? cite "Reference"

        A variant of the SORT method of Definition 1.2 in

        ```bibtex
        @misc{foster2021shiftedode,
            title={The shifted ODE method for underdamped Langevin MCMC},
            author={James Foster and Terry Lyons and Harald Oberhauser},
            year={2021},
            eprint={2101.03446},
            archivePrefix={arXiv},
            primaryClass={math.NA},
        }
        ```

        with ideas from the UBU method of

        ```bibtex
        @misc{chada2024unbiased,
            title={Unbiased Kinetic Langevin Monte Carlo with Inexact Gradients},
            author={Neil K. Chada and Benedict Leimkuhler and Daniel Paulin
                and Peter A. Whalley},
            year={2024},
            eprint={2311.05025},
            archivePrefix={arXiv},
            primaryClass={stat.CO},
        }
        ```
    """

    minimal_levy_area: ClassVar = AbstractSpaceTimeTimeLevyArea
    taylor_threshold: float = eqx.field(static=True, default=0.1)
    scan_stages: bool = eqx.field(default=False, static=True, kw_only=True)
    _fsal: ClassVar[bool] = False

    def order(self, terms):
        return 3

    def strong_order(self, terms):
        return 3.0

    def _coefficients(self, h, gamma):
        z = -gamma * h
        out = {}
        for node, theta in (("l", _GAUSS_L), ("r", _GAUSS_R), ("1", 1.0)):
            p0, p1, p2 = self._phis(theta * z, 2)
            out["beta_" + node] = p0  # exp(-theta gamma h)
            out["a_" + node] = (theta * h) * p1
            out["b_" + node] = (theta * theta * h) * p2
            if node == "1":
                out["aa"] = p1
        out["a_third"] = (h / 3) * self._phis(z / 3, 1)[1]
        return out

    def _update(self, c, x0, v0, noise, params, grad, f0):
        rho, uh = params["rho"], params["uh"]
        v_shift = _each(
            lambda v, hh, kk, r: v + r * (hh + 6 * kk), v0, noise.H, noise.K, rho
        )
        slope = _each(lambda w, kk, r: r * (w - 12 * kk), noise.W, noise.K, rho)

        def kick(gradient):
            return _each(lambda f, uh_: uh_ * f, gradient, uh)

        _, g_l, _, g_r = _two_gradients(
            grad,
            lambda: _each(
                lambda c, x, v, s: x + c["a_l"] * v + c["b_l"] * s,
                c,
                x0,
                v_shift,
                slope,
            ),
            lambda g_l: _each(
                lambda c, x, v, s, k: (
                    x + c["a_r"] * v + c["b_r"] * s - c["a_third"] * k
                ),
                c,
                x0,
                v_shift,
                slope,
                kick(g_l),
            ),
            x0,
            params["loop"],
        )
        kick_l, kick_r = kick(g_l), kick(g_r)

        def position(c, x, v, s, kl, kr):
            force = (c["a_r"] * kl + c["a_l"] * kr) / 2
            return x + c["a_1"] * v + c["b_1"] * s - force

        def velocity(c, v, s, kl, kr, hh, kk, r):
            force = (c["beta_r"] * kl + c["beta_l"] * kr) / 2
            shifted = c["beta_1"] * v - force + c["aa"] * s
            return shifted - r * (hh - 6 * kk)

        x1 = _each(position, c, x0, v_shift, slope, kick_l, kick_r)
        v1 = _each(velocity, c, v_shift, slope, kick_l, kick_r, noise.H, noise.K, rho)
        return x1, v1, None, None
