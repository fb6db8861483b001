"""LoRA on the anchor (the paper's parameter-matched baseline).

Adapters live in their own tree, `{target: {'a': [layers, in, rank], 'b': [layers, rank, out]}}`,
for kernels of the stacked decoder blocks; `merge` returns the anchor parameters with
`W + (alpha / rank) * A @ B` folded in, so the decoder itself needs no LoRA-aware code. `b`
starts at zero: at step 0 the adapted model is the anchor.

`rank_for_budget` picks the rank whose adapter count is closest to a given budget, e.g.
`ComposedLM.num_composition_params()` for the comparison of the paper's Table 5.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

# Kernel path under params['layers'] -> number of leading (input) axes after the layer axis.
TARGETS = {
    "attn/query": 1, "attn/key": 1, "attn/value": 1, "attn/out": 2,
    "mlp/gate": 1, "mlp/up": 1, "mlp/down": 1,
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank: adapter rank (None: `rank_for_budget` decides); targets: keys of `TARGETS`;
    alpha: scale numerator (None means alpha = rank, a scale of 1)."""

    rank: int | None = None
    targets: tuple[str, ...] = ("attn/query", "attn/value")
    alpha: float | None = None

    def __post_init__(self):
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"lora.targets: expected a non-empty subset of {sorted(TARGETS)}, "
                             f"got {list(self.targets)}")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank <= 0):
            raise ValueError(f"lora.rank: expected None or a positive integer, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"lora.alpha: expected None or a positive scale numerator, "
                             f"got {self.alpha!r}")
        object.__setattr__(self, "targets", tuple(self.targets))


def _kernel(params: Mapping[str, Any], target: str):
    module, name = target.split("/")
    return params["layers"][module][name]["kernel"]


def _split(shape: tuple[int, ...], target: str) -> tuple[int, int, int]:
    n_in = TARGETS[target]
    return shape[0], math.prod(shape[1:1 + n_in]), math.prod(shape[1 + n_in:])


def params_per_rank(anchor_params: Mapping[str, Any], config: LoraConfig) -> int:
    total = 0
    for target in config.targets:
        layers, d_in, d_out = _split(_kernel(anchor_params, target).shape, target)
        total += layers * (d_in + d_out)
    return total


def rank_for_budget(anchor_params: Mapping[str, Any], config: LoraConfig, budget: int) -> int:
    """The rank (>= 1) whose adapter parameter count is closest to `budget`."""
    return max(1, round(budget / params_per_rank(anchor_params, config)))


def init_lora(rng: jax.Array, anchor_params: Mapping[str, Any], config: LoraConfig,
              rank: int) -> dict[str, dict[str, jax.Array]]:
    out = {}
    for target, key in zip(config.targets, jax.random.split(rng, len(config.targets))):
        layers, d_in, d_out = _split(_kernel(anchor_params, target).shape, target)
        a = jax.random.normal(key, (layers, d_in, rank), jnp.float32) / math.sqrt(d_in)
        out[target] = {"a": a, "b": jnp.zeros((layers, rank, d_out), jnp.float32)}
    return out


def merge(anchor_params: Mapping[str, Any], lora: Mapping[str, Any],
          config: LoraConfig) -> dict[str, Any]:
    """Anchor parameters with every adapter folded into its kernel."""
    merged = jax.tree.map(lambda x: x, dict(anchor_params))  # shallow-safe copy of the tree
    for target, ab in lora.items():
        rank = ab["a"].shape[-1]
        scale = (config.alpha if config.alpha is not None else rank) / rank
        module, name = target.split("/")
        w = _kernel(anchor_params, target)
        delta = jnp.einsum("lir,lro->lio", ab["a"], ab["b"]).reshape(w.shape)
        merged["layers"][module][name]["kernel"] = w + (scale * delta).astype(w.dtype)
    return merged
