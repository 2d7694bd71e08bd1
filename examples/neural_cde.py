"""Neural controlled differential equation: is a spiral turning clockwise or not?

Each series is a two-dimensional spiral observed at irregular, random times, with some
observations missing (NaN). The series is turned into a continuous path X(t) of
(time, x, y) by Hermite cubic interpolation with backward differences, which skips
the missing values; a neural CDE

    h(t0) = A X(t0),    dh(t) = f_theta(h(t)) dX(t),    label = sigmoid(w . h(t1))

then reads the whole path, with `f_theta` an MLP returning a (hidden x channels)
matrix. Batches are handled with `jax.vmap`: every path, and every solve, is built for
one series.

Run with:  python examples/neural_cde.py      (about half a minute on a laptop CPU)
"""

import argparse
import os
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import diffeqx as dfx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _adam import adam  # noqa: E402

DTYPE = jnp.float32  # explicit, so the example behaves alike with or without x64
SPEED = 2.0  # angular speed of the spirals (radians per unit time)
DECAY = 0.3  # their radius decays as exp(-DECAY t)


# ---- data -----------------------------------------------------------------------------


def make_spirals(key, num_series: int, length: int = 64, missing: float = 0.1):
    """Spirals observed at `length` random times in [0, 4pi], half of them clockwise.

    Returns `ts` of shape (num_series, length), `ys` of shape
    (num_series, length, 3) holding (t, x, y) with NaN for missing x/y values, and
    `labels` (1.0 for clockwise)."""
    key_ts, key_phase, key_label, key_noise, key_missing = jr.split(key, 5)
    span = 4 * jnp.pi
    # Irregular times: random gaps between consecutive observations.
    gaps = jr.uniform(key_ts, (num_series, length - 1), DTYPE, minval=0.2, maxval=1.0)
    ts = jnp.concatenate([jnp.zeros((num_series, 1), DTYPE), jnp.cumsum(gaps, 1)], 1)
    ts = span * ts / ts[:, -1:]
    labels = jr.bernoulli(key_label, 0.5, (num_series,)).astype(DTYPE)
    direction = 1 - 2 * labels  # clockwise: -1
    phase = jr.uniform(key_phase, (num_series, 1), DTYPE) * 2 * jnp.pi
    angle = direction[:, None] * SPEED * ts + phase
    radius = jnp.exp(-DECAY * ts)
    xy = radius[..., None] * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=-1)
    xy = xy + 0.05 * jr.normal(key_noise, xy.shape, DTYPE)
    # Missing observations: never at the first time, so every path has a start.
    drop = jr.bernoulli(key_missing, missing, xy.shape).at[:, 0].set(False)
    xy = jnp.where(drop, jnp.nan, xy)
    # Time is a channel too, scaled to the size of the spatial channels.
    ys = jnp.concatenate([ts[..., None] / 4, xy], axis=-1)
    return ts, ys, labels


def to_paths(ts, ys):
    """Cubic coefficients for a batch of series: `jax.vmap` over the series."""
    coefficients = lambda t, y: dfx.backward_hermite_coefficients(
        t, y, fill_forward_nans_at_end=True
    )
    return jax.vmap(coefficients)(ts, ys)


# ---- model ----------------------------------------------------------------------------


class MatrixField(eqx.Module):
    """f(h): an MLP whose output is reshaped to a (hidden, channels) matrix."""

    mlp: eqx.nn.MLP
    hidden: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)

    def __init__(self, hidden, channels, width, depth, *, key):
        self.hidden, self.channels = hidden, channels
        self.mlp = eqx.nn.MLP(
            hidden,
            hidden * channels,
            width,
            depth,
            activation=jax.nn.softplus,
            final_activation=jnp.tanh,
            dtype=DTYPE,
            key=key,
        )

    def __call__(self, t, h, args):
        return self.mlp(h).reshape(self.hidden, self.channels)


