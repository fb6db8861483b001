"""The decoder-only transformer.

Layers are stacked: every block parameter has a leading `layers` axis (created with `nn.scan`)
and the forward pass runs them with `jax.lax.scan`, so compile time does not grow with depth.
The forward is split into `embed` -> `run_layers(start, stop)` -> `head`, which is what lets CALM
add its cross-attention between two layers of the anchor, and lets `hidden_states` stop after the
last layer it needs.

Cached decoding (`Decoder.extend`) appends tokens to a `KVCache` with the same pieces:
`embed` -> `run_layers_cached(start, stop)` -> `head`. With a stacked cache it scans the cache
alongside the layers; with a per-layer cache (and, for speed, per-layer weights from
`unstack_layers`, whose projections that share an input are fused) it unrolls the layer loop,
so no layer's weights or cache slots are copied. `run_layers` takes per-layer weights too (the
layers then run unrolled), e.g. for frozen models in a training step.

Layer numbering: 1-indexed, as in the paper. `states[k]` is the residual stream after block k
(before the final norm); `states[0]` is the embedding output. See `calm_jax.models.config`.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from flax import struct

from calm_jax.models.config import TransformerConfig
from calm_jax.validation import check_like, check_token_array
from calm_jax.models import layers as L
from calm_jax.models.attention import (AttentionContext, CacheContext, KVCache, SelfAttention,
                                       make_cache_context, make_context)

Array = jax.Array

# Primitives of cuDNN's fused attention forward in `jax.nn.dot_product_attention` (its
# custom-VJP forward rule binds the wrapper; the core primitive is what that lowers to).
FUSED_ATTENTION_FORWARD = frozenset({"dot_product_attention_fwd",
                                     "dot_product_attention_fwd_wrapper"})


def _dots_and_fused_attention(prim, *avals, **params) -> bool:
    """"dots" plus the results of cuDNN's fused attention forward (its output and softmax
    statistics, what the fused backward reads): under "dots" alone the backward pass runs
    that forward kernel again in every rematerialised layer."""
    return (prim.name in FUSED_ATTENTION_FORWARD
            or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params))


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_attention": _dots_and_fused_attention,
}


class Block(nn.Module):
    """Pre-norm transformer block (with Gemma's optional post-norms).

    With a `cache` (decoding) the attention appends to it at layer `layer`; see `SelfAttention`.
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, h: Array, ctx: AttentionContext | CacheContext, is_global: Array,
                 cache: KVCache | None = None,
                 layer: int | Array | None = None) -> tuple[Array, KVCache | None]:
        """h [batch, length, embed] -> (h, cache or None); the tuple form suits `nn.scan`."""
        cfg = self.config
        a, cache = SelfAttention(cfg, name="attn")(L.make_norm(cfg, "attn_norm")(h), ctx,
                                                   is_global, cache, layer)
        if cfg.post_norms:
            a = L.make_norm(cfg, "post_attn_norm")(a)
        h = h + a.astype(h.dtype)
        m = L.MLP(cfg, name="mlp")(L.make_norm(cfg, "mlp_norm")(h))
        if cfg.post_norms:
            m = L.make_norm(cfg, "post_mlp_norm")(m)
        h = h + m.astype(h.dtype)
        return nn.with_logical_constraint(h, L.ACT_BLE), cache


# Indexing and layout operations: as cheap to redo in the backward pass as to read back.
_VIEW_PRIMITIVES = frozenset({"dynamic_slice", "squeeze", "reshape", "transpose",
                              "broadcast_in_dim"})


def _save_all_but_views(prim, *_, **__) -> bool:
    return prim.name not in _VIEW_PRIMITIVES


