"""The built-in composition variants (`CompositionConfig.kind`), each one `Bridge` subclass.

* "cross_attention" (`CrossAttention`, CALM): the anchor query attends over the projected
  augmenting states, causally; its decoding cache keeps every connection's keys and values.
* "fusion" (`Fusion`, the attention-free ablation, same parameter budget): position t mixes
  the anchor state with the projected augmenting state at t through a gated feed-forward;
  position-wise, so its decoding keeps nothing.

The cross-attention's keys and values are linear in the projected states, so its `memory` may
multiply the projection (and the states' norm scale s) into the key and value kernels first,
((x s) P + b) W_k = x (diag(s) P W_k) + b W_k (`precompose_memory`): it does so where that
costs fewer multiply-adds for the states each device holds (many, as in a training step), and
projects first where it does not (a decode step's few states). Same parameters, same function,
same gradients, in either order. Its decoding layout (`decoding_params`) stores the
precomposed kernels.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from calm_jax import partitioning as part
from calm_jax.bridge import Bridge, register_variant
from calm_jax.models import layers as L
from calm_jax.models.attention import attend, cache_mask

Array = jax.Array

# Logical axes of the cross-attention's stacked decoding memory [n, batch, mem_len, heads, hd].
MEMORY_AXES = ("connections", "activation_batch", "activation_length", "heads", "head_dim")


@register_variant("cross_attention")
class CrossAttention(Bridge):
    """CALM's f_cross: per connection, cross-attention from the normalised anchor state into
    the projected augmenting states (W_q, W_k, W_v: D_anchor x heads x head_dim; W_o zero-
    initialised), optionally rotary at the shared stream's positions (`config.rope_theta`)."""

    position_wise = False
    cross_tokenizer = True

    def setup(self):
        db, h, dh = self.anchor_dim, self.num_heads, self.head_dim
        init = L.dense_init(1, (2, 3))
        # The decoding layout (`decoding_params`) holds the memory's projection already
        # multiplied into its key and value kernels (`precompose_memory`).
        self.precomposed = (not self.is_initializing()
                            and "memory_kv" in self.variables.get("params", {}))
        # Precomposed, the augmenting norm's scale is part of memory_kv.
        self.setup_input_norms(augment=not self.precomposed)
        if self.precomposed:
            self.memory_kv = self._param("memory_kv", nn.initializers.zeros,
                                         (self.augment_dim, 2, h, dh),
                                         ("augment_embed", None, "heads", "head_dim"))
            if self.config.proj_bias:
                self.memory_kv_b = self._param("memory_kv_bias", nn.initializers.zeros,
                                               (2, h, dh), (None, "heads", "head_dim"))
        else:
            self.setup_projection()
        self.w_q = self._param("query", init, (db, h, dh), ("embed", "heads", "head_dim"))
        if not self.precomposed:
            self.w_k = self._param("key", init, (db, h, dh), ("embed", "heads", "head_dim"))
            self.w_v = self._param("value", init, (db, h, dh), ("embed", "heads", "head_dim"))
        self.w_o = self._param("out", nn.initializers.zeros, (h, dh, db),
                               ("heads", "head_dim", "embed"))

    def _rotate(self, x: Array, positions: Array | None) -> Array:
        """Rotary embedding of x [batch, length, heads, head_dim] at positions [batch, length]."""
        theta = self.config.rope_theta
        if theta is None:
            return x
        if positions is None:
            raise ValueError("positions: expected [batch, length] token positions with "
                             "composition.rope_theta set, got None")
        dim = self.head_dim
        inv = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
        angles = positions.astype(jnp.float32)[..., None] * inv
        return L.apply_rope(x, jnp.sin(angles), jnp.cos(angles))

    def memory(self, states: Array, positions: Array | None = None) -> dict[str, Array]:
        """states [n, batch, aug_len, D_aug] -> {'key', 'value'} [n, batch, aug_len, heads,
        head_dim] (keys rotated to `positions` [batch, aug_len] with `rope_theta`)."""
        x = states.astype(self.dtype)
        kv = self._memory_kernels(x.shape[1] * x.shape[2] // part.batch_shards())
        if kv is None:
            p = self.project(x)
            key = jnp.einsum("nbsd,ndhk->nbshk", p, self.w_k.astype(self.dtype))
            value = jnp.einsum("nbsd,ndhk->nbshk", p, self.w_v.astype(self.dtype))
        else:  # the norm's scale is in the kernel: the states themselves take no gradient
            kernel, bias = kv
            if self.config.normalize_inputs:
                x = L.normalize(x, "rmsnorm", self.config.norm_eps).astype(self.dtype)
            both = jnp.einsum("nbsa,nathk->nbsthk", x, kernel.astype(self.dtype))
            if bias is not None:
                both = both + bias[:, None, None].astype(self.dtype)
            key, value = both[:, :, :, 0], both[:, :, :, 1]
        key = jax.vmap(lambda k: self._rotate(k, positions))(key)
        return {"key": key, "value": value}

    def _memory_kernels(self, tokens: int) -> tuple[Array, Array | None] | None:
        """(kernel [n, D_aug, 2, heads, head_dim], bias [n, 2, heads, head_dim] or None) that
        give the memory's keys and values in one product from the augmenting states, RMS-
        normalised without the norm's scale (`precompose_memory`: the scale is in the kernel),
        or None where projecting first costs fewer multiply-adds for `tokens` states per
        connection and device (few tokens, as in a decode step; the product is computed whole
        on every device that holds a share of the batch).

        ((x s) P + b) W = x (diag(s) P W) + b W, so either order computes the same function of
        the same parameters, gradients included; P W costs D_aug D_anchor 2F once, and then each
        token D_aug 2F instead of D_aug D_anchor + D_anchor 2F (F = heads x head_dim). With the
        scale s in the kernel, its gradient comes from the kernel's: no gradient of the
        [n, batch, length, D_aug] normalised states is formed.
        """
        c = self.config
        if self.precomposed:
            return self.memory_kv, self.memory_kv_b if c.proj_bias else None
        da, db, f2 = self.augment_dim, self.anchor_dim, 2 * self.num_heads * self.head_dim
        if da * db * f2 + tokens * da * f2 >= tokens * (da * db + db * f2):
            return None
        return precompose_memory(self.proj, self.proj_b if c.proj_bias else None,
                                 self.w_k, self.w_v, self.dtype,
                                 self.augment_norm if c.normalize_inputs else None)

    def __call__(self, i: int, h: Array, memory: dict[str, Array], mask: Array | None,
                 positions: Array | None = None) -> Array:
        """Connection i's update for the anchor state h [batch, len, D_anchor] (same shape);
        `positions` [batch, len] of the queries, needed with `rope_theta`."""
        x = self.query_input(i, h)
        q = self._rotate(jnp.einsum("btd,dhk->bthk", x, self.w_q[i].astype(self.dtype)),
                         positions)
        out = attend(q, memory["key"][i], memory["value"][i], mask=mask, is_causal=True,
                     scale=self.head_dim ** -0.5, impl=self.attention_impl)
        return jnp.einsum("bthk,hkd->btd", out, self.w_o[i].astype(self.dtype))

    # The decoding cache: every connection's keys and values of every slot so far --------------

    @nn.nowrap
    def init_memory(self, batch: int, mem_len: int, per_layer: bool) -> dict[str, Any]:
        """{'key', 'value'} zeros [n, batch, mem_len, heads, head_dim], or with `per_layer` a
        tuple of n [batch, heads, mem_len, head_dim] arrays (laid out like a per-layer
        `KVCache`, so that no step copies connection i's memory out of a stack)."""
        n, h, d = self.num_connections, self.num_heads, self.head_dim
        return {k: (tuple(jnp.zeros((batch, h, mem_len, d), self.dtype) for _ in range(n))
                    if per_layer else jnp.zeros((n, batch, mem_len, h, d), self.dtype))
                for k in ("key", "value")}

    @nn.nowrap
    def write_memory(self, memory: dict[str, Any], new: dict[str, Any],
                     index: Array) -> dict[str, Any]:
        return {k: _write_memory(memory[k], new[k], index) for k in ("key", "value")}

    @nn.nowrap
    def read_memory(self, memory: dict[str, Any]) -> dict[str, Any]:
        return {k: _memory_view(v) for k, v in memory.items()}

    @nn.nowrap
    def decode_mask(self, view: dict[str, Any], start: Array, index: Array,
                    length: int) -> Array | None:
        """Query slot t reads memory slots start[b] .. t (`cache_mask`)."""
        return cache_mask(start, index, length, view["key"][0].shape[1])

    @nn.nowrap
    def keep_memory(self, memory: dict[str, Any]) -> dict[str, Any]:
        return {k: _constrain_memory(v) for k, v in memory.items()}

    @classmethod
    def decoding_params(cls, tree: dict[str, Any]) -> dict[str, Any]:
        """The memory projection (and the augmenting states' norm scale) multiplied into the
        key and value kernels (`precompose_memory`, in the parameters' dtype) as `memory_kv`
        (and `memory_kv_bias`): each new token's keys and values are then one matrix product
        where they were three."""
        tree = dict(tree)
        bias = tree.pop("proj_bias", None)
        kernel, kv_bias = precompose_memory(tree.pop("proj"), bias, tree.pop("key"),
                                            tree.pop("value"), tree["query"].dtype,
                                            tree.pop("augment_norm", None))
        tree["memory_kv"] = kernel
        if kv_bias is not None:
            tree["memory_kv_bias"] = kv_bias
        return tree


@register_variant("fusion")
class Fusion(Bridge):
    """The attention-free ablation with the cross-attention's parameter budget: connection i
    at position t mixes the normalised anchor state q with the projected augmenting state p_t,
    `delta = W_o(silu(W_g [q; p_t]) * (W_v p_t))`, with W_g: 2D x F, W_v: D x F, W_o: F x D
    (zero init), F = heads * head_dim (the 4 D F of the cross-attention's W_q, W_k, W_v, W_o)."""

    def setup(self):
        db, f = self.anchor_dim, self.num_heads * self.head_dim
        init = L.dense_init(1, 2)
        self.setup_input_norms()
        self.setup_projection()
        self.w_g = self._param("gate", init, (2 * db, f), ("embed", "mlp"))
        self.w_v = self._param("value", init, (db, f), ("embed", "mlp"))
        self.w_o = self._param("out", nn.initializers.zeros, (f, db), ("mlp", "embed"))

    def memory(self, states: Array, positions: Array | None = None) -> dict[str, Array]:
        """states [n, batch, aug_len, D_aug] -> {'proj'} [n, batch, aug_len, D_anchor]."""
        return {"proj": self.project(states.astype(self.dtype))}

    def __call__(self, i: int, h: Array, memory: dict[str, Array], mask: Array | None,
                 positions: Array | None = None) -> Array:
        x = self.query_input(i, h)
        p = memory["proj"][i]
        gate = jnp.concatenate([x, p], axis=-1) @ self.w_g[i].astype(self.dtype)
        hidden = jax.nn.silu(gate) * (p @ self.w_v[i].astype(self.dtype))
        return hidden @ self.w_o[i].astype(self.dtype)


def precompose_memory(proj: Array, proj_bias: Array | None, key: Array, value: Array,
                      dtype: Any, norm_scale: Array | None = None
                      ) -> tuple[Array, Array | None]:
    """The memory projection multiplied into the cross-attention's key and value kernels:
    proj [n, D_aug, D_anchor] (bias [n, D_anchor]), key and value [n, D_anchor, heads,
    head_dim], and the augmenting states' norm scale [n, D_aug] if any -> (kernel [n, D_aug,
    2, heads, head_dim], bias [n, 2, heads, head_dim] or None), computed in `dtype`: the
    kernel reads RMS-normalised states without that scale. `CrossAttention.memory` gives the
    same keys and values from either form."""
    kv = jnp.stack([key, value], axis=2).astype(dtype)  # [n, D_anchor, 2, heads, head_dim]
    # Full float32 products where float32 is asked for (a GPU would otherwise use TF32).
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
    scaled = proj if norm_scale is None else proj * norm_scale[:, :, None]
    kernel = jnp.einsum("nad,ndthk->nathk", scaled.astype(dtype), kv, precision=precision)
    if proj_bias is None:
        return kernel, None
    return kernel, jnp.einsum("nd,ndthk->nthk", proj_bias.astype(dtype), kv,
                              precision=precision)


def _write_memory(memory: Array | tuple[Array, ...], new: Array | tuple[Array, ...],
                  index: Array):
    """Writes new [n, batch, T, heads, head_dim] (or n such [batch, T, heads, head_dim]) at slots
    index .. index+T-1 of a stacked memory [n, batch, mem_len, heads, head_dim] or of each
    [batch, heads, mem_len, head_dim] array of a per-connection tuple."""
    zero = jnp.zeros((), jnp.int32)
    if isinstance(memory, tuple):
        return tuple(jax.lax.dynamic_update_slice(
            m, jnp.swapaxes(x, 1, 2).astype(m.dtype), (zero, zero, index, zero))
            for m, x in zip(memory, new))
    if isinstance(new, tuple):  # per-connection projections into a stacked memory
        new = jnp.stack(new)
    return jax.lax.dynamic_update_slice(memory, new.astype(memory.dtype),
                                        (zero, zero, index, zero, zero))


def _memory_view(memory: Array | tuple[Array, ...]):
    """What `CrossAttention.__call__` indexes: memory[i] [batch, mem_len, heads, head_dim]."""
    if isinstance(memory, tuple):
        return tuple(jnp.swapaxes(m, 1, 2) for m in memory)
    return memory


def _constrain_memory(memory: Array | tuple[Array, ...]):
    if isinstance(memory, tuple):  # [batch, heads, mem_len, head_dim]
        axes = tuple(MEMORY_AXES[i] for i in (1, 3, 2, 4))
        return tuple(nn.with_logical_constraint(m, axes) for m in memory)
    return nn.with_logical_constraint(memory, MEMORY_AXES)
