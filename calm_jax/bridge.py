"""CALM's trained parameters for one augmenting model: `Bridge`, and its decoding layout.

A `Bridge` holds n stacked connections (leading `connections` axis): per connection the
projection of the augmenting states into the anchor's width and the cross-attention that
reads them (or the attention-free "fusion" ablation); `calm_jax.composition.ComposedLM` runs
it. Its `memory` turns the augmenting states of all n connections into the cross-attention's
keys and values at once; calling it applies connection i to an anchor state.

The memory's keys and values are linear in the projected states, so `Bridge.memory` may
multiply the projection (and the states' norm scale s) into the key and value kernels first,
((x s) P + b) W_k = x (diag(s) P W_k) + b W_k (`precompose_memory`): it does so where that
costs fewer multiply-adds for the states each device holds (many, as in a training step), and
projects first where it does not (a decode step's few states). Same parameters, same
function, same gradients, in either order.

For cached decoding `unstack_connections` splits each leaf into one array per connection (a
`LayerList`, like the Decoders' per-layer layout; `connection_params` reads connection i back
as a one-connection Bridge's tree) and stores the precomposed memory kernels.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn

from calm_jax import partitioning as part
from calm_jax.models.attention import attend
from calm_jax.models import layers as L
from calm_jax.models.transformer import LayerList, layers_unstacked, unstack_leaves

Array = jax.Array


class Bridge(nn.Module):
    """The composition parameters for one augmenting model: n stacked connections.

    Leaves have a leading `connections` axis of size n. `memory` projects the augmenting states
    of all connections at once; `__call__` applies connection i to an anchor state.
    """

    anchor_dim: int
    augment_dim: int
    num_connections: int
    num_heads: int
    head_dim: int
    kind: str = "cross_attention"
    normalize_inputs: bool = True
    proj_bias: bool = True
    norm_eps: float = 1e-6
    rope_theta: float | None = None
    attention_impl: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _param(self, name, init, shape, axes):
        return L.logical_param(self, name, init, (self.num_connections,) + shape,
                               ("connections",) + axes, self.param_dtype)

    def setup(self):
        da, db = self.augment_dim, self.anchor_dim
        h, dh = self.num_heads, self.head_dim
        f = h * dh
        init = lambda in_axes, out_axes: L.dense_init(in_axes, out_axes)  # noqa: E731
        # The decoding layout (`unstack_connections`) holds the memory's projection already
        # multiplied into its key and value kernels (`precompose_memory`).
        self.precomposed = (not self.is_initializing()
                            and "memory_kv" in self.variables.get("params", {}))
        if self.normalize_inputs:
            if not self.precomposed:  # else its scale is part of memory_kv
                self.augment_norm = self._param("augment_norm", nn.initializers.ones, (da,),
                                                ("augment_embed",))
            self.query_norm = self._param("query_norm", nn.initializers.ones, (db,), ("embed",))
        if self.precomposed:
            self.memory_kv = self._param("memory_kv", nn.initializers.zeros, (da, 2, h, dh),
                                         ("augment_embed", None, "heads", "head_dim"))
            if self.proj_bias:
                self.memory_kv_b = self._param("memory_kv_bias", nn.initializers.zeros,
                                               (2, h, dh), (None, "heads", "head_dim"))
        else:
            self.proj = self._param("proj", init(1, 2), (da, db), ("augment_embed", "embed"))
            if self.proj_bias:
                self.proj_b = self._param("proj_bias", nn.initializers.zeros, (db,),
                                          ("embed",))
        if self.kind == "cross_attention":
            self.w_q = self._param("query", init(1, (2, 3)), (db, h, dh),
                                   ("embed", "heads", "head_dim"))
            if not self.precomposed:
                self.w_k = self._param("key", init(1, (2, 3)), (db, h, dh),
                                       ("embed", "heads", "head_dim"))
                self.w_v = self._param("value", init(1, (2, 3)), (db, h, dh),
                                       ("embed", "heads", "head_dim"))
            self.w_o = self._param("out", nn.initializers.zeros, (h, dh, db),
                                   ("heads", "head_dim", "embed"))
        else:
            self.w_g = self._param("gate", init(1, 2), (2 * db, f), ("embed", "mlp"))
            self.w_v = self._param("value", init(1, 2), (db, f), ("embed", "mlp"))
            self.w_o = self._param("out", nn.initializers.zeros, (f, db), ("mlp", "embed"))

    def _norm(self, x: Array, scale: Array) -> Array:
        y = L.normalize(x, "rmsnorm", self.norm_eps) * scale.astype(jnp.float32)
        return y.astype(self.dtype)

    def _rotate(self, x: Array, positions: Array | None) -> Array:
        """Rotary embedding of x [batch, length, heads, head_dim] at positions [batch, length]."""
        if self.rope_theta is None:
            return x
        if positions is None:
            raise ValueError("positions: expected [batch, length] token positions with "
                             "composition.rope_theta set, got None")
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
        angles = positions.astype(jnp.float32)[..., None] * inv
        return L.apply_rope(x, jnp.sin(angles), jnp.cos(angles))

    def memory(self, states: Array, positions: Array | None = None) -> dict[str, Array]:
        """states [n, batch, aug_len, D_aug] -> per-connection memory, leading axis n.

        Cross-attention: {'key', 'value'} [n, batch, aug_len, heads, head_dim] (keys rotated
        to `positions` [batch, aug_len] with `rope_theta`); fusion: {'proj'}
        [n, batch, aug_len, D_anchor].
        """
        x = states.astype(self.dtype)
        kv = self._memory_kernels(x.shape[1] * x.shape[2] // part.batch_shards())
        if kv is None:
            if self.normalize_inputs:
                x = self._norm(x, self.augment_norm[:, None, None, :])
            p = jnp.einsum("nbsa,nad->nbsd", x, self.proj.astype(self.dtype))
            if self.proj_bias:
                p = p + self.proj_b[:, None, None, :].astype(self.dtype)
            if self.kind == "fusion":
                return {"proj": p}
            key = jnp.einsum("nbsd,ndhk->nbshk", p, self.w_k.astype(self.dtype))
            value = jnp.einsum("nbsd,ndhk->nbshk", p, self.w_v.astype(self.dtype))
        else:  # the norm's scale is in the kernel: the states themselves take no gradient
            kernel, bias = kv
            if self.normalize_inputs:
                x = L.normalize(x, "rmsnorm", self.norm_eps).astype(self.dtype)
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
        on every device that holds a share of the batch) or for "fusion".

        ((x s) P + b) W = x (diag(s) P W) + b W, so either order computes the same function of
        the same parameters, gradients included; P W costs D_aug D_anchor 2F once, and then each
        token D_aug 2F instead of D_aug D_anchor + D_anchor 2F (F = heads x head_dim). With the
        scale s in the kernel, its gradient comes from the kernel's: no gradient of the
        [n, batch, length, D_aug] normalised states is formed.
        """
        if self.precomposed:
            return self.memory_kv, self.memory_kv_b if self.proj_bias else None
        if self.kind != "cross_attention":
            return None
        da, db, f2 = self.augment_dim, self.anchor_dim, 2 * self.num_heads * self.head_dim
        if da * db * f2 + tokens * da * f2 >= tokens * (da * db + db * f2):
            return None
        return precompose_memory(self.proj, self.proj_b if self.proj_bias else None,
                                 self.w_k, self.w_v, self.dtype,
                                 self.augment_norm if self.normalize_inputs else None)

    def __call__(self, i: int, h: Array, memory: dict[str, Array], mask: Array | None,
                 positions: Array | None = None) -> Array:
        """Connection i's update for the anchor state h [batch, len, D_anchor] (same shape);
        `positions` [batch, len] of the queries, needed with `rope_theta`."""
        x = h.astype(self.dtype)
        if self.normalize_inputs:
            x = self._norm(x, self.query_norm[i])
        if self.kind == "fusion":
            p = memory["proj"][i]
            gate = jnp.concatenate([x, p], axis=-1) @ self.w_g[i].astype(self.dtype)
            hidden = jax.nn.silu(gate) * (p @ self.w_v[i].astype(self.dtype))
            return hidden @ self.w_o[i].astype(self.dtype)
        q = self._rotate(jnp.einsum("btd,dhk->bthk", x, self.w_q[i].astype(self.dtype)),
                         positions)
        out = attend(q, memory["key"][i], memory["value"][i], mask=mask, is_causal=True,
                     scale=self.head_dim ** -0.5, impl=self.attention_impl)
        return jnp.einsum("bthk,hkd->btd", out, self.w_o[i].astype(self.dtype))


