"""How the anchor reads its augmenting models: `CompositionConfig` and its connections.

For every augmenting model `name`, `connections[name]` lists pairs (augment_layer, anchor_layer),
1-indexed (see `calm_jax.models.config`; anchor layer 0 is the embedding output). The model
(`calm_jax.composition.ComposedLM`) checks each list against the models' depths, layers strictly
increasing on both sides (`validate_connections`).

Default connections (`default_connections`): n = N_aug // 4 augmenting layers 4, 8, ..., 4n
(every 4th, the paper's choice), paired with anchor layers round-down(k * N_anchor / n) for
k = 1..n, i.e. n evenly spaced anchor layers ending at the last one. An augmenting model with
fewer than 4 layers gets one connection, its last layer to the anchor's last layer.

`calm_jax.composition` re-exports `CompositionConfig`, `Connections` and `default_connections`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

import numpy as np

from calm_jax.bridge import variant_class
from calm_jax.models.config import TransformerConfig, check_bool, check_real

Connections = tuple[tuple[int, int], ...]


def default_connections(augment: TransformerConfig, anchor: TransformerConfig) -> Connections:
    """Every 4th augmenting layer, paired with evenly spaced anchor layers (module docstring)."""
    n = augment.num_layers // 4
    if n == 0:
        return ((augment.num_layers, anchor.num_layers),)
    if n > anchor.num_layers:
        raise ValueError(
            f"connections: the default pairs {n} augmenting layers with as many anchor layers, "
            f"but the anchor has only {anchor.num_layers}; give connections explicitly")
    return tuple((4 * k, (k * anchor.num_layers) // n) for k in range(1, n + 1))


@dataclasses.dataclass(frozen=True)
class CompositionConfig:
    """How the anchor reads its augmenting models.

    Attributes:
      connections: {augment name: ((augment_layer, anchor_layer), ...)}; models not named get
        `default_connections`. Layers are 1-indexed and must be strictly increasing.
      num_heads: cross-attention heads; None means the anchor's head count.
      head_dim: per-head width; None means anchor embed_dim // num_heads.
      kind: the composition variant: "cross_attention" (CALM), "fusion" (attention-free
        ablation, same budget), or any kind registered with
        `calm_jax.bridge.register_variant` (a `Bridge` subclass).
      augment_sees: "all" (the shared token stream, the paper's setting) or "prompt" (the
        "mA as encoder" ablation; needs `prompt_mask` at call time).
      normalize_inputs: RMS-normalise the anchor query and augmenting state inputs.
      proj_bias: bias on the D_aug -> D_anchor projection.
      norm_eps: epsilon of those norms.
      rope_theta: rotary position embeddings with this base on the cross-attention's queries
        and keys, at the positions of the shared token stream (anchor slot t and augmenting
        slot t hold the same token), so a head can read by relative position, e.g. the
        augmenting state of the current token. None: content-only attention (the paper's form).
        Across tokenizers the positions are the tokens' byte ends (`calm_jax.alignment`).
      shared_vocabulary: True: every model reads the anchor's token stream (vocab sizes must
        match). False: each augmenting model reads the text through its own tokenizer; calls
        pass its tokens and both sides' byte ends (`augment_inputs`, `byte_ends`; see
        `calm_jax.alignment`). Needs a variant that composes across tokenizers
        ('cross_attention') and augment_sees='all'.
    """

    connections: Mapping[str, Connections] = dataclasses.field(default_factory=dict)
    num_heads: int | None = None
    head_dim: int | None = None
    kind: str = "cross_attention"
    augment_sees: Literal["all", "prompt"] = "all"
    normalize_inputs: bool = True
    proj_bias: bool = True
    norm_eps: float = 1e-6
    rope_theta: float | None = None
    shared_vocabulary: bool = True

    def __post_init__(self):
        variant = variant_class(self.kind)
        if self.augment_sees not in ("all", "prompt"):
            raise ValueError(f"composition.augment_sees: expected 'all' or 'prompt', "
                             f"got {self.augment_sees!r}")
        check_real("composition.rope_theta", self.rope_theta, above=1.0, allow_none=True)
        variant.check_config(self)
        for name in ("num_heads", "head_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value <= 0):
                raise ValueError(f"composition.{name}: expected None or a positive integer, "
                                 f"got {value!r}")
        for name in ("normalize_inputs", "proj_bias"):
            check_bool(f"composition.{name}", getattr(self, name))
        check_real("composition.norm_eps", self.norm_eps)
        object.__setattr__(self, "connections", _normalize_connections(self.connections))
        check_bool("composition.shared_vocabulary", self.shared_vocabulary)
        if not self.shared_vocabulary and not (variant.cross_tokenizer
                                                and self.augment_sees == "all"):
            raise ValueError(f"composition.shared_vocabulary: expected True with kind="
                             f"{self.kind!r} and augment_sees={self.augment_sees!r} (across "
                             f"tokenizers only cross-attention over the whole text is "
                             f"defined), got False")


def _is_layer_number(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _normalize_connections(connections: Any) -> dict[str, Connections]:
    """{name: pairs} as hashable tuples of int pairs; raises ValueError naming the entry for a
    non-mapping, an empty list of pairs, a pair that is not two integers (floats would be
    truncated, bools read as 0/1)."""
    if not isinstance(connections, Mapping):
        raise ValueError(f"composition.connections: expected a mapping {{augment name: "
                         f"((augment_layer, anchor_layer), ...)}}, got {connections!r}")
    conns = {}
    for name, pairs in connections.items():
        field = f"composition.connections[{name!r}]"
        try:
            pairs = tuple(tuple(p) for p in pairs)
        except TypeError:
            pairs = None
        if pairs is None or any(
                len(p) != 2 or not all(_is_layer_number(x) for x in p) for p in pairs):
            raise ValueError(f"{field}: expected pairs of integers (augment_layer, "
                             f"anchor_layer), got {connections[name]!r}")
        if not pairs:
            raise ValueError(f"{field}: expected at least one (augment_layer, anchor_layer) "
                             f"pair (leave the name out for the default connections), got "
                             f"{connections[name]!r}")
        conns[name] = tuple((int(a), int(b)) for a, b in pairs)
    return conns


def validate_connections(name: str, pairs: Connections, augment: TransformerConfig,
                         anchor: TransformerConfig) -> None:
    """Raises ValueError naming `composition.connections[name]` unless `pairs` is a non-empty,
    strictly increasing list of layers within both models' depths."""
    field = f"composition.connections[{name!r}]"
    if not pairs:
        raise ValueError(f"{field}: expected at least one (augment_layer, anchor_layer) pair, "
                         f"got {pairs!r}")
    for aug_layer, anchor_layer in pairs:
        if not 1 <= aug_layer <= augment.num_layers:
            raise ValueError(f"{field}: expected augment layers in [1, {augment.num_layers}] "
                             f"(1-indexed), got {aug_layer} in {pairs}")
        if not 0 <= anchor_layer <= anchor.num_layers:
            raise ValueError(f"{field}: expected anchor layers in [0, {anchor.num_layers}] "
                             f"(1-indexed; 0 is the embedding output), got {anchor_layer} "
                             f"in {pairs}")
    for which, k in (("augment", 0), ("anchor", 1)):
        seq = [p[k] for p in pairs]
        if any(b <= a for a, b in zip(seq, seq[1:])):
            raise ValueError(f"{field}: expected strictly increasing {which} layers, got {seq}")
