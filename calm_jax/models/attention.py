"""Attention: masks, the shared `attend` kernel and the self-attention layer.

Masks are boolean `[batch, 1, q_len, kv_len]` arrays, True where a query may read a key. Token
streams are described by `segment_ids` ([batch, length] int; 0 marks padding, equal positive ids
mark one packed example) and by each token's index in the stream. With no segment ids and no
sliding window the mask is plain causal and is not materialised (`is_causal=True`), which lets
cuDNN use its fused causal kernel.

For decoding, `KVCache` holds every layer's keys and values (stacked like the parameters, or one
array per layer) and `SelfAttention`, given a cache, appends to it; see the section at the end of
this module.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import struct

from calm_jax.models.config import TransformerConfig
from calm_jax.models import layers as L

Array = jax.Array


def attention_mask(q_segment_ids: Array, kv_segment_ids: Array, q_index: Array,
                   kv_index: Array, *, causal: bool = True, window: int | None = None,
                   kv_valid: Array | None = None) -> Array:
    """Boolean mask [batch, 1, q_len, kv_len].

    Args:
      q_segment_ids, kv_segment_ids: [batch, q_len] / [batch, kv_len]; 0 is padding.
      q_index, kv_index: [batch, q_len] / [batch, kv_len] positions in the token stream.
      causal: keys must not come after the query.
      window: if set, keys at most `window - 1` positions before the query.
      kv_valid: optional extra [batch, kv_len] predicate on keys (e.g. "is in the prompt").
    """
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    mask = same & (kv_segment_ids[:, None, :] != 0)
    delta = q_index[:, :, None] - kv_index[:, None, :]
    if causal:
        mask &= delta >= 0
    if window is not None:
        mask &= delta < window
    if kv_valid is not None:
        mask &= kv_valid[:, None, :]
    return mask[:, None]


CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)

# The backend "auto" resolves for (`compiling_for`); None: the process's default backend.
_TARGET_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "calm_jax_attention_backend", default=None)


@contextlib.contextmanager
def compiling_for(backend: str) -> Iterator[str]:
    """Inside, `attend` resolves `impl="auto"` as on `backend` ("gpu", "cuda", "cpu", ...)
    rather than on the process's default backend: for a program traced here and compiled ahead
    of time for a device this process does not have (`bench/gpu_aot.py`)."""
    if not isinstance(backend, str) or not backend:
        raise ValueError(f"backend: expected a platform name such as 'gpu', got {backend!r}")
    token = _TARGET_BACKEND.set(backend)
    try:
        yield backend
    finally:
        _TARGET_BACKEND.reset(token)


def choose_attention_impl(impl: str, *, backend: str, dtype, head_dim: int, q_len: int,
                          kv_len: int, has_mask: bool, logit_softcap: float | None) -> str:
    """The implementation `attend` runs for `impl` ("xla", "cudnn" or "auto").

    "auto" takes cuDNN's fused flash attention where it is known to apply: a GPU backend,
    bf16/fp16 inputs, head_dim a multiple of 8 up to 128, no explicit mask (plain causal, so
    cuDNN's own causal mask applies; packed segments and sliding windows keep XLA), no logit
    soft-capping, and as many queries as keys. Everything else runs XLA's implementation.
    """
    if impl != "auto":
        return impl
    fused = (backend in ("gpu", "cuda") and jnp.dtype(dtype) in map(jnp.dtype, CUDNN_DTYPES)
             and head_dim % 8 == 0 and head_dim <= 128 and not has_mask
             and logit_softcap is None and q_len == kv_len)
    return "cudnn" if fused else "xla"


def attend(q: Array, k: Array, v: Array, *, mask: Array | None, is_causal: bool,
           scale: float, logit_softcap: float | None = None, impl: str = "xla") -> Array:
    """Multi-head attention core. q [B, T, N, H]; k, v [B, S, K, H] with K dividing N.

    Uses `jax.nn.dot_product_attention` (XLA or cuDNN; "auto" chooses, see
    `choose_attention_impl`); logit soft-capping (Gemma 2), which that function does not offer,
    takes an explicit einsum path.
    """
    backend = _TARGET_BACKEND.get() or jax.default_backend()
    impl = choose_attention_impl(impl, backend=backend, dtype=q.dtype, head_dim=q.shape[-1],
                                 q_len=q.shape[1], kv_len=k.shape[1], has_mask=mask is not None,
                                 logit_softcap=logit_softcap)
    if logit_softcap is None:
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=is_causal and mask is None, scale=scale,
            implementation=impl)
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    logits = L.softcap(logits, logit_softcap)
    if mask is None and is_causal:
        mask = jnp.tril(jnp.ones((t, k.shape[1]), bool))[None, None]
    if mask is not None:  # [B, 1, T, S] -> [B, 1, 1, T, S]
        logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


@struct.dataclass
class AttentionContext:
    """Per-sequence inputs shared by every layer of one forward pass.

    `mask` / `local_mask` are None when attention is plain causal; `rope` / `rope_local` hold
    (sin, cos) tables or None when the model has no rotary embeddings.
    """

    mask: Array | None
    local_mask: Array | None
    rope: tuple[Array, Array] | None
    rope_local: tuple[Array, Array] | None


def make_context(cfg: TransformerConfig, positions: Array,
                 segment_ids: Array | None) -> AttentionContext:
    """Builds masks and rotary tables for tokens at `positions` ([batch, length])."""
    b, t = positions.shape
    index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = local_mask = None
    if segment_ids is not None or cfg.sliding_window is not None:
        seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
        mask = attention_mask(seg, seg, index, index)
        if cfg.sliding_window is not None:
            local_mask = attention_mask(seg, seg, index, index, window=cfg.sliding_window)
    rope = rope_local = None
    if cfg.position == "rope":
        rope = L.rope_tables(cfg, positions, cfg.rope_theta)
        if cfg.sliding_window is not None and cfg.rope_local_theta is not None:
            rope_local = L.rope_tables(cfg, positions, cfg.rope_local_theta)
    return AttentionContext(mask=mask, local_mask=local_mask, rope=rope, rope_local=rope_local)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with grouped-query heads, RoPE and optional QK-norm.

    With a `cache` (decoding), this layer's keys and values for the new tokens are written into
    the KV cache at layer `layer` (`KVCache.append`: an int, or a traced int for a stacked cache)
    and attention reads that layer's slots (always the XLA implementation with an explicit
    mask). The parameters are the same.
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: Array, ctx: AttentionContext | CacheContext, is_global: Array,
                 cache: KVCache | None = None,
                 layer: int | Array | None = None) -> tuple[Array, KVCache | None]:
        """x [batch, length, embed] -> ([batch, length, embed], updated cache or None).

        `is_global` is a traced bool (sliding-window layers use the local mask and RoPE base).
        """
        cfg = self.config
        d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.dims_per_head
        common = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                      use_bias=cfg.use_bias or cfg.qkv_bias)
        fused = L.fused_names(self)  # the decoding layout's (`fuse_projections`), if any
        if "qkv" in fused:  # equal query and key/value head counts: one product
            qkv = L.Dense((d,), (3, n, h), ("embed",), (None, "heads", "head_dim"),
                          name="qkv", **common)(x)
            q, key, val = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        else:
            q = L.Dense((d,), (n, h), ("embed",), ("heads", "head_dim"), name="query",
                        **common)(x)
            if "kv" in fused:  # grouped-query heads: keys and values in one product
                kv = L.Dense((d,), (2, k, h), ("embed",), (None, "kv_heads", "head_dim"),
                             name="kv", **common)(x)
                key, val = kv[..., 0, :, :], kv[..., 1, :, :]
            else:
                key = L.Dense((d,), (k, h), ("embed",), ("kv_heads", "head_dim"), name="key",
                              **common)(x)
                val = L.Dense((d,), (k, h), ("embed",), ("kv_heads", "head_dim"),
                              name="value", **common)(x)
        if cfg.qk_norm:
            q = L.make_norm(cfg, "query_norm", axis_name="head_dim")(q)
            key = L.make_norm(cfg, "key_norm", axis_name="head_dim")(key)
        if ctx.rope is not None:
            sin, cos = ctx.rope
            if ctx.rope_local is not None:
                sin = jnp.where(is_global, sin, ctx.rope_local[0])
                cos = jnp.where(is_global, cos, ctx.rope_local[1])
            q, key = L.apply_rope(q, sin, cos), L.apply_rope(key, sin, cos)
        impl, is_causal = cfg.attention_impl, True
        if cache is not None:
            cache, key, val = cache.append(layer, ctx.index, key, val)
            key, val = key.astype(q.dtype), val.astype(q.dtype)
            impl, is_causal = "xla", False  # the cache mask already encodes causality
        mask = ctx.mask
        if ctx.local_mask is not None:
            mask = jnp.where(is_global, ctx.mask, ctx.local_mask)
        scale = cfg.query_scale if cfg.query_scale is not None else h ** -0.5
        out = attend(q, key, val, mask=mask, is_causal=is_causal, scale=scale,
                     logit_softcap=cfg.attn_logit_softcap, impl=impl)
        out = L.Dense((n, h), (d,), ("heads", "head_dim"), ("embed",), name="out",
                      dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                      use_bias=cfg.use_bias)(out)
        return out, cache


# Cached decoding ------------------------------------------------------------------------------
#
# A KV cache holds the post-RoPE keys and values of every layer. Rows are LEFT-padded: row b's
# real tokens fill slots start[b] .. index-1, so the next token of every row is written at the
# same slot `index` and its position in its own sequence is `index - start[b]`. Two layouts:
#
# * stacked (`KVCache.zeros`'s default): k, v [layers, batch, cache_len, kv_heads, head_dim],
#   like the stacked parameters. The stack is carried through the scan over layers and each
#   layer writes its slice in place (`lax.dynamic_update_slice`), so the decode program does
#   not grow with depth. Reading layer l's keys indexes the stack at a traced layer, which XLA
#   materialises as a copy of that layer's slots every step (as it does for each layer's
#   weights).
# * per layer (`per_layer=True`): k, v are tuples of one [batch, kv_heads, cache_len, head_dim]
#   array per layer. Heads come before slots so that attention's two products can read the
#   cache as it lies: with [.., cache_len, kv_heads, ..] XLA's CPU backend transposes a copy of
#   every layer's keys and values at every step (with this order it does not, for batch and
#   kv_heads above 1; bench/decode.py's `step_copies` shows it for any backend). The layer
#   loop is unrolled (`Decoder.run_layers_cached`), each layer updates and reads its own
#   buffers, and with per-layer weights (`unstack_layers`) a decode step reads every weight and
#   every cache slot once, with no per-layer copies; the program grows with depth. This is the
#   layout `calm_jax.decoding.generate` uses by default.

KV_CACHE_AXES = ("layers", "activation_batch", "activation_length", "kv_heads", "head_dim")


@struct.dataclass
class KVCache:
    """Keys and values of one decoder, and where its rows stand.

    Attributes:
      k, v: [layers, batch, cache_len, kv_heads, head_dim] (stacked), or tuples of one
        [batch, kv_heads, cache_len, head_dim] array per layer (per layer); compute dtype.
      start: [batch] int32, first real slot of each row (the number of left pads).
      index: [] int32, the slot the next token is written to (slots < index are filled).
    """

    k: Array | tuple[Array, ...]
    v: Array | tuple[Array, ...]
    start: Array
    index: Array

    @classmethod
    def zeros(cls, cfg: TransformerConfig, batch: int, cache_len: int, start: Array | None = None,
              *, num_layers: int | None = None, per_layer: bool = False) -> "KVCache":
        """An empty cache of `cache_len` slots for `num_layers` (default: all) layers, stacked
        or (`per_layer`) one array per layer."""
        num_layers = cfg.num_layers if num_layers is None else num_layers
        if not 0 < num_layers <= cfg.num_layers:
            raise ValueError(f"num_layers: expected a value in [1, {cfg.num_layers}], "
                             f"got {num_layers}")
        if cache_len <= 0:
            raise ValueError(f"cache_len: expected a positive integer, got {cache_len}")
        start = jnp.zeros((batch,), jnp.int32) if start is None else start
        start = jnp.broadcast_to(jnp.asarray(start, jnp.int32), (batch,))
        kv, dim, dtype = cfg.kv_heads, cfg.dims_per_head, cfg.compute_dtype
        if per_layer:
            k, v = (tuple(jnp.zeros((batch, kv, cache_len, dim), dtype) for _ in range(num_layers))
                    for _ in range(2))
        else:
            k, v = (jnp.zeros((num_layers, batch, cache_len, kv, dim), dtype) for _ in range(2))
        return cls(k=k, v=v, start=start, index=jnp.zeros((), jnp.int32))

    @property
    def per_layer(self) -> bool:
        """Whether k and v hold one array per layer (else one stacked array)."""
        return isinstance(self.k, tuple)

    @property
    def num_layers(self) -> int:
        return len(self.k) if self.per_layer else self.k.shape[0]

    @property
    def length(self) -> int:
        """Number of slots (`cache_len`)."""
        return self.k[0].shape[2] if self.per_layer else self.k.shape[2]

    def append(self, layer: int | Array, index: Array, key: Array,
               value: Array) -> tuple["KVCache", Array, Array]:
        """Writes key, value [batch, T, kv_heads, head_dim] of `layer` at slots index ..
        index+T-1; returns (cache, that layer's keys, values [batch, cache_len, kv_heads,
        head_dim], in either layout).

        `layer` is a Python int for a per-layer cache, an int or traced int32 when stacked.
        """
        zero = jnp.zeros((), jnp.int32)
        if self.per_layer:
            def write(arrays, new):  # arrays[layer]: [batch, kv_heads, cache_len, head_dim]
                new = jnp.swapaxes(new, 1, 2).astype(arrays[layer].dtype)
                updated = jax.lax.dynamic_update_slice(arrays[layer], new,
                                                       (zero, zero, index, zero))
                return arrays[:layer] + (updated,) + arrays[layer + 1:], jnp.swapaxes(
                    updated, 1, 2)

            (k, key), (v, value) = write(self.k, key), write(self.v, value)
            return self.replace(k=k, v=v), key, value
        where = (jnp.asarray(layer, jnp.int32), zero, index, zero, zero)
        k = jax.lax.dynamic_update_slice(self.k, key[None].astype(self.k.dtype), where)
        v = jax.lax.dynamic_update_slice(self.v, value[None].astype(self.v.dtype), where)
        return (self.replace(k=k, v=v), jax.lax.dynamic_index_in_dim(k, layer, 0, False),
                jax.lax.dynamic_index_in_dim(v, layer, 0, False))

    def constrain(self) -> "KVCache":
        """Applies the logical sharding `KV_CACHE_AXES` to k and v (a no-op without rules)."""
        if self.per_layer:
            axes = tuple(KV_CACHE_AXES[i] for i in (1, 3, 2, 4))  # [batch, heads, slots, dim]
            return self.replace(k=tuple(nn.with_logical_constraint(x, axes) for x in self.k),
                                v=tuple(nn.with_logical_constraint(x, axes) for x in self.v))
        return self.replace(k=nn.with_logical_constraint(self.k, KV_CACHE_AXES),
                            v=nn.with_logical_constraint(self.v, KV_CACHE_AXES))


@struct.dataclass
class CacheContext:
    """Inputs shared by every layer when T new tokens are appended to a cache.

    Attributes:
      index: [] int32, slot of the first new token.
      positions: [batch, T] int32, each new token's position in its own sequence.
      mask, local_mask: [batch, 1, T, cache_len] bool (local_mask None without sliding window).
      rope, rope_local: (sin, cos) [batch, T, head_dim // 2] or None, as in `AttentionContext`.
    """

    index: Array
    positions: Array
    mask: Array
    local_mask: Array | None
    rope: tuple[Array, Array] | None
    rope_local: tuple[Array, Array] | None


def cache_mask(start: Array, index: Array, length: int, cache_len: int, *,
               window: int | None = None) -> Array:
    """[batch, 1, length, cache_len] mask: query slot index+t reads real slots <= itself.

    `start` [batch] is each row's first real slot; a `window` keeps keys less than `window`
    slots (= positions) before the query.
    """
    b = start.shape[0]
    q_slots = jnp.broadcast_to(index + jnp.arange(length, dtype=jnp.int32), (b, length))
    kv_slots = jnp.broadcast_to(jnp.arange(cache_len, dtype=jnp.int32), (b, cache_len))
    ones_q, ones_kv = jnp.ones((b, length), jnp.int32), jnp.ones((b, cache_len), jnp.int32)
    return attention_mask(ones_q, ones_kv, q_slots, kv_slots, window=window,
                          kv_valid=kv_slots >= start[:, None])


def make_cache_context(cfg: TransformerConfig, cache: KVCache, length: int) -> CacheContext:
    """Masks, positions and rotary tables for `length` tokens appended to `cache`."""
    b = cache.start.shape[0]
    slots = cache.index + jnp.arange(length, dtype=jnp.int32)
    # Pad slots (before `start`) get position 0; nothing reads them.
    positions = jnp.maximum(slots[None, :] - cache.start[:, None], 0).astype(jnp.int32)
    positions = jnp.broadcast_to(positions, (b, length))
    mask = cache_mask(cache.start, cache.index, length, cache.length)
    local_mask = None
    if cfg.sliding_window is not None:
        local_mask = cache_mask(cache.start, cache.index, length, cache.length,
                                window=cfg.sliding_window)
    rope = rope_local = None
    if cfg.position == "rope":
        rope = L.rope_tables(cfg, positions, cfg.rope_theta)
        if cfg.sliding_window is not None and cfg.rope_local_theta is not None:
            rope_local = L.rope_tables(cfg, positions, cfg.rope_local_theta)
    return CacheContext(index=cache.index, positions=positions, mask=mask,
                        local_mask=local_mask, rope=rope, rope_local=rope_local)
