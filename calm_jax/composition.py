"""CALM: a frozen anchor LM reads frozen augmenting LMs through trained cross-attention.

For every augmenting model `name`, `connections[name]` lists pairs (augment_layer, anchor_layer),
1-indexed (see `calm_jax.models.config`). For each pair i:

    p_i   = proj_i(norm(H_aug[augment_layer]))                   [batch, aug_len, D_anchor]
    delta = cross_attn_i(q = norm(H_anchor[anchor_layer]), kv = p_i)  [batch, len, D_anchor]
    H_anchor[anchor_layer] <- H_anchor[anchor_layer] + delta      (the input of the next layer)

The paper's `f_proj` and `f_cross` (Bansal et al., 2024, "LLM Augmented LLMs: Expanding
Capabilities through Composition", section 3), with three documented choices:

* Causality. Both models read the same token stream; anchor position t only sees augmenting
  positions s <= t of the same packed segment that are not padding. With
  `augment_sees="prompt"` ("mA as encoder") it further only sees positions inside the prompt.
* Zero start. The cross-attention output projection W^O starts at zero, so at step 0 the composed
  logits equal the anchor's exactly (the paper does not say how it initialises).
* Input norms (`normalize_inputs`, on by default): the anchor query and the augmenting state are
  RMS-normalised (learned scale) before their projections, as every sublayer of a pre-norm
  transformer normalises its input; real models' residual streams (Gemma's especially) are too
  large to feed raw. Set it to False for the paper's bare form.

The config, its connections and their defaults (every 4th augmenting layer, paired with evenly
spaced anchor layers) are in `calm_jax.composition_config` (`CompositionConfig`,
`default_connections`; both re-exported here).

Several connections may share an anchor layer (from different augmenting models); each reads the
same anchor state and their outputs are summed.

Variants (`CompositionConfig.kind`) are classes in a table (`calm_jax.bridge`: the `Bridge`
interface, `register_variant`; the built-ins in `calm_jax.variants`): "cross_attention" is the
above; `kind="fusion"` is the attention-free ablation with the same parameter budget: position t
mixes the anchor state with the projected augmenting state at t through a gated feed-forward,
`delta = W_o(silu(W_g [q; p_t]) * (W_v p_t))`, with W_g: 2D x F, W_v: D x F, W_o: F x D (zero
init), F = heads * head_dim — the 4 D F of the cross-attention's W_q, W_k, W_v, W_o.
`ComposedLM` looks the variant up by `kind` and calls only its interface (parameters, `memory`,
the update, the decoding cache), so a new variant is one registered class.

Cached decoding (`ComposedLM.init_cache`, `extend`, `end_prompt`; driven by
`calm_jax.decoding`): every augmenting model consumes every new token through its own KV cache;
the projected states of the new tokens (`Bridge.memory`) are appended to a per-connection
cross-attention memory (the variant's `write_memory`), so the anchor at slot t reads memory slots
<= t exactly as in `apply`.
With `augment_sees="prompt"` the memory covers the prompt only and is fixed after it.

Parameters are `{'anchor': ..., 'augments': {name: ...}, 'composition': {name: ...}}`; each
composition leaf has a leading `connections` axis. The augmenting forwards run under
`stop_gradient`, and the training loss is differentiated with respect to `composition` only.
The composition parameters of one augmenting model and their decoding layout are in
`calm_jax.bridge` (`Bridge`, `unstack_connections`) and `calm_jax.variants`. For cached
decoding `unstack_connections` splits each leaf into one array per connection (a `LayerList`,
like the Decoders' per-layer layout): `extend` then reads connection i's weights where they
lie, where indexing the stack would copy them at every step.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from flax import struct, traverse_util

from calm_jax.alignment import AugmentInput
from calm_jax.bridge import Bridge, connection_params, variant_class
# The config's names stay importable from here (`composition.CompositionConfig`, ...).
from calm_jax.composition_config import (  # noqa: F401
    CompositionConfig, Connections, default_connections, validate_connections)
from calm_jax.models.config import TransformerConfig
from calm_jax.models.attention import attention_mask
from calm_jax.models.attention import KVCache, make_cache_context
from calm_jax.models.transformer import REMAT_POLICIES, Decoder, layers_unstacked
from calm_jax.validation import check_like, check_token_array, model_limits

Array = jax.Array


@struct.dataclass
class ComposedCache:
    """Decoding state of a `ComposedLM` (rows left-padded, as in `KVCache`).

    Attributes:
      anchor: the anchor's `KVCache` (all layers); its `start` / `index` are the rows' layout.
      augments: {name: KVCache} over augmenting layers 1 .. deepest connected one; empty once
        the memory is fixed (`augment_sees="prompt"` after `end_prompt`).
      memory: {name: the variant's decoding memory} (`Bridge.init_memory`): for
        cross-attention {'key', 'value'} [n, batch, mem_len, heads, head_dim], connection i's
        projected keys/values of every slot so far (with per-layer caches, a tuple of n
        [batch, heads, mem_len, head_dim] arrays, laid out like a per-layer `KVCache`, so that
        no step copies connection i's memory out of a stack); no entry for a position-wise
        variant (`kind="fusion"`), whose update only reads the current token's projected
        state.
      ends: across tokenizers (`init_cache(augment_len=...)`, `extend_text`), {name: [batch,
        mem_len] int32}, the byte end of the augmenting token in each memory slot (`NO_END` for
        a slot not filled); empty otherwise.
    """

    anchor: KVCache
    augments: dict[str, KVCache]
    memory: dict[str, dict[str, Array]]
    ends: dict[str, Array] = struct.field(default_factory=dict)


# The byte end of an empty memory slot: no anchor token reads it.
NO_END = 2 ** 31 - 1


class ComposedLM:
    """An anchor LM composed with one or more named augmenting LMs (see the module docstring).

    Example:
        model = ComposedLM(anchor_cfg, {"kv": augment_cfg})
        params = nn.unbox(model.init(jax.random.key(0)))
        logits = model.apply(params, tokens)          # [batch, length, vocab]
    """

    def __init__(self, anchor: TransformerConfig, augments: Mapping[str, TransformerConfig],
                 composition: CompositionConfig | None = None):
        composition = composition or CompositionConfig()
        if not augments:
            raise ValueError("augments: expected at least one augmenting model, got none")
        unknown = sorted(set(composition.connections) - set(augments))
        if unknown:
            raise ValueError(f"composition.connections: expected names among augments "
                             f"{sorted(augments)}, got unknown {unknown}")
        for name, cfg in augments.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"augments: expected identifier-like names, got {name!r}")
            if composition.shared_vocabulary and cfg.vocab_size != anchor.vocab_size:
                raise ValueError(
                    f"augments[{name!r}].vocab_size: expected the anchor's vocab_size="
                    f"{anchor.vocab_size} (both models read the same token stream; "
                    f"composition.shared_vocabulary=False composes across tokenizers), "
                    f"got {cfg.vocab_size}")
        heads = composition.num_heads or anchor.num_heads
        if composition.head_dim is None and anchor.embed_dim % heads:
            raise ValueError(f"composition.num_heads: expected a divisor of the anchor's "
                             f"embed_dim={anchor.embed_dim} (or set head_dim), got {heads}")
        self.anchor_config = anchor
        self.augment_configs = dict(sorted(augments.items()))
        self.config = composition
        self.variant = variant_class(composition.kind)
        self.num_heads = heads
        self.head_dim = composition.head_dim or anchor.embed_dim // heads
        if composition.rope_theta is not None and self.head_dim % 2:
            raise ValueError(f"composition.head_dim: expected an even width with rope_theta "
                             f"set (rotary pairs), got {self.head_dim}")
        self.connections: dict[str, Connections] = {}
        for name, cfg in self.augment_configs.items():
            pairs = (composition.connections[name] if name in composition.connections
                     else default_connections(cfg, anchor))
            validate_connections(name, pairs, cfg, anchor)
            self.connections[name] = pairs
        at_layer: dict[int, list[tuple[str, int]]] = {}
        for name, pairs in self.connections.items():
            for i, (_, anchor_layer) in enumerate(pairs):
                at_layer.setdefault(anchor_layer, []).append((name, i))
        # ((anchor_layer, ((augment name, connection index), ...)), ...) in layer order.
        self._at_layer = tuple((layer, tuple(at_layer[layer])) for layer in sorted(at_layer))
        self.anchor = Decoder(anchor)
        self.augments = {name: Decoder(cfg) for name, cfg in self.augment_configs.items()}
        self.bridges = {name: self._bridge(name) for name in self.augment_configs}
        self._expected_composition: dict[str, Any] | None = None
        # The same parameters one connection at a time (the per-connection decoding layout).
        self._single_bridges = {name: self._bridge(name, 1) for name in self.augment_configs}

    def _bridge(self, name: str, num_connections: int | None = None) -> Bridge:
        n = len(self.connections[name]) if num_connections is None else num_connections
        return self.variant(config=self.config, anchor_dim=self.anchor_config.embed_dim,
                            augment_dim=self.augment_configs[name].embed_dim,
                            num_connections=n, num_heads=self.num_heads,
                            head_dim=self.head_dim,
                            attention_impl=self.anchor_config.attention_impl,
                            dtype=self.anchor_config.compute_dtype,
                            param_dtype=self.anchor_config.params_dtype)

    # Parameters ---------------------------------------------------------------------------------

    def init_composition(self, rng: Array) -> dict[str, Any]:
        """Fresh composition parameters {name: ...} (boxed with logical axis names)."""
        out = {}
        for (name, bridge), key in zip(self.bridges.items(),
                                       jax.random.split(rng, len(self.bridges))):
            n, b = len(self.connections[name]), 1
            states = jnp.zeros((n, b, 1, self.augment_configs[name].embed_dim))
            anchor_h = jnp.zeros((b, 1, self.anchor_config.embed_dim))

            def first(module, states=states, anchor_h=anchor_h):
                positions = jnp.zeros((b, 1), jnp.int32)
                return module(0, anchor_h, module.memory(states, positions), None, positions)

            out[name] = bridge.init(key, method=first)["params"]
        return out

    def init(self, rng: Array, length: int = 8) -> dict[str, Any]:
        """All parameters, boxed: fresh anchor, augmenting models and composition."""
        k_anchor, k_comp, *k_aug = jax.random.split(rng, 2 + len(self.augments))
        tokens = jnp.zeros((1, length), jnp.int32)
        return {
            "anchor": self.anchor.init(k_anchor, tokens)["params"],
            "augments": {name: model.init(k, tokens)["params"]
                         for (name, model), k in zip(self.augments.items(), k_aug)},
            "composition": self.init_composition(k_comp),
        }

    def num_composition_params(self) -> int:
        """The composition's parameter count, read from the shapes of fresh parameters (for
        the built-in variants: per connection D_aug D_anchor + 4 D_anchor F, plus D_anchor with
        `proj_bias` and D_aug + D_anchor with `normalize_inputs`, F = heads x head_dim)."""
        return sum(int(np.prod(leaf.shape))
                   for leaf in jax.tree.leaves(self._composition_shapes()))

    # Argument checks (at trace time: shapes, dtypes and tree structure only) -----------------

    def check_params(self, params: Mapping[str, Any]) -> None:
        """Raises ValueError naming the entry unless `params` (unboxed) holds 'anchor',
        'augments' and 'composition' with an entry per augmenting model, and each stacked
        composition tree has the parameter names and shapes this model creates (a
        per-connection tree from `unstack_connections` is checked for its names only)."""
        names = sorted(self.augment_configs)
        if not isinstance(params, Mapping) or not {"anchor", "augments", "composition"} <= set(
                params):
            got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
            raise ValueError(f"params: expected a mapping with 'anchor', 'augments' and "
                             f"'composition', got {got}")
        for key in ("augments", "composition"):
            tree = params[key]
            given = sorted(tree) if isinstance(tree, Mapping) else None
            if given is None or not set(names) <= set(given):
                raise ValueError(f"params[{key!r}]: expected an entry for every augmenting "
                                 f"model {names}, got {given if given is not None else tree!r}")
        expected = self._composition_shapes()
        for name in names:
            tree = params["composition"][name]
            if layers_unstacked(tree):
                continue
            want, got = traverse_util.flatten_dict(expected[name], sep="/"), None
            try:
                got = traverse_util.flatten_dict(dict(tree), sep="/")
            except (TypeError, ValueError):
                pass
            field = f"params['composition'][{name!r}]"
            if got is None or set(got) != set(want):
                raise ValueError(f"{field}: expected parameters {sorted(want)}, got "
                                 f"{sorted(got) if got is not None else type(tree).__name__}")
            for path, leaf in sorted(want.items()):
                shape = tuple(getattr(got[path], "shape", ()))
                if shape != leaf.shape:
                    raise ValueError(
                        f"{field}['{path}']: expected shape {leaf.shape} (connections="
                        f"{len(self.connections[name])}, augment embed_dim="
                        f"{self.augment_configs[name].embed_dim}, anchor embed_dim="
                        f"{self.anchor_config.embed_dim}, heads={self.num_heads}, "
                        f"head_dim={self.head_dim}), got {shape}")

    def _composition_shapes(self) -> dict[str, Any]:
        """{name: tree of ShapeDtypeStruct} of fresh composition parameters (computed once)."""
        if self._expected_composition is None:
            self._expected_composition = nn.unbox(
                jax.eval_shape(self.init_composition, jax.random.key(0)))
        return self._expected_composition

    def _check_inputs(self, tokens: Any, positions: Any = None, segment_ids: Any = None,
                      prompt_mask: Any = None) -> None:
        """Shape and dtype checks of the forward's inputs (static: no values are read)."""
        shape = check_token_array(tokens, "tokens")
        check_like(positions, shape, "positions")
        check_like(segment_ids, shape, "segment_ids")
        check_like(prompt_mask, shape, "prompt_mask", kind="bool")
        max_len = model_limits(self)["max_len"]  # the augments read the anchor's positions
        if positions is None and max_len is not None and shape[1] > max_len:
            raise ValueError(f"tokens: expected length <= max_len={max_len} (the smallest "
                             f"learned position table of the composed models), got length "
                             f"{shape[1]}")

    # Forward ------------------------------------------------------------------------------------

    def memories(self, params: Mapping[str, Any], tokens: Array, positions: Array,
                 segment_ids: Array | None,
                 augment_inputs: Mapping[str, AugmentInput] | None = None
                 ) -> dict[str, dict[str, Array]]:
        """Runs every augmenting model (no gradient) and projects its selected states.

        With `augment_inputs` each model reads its own stream instead of `tokens` (its own
        positions and segment ids; the keys rotated at its tokens' byte ends)."""
        if layers_unstacked(params["composition"]):
            raise ValueError("params['composition']: expected stacked [connections, ...] "
                             "arrays (the training layout), got per-connection LayerLists "
                             "(unstack_connections: cached decoding only)")
        out = {}
        for name, model in self.augments.items():
            frozen = jax.lax.stop_gradient(params["augments"][name])
            layers = [a for a, _ in self.connections[name]]
            if augment_inputs is None:
                own, own_positions, own_segments, key_positions = (
                    tokens, positions, segment_ids, positions)
            else:
                stream = augment_inputs[name]
                own, own_positions, own_segments, key_positions = (
                    stream.tokens, stream.positions, stream.segment_ids, stream.byte_ends)
            states = model.apply({"params": frozen}, own, layers, positions=own_positions,
                                 segment_ids=own_segments, method=Decoder.hidden_states)
            stacked = jax.lax.stop_gradient(jnp.stack([states[a] for a in layers]))

            def project(composition, stacked, positions, name=name):
                return self.bridges[name].apply({"params": composition}, stacked, positions,
                                                method="memory")

            out[name] = self._remat(project)(params["composition"][name], stacked,
                                             key_positions)
        return out

    def _remat(self, fn):
        """`fn` rematerialised with the anchor's `remat_policy` (unchanged for "none"), like the
        anchor's own blocks: the composition's intermediates (fp32 norms, XLA attention's
        [batch, heads, length, length] scores) are then recomputed in the backward pass
        instead of kept alive until it."""
        policy = REMAT_POLICIES.get(self.anchor_config.remat_policy)
        return fn if policy is None else jax.checkpoint(fn, policy=policy)

    def cross_mask(self, tokens: Array, segment_ids: Array | None,
                   prompt_mask: Array | None, *, byte_ends: Array | None = None,
                   augment_inputs: Mapping[str, AugmentInput] | None = None
                   ) -> Array | dict[str, Array] | None:
        """[batch, 1, len, len] mask of anchor queries over augmenting keys; None = causal.

        With `augment_inputs`: {name: [batch, 1, len, aug_len]}, anchor token t reading
        augmenting token s iff s ends at or before t's byte end, in t's segment, and is not
        padding (`calm_jax.alignment`)."""
        if augment_inputs is not None:
            b, t = tokens.shape
            seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
            masks = {}
            for name, stream in augment_inputs.items():
                aug_seg = (jnp.ones(stream.tokens.shape, jnp.int32)
                           if stream.segment_ids is None else stream.segment_ids)
                masks[name] = attention_mask(seg, aug_seg, byte_ends, stream.byte_ends)
            return masks
        if self.config.augment_sees == "prompt":
            if prompt_mask is None:
                raise ValueError("prompt_mask: expected a [batch, length] bool array with "
                                 "composition.augment_sees='prompt', got None")
        elif segment_ids is None:
            return None
        b, t = tokens.shape
        index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
        valid = None if self.config.augment_sees == "all" else prompt_mask.astype(bool)
        return attention_mask(seg, seg, index, index, kv_valid=valid)

    def apply(self, params: Mapping[str, Any], tokens: Array, *, positions: Array | None = None,
              segment_ids: Array | None = None, prompt_mask: Array | None = None,
              byte_ends: Array | None = None,
              augment_inputs: Mapping[str, AugmentInput] | None = None) -> Array:
        """tokens [batch, length] -> composed logits [batch, length, vocab] (float32).

        Across tokenizers (`calm_jax.alignment`), `augment_inputs` gives every augmenting
        model's own stream and `byte_ends` [batch, length] the anchor tokens' byte ends."""
        h = self.final_states(params, tokens, positions=positions, segment_ids=segment_ids,
                              prompt_mask=prompt_mask, byte_ends=byte_ends,
                              augment_inputs=augment_inputs)
        return self.head(params, h)

    def head(self, params: Mapping[str, Any], h: Array) -> Array:
        """The anchor's final norm and output layer: h [batch, length, D_anchor] -> logits."""
        return self.anchor.apply({"params": nn.unbox(params)["anchor"]}, h, method=Decoder.head)

    def final_states(self, params: Mapping[str, Any], tokens: Array, *,
                     positions: Array | None = None, segment_ids: Array | None = None,
                     prompt_mask: Array | None = None, byte_ends: Array | None = None,
                     augment_inputs: Mapping[str, AugmentInput] | None = None) -> Array:
        """The composed anchor's last residual stream [batch, length, D_anchor]: `apply`
        without the head (for a loss that applies the head a chunk at a time)."""
        self._check_inputs(tokens, positions, segment_ids, prompt_mask)
        params = nn.unbox(params)
        self.check_params(params)
        anchor_vars = {"params": params["anchor"]}
        positions, ctx = self.anchor.apply(anchor_vars, tokens, positions, segment_ids,
                                           method=Decoder.context)
        self._check_streams(tokens, byte_ends, augment_inputs)
        memories = self.memories(params, tokens, positions, segment_ids, augment_inputs)
        mask = self.cross_mask(tokens, segment_ids, prompt_mask, byte_ends=byte_ends,
                               augment_inputs=augment_inputs)
        h = self.anchor.apply(anchor_vars, tokens, positions, method=Decoder.embed)

        def run_segment(h, start, stop):
            return self.anchor.apply(anchor_vars, h, ctx, start, stop,
                                     method=Decoder.run_layers)

        query_positions = positions if augment_inputs is None else byte_ends
        return self._anchor_layers(params, h, run_segment, memories, mask, query_positions)

    def _check_streams(self, tokens: Array, byte_ends: Array | None,
                       augment_inputs: Mapping[str, AugmentInput] | None) -> None:
        """Raises ValueError naming the argument unless the cross-tokenizer inputs are all
        given or all absent, for every augmenting model, with matching shapes."""
        names = sorted(self.augment_configs)
        if augment_inputs is None:
            if not self.config.shared_vocabulary:
                raise ValueError(f"augment_inputs: expected {{name: AugmentInput}} for "
                                 f"{names} with composition.shared_vocabulary=False (each "
                                 f"model reads its own tokens), got None")
            if byte_ends is not None:
                raise ValueError("byte_ends: expected None without augment_inputs (one shared "
                                 "token stream), got an array")
            return
        if self.config.augment_sees != "all":
            raise ValueError(f"augment_inputs: expected None with composition.augment_sees="
                             f"{self.config.augment_sees!r} (across tokenizers the augment "
                             f"reads the whole text), got {sorted(augment_inputs)}")
        if not self.variant.cross_tokenizer:
            raise ValueError(f"augment_inputs: expected None with composition.kind="
                             f"{self.config.kind!r} (this variant needs one token stream), "
                             f"got {sorted(augment_inputs)}")
        if not isinstance(augment_inputs, Mapping) or sorted(augment_inputs) != names:
            got = sorted(augment_inputs) if isinstance(augment_inputs, Mapping) else (
                type(augment_inputs).__name__)
            raise ValueError(f"augment_inputs: expected one AugmentInput per augmenting model "
                             f"{names}, got {got}")
        if byte_ends is None or tuple(jnp.shape(byte_ends)) != tuple(tokens.shape):
            raise ValueError(f"byte_ends: expected the anchor tokens' byte ends, shape "
                             f"{tuple(tokens.shape)}, with augment_inputs, got "
                             f"{None if byte_ends is None else tuple(jnp.shape(byte_ends))}")
        for name in names:
            stream = augment_inputs[name]
            field = f"augment_inputs[{name!r}]"
            if not isinstance(stream, AugmentInput):
                raise ValueError(f"{field}: expected an AugmentInput, got "
                                 f"{type(stream).__name__}")
            shape = tuple(jnp.shape(stream.tokens))
            if len(shape) != 2 or shape[0] != tokens.shape[0]:
                raise ValueError(f"{field}.tokens: expected [batch={tokens.shape[0]}, "
                                 f"aug_len], got shape {shape}")
            for f in ("byte_ends", "positions", "segment_ids"):
                value = getattr(stream, f)
                if value is not None and tuple(jnp.shape(value)) != shape:
                    raise ValueError(f"{field}.{f}: expected shape {shape} like its tokens, "
                                     f"got {tuple(jnp.shape(value))}")

    def _anchor_layers(self, params: Mapping[str, Any], h: Array, run_segment,
                       memories: Mapping[str, Any], mask: Array | None,
                       positions: Array) -> Array:
        """All anchor layers from h, each connection's update added after its anchor layer.

        `run_segment(h, start, stop)` applies anchor layers start+1 .. stop. Connections that
        share an anchor layer read the same state and their updates are summed. Each update is
        rematerialised with the anchor's `remat_policy` (`_remat`). Per-connection composition
        parameters (`unstack_connections`) are applied one connection at a time, with connection
        i's memory, so no weight is indexed out of a stack.
        """
        def update(name: str, i: int, h: Array) -> Array:
            tree, memory = params["composition"][name], memories[name]
            own_mask = mask[name] if isinstance(mask, dict) else mask
            bridge, index = self.bridges[name], i
            if layers_unstacked(tree):
                tree, memory = connection_params(tree, i), {k: (v[i],) for k, v in memory.items()}
                bridge, index = self._single_bridges[name], 0

            def apply(composition, h, memory, mask, positions):
                return bridge.apply({"params": composition}, index, h, memory, mask, positions)

            delta = self._remat(apply)(tree, h, memory, own_mask, positions)
            if isinstance(mask, dict):  # across tokenizers a query may have no key: no update
                delta = delta * jnp.any(own_mask, axis=-1)[:, 0, :, None].astype(delta.dtype)
            return delta

        done = 0
        for layer, conns in self._at_layer:
            h = run_segment(h, done, layer)
            delta = sum(update(name, i, h) for name, i in conns)
            h, done = h + delta.astype(h.dtype), layer
        return run_segment(h, done, self.anchor_config.num_layers)

    def anchor_logits(self, params: Mapping[str, Any], tokens: Array, **kw) -> Array:
        """The anchor alone on the same input (for comparisons)."""
        return self.anchor.apply({"params": nn.unbox(params)["anchor"]}, tokens, **kw)[0]

    # Cached decoding ----------------------------------------------------------------------------

    def init_cache(self, batch: int, cache_len: int, start: Array | None = None, *,
                   prompt_len: int | None = None, per_layer: bool = False,
                   augment_len: int | None = None) -> ComposedCache:
        """An empty `ComposedCache` of `cache_len` slots; `start` [batch] are the left pads.

        With `augment_sees="prompt"`, `prompt_len` (the padded prompt width) is required: the
        augmenting caches and the memory then hold `prompt_len` slots only. `per_layer`: every
        `KVCache` holds one array per layer and the memory one per connection (the unrolled
        decoding layout, see `calm_jax.models.attention.KVCache`).

        `augment_len`: across tokenizers (`extend_text`), every augmenting cache and memory holds
        `augment_len` slots of its own tokens, and `ends` their byte ends.
        """
        if augment_len is not None:
            if (not isinstance(augment_len, int) or augment_len <= 0
                    or self.config.augment_sees != "all"
                    or not self.variant.cross_tokenizer):
                raise ValueError(f"augment_len: expected None, or a positive integer with "
                                 f"kind='cross_attention' and augment_sees='all', got "
                                 f"{augment_len!r} (kind={self.config.kind!r}, augment_sees="
                                 f"{self.config.augment_sees!r})")
            mem_len = augment_len
        elif self.config.augment_sees == "prompt":
            if prompt_len is None or not 0 < prompt_len <= cache_len:
                raise ValueError(f"prompt_len: expected an integer in [1, cache_len={cache_len}] "
                                 f"with composition.augment_sees='prompt', got {prompt_len!r}")
            mem_len = prompt_len
        else:
            mem_len = cache_len
        augments, memory = {}, {}
        for name, cfg in self.augment_configs.items():
            deepest = max(a for a, _ in self.connections[name])
            augments[name] = KVCache.zeros(cfg, batch, mem_len, start, num_layers=deepest,
                                           per_layer=per_layer)
            kept = self.bridges[name].init_memory(batch, mem_len, per_layer)
            if kept:
                memory[name] = kept
        anchor = KVCache.zeros(self.anchor_config, batch, cache_len, start, per_layer=per_layer)
        ends = {} if augment_len is None else {
            name: jnp.full((batch, augment_len), NO_END, jnp.int32) for name in augments}
        return ComposedCache(anchor=anchor, augments=augments, memory=memory, ends=ends)

    def rewind(self, cache: ComposedCache, anchor_index: Array,
               augment_index: Mapping[str, Array]) -> ComposedCache:
        """The cache cut back to `anchor_index` anchor slots and `augment_index[name]` slots of
        each named augmenting model (across tokenizers): later slots are overwritten by the next
        `extend_text` and never read before, and their byte ends become `NO_END`."""
        if not cache.ends:
            raise ValueError("cache: expected a cache from init_cache(augment_len=...) "
                             "(across tokenizers), got one without byte ends")
        augments, ends = dict(cache.augments), dict(cache.ends)
        for name, index in augment_index.items():
            index = jnp.asarray(index, jnp.int32)
            augments[name] = augments[name].replace(index=index)
            slots = jnp.arange(ends[name].shape[1], dtype=jnp.int32)[None, :]
            ends[name] = jnp.where(slots >= index, NO_END, ends[name])
        anchor = cache.anchor.replace(index=jnp.asarray(anchor_index, jnp.int32))
        return cache.replace(anchor=anchor, augments=augments, ends=ends)

    def extend_text(self, params: Mapping[str, Any], tokens: Array, byte_ends: Array,
                    cache: ComposedCache, augment_inputs: Mapping[str, AugmentInput], *,
                    logits: str = "last") -> tuple[Array, ComposedCache]:
        """Across tokenizers: appends each named augmenting model's new tokens
        (`augment_inputs[name].tokens` [batch, S] with their `byte_ends`) to its own cache and
        memory at its own index, then the anchor's tokens [batch, T] with their `byte_ends`
        [batch, T]; returns (logits, cache) as `extend` does. Anchor token t reads the memory
        slots whose byte end is at most its own (`calm_jax.alignment`); an anchor token that
        reads none gets no update. Models not named get no tokens this call. The driver
        (`calm_jax.cross_decoding.generate_text` and `generate_texts`) rewinds (`rewind`) what
        the augment's tokenizer re-segments and the anchor tokens that read it, then extends
        again."""
        if logits not in ("last", "all"):
            raise ValueError(f"logits: expected 'last' or 'all', got {logits!r}")
        if not cache.ends:
            raise ValueError("cache: expected a cache from init_cache(augment_len=...) "
                             "(across tokenizers), got one without byte ends")
        unknown = sorted(set(augment_inputs) - set(self.augment_configs))
        if unknown:
            raise ValueError(f"augment_inputs: expected names among {sorted(self.augments)}, "
                             f"got unknown {unknown}")
        params = nn.unbox(params)
        ctx = make_cache_context(self.anchor_config, cache.anchor, tokens.shape[1])
        memories, augments, ends = dict(cache.memory), dict(cache.augments), dict(cache.ends)
        for name, stream in sorted(augment_inputs.items()):
            layers = [a for a, _ in self.connections[name]]
            aug_index = cache.augments[name].index
            _, states, augments[name] = self.augments[name].apply(
                {"params": params["augments"][name]}, stream.tokens, cache.augments[name],
                return_states=layers, logits=None, method=Decoder.extend)
            new = self._new_memory(name, params["composition"][name], states,
                                   stream.byte_ends)
            memories[name] = self.bridges[name].write_memory(cache.memory[name], new,
                                                             aug_index)
            zero = jnp.zeros((), jnp.int32)
            ends[name] = jax.lax.dynamic_update_slice(
                ends[name], stream.byte_ends.astype(jnp.int32), (zero, aug_index))
        views = {name: self.bridges[name].read_memory(mem) for name, mem in memories.items()}
        masks = {name: (e[:, None, None, :] <= byte_ends[:, None, :, None])
                 for name, e in ends.items()}

        out, anchor_cache = self._extend_anchor(params, tokens, ctx, cache.anchor, views, masks,
                                                byte_ends, logits)
        return out, ComposedCache(anchor=anchor_cache, augments=augments,
                                  memory=self._keep_memories(memories), ends=ends)

    def end_prompt(self, cache: ComposedCache) -> ComposedCache:
        """Call after the whole prompt has been fed: with `augment_sees="prompt"` the memory is
        now complete, so the augmenting caches are dropped and `extend` stops running them.
        Otherwise the cache is returned unchanged."""
        if self.config.augment_sees == "prompt":
            return cache.replace(augments={})
        return cache

    def _new_memory(self, name: str, tree: Any, states: Mapping[int, Array],
                    positions: Array) -> dict[str, Any]:
        """`Bridge.memory` of the new tokens' augmenting states {layer: [batch, T, D_aug]}:
        {k: [n, batch, T, ...]} from stacked parameters, or {k: (per connection [batch, T, ...],
        ...)} from per-connection ones, each projected by its own weights."""
        layers = [a for a, _ in self.connections[name]]
        if not layers_unstacked(tree):
            stacked = jnp.stack([states[a] for a in layers])
            return self.bridges[name].apply({"params": tree}, stacked, positions,
                                            method="memory")
        single = self._single_bridges[name]
        news = [single.apply({"params": connection_params(tree, i)}, states[a][None], positions,
                             method="memory") for i, a in enumerate(layers)]
        return {k: tuple(n[k][0] for n in news) for k in news[0]}

    def extend(self, params: Mapping[str, Any], tokens: Array, cache: ComposedCache, *,
               logits: str = "last") -> tuple[Array, ComposedCache]:
        """Appends tokens [batch, T] to both models; returns (logits, cache).

        logits: [batch, vocab] for the last new token (`"last"`) or [batch, T, vocab] (`"all"`).
        Each augmenting model in `cache.augments` runs on the new tokens (to its deepest
        connected layer) and its projected states are written into the memory at slots
        index .. index+T-1; the anchor then runs split at the connection layers as in `apply`,
        its cross-attention at slot t reading memory slots start[b] .. t.
        """
        if logits not in ("last", "all"):
            raise ValueError(f"logits: expected 'last' or 'all', got {logits!r}")
        self._check_inputs(tokens)
        params = nn.unbox(params)
        self.check_params(params)
        t = tokens.shape[1]
        index, start = cache.anchor.index, cache.anchor.start
        ctx = make_cache_context(self.anchor_config, cache.anchor, t)  # the new tokens' positions
        memories, augments = dict(cache.memory), {}
        for name, model in self.augments.items():
            if name not in cache.augments:
                continue
            layers = [a for a, _ in self.connections[name]]
            _, states, augments[name] = model.apply(
                {"params": params["augments"][name]}, tokens, cache.augments[name],
                return_states=layers, logits=None, method=Decoder.extend)
            new = self._new_memory(name, params["composition"][name], states, ctx.positions)
            memories[name] = self.bridges[name].write_memory(cache.memory.get(name, {}), new,
                                                             index)
        views = {name: self.bridges[name].read_memory(mem) for name, mem in memories.items()}
        # Every connection's memory has the same slots: one mask serves them all.
        first = next(iter(views))
        mask = self.bridges[first].decode_mask(views[first], start, index, t)

        out, anchor_cache = self._extend_anchor(params, tokens, ctx, cache.anchor, views, mask,
                                                ctx.positions, logits)
        return out, ComposedCache(anchor=anchor_cache, augments=augments,
                                  memory=self._keep_memories(memories))

    def _extend_anchor(self, params: Mapping[str, Any], tokens: Array, ctx, cache: KVCache,
                       memories: Mapping[str, Any], mask: Array | dict[str, Array],
                       positions: Array, logits: str) -> tuple[Array, KVCache]:
        """The anchor's part of `extend` / `extend_text`: its new tokens [batch, T] through its
        cached layers (`ctx`: their `make_cache_context`), each connection's update read from
        `memories` under `mask` at query `positions` (`_anchor_layers`); returns (logits as
        `extend`'s `logits` says, the anchor's cache advanced by T)."""
        anchor_vars = {"params": params["anchor"]}
        index, anchor_cache = cache.index, cache
        h = self.anchor.apply(anchor_vars, tokens, ctx.positions, method=Decoder.embed)

        def run_segment(h, start, stop):
            nonlocal anchor_cache
            h, anchor_cache = self.anchor.apply(anchor_vars, h, ctx, anchor_cache, start, stop,
                                                method=Decoder.run_layers_cached)
            return h

        h = self._anchor_layers(params, h, run_segment, memories, mask, positions)
        if logits == "last":
            h = h[:, -1:]
        out = self.anchor.apply(anchor_vars, h, method=Decoder.head)
        if logits == "last":
            out = out[:, 0]
        return out, anchor_cache.replace(index=index + tokens.shape[1]).constrain()

    def _keep_memories(self, memories: Mapping[str, Any]) -> dict[str, Any]:
        """What the cache keeps of each model's decoding memory (`Bridge.keep_memory`);
        a model whose variant keeps nothing gets no entry."""
        kept = {name: self.bridges[name].keep_memory(mem) for name, mem in memories.items()}
        return {name: mem for name, mem in kept.items() if mem}