class NeuralCDE(eqx.Module):
    initial: eqx.nn.Linear
    field: MatrixField
    readout: eqx.nn.Linear

    def __init__(self, channels=3, hidden=8, width=128, depth=1, *, key):
        key_initial, key_field, key_readout = jr.split(key, 3)
        self.initial = eqx.nn.Linear(channels, hidden, dtype=DTYPE, key=key_initial)
        self.field = MatrixField(hidden, channels, width, depth, key=key_field)
        self.readout = eqx.nn.Linear(hidden, "scalar", dtype=DTYPE, key=key_readout)

    def __call__(self, ts, coeffs):
        """The logit that one series (times `ts`, cubic `coeffs`) is clockwise."""
        control = dfx.CubicInterpolation(ts, coeffs)
        max_step = (ts[-1] - ts[0]) / 32
        sol = dfx.diffeqsolve(
            dfx.ControlTerm(self.field, control),
            dfx.Tsit5(),
            t0=ts[0],
            t1=ts[-1],
            dt0=max_step,
            y0=self.initial(control.evaluate(ts[0])),
            # A Runge-Kutta step of a CDE sees only the control's increment over the
            # step, so its error estimate cannot tell how much the path turns within
            # the step: cap the step, so that the solve follows the spiral.
            stepsize_controller=dfx.PIDController(rtol=1e-3, atol=1e-5, dtmax=max_step),
            max_steps=256,
        )
        return self.readout(sol.ys[-1])


# ---- training -------------------------------------------------------------------------


def loss_and_accuracy(model, ts, coeffs, labels):
    logits = jax.vmap(model)(ts, coeffs)
    # Binary cross-entropy, written stably in terms of the logits.
    loss = jnp.mean(jax.nn.softplus(logits) - labels * logits)
    accuracy = jnp.mean((logits > 0) == (labels > 0.5))
    return loss, accuracy


def train(model, ts, coeffs, labels, *, steps, batch_size, learning_rate, key, log):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    init, update = adam(learning_rate)
    opt_state = init(params)

    @eqx.filter_jit
    def train_step(params, opt_state, batch):
        def loss(params):
            return loss_and_accuracy(eqx.combine(params, static), *batch)

        (value, accuracy), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = update(grads, opt_state)
        return eqx.apply_updates(params, updates), opt_state, value, accuracy

    num_series = ts.shape[0]
    for step in range(steps):
        key, subkey = jr.split(key)
        index = jr.choice(subkey, num_series, (batch_size,), replace=False)
        batch = (
            ts[index],
            jax.tree.map(lambda c, i=index: c[i], coeffs),
            labels[index],
        )
        params, opt_state, value, accuracy = train_step(params, opt_state, batch)
        if log and (step % 20 == 0 or step == steps - 1):
            print(
                f"step {step:4d}  loss {float(value):.4f}  batch accuracy {float(accuracy):.2f}"
            )
    return eqx.combine(params, static)


def main(
    num_train=256,
    num_test=256,
    steps=100,
    batch_size=32,
    learning_rate=1e-2,
    seed=0,
    log=True,
):
    """Trains a neural CDE; returns its test accuracy and the wall time taken."""
    start = time.perf_counter()
    key_data, key_test, key_model, key_train = jr.split(jr.key(seed), 4)
    ts, ys, labels = make_spirals(key_data, num_train)
    test_ts, test_ys, test_labels = make_spirals(key_test, num_test)
    coeffs, test_coeffs = to_paths(ts, ys), to_paths(test_ts, test_ys)
    model = NeuralCDE(key=key_model)
    model = train(
        model,
        ts,
        coeffs,
        labels,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        key=key_train,
        log=log,
    )
    evaluate = eqx.filter_jit(loss_and_accuracy)
    test_loss, test_accuracy = evaluate(model, test_ts, test_coeffs, test_labels)
    seconds = time.perf_counter() - start
    if log:
        print(
            f"test loss {float(test_loss):.4f}  test accuracy {float(test_accuracy):.3f}"
            f"  ({num_train} training series, {steps} steps, {seconds:.1f} s)"
        )
    return {
        "accuracy": float(test_accuracy),
        "loss": float(test_loss),
        "seconds": seconds,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    main(steps=options.steps, seed=options.seed)
