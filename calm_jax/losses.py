"""Token-level losses for language modelling."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def cross_entropy(logits: Array, targets: Array, weights: Array | None = None) -> dict[str, Array]:
    """Weighted next-token cross-entropy.

    Args:
      logits: [batch, length, vocab] (any float dtype; computed in float32).
      targets: [batch, length] int token ids.
      weights: [batch, length] loss weights (e.g. 1 on target tokens only); None means all ones.

    Returns:
      {'loss': weighted mean, 'loss_sum', 'weight_sum', 'correct_sum'}: sums let callers
      average exactly over micro-batches and devices.
    """
    logits = logits.astype(jnp.float32)
    if weights is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    weights = weights.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = log_z - target_logit
    loss_sum = jnp.sum(nll * weights)
    weight_sum = jnp.sum(weights)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {
        "loss": loss_sum / jnp.maximum(weight_sum, 1.0),
        "loss_sum": loss_sum,
        "weight_sum": weight_sum,
        "correct_sum": jnp.sum(correct * weights),
    }
