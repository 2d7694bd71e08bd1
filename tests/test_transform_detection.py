"""How the default adjoint reads the JAX transformations a solve is traced under.

`diffeqx._transforms` reads JAX's trace context (JAX has no public API for it), and
`RecursiveCheckpointAdjoint` chooses its loop from the result. Tested here: what is
detected under each transformation, which loop each choice leads to and that its
derivatives are right (against the closed form of `dy/dt = -a y`), that a JAX whose
internals differ makes it fail loudly (never guess), and that a forward-mode
derivative reaching the reverse-only loop says what to do.
"""

import types

import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import diffeqx as dfx
import diffeqx._adjoint.checkpoint as checkpoint_module
from diffeqx import _transforms
from diffeqx._adjoint.reverse_only import ForwardModeError
from diffeqx._transforms import TransformDetectionError, active_transforms

X = jnp.array(0.7)


def _shard_map(f):
    mesh = jax.make_mesh((1,), ("i",))
    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:  # JAX < 0.6
        from jax.experimental.shard_map import shard_map
    return shard_map(f, mesh=mesh, in_specs=PartitionSpec(), out_specs=PartitionSpec())


def _scan(f):
    return lambda x: lax.scan(lambda c, _: (f(c), None), x, None, length=2)[0]


def _cond(f):
    return lambda x: lax.cond(x > 0, f, lambda z: f(-z), x)


def _jvp(f):
    return lambda x: jax.jvp(f, (x,), (jnp.ones_like(x),))[1]


def _linearize(f):
    return lambda x: jax.linearize(f, x)[1](jnp.ones_like(x))


def _vmap(f):
    return lambda x: jax.vmap(f)(jnp.stack([x, 2 * x]))


# name: (wrap the scalar function `f`, the levels seen inside, innermost first)
TRANSFORMS = {
    "none": (lambda f: lambda x: f(x), []),
    "jit": (jax.jit, []),
    "vmap": (_vmap, ["batch"]),
    "grad": (jax.grad, ["reverse"]),
    "vjp": (lambda f: lambda x: jax.vjp(f, x)[1](jnp.ones_like(x)), ["reverse"]),
    "jvp": (_jvp, ["forward"]),
    "jacfwd": (jax.jacfwd, ["forward", "batch"]),
    "linearize": (_linearize, ["linearize"]),
    "hessian": (jax.hessian, ["reverse", "forward", "batch"]),
    "grad-of-grad": (lambda f: jax.grad(jax.grad(f)), ["reverse", "reverse"]),
    "grad-of-jit": (lambda f: jax.grad(jax.jit(f)), ["reverse"]),
    "jvp-of-jit": (lambda f: _jvp(jax.jit(f)), ["forward"]),
    "vmap-of-grad": (lambda f: _vmap(jax.grad(f)), ["reverse", "batch"]),
    "grad-of-scan": (lambda f: jax.grad(_scan(f)), ["reverse"]),
    "jvp-of-cond": (lambda f: _jvp(_cond(f)), ["forward"]),
    "grad-of-checkpoint": (lambda f: jax.grad(jax.checkpoint(f)), ["reverse"]),
    "shard_map": (_shard_map, []),
    "jit-of-shard_map": (lambda f: jax.jit(_shard_map(f)), []),
    "grad-of-shard_map": (lambda f: jax.grad(_shard_map(f)), ["reverse"]),
    "jvp-of-shard_map": (lambda f: _jvp(_shard_map(f)), ["forward"]),
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_active_transforms_names_each_transformation(name):
    wrap, expected = TRANSFORMS[name]
    seen = []

    def probe(x):  # a fresh function each time, so that no trace is reused
        seen.append(active_transforms(strict=True))
        return jnp.sin(x)

    wrap(probe)(X)
    assert seen, "the function was never traced"
    assert all(levels == expected for levels in seen), seen


# ---------------------------------------------------------------------------------
# The loop chosen under each transformation, and its derivative
# ---------------------------------------------------------------------------------


def _solve(a):
    """y(1) for dy/dt = -a y, y(0) = 1: exp(-a)."""
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, a: -a * y),
        dfx.Tsit5(),
        0.0,
        1.0,
        None,
        jnp.ones(()),
        a,
        stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-10),
        max_steps=64,
    )
    return sol.ys[-1]


