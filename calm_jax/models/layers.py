"""Building blocks: norms, dense layers with logical axes, rotary embeddings, feed-forward.

Every parameter is created through `nn.with_logical_partitioning`, so a mesh and a set of logical
axis rules (see `calm_jax.partitioning`) decide how it is sharded. Logical parameter axes:
`vocab`, `embed`, `mlp`, `heads`, `kv_heads`, `head_dim`, `norm`, `layers`, `connections`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from calm_jax.models.config import TransformerConfig

Array = jax.Array

# Activation axes, for `nn.with_logical_constraint`.
ACT_BLE = ("activation_batch", "activation_length", "activation_embed")


def dense_init(in_axis: int | Sequence[int] = -2, out_axis: int | Sequence[int] = -1):
    """Fan-in scaled normal init (variance 1/fan_in), as in most LM code bases."""
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=in_axis, out_axis=out_axis)


def logical_param(module: nn.Module, name: str, init, shape: tuple[int, ...],
                  axes: tuple[str, ...], dtype) -> Array:
    """Declares a parameter carrying logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def normalize(x: Array, kind: str, eps: float) -> Array:
    """Unscaled RMS- or layer-normalisation over the last axis, in float32."""
    y = x.astype(jnp.float32)
    if kind == "layernorm":
        y = y - jnp.mean(y, axis=-1, keepdims=True)
    return y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + eps)


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last axis, computed in float32.

    With `scale_plus_one`, the stored scale is an offset from one (Gemma's convention) and is
    initialised at zero.
    """

    kind: str = "rmsnorm"
    eps: float = 1e-6
    scale_plus_one: bool = False
    param_dtype: Any = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dim = x.shape[-1]
        init = nn.initializers.zeros if self.scale_plus_one else nn.initializers.ones
        scale = logical_param(self, "scale", init, (dim,), (self.axis_name,), self.param_dtype)
        y = normalize(x, self.kind, self.eps)
        scale = scale.astype(jnp.float32)
        y = y * (1.0 + scale if self.scale_plus_one else scale)
        if self.kind == "layernorm":
            bias = logical_param(self, "bias", nn.initializers.zeros, (dim,), (self.axis_name,),
                                 self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(x.dtype)


def make_norm(cfg: TransformerConfig, name: str | None = None, axis_name: str = "norm") -> Norm:
    return Norm(kind=cfg.norm, eps=cfg.norm_eps, scale_plus_one=cfg.norm_scale_plus_one,
                param_dtype=cfg.params_dtype, axis_name=axis_name, name=name)


class Dense(nn.Module):
    """`x @ kernel (+ bias)` contracting the trailing `len(in_shape)` axes of `x`.

    `kernel` has shape `in_shape + out_shape` and logical axes `in_axes + out_axes`.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n_in, n_out = len(self.in_shape), len(self.out_shape)
        init = self.kernel_init or dense_init(tuple(range(n_in)),
                                             tuple(range(n_in, n_in + n_out)))
        kernel = logical_param(self, "kernel", init, self.in_shape + self.out_shape,
                               self.in_axes + self.out_axes, self.param_dtype)
        x = x.astype(self.dtype)
        y = jax.lax.dot_general(
            x, kernel.astype(self.dtype),
            ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))
        if self.use_bias:
            bias = logical_param(self, "bias", nn.initializers.zeros, self.out_shape,
                                 self.out_axes, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


# Fused projections of the per-layer decoding layout (`transformer.fuse_projections`): one
# product where the training layout has two or three reading the same input.
FUSED = ("qkv", "kv", "gate_up")


def fused_names(module: nn.Module) -> frozenset[str]:
    """Which fused projections `module`'s bound parameters hold (none while initialising)."""
    if module.is_initializing():
        return frozenset()
    params = module.variables.get("params", {})
    return frozenset(name for name in FUSED if name in params)


def activation_fn(name: str):
    return {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "silu": jax.nn.silu,
        "relu": jax.nn.relu,
    }[name]


class MLP(nn.Module):
    """Feed-forward block: GLU (`act(x W_gate) * (x W_up)) W_down`) or two dense layers."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        d, f = cfg.embed_dim, cfg.mlp_dim
        common = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                      use_bias=cfg.use_bias)
        act = activation_fn(cfg.activation)
        if "gate_up" in fused_names(self):  # the decoding layout's (`fuse_projections`)
            both = Dense((d,), (2, f), ("embed",), (None, "mlp"), name="gate_up",
                         **common)(x)
            hidden = act(both[..., 0, :]) * both[..., 1, :]
        else:
            up = Dense((d,), (f,), ("embed",), ("mlp",), name="up", **common)(x)
            if cfg.gated_mlp:
                gate = Dense((d,), (f,), ("embed",), ("mlp",), name="gate", **common)(x)
                hidden = act(gate) * up
            else:
                hidden = act(up)
        hidden = nn.with_logical_constraint(
            hidden, ("activation_batch", "activation_length", "activation_mlp"))
        return Dense((f,), (d,), ("mlp",), ("embed",), name="down", **common)(hidden)


# Rotary position embeddings -----------------------------------------------------------------


def rope_frequencies(cfg: TransformerConfig, theta: float) -> Array:
    """Inverse frequencies [head_dim // 2] with the configured scaling applied."""
    dim = cfg.dims_per_head
    inv = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if cfg.rope_scaling == "linear":
        inv = inv / cfg.rope_scaling_factor
    elif cfg.rope_scaling == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        factor, lo, hi = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelen = 2 * jnp.pi / inv
        low_wavelen = cfg.rope_original_max_len / lo
        high_wavelen = cfg.rope_original_max_len / hi
        smooth = (cfg.rope_original_max_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * inv / factor + smooth * inv
        inv = jnp.where(wavelen > low_wavelen, inv / factor,
                        jnp.where(wavelen < high_wavelen, inv, blended))
    return inv


def rope_tables(cfg: TransformerConfig, positions: Array, theta: float) -> tuple[Array, Array]:
    """(sin, cos), each [batch, length, head_dim // 2], float32."""
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(cfg, theta)
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: Array, sin: Array, cos: Array) -> Array:
    """Rotates x [batch, length, heads, head_dim] by halves (the Hugging Face layout)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def softcap(x: Array, cap: float | None) -> Array:
    return x if cap is None else cap * jnp.tanh(x / cap)
