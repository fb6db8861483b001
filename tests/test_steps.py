"""Train and eval steps: gradients of the trained tree only, and non-finite updates skipped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax.optim import OptimizerConfig, make_optimizer, schedule
from calm_jax.steps import make_eval_step, make_train_step

VOCAB, LENGTH = 8, 5


def _forward(params, frozen, batch):
    """A bigram model: logits [batch, length, vocab] = (one_hot(inputs) @ w) * frozen scale."""
    return jax.nn.one_hot(batch["decoder_input_tokens"], VOCAB) @ params["w"] * frozen["scale"]


def _batch(seed, nan=False):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, (4, LENGTH)).astype(np.int32)
    weights = np.ones((4, LENGTH), np.float32)
    if nan:
        weights[2, 3] = np.nan
    return {"decoder_input_tokens": jnp.asarray(np.roll(tokens, 1, axis=1)),
            "decoder_target_tokens": jnp.asarray(tokens),
            "decoder_loss_weights": jnp.asarray(weights)}


def _setup(skip_nonfinite, accum_steps=1):
    config = OptimizerConfig(learning_rate=0.1, decay="constant",
                             skip_nonfinite=skip_nonfinite)
    opt = make_optimizer(config, 10)
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(VOCAB, VOCAB)),
                               jnp.float32)}
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt.init(params)}
    step = jax.jit(make_train_step(_forward, opt, schedule(config, 10), accum_steps))
    return state, step, {"scale": jnp.float32(1.0)}


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_a_step_updates_the_trained_tree_and_reports_the_mean_loss():
    state, step, frozen = _setup(0)
    batch = _batch(0)
    new, metrics = step(state, frozen, batch)
    expected = make_eval_step(_forward)(state["params"], frozen, batch)
    np.testing.assert_allclose(metrics["loss"], expected["loss_sum"] / expected["weight_sum"],
                               rtol=1e-6)
    assert int(new["step"]) == 1 and float(metrics["tokens"]) == 4 * LENGTH
    assert not np.allclose(new["params"]["w"], state["params"]["w"])
    assert set(metrics) == {"loss", "accuracy", "grad_norm", "learning_rate", "tokens"}


def test_without_skipping_a_nan_loss_weight_poisons_the_parameters():
    state, step, frozen = _setup(0)
    new, metrics = step(state, frozen, _batch(0, nan=True))
    assert np.isnan(float(metrics["loss"])) and np.isnan(float(metrics["grad_norm"]))
    assert np.isnan(np.asarray(new["params"]["w"])).all()


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_a_skipped_update_changes_neither_parameters_nor_moments(accum_steps):
    state, step, frozen = _setup(3, accum_steps)
    state, _ = step(state, frozen, _batch(0))
    before = _leaves((state["params"], state["opt_state"].inner_state))
    skipped, metrics = step(state, frozen, _batch(1, nan=True))
    assert np.isnan(float(metrics["loss"]))
    assert int(metrics["skipped_updates"]) == 1 and int(metrics["nonfinite_streak"]) == 1
    after = _leaves((skipped["params"], skipped["opt_state"].inner_state))
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert int(skipped["step"]) == 2  # the step counter (and the data position) moves on

    resumed, metrics = step(skipped, frozen, _batch(2))
    assert int(metrics["skipped_updates"]) == 1 and int(metrics["nonfinite_streak"]) == 0
    assert np.isfinite(np.asarray(resumed["params"]["w"])).all()
    assert not np.array_equal(resumed["params"]["w"], skipped["params"]["w"])


def test_more_non_finite_updates_in_a_row_than_the_limit_are_applied():
    state, step, frozen = _setup(1)
    state, metrics = step(state, frozen, _batch(0, nan=True))
    assert int(metrics["nonfinite_streak"]) == 1
    assert np.isfinite(np.asarray(state["params"]["w"])).all()
    state, metrics = step(state, frozen, _batch(1, nan=True))
    assert int(metrics["nonfinite_streak"]) == 2 and int(metrics["skipped_updates"]) == 2
    assert np.isnan(np.asarray(state["params"]["w"])).all()  # optax gives up and applies it