# name: (outer loop kind chosen, the derivative's closed form at a)
LOOPS = {
    "none": ("checkpointed", lambda a: np.exp(-a)),
    "grad": ("checkpointed", lambda a: -np.exp(-a)),
    "jvp": ("lax", lambda a: -np.exp(-a)),
    "jacfwd": ("lax", lambda a: -np.exp(-a)),
    "linearize": ("bounded", lambda a: -np.exp(-a)),
    "vmap": ("checkpointed", lambda a: np.exp(-np.array([a, 2 * a]))),
    "hessian": ("checkpointed", lambda a: np.exp(-a)),
    "grad-of-grad": ("bounded", lambda a: np.exp(-a)),
    "grad-of-scan": ("checkpointed", lambda a: np.exp(-a) * np.exp(-np.exp(-a))),
    "jvp-of-cond": ("lax", lambda a: -np.exp(-a)),
    "grad-of-checkpoint": ("checkpointed", lambda a: -np.exp(-a)),
    "jit-of-shard_map": ("checkpointed", lambda a: np.exp(-a)),
    "jvp-of-shard_map": ("lax", lambda a: -np.exp(-a)),
    # Not jitted: `jax.jit(jax.grad(shard_map(...)))` through the checkpointed loop
    # fails inside Equinox (its closure conversion sees the integer loop counters
    # gain a sharding annotation); Diffrax fails the same way. Op by op it works, but
    # slowly.
    "grad-of-shard_map": ("checkpointed", lambda a: -np.exp(-a)),
}
EAGER = {"grad-of-shard_map"}
# What these detect is checked for each in test_active_transforms_names_each_...; the
# loop chosen for what they detect, and its derivative, by "grad" (reverse) and "jvp"
# (forward) in the default run. Each is a compilation of several seconds: `slow`.
SAME_LOOP_AS_GRAD_OR_JVP = {
    "grad-of-scan",
    "grad-of-checkpoint",
    "jacfwd",
    "jvp-of-cond",
    "jvp-of-shard_map",
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            n,
            marks=[pytest.mark.slow] * (n in EAGER or n in SAME_LOOP_AS_GRAD_OR_JVP),
        )
        for n in LOOPS
    ],
)
def test_default_adjoint_loop_choice_and_derivative(name, monkeypatch):
    kinds = []
    original = checkpoint_module.while_loop_of_kind

    def recording(kind, **kwargs):
        kinds.append(kind)
        return original(kind, **kwargs)

    monkeypatch.setattr(checkpoint_module, "while_loop_of_kind", recording)
    wrap, _ = TRANSFORMS[name]
    expected_kind, closed_form = LOOPS[name]
    # Jitted outermost (the transformations stay visible inside), which also keeps
    # the solve from running op by op.
    value = (wrap if name in EAGER else lambda f: jax.jit(wrap(f)))(_solve)(X)
    assert kinds and kinds[0] == expected_kind, kinds
    np.testing.assert_allclose(value, closed_form(float(X)), rtol=1e-7)


def test_linearize_result_can_be_transposed():
    # Linear functions from `jax.linearize` are transposed by e.g. lineax's operators:
    # the loop chosen for it supports both modes.
    def transposed_derivative(a):
        _, linear = jax.linearize(_solve, a)
        return jax.linear_transpose(linear, a)(jnp.ones(()))[0]

    transposed = jax.jit(transposed_derivative)(X)
    np.testing.assert_allclose(transposed, -np.exp(-float(X)), rtol=1e-7)


# ---------------------------------------------------------------------------------
# Forward mode reaching the checkpointed loop (a solve traced without derivatives)
# ---------------------------------------------------------------------------------

FORWARD_AFTER_JIT = {
    "jvp": lambda f: _jvp(f)(X),
    "jacfwd": lambda f: jax.jacfwd(f)(X),
    "linearize": lambda f: jax.linearize(f, X)[1](jnp.ones(())),
}


@pytest.mark.parametrize(
    # The same error for every forward-mode transformation: "jvp" by default.
    "name",
    [
        pytest.param(n, marks=() if n == "jvp" else (pytest.mark.slow,))
        for n in FORWARD_AFTER_JIT
    ],
)
def test_forward_mode_after_jit_says_what_to_do(name):
    solve = jax.jit(lambda a: _solve(a))
    solve(X)  # traced (and cached) without derivatives: the checkpointed loop
    with pytest.raises(ForwardModeError) as info:
        FORWARD_AFTER_JIT[name](solve)
    message = str(info.value)
    assert "RecursiveCheckpointAdjoint" in message
    assert "jax.jit" in message
    assert "ForwardMode()" in message and "DirectAdjoint()" in message
    if name == "jvp":
        # The same function still differentiates in reverse mode.
        grad = jax.grad(solve)(X)
        np.testing.assert_allclose(grad, -np.exp(-float(X)), rtol=1e-7)


