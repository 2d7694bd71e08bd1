"""Misuse of diffeqsolve is reported at trace time, before any solving, by an error that
names the argument, what was received and what was expected.

Each case is checked twice: the mistaken call raises (eagerly and while tracing under
`jax.jit`), and the same call with the mistake fixed succeeds -- so each error test
isolates exactly one mistake.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx as dfx
from _user_solvers import HandWrittenEuler


def _decay(t, y, args):
    return jax.tree_util.tree_map(jnp.negative, y)


_TERM = dfx.ODETerm(_decay)
_Y0 = jnp.array([1.0, 2.0])


def _base_call():
    return dict(
        terms=_TERM,
        solver=dfx.Tsit5(),
        t0=0.0,
        t1=1.0,
        dt0=0.1,
        y0=_Y0,
        saveat=dfx.SaveAt(t1=True),
        stepsize_controller=dfx.ConstantStepSize(),
    )


def _all_of(*fragments):
    """A regex matching a message that contains every fragment, in any order."""
    return "(?s)" + "".join(f"(?=.*{re.escape(fragment)})" for fragment in fragments)


# (id, mistaken arguments, the same arguments fixed, exception, message fragments)
_CASES = [
    (
        "solver-class-not-instance",
        dict(solver=dfx.Tsit5),
        dict(solver=dfx.Tsit5()),
        TypeError,
        ("solver", "Tsit5()"),
    ),
    (
        "terms-list-of-functions",
        dict(terms=[_decay]),
        dict(terms=_TERM),
        TypeError,
        ("terms", "AbstractTerm"),
    ),
    (
        "terms-bare-function",
        dict(terms=_decay),
        dict(terms=_TERM),
        TypeError,
        ("terms", "AbstractTerm"),
    ),
    (
        "terms-structure-mismatch",
        dict(terms=(_TERM, _TERM)),
        dict(terms=_TERM),
        ValueError,
        ("term_structure",),
    ),
    (
        "dt0-sign-forward",
        dict(dt0=-0.1),
        dict(dt0=0.1),
        ValueError,
        ("dt0",),
    ),
    (
        "dt0-sign-backward",
        dict(t0=1.0, t1=0.0, dt0=0.1),
        dict(t0=1.0, t1=0.0, dt0=-0.1),
        ValueError,
        ("dt0",),
    ),
    (
        "dt0-none-with-constant-step-size",
        dict(dt0=None),
        dict(dt0=0.1),
        ValueError,
        ("dt0", "ConstantStepSize"),
    ),
    (
        "non-adaptive-solver-with-pid",
        dict(
            solver=dfx.Euler(),
            stepsize_controller=dfx.PIDController(rtol=1e-4, atol=1e-6),
        ),
        dict(solver=dfx.Euler(), stepsize_controller=dfx.ConstantStepSize()),
        ValueError,
        ("Euler", "adaptive"),
    ),
    (
        "user-solver-without-error-estimate-with-pid",
        dict(
            solver=HandWrittenEuler(),
            stepsize_controller=dfx.PIDController(rtol=1e-4, atol=1e-6),
        ),
        dict(solver=HandWrittenEuler(), stepsize_controller=dfx.ConstantStepSize()),
        ValueError,
        ("HandWrittenEuler", "error estimate", "PIDController"),
    ),
    (
        "saveat-ts-outside-interval",
        dict(saveat=dfx.SaveAt(ts=jnp.array([0.0, 0.5, 1.5]))),
        dict(saveat=dfx.SaveAt(ts=jnp.array([0.0, 0.5, 1.0]))),
        ValueError,
        ("ts",),
    ),
    (
        "saveat-ts-before-t0",
        dict(saveat=dfx.SaveAt(ts=jnp.array([-0.5, 0.5]))),
        dict(saveat=dfx.SaveAt(ts=jnp.array([0.0, 0.5]))),
        ValueError,
        ("ts",),
    ),
    (
        "saveat-ts-not-increasing",
        dict(saveat=dfx.SaveAt(ts=jnp.array([0.2, 0.7, 0.5]))),
        dict(saveat=dfx.SaveAt(ts=jnp.array([0.2, 0.5, 0.7]))),
        ValueError,
        ("ts", "increasing"),
    ),
]

_IDS = [case[0] for case in _CASES]


def _call(overrides):
    kwargs = _base_call()
    kwargs.update(overrides)
    return dfx.diffeqsolve(**kwargs)


@pytest.mark.parametrize("name, bad, fixed, error, fragments", _CASES, ids=_IDS)
def test_misuse_raises_naming_argument(name, bad, fixed, error, fragments):
    with pytest.raises(error, match=_all_of(*fragments)):
        _call(bad)


@pytest.mark.parametrize("name, bad, fixed, error, fragments", _CASES, ids=_IDS)
def test_misuse_raises_while_tracing_under_jit(name, bad, fixed, error, fragments):
    # Raised while tracing: a Python exception of the documented type, not a runtime
    # error from inside the compiled solve. y0 is the traced argument.
    bad = dict(bad)
    y0 = bad.pop("y0", _Y0)

    @jax.jit
    def solve(y0):
        return _call(dict(bad, y0=y0)).ys

    with pytest.raises(error, match=_all_of(*fragments)):
        solve(y0)


# The fixed calls of these cases are the base call itself (as is the fixed call of
# "solver-class-not-instance"), or save at a few requested times as the fixed call of
# "saveat-ts-not-increasing" does: `slow`, each being a compilation of its own.
_SAME_CORRECTED_CALL = (
    "terms-list-of-functions",
    "terms-bare-function",
    "terms-structure-mismatch",
    "dt0-sign-forward",
    "dt0-none-with-constant-step-size",
    "saveat-ts-outside-interval",
    "saveat-ts-before-t0",
)


@pytest.mark.parametrize(
    "name, bad, fixed, error, fragments",
    [
        pytest.param(
            *case,
            id=case[0],
            marks=(pytest.mark.slow,) if case[0] in _SAME_CORRECTED_CALL else (),
        )
        for case in _CASES
    ],
)
def test_corrected_call_succeeds(name, bad, fixed, error, fragments):
    sol = _call(fixed)
    for leaf in jax.tree_util.tree_leaves(sol.ys):
        assert jnp.all(jnp.isfinite(leaf))
    # y' = -y, so every saved value is the initial value times exp(-(t - t0)).
    decay = np.exp(-(np.asarray(sol.ts) - float(sol.t0)))
    for y_leaf, y0_leaf in zip(
        jax.tree_util.tree_leaves(sol.ys),
        jax.tree_util.tree_leaves(fixed.get("y0", _Y0)),
        strict=True,
    ):
        expected = decay[:, None] * np.asarray(y0_leaf)[None]
        # Euler with dt0=0.1 is first order; the others are Tsit5.
        np.testing.assert_allclose(y_leaf, expected, rtol=0.1)