def _partial_stack_policy(remat_policy: str):
    """Checkpoint policy of a partial-stack scan: `remat_policy`'s, never saving one layer's
    weights indexed out of the stack (the backward pass indexes them again).

    For "none" it saves every value except the outputs of indexing and layout operations
    (the weights' indexing, and any reshape of them after it); their inputs are saved or are
    inputs already. Frozen weights are placed in the compute dtype, so no cast of them is
    left to save. "dots", "dots_attention" and "full" never save such values.
    """
    if remat_policy == "none":
        return _save_all_but_views
    return REMAT_POLICIES[remat_policy]


@struct.dataclass
class LayerList:
    """One array per layer in place of a stacked [layers, ...] block parameter: the decoding
    layout made by `unstack_layers`. A decode step then reads each layer's weights where they
    lie; indexing a stack inside the layer loop makes XLA copy that layer's slice every step."""

    arrays: tuple[Array, ...]


def _is_layer_list(x: Any) -> bool:
    return isinstance(x, LayerList)


def unstack_layers(params: Any, fuse: bool = True) -> Any:
    """A Decoder's parameters (its `params` tree) with every stacked block parameter split into
    a `LayerList` and the projections that share an input fused (`fuse_projections`); other
    entries are unchanged, and already split or fused ones are kept. For cached
    decoding with a per-layer `KVCache` (`calm_jax.decoding.unstack_params` does it for any
    model); the training forward takes the stacked tree. `fuse=False` splits without fusing."""
    params = nn.unbox(params)
    if not isinstance(params, Mapping) or "layers" not in params:
        raise ValueError(f"params: expected a Decoder's parameter tree with a 'layers' entry, "
                         f"got {type(params).__name__} with keys "
                         f"{sorted(params) if isinstance(params, Mapping) else None}")

    return {**params, "layers": _split(params["layers"], fuse)}


@functools.partial(jax.jit, static_argnums=1)
def _split(layers: Any, fuse: bool) -> Any:
    """`unstack_leaves(layers)`, then `fuse_projections` if `fuse`, as one program: called
    eagerly, the per-layer slices of the projections it fuses are never all held beside the
    result."""
    layers = unstack_leaves(layers)
    return fuse_projections(layers) if fuse else layers


def fuse_projections(layers: Mapping[str, Any]) -> dict[str, Any]:
    """Per-layer block parameters (`LayerList`s) with the projections that read the same input
    merged into one kernel per layer, so a decode step runs one matrix product where training
    runs two or three: query, key and value into `attn/qkv` ([embed, 3, heads, head_dim]) when
    they have as many heads, else key and value into `attn/kv` ([embed, 2, kv_heads,
    head_dim]); a GLU's gate and up into `mlp/gate_up` ([embed, 2, mlp]); biases alike. The
    parts are stacked on a new axis after the input one, so a sharded heads or mlp axis keeps
    its sharding. `SelfAttention` and `MLP` read whichever form they find; already fused
    parameters are returned unchanged. Part of the per-layer layout (`unstack_layers`), which
    decoding uses and a forward pass runs unrolled (`Decoder.run_layers`)."""
    def stack(denses):  # {"kernel": [d, ...] per layer, "bias"?: [...]} of each Dense
        axis = {"kernel": 1, "bias": 0}  # after the kernel's input axis; the bias has none
        return {name: LayerList(tuple(jnp.stack(parts, axis=axis[name]) for parts in
                                      zip(*(dense[name].arrays for dense in denses))))
                for name in denses[0]}

    out = dict(layers)
    attn = dict(out.get("attn", {}))
    if {"query", "key", "value"} <= attn.keys():
        shape = lambda name: attn[name]["kernel"].arrays[0].shape  # noqa: E731
        if shape("query") == shape("key"):
            attn["qkv"] = stack([attn.pop("query"), attn.pop("key"), attn.pop("value")])
        else:
            attn["kv"] = stack([attn.pop("key"), attn.pop("value")])
        out["attn"] = attn
    mlp = dict(out.get("mlp", {}))
    if {"gate", "up"} <= mlp.keys():
        mlp["gate_up"] = stack([mlp.pop("gate"), mlp.pop("up")])
        out["mlp"] = mlp
    return out