def _solve_with_tangent_in(which, solver, controller):
    """A solve whose only differentiated input is `which` (args, t1 or save times):
    the initial state does not depend on it (Euler has no solver state)."""

    def solve(x):
        a = x if which == "args" else X
        t1 = x + 0.3 if which == "t1" else 1.0
        ts = jnp.stack([0.5 * x, t1]) if which == "ts" else jnp.array([0.35, 1.0])
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, a: -a * y),
            solver,
            0.0,
            t1,
            0.1,
            jnp.ones(()),
            a,
            saveat=dfx.SaveAt(ts=ts),
            stepsize_controller=controller,
            max_steps=64,
        )
        return sol.ys[0]

    return solve


@pytest.mark.parametrize("which", ["args", "t1", "ts"])
@pytest.mark.parametrize(
    # With constant steps the same in the slow run.
    "adaptive",
    [
        pytest.param(False, id="euler", marks=pytest.mark.slow),
        pytest.param(True, id="tsit5-pid"),
    ],
)
def test_forward_mode_error_when_only_a_closed_over_input_carries_a_tangent(
    which, adaptive
):
    if adaptive:
        method = (dfx.Tsit5(), dfx.PIDController(rtol=1e-8, atol=1e-8))
    else:
        method = (dfx.Euler(), dfx.ConstantStepSize())
    solve = jax.jit(_solve_with_tangent_in(which, *method))
    solve(X)
    with pytest.raises(ForwardModeError, match="RecursiveCheckpointAdjoint"):
        _jvp(solve)(X)


def test_forward_mode_after_jit_works_the_ways_the_message_gives():
    expected = -np.exp(-float(X))
    # jit outside the derivative
    jvp = jax.jit(lambda a: _jvp(_solve)(a))
    np.testing.assert_allclose(jvp(X), expected, rtol=1e-7)

    # an explicit adjoint that supports forward mode, jitted and called first
    def forward(a):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, a: -a * y),
            dfx.Tsit5(),
            0.0,
            1.0,
            None,
            jnp.ones(()),
            a,
            stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-10),
            adjoint=dfx.ForwardMode(),
        )
        return sol.ys[-1]

    solve = jax.jit(forward)
    solve(X)
    np.testing.assert_allclose(_jvp(solve)(X), expected, rtol=1e-7)


# ---------------------------------------------------------------------------------
# A JAX whose internals differ: fail loudly, never guess
# ---------------------------------------------------------------------------------


def test_batch_size_multiplies_the_vmaps_around():
    seen = []

    def record(x):
        seen.append(_transforms.batch_size())
        return x

    record(jnp.ones(2))
    jax.jit(record)(jnp.ones(2))
    jax.vmap(jax.vmap(record), in_axes=1)(jnp.ones((3, 5)))
    jax.vmap(jax.grad(lambda x: jnp.sum(record(x))))(jnp.ones((4, 2)))
    jax.vmap(lambda x: lax.scan(lambda c, _: (record(c), None), x, length=2)[0])(
        jnp.ones((6, 2))
    )
    assert seen == [1, 1, 15, 4, 6]


def _rename_jit_trace(monkeypatch):
    """Stands in for a JAX whose jit tracing uses a class the detection does not
    know."""

    class Renamed:
        pass

    fake_pe = types.SimpleNamespace(
        DynamicJaxprTrace=Renamed, JaxprTrace=_transforms._pe.JaxprTrace
    )
    monkeypatch.setattr(_transforms, "_pe", fake_pe)


def test_batch_size_is_none_where_it_cannot_tell(monkeypatch):
    _rename_jit_trace(monkeypatch)
    seen = []
    jax.jit(lambda x: seen.append(_transforms.batch_size()) or x)(jnp.ones(2))
    assert seen == [None]


def _assert_detection_error(info, what):
    message = str(info.value)
    assert f"JAX {jax.__version__}" in message
    assert what in message
    assert "DirectAdjoint()" in message


def test_missing_attribute_fails_loudly(monkeypatch):
    # A JAX whose `ad` module no longer has `JVPTrace`.
    monkeypatch.setattr(_transforms, "_ad", types.SimpleNamespace())
    with pytest.raises(TransformDetectionError) as info:
        jax.grad(_solve)(X)
    _assert_detection_error(info, "JVPTrace")
    # Without derivatives too: the solve could still be differentiated later.
    with pytest.raises(TransformDetectionError):
        _solve(X)


def test_missing_trace_context_fails_loudly(monkeypatch):
    monkeypatch.setattr(
        _transforms,
        "_core",
        types.SimpleNamespace(trace_ctx=types.SimpleNamespace()),
    )
    with pytest.raises(TransformDetectionError) as info:
        _solve(X)
    _assert_detection_error(info, "trace")


