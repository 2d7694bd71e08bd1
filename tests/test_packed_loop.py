"""The checkpointed loop of `RecursiveCheckpointAdjoint` carries the solve's scalars
packed into one vector per kind (see `_scalars_packed` in `_adjoint/base.py`).

Truth here is a plain `lax.while_loop` running the same body (values, dtypes, weak
types) and central finite differences (gradients); the packing itself is checked by
recording the state the checkpointed loop is handed.
"""

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import diffeqx as dfx
from diffeqx._adjoint.base import while_loop_of_kind


def _initial_state():
    return {
        "x": jnp.array([1.0, -0.5]),  # an array: kept as it is
        "t": jnp.asarray(0.0),  # float64 scalars: packed together
        "scale": jnp.asarray(1.5),
        "t32": jnp.asarray(0.25, jnp.float32),  # its own float32 vector
        "flag": jnp.asarray(False),  # integers and booleans: one integer vector
        "code": jnp.asarray(3, jnp.int32),
        "count": jnp.asarray(0),  # weakly typed, as a counter started from 0
        "steps": jnp.asarray(0, jnp.int64),
        "key": jax.random.key(0),  # a key: kept as it is
        "out": jnp.zeros(6),  # a write-once buffer
    }


def _cond(s):
    return s["count"] < 6


def _body(s):
    x = s["x"] * s["scale"] * jnp.cos(s["t"]) + jnp.sin(s["x"])
    key, _ = jax.random.split(s["key"])
    return {
        "x": x,
        "t": s["t"] + 0.1,
        "scale": s["scale"] * 0.9,
        "t32": s["t32"] * jnp.float32(2),
        "flag": s["flag"] | (s["count"] == 2),
        "code": s["code"] + jnp.where(s["flag"], 1, 0).astype(jnp.int32),
        "count": s["count"] + 1,
        "steps": s["steps"] + 2,
        "key": key,
        "out": s["out"].at[s["count"]].set(jnp.sum(x)),
    }


def _buffers(s):
    return s["out"]


def _run(loop, x0):
    state = dict(_initial_state(), x=x0)
    return loop(_cond, _body, state, max_steps=16, buffers=_buffers)


def _plain(cond, body, init, *, max_steps, buffers):
    del max_steps, buffers
    return jax.lax.while_loop(cond, body, init)


def test_packed_loop_gives_the_plain_loop_values_dtypes_and_weak_types():
    x0 = jnp.array([1.0, -0.5])
    packed = jax.jit(
        lambda x: _run(while_loop_of_kind("checkpointed", pack_scalars=True), x)
    )(x0)
    plain = jax.jit(lambda x: _run(_plain, x))(x0)
    for name in plain:
        a, b = packed[name], plain[name]
        if name == "key":
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert a.dtype == b.dtype, name
        assert jax.typeof(a).weak_type == jax.typeof(b).weak_type, name
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_the_checkpointed_loop_is_handed_one_vector_per_kind(monkeypatch):
    handed = []
    real = eqxi.while_loop

    def recording(cond, body, init, **kwargs):
        handed.append(init)
        return real(cond, body, init, **kwargs)

    monkeypatch.setattr(eqxi, "while_loop", recording)
    jax.jit(lambda x: _run(while_loop_of_kind("checkpointed", pack_scalars=True), x))(
        jnp.ones(2)
    )
    (carry,) = handed
    vectors, others, buffers = carry
    # float64 (t, scale), float32 (t32) is alone so stays as it is, and one
    # integer vector for flag, code, count and steps.
    assert sorted((v.dtype.name, v.shape) for v in vectors) == [
        ("float64", (2,)),
        ("int64", (4,)),
    ]
    assert len(buffers) == 1 and buffers[0].shape == (6,)
    assert len(others) == 3  # x, t32 and the key


def test_packed_loop_gradient_matches_finite_differences():
    def loss(x0):
        return jnp.sum(
            _run(while_loop_of_kind("checkpointed", pack_scalars=True), x0)["out"] ** 2
        )

    x0 = jnp.array([0.3, -0.7])
    grad = jax.jit(jax.grad(loss))(x0)
    loss = jax.jit(loss)
    eps = 1e-6
    for i in range(2):
        e = jnp.zeros(2).at[i].set(eps)
        fd = (loss(x0 + e) - loss(x0 - e)) / (2 * eps)
        np.testing.assert_allclose(grad[i], fd, rtol=1e-6)


def test_solve_statistics_keep_their_types_under_reverse_mode():
    """The counters of a solve come out of the packed loop with the dtype and weak
    type they have from the unpacked forward loop."""

    def solve(y0):
        return dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: -y),
            dfx.Tsit5(),
            0.0,
            1.0,
            0.1,
            y0,
            saveat=dfx.SaveAt(ts=jnp.linspace(0.0, 1.0, 5)),
            stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-6),
        )

    y0 = jnp.array([1.0, 2.0])
    forward = jax.jit(solve)(y0)

    def loss(y0):
        sol = solve(y0)
        return jnp.sum(sol.ys), sol

    (_, reverse), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(y0)
    np.testing.assert_allclose(grad, np.exp(-np.linspace(0.0, 1.0, 5)).sum(), 1e-5)
    # Under reverse mode the saves are interpolated after the loop, batched over
    # the requested times, where the stages combine by a matrix product rather
    # than written-out products: the same values to the last bit or one unit in it.
    np.testing.assert_allclose(reverse.ys, forward.ys, rtol=4e-16, atol=0)
    assert reverse.result == forward.result
    for name, value in forward.stats.items():
        other = reverse.stats[name]
        assert other == value, name
        assert other.dtype == value.dtype, name
        assert jax.typeof(other).weak_type == jax.typeof(value).weak_type, name


@pytest.mark.parametrize(
    "dtype", [pytest.param(jnp.float32, marks=pytest.mark.slow), jnp.float64]
)
def test_neural_ode_gradient_is_the_same_with_and_without_packing(dtype, monkeypatch):
    """The packed and unpacked checkpointed loops run the same arithmetic."""
    mlp = eqx.nn.MLP(
        2, 2, 8, 1, activation=jnp.tanh, key=jax.random.key(0), dtype=dtype
    )

    def loss(mlp, y0):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: args(y)),
            dfx.Tsit5(),
            0.0,
            2.0,
            0.1,
            y0,
            args=mlp,
            saveat=dfx.SaveAt(ts=jnp.linspace(0.0, 2.0, 7, dtype=dtype)),
            stepsize_controller=dfx.PIDController(rtol=1e-5, atol=1e-5),
        )
        return jnp.sum(sol.ys**2)

    y0 = jnp.array([0.5, -1.0], dtype)
    packed = eqx.filter_jit(eqx.filter_grad(loss))(mlp, y0)

    from diffeqx._adjoint import base

    monkeypatch.setattr(base, "_PackingPlan", _NeverPack)
    unpacked = eqx.filter_jit(eqx.filter_grad(loss))(mlp, y0)
    for a, b in zip(jtu.tree_leaves(packed), jtu.tree_leaves(unpacked), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _NeverPack:
    @staticmethod
    def of(init_val, buffers):
        return None