def precompose_memory(proj: Array, proj_bias: Array | None, key: Array, value: Array,
                      dtype: Any, norm_scale: Array | None = None
                      ) -> tuple[Array, Array | None]:
    """The memory projection multiplied into the cross-attention's key and value kernels:
    proj [n, D_aug, D_anchor] (bias [n, D_anchor]), key and value [n, D_anchor, heads,
    head_dim], and the augmenting states' norm scale [n, D_aug] if any -> (kernel [n, D_aug,
    2, heads, head_dim], bias [n, 2, heads, head_dim] or None), computed in `dtype`: the
    kernel reads RMS-normalised states without that scale. `Bridge.memory` gives the same
    keys and values from either form."""
    kv = jnp.stack([key, value], axis=2).astype(dtype)  # [n, D_anchor, 2, heads, head_dim]
    # Full float32 products where float32 is asked for (a GPU would otherwise use TF32).
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
    scaled = proj if norm_scale is None else proj * norm_scale[:, :, None]
    kernel = jnp.einsum("nad,ndthk->nathk", scaled.astype(dtype), kv, precision=precision)
    if proj_bias is None:
        return kernel, None
    return kernel, jnp.einsum("nd,ndthk->nthk", proj_bias.astype(dtype), kv,
                              precision=precision)