def test_unknown_trace_type_fails_loudly(monkeypatch):
    _rename_jit_trace(monkeypatch)
    with pytest.raises(TransformDetectionError) as info:
        jax.jit(lambda a: _solve(a))(X)
    _assert_detection_error(info, "DynamicJaxprTrace")


@pytest.mark.parametrize("saves", ["ts", "t1"])
def test_real_unknown_transformation_fails_loudly(saves):
    # `jax.experimental.jet` (Taylor mode) is a transformation the detection does
    # not know: it must say so rather than pick a loop (a scan of constant steps,
    # whose blocks for reverse mode depend on it, too: that leaked a tracer).
    from jax.experimental.jet import jet

    saveat = dfx.SaveAt(ts=jnp.array([0.5])) if saves == "ts" else dfx.SaveAt(t1=True)

    def solve(y0):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: -y),
            dfx.Euler(),
            0.0,
            1.0,
            0.1,
            y0,
            saveat=saveat,
        )
        return sol.ys[-1]

    with pytest.raises(TransformDetectionError) as info:
        jet(solve, (X,), ((jnp.ones(()),),))
    _assert_detection_error(info, "JetTrace")


def test_explicit_adjoint_needs_no_detection(monkeypatch):
    # The way out that the message gives works even when nothing can be read, and
    # the speed heuristics that also read the trace do not fail.
    monkeypatch.setattr(_transforms, "_ad", types.SimpleNamespace())
    assert not _transforms.is_batched()
    assert _transforms.differentiation_levels() == []

    def loss(a):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, a: -a * y),
            dfx.Tsit5(),
            0.0,
            1.0,
            None,
            jnp.ones(()),
            a,
            stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-10),
            adjoint=dfx.DirectAdjoint(),
            max_steps=64,
        )
        return sol.ys[-1]

    grad = jax.jit(jax.grad(loss))(X)
    np.testing.assert_allclose(grad, -np.exp(-float(X)), rtol=1e-7)


class _FakeTrace:
    def __init__(self, parent):
        self.parent_trace = parent


def _with_fake_chain(monkeypatch, chain, ad_attrs):
    """Stands in for JAX's trace context: `chain` is a list of trace classes,
    innermost first."""
    trace = None
    for cls in reversed(chain):
        trace = cls(trace) if cls is not None else None
    root = types.SimpleNamespace(trace=trace)
    monkeypatch.setattr(
        _transforms,
        "_core",
        types.SimpleNamespace(trace_ctx=root, EvalTrace=_FakeEval),
    )
    monkeypatch.setattr(_transforms, "_ad", types.SimpleNamespace(**ad_attrs))
    monkeypatch.setattr(
        _transforms,
        "_batching",
        types.SimpleNamespace(BatchTrace=_FakeBatch),
    )
    monkeypatch.setattr(
        _transforms,
        "_pe",
        types.SimpleNamespace(DynamicJaxprTrace=_FakeStage, JaxprTrace=_FakePartial),
    )


class _FakeEval(_FakeTrace):
    pass


class _FakeStage(_FakeTrace):
    pass


class _FakePartial(_FakeTrace):
    pass


class _FakeBatch(_FakeTrace):
    pass


class _FakeJVP(_FakeTrace):
    pass


class _FakeLinearizeWithoutIsVjp(_FakeTrace):
    pass


def test_older_jax_reverse_mode_is_jvp_over_partial_eval(monkeypatch):
    # Before direct linearisation, `jax.grad` was `jax.jvp` staged for partial
    # evaluation: a JVPTrace whose parent is a JaxprTrace.
    _with_fake_chain(
        monkeypatch,
        [_FakeJVP, _FakePartial, _FakeBatch, _FakeJVP, _FakeEval],
        dict(JVPTrace=_FakeJVP),
    )
    assert active_transforms(strict=True) == ["reverse", "batch", "forward"]


def test_linearize_trace_without_is_vjp_counts_as_reverse(monkeypatch):
    _with_fake_chain(
        monkeypatch,
        [_FakeLinearizeWithoutIsVjp, _FakeEval],
        dict(JVPTrace=_FakeJVP, LinearizeTrace=_FakeLinearizeWithoutIsVjp),
    )
    assert active_transforms(strict=True) == ["reverse"]


def test_derivative_trace_without_parent_fails_loudly(monkeypatch):
    class Orphan(_FakeJVP):
        def __init__(self, parent):
            pass

    _with_fake_chain(monkeypatch, [Orphan], dict(JVPTrace=_FakeJVP))
    with pytest.raises(TransformDetectionError, match="parent_trace"):
        active_transforms(strict=True)
    assert active_transforms() == ["forward"]
