"""Gradient accumulation carries whatever metric sums the loss returns."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax.optim import OptimizerConfig, make_optimizer, schedule
from calm_jax.steps import make_train_step, next_token_loss

VOCAB, LENGTH = 8, 5


def _forward(params, frozen, batch):
    return jax.nn.one_hot(batch["decoder_input_tokens"], VOCAB) @ params["w"]


def _loss_with_extra_metrics(params, frozen, batch):
    """The next-token loss plus metric sums the default loss does not have (one of them a
    vector), as an auxiliary loss such as multi-token prediction reports."""
    loss, m = next_token_loss(_forward, params, frozen, batch)
    extra = {"aux_sum": 2.0 * m["weight_sum"], "per_position": batch["decoder_loss_weights"].sum(0)}
    return loss, {**m, **extra}


def test_accumulation_carries_the_metrics_the_loss_returns():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, VOCAB, (8, LENGTH)).astype(np.int32)
    batch = {"decoder_input_tokens": jnp.asarray(np.roll(tokens, 1, axis=1)),
             "decoder_target_tokens": jnp.asarray(tokens),
             "decoder_loss_weights": jnp.ones((8, LENGTH), jnp.float32)}
    config = OptimizerConfig(learning_rate=0.1, decay="constant")
    opt = make_optimizer(config, 10)
    params = {"w": jnp.asarray(rng.normal(size=(VOCAB, VOCAB)), jnp.float32)}
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt.init(params)}
    results = {}
    for accum in (1, 4):
        step = jax.jit(make_train_step(_forward, opt, schedule(config, 10), accum,
                                       _loss_with_extra_metrics))
        results[accum] = step(state, {}, batch)
    (one, m1), (four, m4) = results[1], results[4]
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["tokens"], 8 * LENGTH)
    np.testing.assert_allclose(four["params"]["w"], one["params"]["w"], rtol=1e-5, atol=1e-6)