def stack_layers(params: Any) -> Any:
    """The inverse of `unstack_layers`: a Decoder's parameters with every per-layer block
    parameter (`LayerList`) stacked again on a leading layer axis and the fused projections
    split back into query, key and value, gate and up; the stacked tree a Decoder initialises,
    saves and loads. A stacked tree is returned unchanged."""
    params = nn.unbox(params)
    if not isinstance(params, Mapping) or "layers" not in params:
        raise ValueError(f"params: expected a Decoder's parameter tree with a 'layers' entry, "
                         f"got {type(params).__name__}")
    if not layers_unstacked(params["layers"]):
        return params
    return {**params, "layers": _stack(params["layers"])}


@jax.jit
def _stack(layers: Any) -> Any:
    def split(dense, names):  # a fused Dense -> one Dense per part, as `fuse_projections` stacked
        axis = {"kernel": 1, "bias": 0}
        return {part: {k: LayerList(tuple(jnp.take(x, i, axis=axis[k]) for x in v.arrays))
                       for k, v in dense.items()}
                for i, part in enumerate(names)}

    out = dict(layers)
    attn = dict(out.get("attn", {}))
    if "qkv" in attn:
        attn.update(split(attn.pop("qkv"), ("query", "key", "value")))
    if "kv" in attn:
        attn.update(split(attn.pop("kv"), ("key", "value")))
    if "attn" in out:
        out["attn"] = attn
    mlp = dict(out.get("mlp", {}))
    if "gate_up" in mlp:
        mlp.update(split(mlp.pop("gate_up"), ("gate", "up")))
        out["mlp"] = mlp
    return jax.tree.map(lambda x: jnp.stack(x.arrays) if _is_layer_list(x) else x, out,
                        is_leaf=_is_layer_list)


def unstack_leaves(tree: Any) -> Any:
    """Every stacked leaf of `tree` split along its leading axis into a `LayerList` (already
    split ones are kept)."""
    def split(x):
        return x if _is_layer_list(x) else LayerList(tuple(x[i] for i in range(x.shape[0])))

    return jax.tree.map(split, tree, is_leaf=_is_layer_list)


def layers_unstacked(params: Any) -> bool:
    """Whether a parameter tree holds per-layer (`LayerList`) block parameters."""
    return any(_is_layer_list(x) for x in jax.tree.leaves(params, is_leaf=_is_layer_list))


def _index_layer(params: Any, layer: int | Array) -> Any:
    """One layer's block parameters: taken from a `LayerList` (`layer` a Python int), else
    indexed out of the stack."""
    def pick(p):
        if _is_layer_list(p):
            return p.arrays[layer]
        return jax.lax.dynamic_index_in_dim(p, layer, 0, keepdims=False)

    return jax.tree.map(pick, params, is_leaf=_is_layer_list)


