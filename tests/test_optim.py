"""Optimizers and schedules: warmup and decay values, clipping, weight decay, config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from calm_jax.optim import OptimizerConfig, make_optimizer, schedule


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_schedule_warms_up_linearly_then_decays_to_the_final_fraction(decay):
    config = OptimizerConfig(learning_rate=2e-3, warmup_steps=10, decay=decay,
                             final_lr_fraction=0.1)
    lr = schedule(config, total_steps=110)
    np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, 1e-3, 2e-3], rtol=1e-6)
    np.testing.assert_allclose(lr(110), 2e-4, rtol=1e-5)
    # Halfway through the decay: cosine and linear both sit at the midpoint of peak and end.
    np.testing.assert_allclose(lr(60), 1.1e-3, rtol=1e-5)
    values = [float(lr(s)) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_constant_schedule_without_warmup_is_the_peak_everywhere():
    lr = schedule(OptimizerConfig(learning_rate=3e-4, decay="constant"), total_steps=50)
    np.testing.assert_allclose([lr(0), lr(25), lr(50)], [3e-4] * 3, rtol=1e-6)


def test_warmup_as_long_as_the_run_still_reaches_the_peak():
    lr = schedule(OptimizerConfig(learning_rate=1e-3, warmup_steps=20), total_steps=20)
    np.testing.assert_allclose([lr(10), lr(20)], [5e-4, 1e-3], rtol=1e-6)


def _first_update(config, grads, params):
    opt = make_optimizer(config, total_steps=100)
    updates, state = opt.update(grads, opt.init(params), params)
    return updates, state


def test_clip_norm_bounds_the_gradient_the_moments_see():
    params = {"w": jnp.ones((4,))}
    grads = {"w": jnp.full((4,), 100.0)}  # global norm 200
    config = OptimizerConfig(learning_rate=1e-2, decay="constant", clip_norm=1.0)
    _, state = _first_update(config, grads, params)
    adam = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(
        s, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1
    # mu = (1 - b1) * g after one step, with g clipped to norm 1: 0.5 per coordinate.
    np.testing.assert_allclose(adam[0].mu["w"], 0.1 * 0.5, rtol=1e-5)
    _, unclipped = _first_update(OptimizerConfig(learning_rate=1e-2, decay="constant",
                                                 clip_norm=None), grads, params)
    mu = [s for s in jax.tree.leaves(unclipped, is_leaf=lambda s: isinstance(
        s, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)][0].mu
    np.testing.assert_allclose(mu["w"], 0.1 * 100.0, rtol=1e-5)


def test_adamw_weight_decay_is_decoupled_from_the_gradient():
    params = {"w": jnp.asarray([1.0, -2.0, 4.0])}
    grads = {"w": jnp.zeros((3,))}
    config = OptimizerConfig(learning_rate=0.1, decay="constant", weight_decay=0.5)
    updates, _ = _first_update(config, grads, params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * params["w"], rtol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_each_optimizer_minimises_a_quadratic(name):
    target = jnp.arange(12.0).reshape(3, 4) / 10
    loss = lambda p: jnp.sum((p["w"] - target) ** 2)  # noqa: E731
    params = {"w": jnp.zeros((3, 4))}
    opt = make_optimizer(OptimizerConfig(name=name, learning_rate=0.05, decay="constant"),
                         total_steps=200)
    state = opt.init(params)
    start = float(loss(params))
    for _ in range(200):
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert float(loss(params)) < 0.05 * start


@pytest.mark.parametrize("field, value, message", [
    ("name", "sgd", "optimizer.name: expected 'adamw' or 'adafactor', got 'sgd'"),
    ("decay", "step", "optimizer.decay: expected 'cosine', 'linear' or 'constant', got 'step'"),
    ("learning_rate", 0.0, "optimizer.learning_rate: expected > 0, got 0.0"),
    ("warmup_steps", -1, "optimizer.warmup_steps: expected >= 0, got -1"),
    ("grad_accum_steps", 0, "optimizer.grad_accum_steps: expected a positive integer, got 0"),
    ("final_lr_fraction", 1.5, "optimizer.final_lr_fraction: expected a fraction in [0, 1], "
                               "got 1.5"),
    ("final_lr_fraction", -0.1, "optimizer.final_lr_fraction: expected a fraction in [0, 1], "
                                "got -0.1"),
    ("weight_decay", -0.01, "optimizer.weight_decay: expected >= 0, got -0.01"),
    ("b1", 1.0, "optimizer.b1: expected a value in [0, 1), got 1.0"),
    ("b2", -0.5, "optimizer.b2: expected a value in [0, 1), got -0.5"),
    ("eps", 0.0, "optimizer.eps: expected > 0, got 0.0"),
    ("clip_norm", -1.0, "optimizer.clip_norm: expected None, 0 (off) or a positive norm, "
                        "got -1.0"),
    ("skip_nonfinite", -1, "optimizer.skip_nonfinite: expected updates >= 0 (0: off), got -1"),
    ("skip_nonfinite", 1.5, "optimizer.skip_nonfinite: expected updates >= 0 (0: off), "
                            "got 1.5"),
])
def test_bad_optimizer_settings_name_the_field(field, value, message):
    with pytest.raises(ValueError) as error:
        OptimizerConfig(**{field: value})
    assert str(error.value) == message
