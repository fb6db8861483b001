"""Token-level losses for language modelling: `cross_entropy` on logits, and
`chunked_cross_entropy`, the same from hidden states without materialising all logits."""

from __future__ import annotations

from typing import Callable

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


def chunked_cross_entropy(h: Array, head_fn: Callable[[Array], Array], targets: Array,
                          weights: Array | None = None, *, chunk: int) -> dict[str, Array]:
    """`cross_entropy(head_fn(h), targets, weights)` without [batch, length, vocab] logits.

    The sequence is cut into chunks of `chunk` positions and scanned; each step applies
    `head_fn` to one chunk and keeps only the chunk's sums. The step is rematerialised
    (`jax.checkpoint`), so the backward pass recomputes one chunk's logits at a time instead of
    saving them: at most [batch, chunk, vocab] logits are live, at the price of one more
    output-layer forward (2 x embed x vocab FLOPs per token).

    Args:
      h: [batch, length, embed] final hidden states (what the output layer reads).
      head_fn: [batch, chunk, embed] -> [batch, chunk, vocab] logits, e.g. final norm and
        output layer (`lambda x: model.apply(variables, x, method=Decoder.head)`); it may
        close over parameters, which receive their gradients through the scan.
      targets: [batch, length] int token ids.
      weights: [batch, length] loss weights; None means all ones.
      chunk: positions per step; a length that is not a multiple is padded with zero weight.

    Returns:
      The same dict as `cross_entropy`: {'loss', 'loss_sum', 'weight_sum', 'correct_sum'}.
    """
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0:
        raise ValueError(f"chunk: expected a positive integer, got {chunk!r}")
    b, t = targets.shape
    if h.shape[:2] != (b, t):
        raise ValueError(f"h: expected [batch, length, embed] with batch, length = {(b, t)} "
                         f"(the targets'), got shape {h.shape}")
    if weights is None:
        weights = jnp.ones((b, t), jnp.float32)
    weights = weights.astype(jnp.float32)
    chunk = min(chunk, t)
    pad = -t % chunk
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    n = (t + pad) // chunk

    def split(x: Array) -> Array:  # [batch, n * chunk, ...] -> [n, batch, chunk, ...]
        return jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def sums(h_c: Array, targets_c: Array, weights_c: Array) -> tuple[Array, Array]:
        m = cross_entropy(head_fn(h_c), targets_c, weights_c)
        return m["loss_sum"], m["correct_sum"]

    def body(carry, xs):
        loss_sum, correct_sum = sums(*xs)
        return (carry[0] + loss_sum, carry[1] + correct_sum), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, correct_sum), _ = jax.lax.scan(
        body, (zero, zero), (split(h), split(targets), split(weights)))
    weight_sum = jnp.sum(weights)
    return {
        "loss": loss_sum / jnp.maximum(weight_sum, 1.0),
        "loss_sum": loss_sum,
        "weight_sum": weight_sum,
        "correct_sum": correct_sum,
    }
