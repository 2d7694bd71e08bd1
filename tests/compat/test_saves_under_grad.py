"""`SaveAt(ts=...)` under `jax.grad`: diffeqx interpolates the requested times after the
loop (deferred saving), Diffrax inside each step; the same call gives the same saved
values and the same gradients, with the default adjoint and with `DirectAdjoint`, and
under `vmap`."""

import pytest

diffrax = pytest.importorskip("diffrax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import diffeqx  # noqa: E402

TS = jnp.linspace(0.0, 4.0, 21)


def _loss(lib, adjoint_name, params, y0):
    def field(t, y, args):
        a, b = args
        return jnp.stack([a * y[0] - y[0] * y[1], -b * y[1] + y[0] * y[1]])

    sol = lib.diffeqsolve(
        lib.ODETerm(field),
        lib.Tsit5(),
        0.0,
        4.0,
        0.05,
        y0,
        args=params,
        saveat=lib.SaveAt(t0=True, ts=TS),
        stepsize_controller=lib.PIDController(rtol=1e-7, atol=1e-9),
        adjoint=getattr(lib, adjoint_name)(),
        max_steps=512,
    )
    return jnp.sum(jnp.sin(sol.ys)), (sol.ts, sol.ys, sol.stats["num_steps"])


# By default the batched comparison below (the default adjoint, under vmap).
@pytest.mark.slow
@pytest.mark.parametrize(
    "adjoint_name", ["RecursiveCheckpointAdjoint", "DirectAdjoint"]
)
def test_saves_and_gradients_match_diffrax(adjoint_name):
    params, y0 = jnp.array([1.5, 1.0]), jnp.array([2.0, 1.0])
    out = {}
    for lib in (diffeqx, diffrax):
        vg = jax.jit(
            jax.value_and_grad(
                lambda p, y, lib=lib: _loss(lib, adjoint_name, p, y),
                argnums=(0, 1),
                has_aux=True,
            )
        )
        out[lib.__name__] = vg(params, y0)
    (v1, (ts1, ys1, n1)), g1 = out["diffeqx"]
    (v2, (ts2, ys2, n2)), g2 = out["diffrax"]
    assert int(n1) == int(n2)
    np.testing.assert_array_equal(ts1, ts2)
    np.testing.assert_allclose(ys1, ys2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(v1, v2, rtol=1e-12)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_batched_saves_and_gradients_match_diffrax():
    params = jnp.array([1.5, 1.0])
    y0s = jnp.array([[2.0, 1.0], [1.0, 0.5], [3.0, 2.0]])
    out = {}
    for lib in (diffeqx, diffrax):

        def loss(p, lib=lib):
            values, (_, ys, _) = jax.vmap(
                lambda y: _loss(lib, "RecursiveCheckpointAdjoint", p, y)
            )(y0s)
            return jnp.sum(values), ys

        out[lib.__name__] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    (_, ys1), g1 = out["diffeqx"]
    (_, ys2), g2 = out["diffrax"]
    np.testing.assert_allclose(ys1, ys2, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(g1, g2, rtol=1e-9, atol=1e-12)