class Decoder(nn.Module):
    """Decoder-only language model.

    Call it with tokens [batch, length] to get logits [batch, length, vocab] and, for the layers
    named in `return_states`, the residual-stream states {layer: [batch, length, embed]}.
    """

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.embedder = nn.Embed(
            cfg.vocab_size, cfg.embed_dim, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(stddev=1.0 if cfg.scale_embeddings else 0.02),
                ("vocab", "embed")),
            name="embedder")
        if cfg.position == "learned":
            self.pos_embedder = nn.Embed(
                cfg.max_len, cfg.embed_dim, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                embedding_init=nn.with_logical_partitioning(
                    nn.initializers.normal(stddev=0.01), (None, "embed")),
                name="pos_embedder")
        self.layers = nn.scan(
            Block, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(nn.broadcast, 0), length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
        self.final_norm = L.make_norm(cfg, "final_norm")
        if not cfg.tie_embeddings:
            self.lm_head = L.Dense((cfg.embed_dim,), (cfg.vocab_size,), ("embed",), ("vocab",),
                                   dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                                   name="lm_head")

    # Pieces of the forward pass -----------------------------------------------------------------

    def context(self, tokens: Array, positions: Array | None = None,
                segment_ids: Array | None = None) -> tuple[Array, AttentionContext]:
        """Default positions (0..T-1, or restarting per packed segment) and attention inputs.

        Checks the inputs' shapes and dtypes (`check_inputs`) when traced."""
        check_inputs(self.config, tokens, positions, segment_ids)
        positions = default_positions(tokens, segment_ids) if positions is None else positions
        return positions, make_context(self.config, positions, segment_ids)

    def embed(self, tokens: Array, positions: Array) -> Array:
        """tokens [batch, length] -> residual stream [batch, length, embed]."""
        cfg = self.config
        h = self.embedder(tokens)
        if cfg.scale_embeddings:
            h = h * jnp.asarray(cfg.embed_dim ** 0.5, h.dtype)
        if cfg.position == "learned":
            h = h + self.pos_embedder(positions)
        return nn.with_logical_constraint(h, L.ACT_BLE)

    def run_layers(self, h: Array, ctx: AttentionContext, start: int, stop: int) -> Array:
        """Applies blocks start+1 .. stop (1-indexed) to h [batch, length, embed]."""
        cfg = self.config
        if not 0 <= start <= stop <= cfg.num_layers:
            raise ValueError(f"layer range: expected 0 <= start <= stop <= {cfg.num_layers}, "
                             f"got ({start}, {stop})")
        is_global = jnp.asarray(cfg.layer_is_global())
        if self.is_initializing():
            # Creates the stacked parameters; only whole-stack runs happen at init.
            if (start, stop) != (0, cfg.num_layers):
                raise ValueError("run_layers: initialise with the whole stack")
            return self.layers(h, ctx, is_global)[0]
        if start == stop:
            return h
        params = nn.unbox(self.layers.variables["params"])
        block = Block(cfg, parent=None)  # unbound: applied to one layer's weights at a time
        if layers_unstacked(params):
            # Per-layer weights (`unstack_layers`, e.g. a frozen model's): the layers run
            # unrolled, each reading its own arrays (fused projections included), so no
            # weight is indexed out of a stack and no activation is stacked for the backward.
            def one(h, layer_params, layer_is_global):
                return block.apply({"params": layer_params}, h, ctx, layer_is_global)[0]

            policy = REMAT_POLICIES.get(cfg.remat_policy)
            if policy is not None:
                one = jax.checkpoint(one, policy=policy)
            for layer in range(start, stop):
                h = one(h, _index_layer(params, layer), is_global[layer])
            return h
        if (start, stop) == (0, cfg.num_layers):
            # The whole stack: the scan reads each layer's weights as its `xs`.
            def body(carry, xs):
                layer_params, layer_is_global = xs
                return block.apply({"params": layer_params}, carry, ctx, layer_is_global)

            xs = (params, is_global)
            policy = REMAT_POLICIES.get(cfg.remat_policy)
        else:
            # Part of the stack (CALM splits the anchor at its connections): each step indexes
            # the stacked weights. Slicing them before the scan (`params[start:stop]`) would
            # make a copy of those layers' weights that the backward pass keeps as a residual
            # (a frozen anchor's weights, duplicated); indexed here and never saved (see
            # `_partial_stack_policy`), the backward re-indexes the original stack instead.
            def body(carry, layer):
                return block.apply({"params": _index_layer(params, layer)}, carry, ctx,
                                   is_global[layer])

            xs = jnp.arange(start, stop, dtype=jnp.int32)
            policy = _partial_stack_policy(cfg.remat_policy)
        if policy is not None:
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        h, _ = jax.lax.scan(body, h, xs, unroll=cfg.scan_unroll)
        return h

    def head(self, h: Array) -> Array:
        """Final norm and output layer: h [batch, length, embed] -> logits [.., vocab] (fp32)."""
        cfg = self.config
        x = self.final_norm(h)
        if cfg.tie_embeddings:
            logits = self.embedder.attend(x)
        else:
            logits = self.lm_head(x)
        logits = nn.with_logical_constraint(
            logits, ("activation_batch", "activation_length", "activation_vocab"))
        return L.softcap(logits.astype(jnp.float32), cfg.final_logit_softcap)

    # Cached decoding ----------------------------------------------------------------------------

    def run_layers_cached(self, h: Array, ctx: CacheContext, cache: KVCache, start: int,
                          stop: int) -> tuple[Array, KVCache]:
        """Blocks start+1 .. stop on h [batch, T, embed], appending to `cache`.

        A stacked cache: one `lax.scan` over the layers; the stacked cache [layers, ...] is
        carried and layer l writes its keys/values into cache layer l in place (weights must be
        stacked too). A per-layer cache: the loop is unrolled, layer l updating its own cache
        arrays and reading its weights from a `LayerList` (or, with stacked weights, a static
        slice of the stack). `cache.index` is not advanced (the caller, e.g. `extend`, does so
        once all layers have run).
        """
        cfg = self.config
        if not 0 <= start <= stop <= cache.num_layers:
            raise ValueError(f"layer range: expected 0 <= start <= stop <= {cache.num_layers} "
                             f"(the cache's layers), got ({start}, {stop})")
        if self.is_initializing():
            raise ValueError("run_layers_cached: initialise the Decoder with its __call__")
        if start == stop:
            return h, cache
        params = nn.unbox(self.layers.variables["params"])
        is_global = jnp.asarray(cfg.layer_is_global())
        block = Block(cfg, parent=None)  # unbound: applied to one layer's slice at a time
        if cache.per_layer:
            for layer in range(start, stop):
                h, cache = block.apply({"params": _index_layer(params, layer)}, h, ctx,
                                       is_global[layer], cache, layer)
            return h, cache
        if layers_unstacked(params):
            raise ValueError("cache: expected a per-layer KVCache (KVCache.zeros(..., "
                             "per_layer=True)) with per-layer weights (unstack_layers), got a "
                             "stacked cache")

        def body(carry, layer):
            h, cache = carry
            h, cache = block.apply({"params": _index_layer(params, layer)}, h, ctx,
                                   is_global[layer], cache, layer)
            return (h, cache), None

        layers = jnp.arange(start, stop, dtype=jnp.int32)
        (h, cache), _ = jax.lax.scan(body, (h, cache), layers, unroll=cfg.scan_unroll)
        return h, cache

    def extend(self, tokens: Array, cache: KVCache, *, return_states: Iterable[int] = (),
               logits: str | None = "last") -> tuple[Array | None, dict[int, Array], KVCache]:
        """Appends tokens [batch, T] (left-padded rows, see `KVCache`) to the cache.

        Returns (logits, states, cache): logits [batch, vocab] for the last new token
        (`logits="last"`), [batch, T, vocab] (`"all"`) or None (`None`: the blocks past the
        deepest requested state are not run, so the cache may hold only that many layers);
        states {layer: [batch, T, embed]}; the cache with `index` advanced by T.
        """
        cfg = self.config
        if logits not in ("last", "all", None):
            raise ValueError(f"logits: expected 'last', 'all' or None, got {logits!r}")
        layers = validate_layers(cfg, return_states, "return_states")
        check_token_array(tokens, "tokens")
        t = tokens.shape[1]
        ctx = make_cache_context(cfg, cache, t)
        h = self.embed(tokens, ctx.positions)
        states, done = {}, 0
        for layer in layers:
            h, cache = self.run_layers_cached(h, ctx, cache, done, layer)
            states[layer], done = h, layer
        out = None
        if logits is not None:
            h, cache = self.run_layers_cached(h, ctx, cache, done, cfg.num_layers)
            out = self.head(h[:, -1:])[:, 0] if logits == "last" else self.head(h)
        return out, states, cache.replace(index=cache.index + t).constrain()

    # Whole passes -------------------------------------------------------------------------------

    def hidden_states(self, tokens: Array, layers: Iterable[int], *,
                      positions: Array | None = None,
                      segment_ids: Array | None = None) -> dict[int, Array]:
        """Residual states after the given layers, running only as deep as the deepest one."""
        layers = validate_layers(self.config, layers, "layers")
        positions, ctx = self.context(tokens, positions, segment_ids)
        h = self.embed(tokens, positions)
        states, done = {}, 0
        for layer in layers:
            h = self.run_layers(h, ctx, done, layer)
            states[layer], done = h, layer
        return states

    def __call__(self, tokens: Array, *, positions: Array | None = None,
                 segment_ids: Array | None = None,
                 return_states: Iterable[int] = ()) -> tuple[Array, dict[int, Array]]:
        """tokens [batch, length] -> (logits [batch, length, vocab], {layer: state})."""
        cfg = self.config
        layers = validate_layers(cfg, return_states, "return_states")
        positions, ctx = self.context(tokens, positions, segment_ids)
        h = self.embed(tokens, positions)
        if self.is_initializing():
            return self.head(self.run_layers(h, ctx, 0, cfg.num_layers)), {}
        states, done = {}, 0
        for layer in layers:
            h = self.run_layers(h, ctx, done, layer)
            states[layer], done = h, layer
        h = self.run_layers(h, ctx, done, cfg.num_layers)
        return self.head(h), states


def check_inputs(cfg: TransformerConfig, tokens: Any, positions: Any = None,
                 segment_ids: Any = None) -> None:
    """Static checks of a forward's inputs (shapes and dtypes; tracers are fine): integer
    tokens [batch, length], positions and segment ids of the same shape, and with learned
    positions and no explicit `positions`, length <= `max_len` (past it the position table
    is read out of range, which gives NaN). Raises ValueError naming the argument. Token ids'
    values are checked where they are concrete (`calm_jax.validation.check_tokens`) or in the
    checked mode (`calm_jax.validation.checked_apply`)."""
    shape = check_token_array(tokens, "tokens")
    check_like(positions, shape, "positions")
    check_like(segment_ids, shape, "segment_ids")
    if cfg.position == "learned" and positions is None and shape[1] > cfg.max_len:
        raise ValueError(f"tokens: expected length <= max_len={cfg.max_len} (the size of the "
                         f"learned position table), got length {shape[1]}")


def validate_layers(cfg: TransformerConfig, layers: Iterable[int], field: str) -> tuple[int, ...]:
    """Sorted unique layer numbers, each an integer in [0, num_layers]."""
    layers = tuple(layers)
    odd = [x for x in layers if isinstance(x, bool) or not isinstance(x, (int, np.integer))]
    if odd:
        raise ValueError(f"{field}: expected integer layer numbers, got {odd}")
    layers = tuple(sorted(set(int(x) for x in layers)))
    bad = [x for x in layers if not 0 <= x <= cfg.num_layers]
    if bad:
        raise ValueError(f"{field}: expected layer numbers in [0, {cfg.num_layers}] "
                         f"(1-indexed; 0 is the embedding output), got {bad}")
    return layers


def default_positions(tokens: Array, segment_ids: Array | None) -> Array:
    """0..T-1 per row, restarting at every new packed segment when segment ids are given."""
    b, t = tokens.shape
    index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
        return index
    starts = jnp.concatenate(
        [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return index - start_index


def init_decoder(cfg: TransformerConfig, rng: Array, batch: int = 1, length: int = 8):
    """Boxed variables of a fresh `Decoder` (use `nn.unbox` for plain arrays)."""
    tokens = jnp.zeros((batch, min(length, cfg.max_len)), jnp.int32)
    return Decoder(cfg).init(rng, tokens)
