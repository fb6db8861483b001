"""Decoder-only transformers: config, layers, attention and the stacked decoder."""

from calm_jax.models.config import TransformerConfig
from calm_jax.models.transformer import Decoder, default_positions, init_decoder

__all__ = ["TransformerConfig", "Decoder", "default_positions", "init_decoder"]
