"""SDE solves through Diffrax and diffeqx on the same (deterministic) driving path:
Euler, Heun, Euler–Heun, Milstein (Itô and Stratonovich), reversible Heun and
`HalfSolver`, with constant and adaptive steps. Their Brownian trees differ by design,
so `tests/compat/_sde_paths.py` supplies one path both accept."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx

from ._counting import Counted
from ._sde_paths import polynomial_path

SOLVERS = {
    "Euler": lambda lib: lib.Euler(),
    "Heun": lambda lib: lib.Heun(),
    "EulerHeun": lambda lib: lib.EulerHeun(),
    "ItoMilstein": lambda lib: lib.ItoMilstein(),
    "StratonovichMilstein": lambda lib: lib.StratonovichMilstein(),
    "ReversibleHeun": lambda lib: lib.ReversibleHeun(),
    "HalfSolver(EulerHeun)": lambda lib: lib.HalfSolver(lib.EulerHeun()),
}
# (Heun adapts on SDEs with its embedded Euler estimate, error order
# strong_order + 1/2 = 1, as in Diffrax.)
ADAPTIVE = ("Heun", "ReversibleHeun", "HalfSolver(EulerHeun)")


def _terms(lib, noise):
    if noise == "scalar":
        path = polynomial_path(lib, ())
        return lib.MultiTerm(
            lib.ODETerm(lambda t, y, args: -0.5 * y + jnp.sin(t)),
            lib.ControlTerm(lambda t, y, args: 0.8 * jnp.cos(y), path),
        ), jnp.asarray(0.7)
    path = polynomial_path(lib, (2,), seed=1)

    def diffusion(t, y, args):
        return jnp.stack(
            [
                jnp.stack([jnp.sin(y[0]), 0.3 * y[1]]),
                jnp.stack([0.2 * y[0], jnp.cos(y[1])]),
            ]
        )

    return lib.MultiTerm(
        lib.ODETerm(lambda t, y, args: -y + 0.1 * y[::-1]),
        lib.ControlTerm(diffusion, path),
    ), jnp.asarray([0.7, -0.4])


def _solve(lib, solver_name, noise, adaptive):
    terms, y0 = _terms(lib, noise)
    controller = (
        lib.PIDController(rtol=1e-2, atol=1e-2) if adaptive else lib.ConstantStepSize()
    )
    sol = lib.diffeqsolve(
        terms,
        SOLVERS[solver_name](lib),
        0.0,
        2.0,
        0.05,
        y0,
        saveat=lib.SaveAt(steps=True),
        stepsize_controller=controller,
        max_steps=1024,
    )
    num = int(sol.stats["num_steps"])
    return dict(
        ts=np.asarray(sol.ts)[:num],
        ys=np.asarray(sol.ys)[:num],
        num_steps=num,
        num_accepted_steps=int(sol.stats["num_accepted_steps"]),
        num_rejected_steps=int(sol.stats["num_rejected_steps"]),
        successful=bool(sol.result == lib.RESULTS.successful),
    )


# Scalar noise is a special case of the general noise below (slow-marked). The
# adaptive solvers run by default with adaptive steps, with constant ones in the slow
# run.
CASES = [
    pytest.param(name, "general", False, marks=pytest.mark.slow)
    if name in ADAPTIVE
    else (name, "general", False)
    for name in SOLVERS
]
CASES += [(name, "general", True) for name in ADAPTIVE]
CASES += [
    pytest.param(name, "scalar", adaptive, marks=pytest.mark.slow)
    for name in SOLVERS
    for adaptive in ((False, True) if name in ADAPTIVE else (False,))
]


@pytest.mark.parametrize("solver_name, noise, adaptive", CASES)
def test_same_solve_as_diffrax(solver_name, noise, adaptive):
    with jax.numpy_dtype_promotion("standard"):
        theirs = _solve(diffrax, solver_name, noise, adaptive)
    ours = _solve(diffeqx, solver_name, noise, adaptive)
    assert ours["successful"] and theirs["successful"]
    for key in ("num_steps", "num_accepted_steps", "num_rejected_steps"):
        assert ours[key] == theirs[key], (key, ours[key], theirs[key])
    if adaptive:
        assert ours["num_rejected_steps"] > 0  # the controller is exercised
    np.testing.assert_allclose(ours["ts"], theirs["ts"], rtol=1e-12)
    np.testing.assert_allclose(ours["ys"], theirs["ys"], rtol=1e-11, atol=1e-12)


def _counted_solve(lib, solver_name):
    terms, y0 = _terms(lib, "general")
    drift, diffusion = terms.terms
    counted_drift = Counted(drift.vector_field)
    counted_diffusion = Counted(diffusion.vector_field)
    terms = lib.MultiTerm(
        lib.ODETerm(counted_drift),
        lib.ControlTerm(counted_diffusion, diffusion.control),
    )
    sol = jax.jit(
        lambda y: (
            lib.diffeqsolve(terms, SOLVERS[solver_name](lib), 0.0, 2.0, 0.05, y).ys
        )
    )(y0)
    jax.effects_barrier()
    return np.asarray(sol), (counted_drift.count, counted_diffusion.count)


@pytest.mark.parametrize("solver_name", ["ItoMilstein", "StratonovichMilstein"])
def test_no_more_evaluations_than_diffrax(solver_name):
    # diffeqx's ItoMilstein evaluated the diffusion four times a step (its product
    # with dW, a Jacobian-vector product along it, and the columns and their
    # Jacobian-vector products for the Itô term); Diffrax's twice.
    with jax.numpy_dtype_promotion("standard"):
        theirs, their_counts = _counted_solve(diffrax, solver_name)
    ours, our_counts = _counted_solve(diffeqx, solver_name)
    assert our_counts[0] <= their_counts[0], (our_counts, their_counts)
    assert our_counts[1] <= their_counts[1], (our_counts, their_counts)
    np.testing.assert_allclose(ours, theirs, rtol=1e-11, atol=1e-12)


def test_spark_revisiting_rejected_steps_matches_diffrax():
    # `ClipStepSizeController(store_rejected_steps=...)` on non-commutative noise:
    # the same accepted and rejected steps as Diffrax. (A rejected step that ended
    # on a remembered time used to be remembered twice, which later asked for a
    # step of length zero and ended the solve with `dt_min_reached`.)
    a = jnp.array([[0.0, 0.7], [-0.7, 0.0]])
    b = jnp.array([[0.7, 0.0], [0.0, -0.7]])
    out = {}
    for lib in (diffrax, diffeqx):
        path = polynomial_path(lib, (2,), lib.SpaceTimeLevyArea, seed=1)
        terms = lib.MultiTerm(
            lib.ODETerm(lambda t, y, args: -0.5 * y + 0.2 * jnp.sin(y)),
            lib.ControlTerm(lambda t, y, args: jnp.stack([a @ y, b @ y], -1), path),
        )
        controller = lib.ClipStepSizeController(
            lib.PIDController(rtol=1e-2, atol=1e-2), store_rejected_steps=32
        )
        with jax.numpy_dtype_promotion("standard"):
            sol = lib.diffeqsolve(
                terms,
                lib.SPaRK(),
                0.0,
                2.0,
                0.5,
                jnp.array([1.0, 0.5]),
                stepsize_controller=controller,
                saveat=lib.SaveAt(steps=True),
                max_steps=256,
            )
        num = int(sol.stats["num_steps"])
        out[lib.__name__] = (
            num,
            int(sol.stats["num_rejected_steps"]),
            np.asarray(sol.ts)[:num],
            np.asarray(sol.ys)[:num],
        )
    ours, theirs = out["diffeqx"], out["diffrax"]
    assert ours[:2] == theirs[:2] and ours[1] > 0
    np.testing.assert_allclose(ours[2], theirs[2], rtol=1e-12)
    np.testing.assert_allclose(ours[3], theirs[3], rtol=1e-11, atol=1e-12)


def _gradient(lib, solver_name, vmapped):
    """The gradient of a loss through 40 constant steps, with respect to `y0` and a
    scale of the diffusion, on the shared path (the fixed-step path under reverse
    mode, in diffeqx); under `vmap`, over two scales."""
    terms, y0 = _terms(lib, "general")

    def loss(y0, scale):
        scaled = lib.MultiTerm(
            terms.terms[0],
            lib.ControlTerm(
                lambda t, y, args: scale * terms.terms[1].vector_field(t, y, args),
                terms.terms[1].control,
            ),
        )
        sol = lib.diffeqsolve(scaled, SOLVERS[solver_name](lib), 0.0, 2.0, 0.05, y0)
        return jnp.sum(sol.ys[-1] ** 2)

    grad = jax.grad(loss, argnums=(0, 1))
    if vmapped:
        grad = jax.vmap(grad, in_axes=(None, 0))
        return jax.jit(grad)(y0, jnp.asarray([0.9, 1.1]))
    return jax.jit(grad)(y0, jnp.asarray(0.9))


@pytest.mark.parametrize(
    "solver_name, vmapped, storage",
    [
        ("ReversibleHeun", False, "stored"),
        ("Heun", True, "blocks"),
        ("Heun", True, "states"),
        # (The other pairings repeat these checks.)
        pytest.param("ReversibleHeun", False, "blocks", marks=pytest.mark.slow),
        pytest.param("Heun", True, "stored", marks=pytest.mark.slow),
        pytest.param("ReversibleHeun", False, "states", marks=pytest.mark.slow),
    ],
)
def test_same_fixed_step_gradient_as_diffrax(
    solver_name, vmapped, storage, monkeypatch
):
    # diffeqx keeps every step's values for the backward pass when they fit its
    # bound; else every step's state, recomputing one step at a time, when those
    # fit; else recomputes blocks of steps: all give Diffrax's gradient.
    from diffeqx._adjoint import checkpoint
    from diffeqx._solve import fixed

    if storage == "blocks":
        monkeypatch.setattr(checkpoint, "_STORAGE_BYTES", 0)
    bounds, carried = [], []
    original = fixed._stored_bytes

    def stored_bytes(*args):
        bounds.append(original(*args))
        # (For "states", the values are made not to fit.)
        return float("inf") if storage == "states" else bounds[-1]

    monkeypatch.setattr(fixed, "_stored_bytes", stored_bytes)
    original_carried = fixed._carried_bytes
    monkeypatch.setattr(
        fixed,
        "_carried_bytes",
        lambda *a: carried.append(original_carried(*a)) or carried[-1],
    )
    with jax.numpy_dtype_promotion("standard"):
        theirs = _gradient(diffrax, solver_name, vmapped)
    ours = _gradient(diffeqx, solver_name, vmapped)
    if storage == "stored":
        assert len(bounds) == 1 and bounds[0] <= checkpoint._STORAGE_BYTES
        assert not carried
    elif storage == "states":
        assert len(carried) == 1 and carried[0] <= checkpoint._STORAGE_BYTES
    else:
        assert not bounds
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "kind, levy_area",
    # The tree's complex samples are also tested in tests/test_brownian.py.
    [("UnsafeBrownianPath", "SpaceTimeTimeLevyArea")]
    + [
        pytest.param(kind, area, marks=pytest.mark.slow)
        for kind, area in [
            ("VirtualBrownianTree", "SpaceTimeLevyArea"),
            ("VirtualBrownianTree", "BrownianIncrement"),
            ("VirtualBrownianTree", "SpaceTimeTimeLevyArea"),
            ("UnsafeBrownianPath", "BrownianIncrement"),
            ("UnsafeBrownianPath", "SpaceTimeLevyArea"),
        ]
    ],
)
def test_complex_brownian_paths_are_accepted_with_diffraxs_dtypes(kind, levy_area):
    # Diffrax samples complex leaves; diffeqx refused them. (Diffrax's tree fails
    # on a complex space-time-time Lévy area, which diffeqx samples.)
    shape = {
        "z": jax.ShapeDtypeStruct((3,), jnp.complex128),
        "x": jax.ShapeDtypeStruct((2,), jnp.float64),
    }
    structures = {}
    for lib in (diffeqx, diffrax):
        area = getattr(lib, levy_area)
        if kind == "VirtualBrownianTree":
            path = lib.VirtualBrownianTree(
                0.0, 1.0, 1e-3, shape, jax.random.key(0), levy_area=area
            )
        else:
            path = lib.UnsafeBrownianPath(shape, jax.random.key(0), levy_area=area)
        try:
            sample = path.evaluate(0.25, 0.75, use_levy=True)
        except ValueError:
            assert lib is diffrax and kind == "VirtualBrownianTree"
            assert levy_area == "SpaceTimeTimeLevyArea"
            continue
        structures[lib.__name__] = {
            name: jax.tree.map(lambda x: (x.shape, x.dtype), getattr(sample, name))
            for name in ("W", "H", "K")
            if hasattr(sample, name)
        }
    if "diffrax" in structures:
        assert structures["diffeqx"] == structures["diffrax"]


@pytest.mark.parametrize("kind", ["VirtualBrownianTree", "UnsafeBrownianPath"])
@pytest.mark.parametrize("jit", [False, True])
def test_brownian_queries_at_mixed_float32_and_python_times(kind, jit):
    """A float32 time next to a Python number (or a float64 array) is a query both
    libraries answer, eagerly and under `jax.jit`, with strict dtype promotion on
    (the test suite's setting): the Python number takes the array's dtype. Until
    2026-12-08 diffeqx's `UnsafeBrownianPath` raised a `TypePromotionError` here,
    working out the times' dtype from the Python number as a float64 array."""
    f32 = jnp.asarray(0.5, jnp.float32)
    pairs = [(f32, 2.0), (0.0, f32), (f32, jnp.asarray(2.0)), (0.0, 2.0)]
    samples = {}
    for lib in (diffrax, diffeqx):
        if kind == "VirtualBrownianTree":
            path = lib.VirtualBrownianTree(0.0, 2.0, 2**-3, (3,), jax.random.key(0))
        else:
            path = lib.UnsafeBrownianPath((3,), jax.random.key(0))
        evaluate = eqx.filter_jit(path.evaluate) if jit else path.evaluate
        samples[lib.__name__] = [evaluate(*pair) for pair in pairs]
    for ours, theirs in zip(samples["diffeqx"], samples["diffrax"], strict=True):
        assert (ours.shape, ours.dtype) == (theirs.shape, theirs.dtype)
        assert np.all(np.isfinite(np.asarray(ours)))