def unstack_connections(composition: Mapping[str, Any], fuse: bool = True) -> dict[str, Any]:
    """The composition parameters {name: tree} with every stacked [connections, ...] leaf split
    into a `LayerList` of per-connection arrays (already split ones are kept): the decoding
    layout `ComposedLM.extend` reads without copying a connection's weights out of the stack.
    Training (`apply`) takes the stacked tree. With `fuse`, a cross-attention's memory
    projection (and the augmenting states' norm scale) is multiplied into its key and value
    kernels (`precompose_memory`, in the parameters' dtype) as `memory_kv` (and
    `memory_kv_bias`): each new token's keys and values are then one matrix product where they
    were three."""
    out = {}
    for name, tree in nn.unbox(composition).items():
        tree = dict(tree)
        if fuse and {"proj", "key", "value"} <= tree.keys() and not layers_unstacked(tree):
            bias = tree.pop("proj_bias", None)
            kernel, kv_bias = precompose_memory(tree.pop("proj"), bias, tree.pop("key"),
                                                tree.pop("value"), tree["query"].dtype,
                                                tree.pop("augment_norm", None))
            tree["memory_kv"] = kernel
            if kv_bias is not None:
                tree["memory_kv_bias"] = kv_bias
        out[name] = unstack_leaves(tree)
    return out


def connection_params(tree: Any, i: int) -> Any:
    """Connection i's parameters from per-connection arrays, as a one-connection Bridge's
    (leading axis 1: a reshape, no copy)."""
    return jax.tree.map(lambda p: p.arrays[i][None], tree,
                        is_leaf=lambda x: isinstance(x, LayerList))
