"""Multi-token prediction: an auxiliary pretraining loss on tokens further ahead.

Besides the usual next-token head, head d (d = 2 .. depth) reads the final residual state at
position t (RMS-normalised, no learned scale) and predicts token t + d through its own linear map
to the vocabulary (Gloeckle et al. 2024, "Better & Faster Large Language Models via Multi-token
Prediction", with linear heads in place of their extra transformer layers). The heads exist only
during pretraining: the exported model is the plain decoder.

Why CALM cares: a small LM trained only on next-token loss computes a fact at the last moment it
is needed. A model that must also predict two and three tokens ahead has to hold those tokens in
its state earlier, where an anchor's cross-attention can read them (the key-value experiment's
mA, `calm_jax.experiments.kv_arithmetic`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import flax.linen as nn

from calm_jax.losses import cross_entropy
from calm_jax.models import layers as L
from calm_jax.models.config import TransformerConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MultiTokenConfig:
    """depth: tokens predicted at each position (1 = next-token loss only); weight: factor of
    each extra head's mean loss in the training loss."""

    depth: int = 1
    weight: float = 1.0

    def __post_init__(self):
        if not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"multi_token.depth: expected an integer >= 1, got {self.depth!r}")
        if not self.weight >= 0:
            raise ValueError(f"multi_token.weight: expected a number >= 0, got {self.weight!r}")


class MultiTokenHeads(nn.Module):
    """h [batch, length, embed] -> logits [depth - 1, batch, length, vocab] (float32)."""

    config: TransformerConfig
    depth: int

    @nn.compact
    def __call__(self, h: Array) -> Array:
        cfg = self.config
        kernel = L.logical_param(self, "kernel", L.dense_init(1, 2),
                                 (self.depth - 1, cfg.embed_dim, cfg.vocab_size),
                                 ("mtp_heads", "embed", "vocab"), cfg.params_dtype)
        x = L.normalize(h, "rmsnorm", cfg.norm_eps).astype(cfg.compute_dtype)
        return jnp.einsum("bte,nev->nbtv", x, kernel.astype(cfg.compute_dtype)).astype(
            jnp.float32)


def ahead_loss(logits: Array, targets: Array, weights: Array,
               segment_ids: Array | None) -> tuple[Array, Array]:
    """Summed cross-entropy of the extra heads and the number of tokens it covers.

    Args:
      logits: [depth - 1, batch, length, vocab]; slice k predicts the target k + 1 positions
        after the next-token target (token t + k + 2 at input position t).
      targets, weights: the next-token `decoder_target_tokens` / `decoder_loss_weights`
        [batch, length].
      segment_ids: [batch, length] packed-segment ids (None: one segment per row); a head never
        predicts across a segment boundary.

    Returns:
      (sum over heads of each head's mean loss, times the next-token weight sum, so it adds to
      the next-token loss sum on the same scale; the next-token weight sum).
    """
    if segment_ids is None:
        segment_ids = jnp.ones(targets.shape, jnp.int32)
    weight_sum = jnp.sum(weights.astype(jnp.float32))
    total = jnp.zeros((), jnp.float32)
    for k in range(logits.shape[0]):
        shift = k + 1
        same = segment_ids[:, shift:] == segment_ids[:, :-shift]
        w = weights[:, shift:].astype(jnp.float32) * same
        m = cross_entropy(logits[k, :, :-shift], targets[:, shift:], w)
        total = total + m["loss"] * weight_sum
    return total, weight_sum
