"""Configuration of the decoder-only transformer.

One frozen dataclass covers the families CALM is used with:

* GPT-2 style: learned absolute positions, LayerNorm with bias, GELU MLP, biases on every dense
  layer, tied input/output embeddings (`TransformerConfig.gpt2_style`).
* Llama / SmolLM2 / Qwen2 style: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, optional
  q/k/v biases (Qwen2), tied or untied output (`TransformerConfig.llama_style`).
* Gemma 1/2/3 style: GeGLU MLP, RMSNorm with a `(1 + scale)` weight, embeddings multiplied by
  `sqrt(embed_dim)`, optional norms after attention/MLP, attention and final logit soft-capping,
  QK-norm and sliding-window layers (`TransformerConfig.gemma_style`).

Layer numbering convention (used by `Decoder` and by CALM's `connections`): layers are
1-indexed as in the paper. "The state after layer k" is the residual stream leaving block k,
before any final norm; k = 0 is the embedding output and k = num_layers is the last block's
output.

Every field is validated on construction; a bad value raises `ValueError` naming the field, the
expected value and the given one, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax.numpy as jnp

NormType = Literal["rmsnorm", "layernorm"]
PositionType = Literal["rope", "learned", "none"]
Activation = Literal["gelu", "gelu_tanh", "silu", "relu"]
AttentionImpl = Literal["auto", "xla", "cudnn"]
RopeScaling = Literal["none", "linear", "llama3"]

# Fields that say how a model computes, not what it computes: a run may set them differently
# from the stored model (`trainer.ModelSpec`), and a model's fingerprint leaves them out.
RUNTIME_FIELDS = ("dtype", "attention_impl", "remat_policy", "scan_unroll")
# `transformer.REMAT_POLICIES` holds the policy of each name but "none".
REMAT_POLICY_NAMES = ("none", "full", "dots", "dots_attention")

BOOL_FIELDS = ("norm_scale_plus_one", "post_norms", "qk_norm", "gated_mlp", "use_bias",
               "qkv_bias", "tie_embeddings", "scale_embeddings")

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


def resolve_dtype(value: Any, field: str) -> jnp.dtype:
    """Returns a numpy dtype for a dtype or its name; raises ValueError naming `field`."""
    if isinstance(value, str):
        if value not in _DTYPES:
            raise ValueError(f"{field}: expected one of {sorted(_DTYPES)}, got {value!r}")
        return jnp.dtype(_DTYPES[value])
    try:
        dtype = jnp.dtype(value)
    except TypeError as e:
        raise ValueError(f"{field}: expected a floating dtype, got {value!r}") from e
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{field}: expected a floating dtype, got {dtype}")
    return dtype


def _check_choice(field: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{field}: expected one of {choices}, got {value!r}")


def _check_positive(field: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{field}: expected a positive integer, got {value!r}")


def is_real(value: Any) -> bool:
    """Whether `value` is a finite int or float (bools, NaN and infinities are not)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def check_real(field: str, value: Any, *, above: float = 0.0, allow_none: bool = False) -> None:
    """Raises ValueError naming `field` unless `value` is a finite number > `above` (or None
    where allowed). Bools are not numbers here: `True` would silently mean 1."""
    if value is None and allow_none:
        return
    if not is_real(value) or value <= above:
        what = "a positive number" if above == 0 else f"a number > {above:g}"
        raise ValueError(f"{field}: expected {'None or ' if allow_none else ''}{what}, "
                         f"got {value!r}")


def check_bool(field: str, value: Any) -> None:
    """Raises ValueError naming `field` unless `value` is True or False."""
    if not isinstance(value, bool):
        raise ValueError(f"{field}: expected True or False, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of one decoder-only transformer.

    Attributes:
      vocab_size: number of embedding rows. Pad it to a multiple of the mesh's tensor axis
        (128 is a safe choice) when the vocabulary is sharded.
      embed_dim: width D of the residual stream.
      num_layers: number of transformer blocks.
      num_heads: query heads.
      num_kv_heads: key/value heads (grouped-query attention); `None` means `num_heads`.
      head_dim: per-head width; `None` means `embed_dim // num_heads`.
      mlp_dim: hidden width of the feed-forward block.
      max_len: longest sequence (size of the learned position table; RoPE has no limit).
      norm: "rmsnorm" or "layernorm" (LayerNorm has a bias).
      norm_eps: epsilon of every norm.
      norm_scale_plus_one: Gemma's RMSNorm weight `x * (1 + scale)` with `scale` initialised at 0.
      post_norms: Gemma 2/3 extra norms on the attention and MLP outputs before the residual add.
      qk_norm: RMSNorm over the head dimension of queries and keys (Gemma 3).
      activation: MLP nonlinearity.
      gated_mlp: GLU feed-forward (SwiGLU with silu, GeGLU with gelu); otherwise two dense layers.
      use_bias: biases on every dense layer (GPT-2).
      qkv_bias: biases on the q/k/v projections only (Qwen2). Implied by `use_bias`.
      position: "rope", "learned" absolute positions (GPT-2) or "none".
      rope_theta: RoPE base frequency (global layers).
      rope_local_theta: RoPE base of sliding-window layers (Gemma 3); `None` means `rope_theta`.
      rope_scaling: "none", "linear" (positions divided by `rope_scaling_factor`) or "llama3".
      rope_scaling_factor, rope_low_freq_factor, rope_high_freq_factor,
      rope_original_max_len: parameters of the scaled RoPE variants.
      tie_embeddings: output layer shares the input embedding matrix.
      scale_embeddings: multiply embeddings by sqrt(embed_dim) (Gemma).
      query_scale: attention logit scale; `None` means head_dim ** -0.5.
      attn_logit_softcap: `cap * tanh(logits / cap)` on attention logits (Gemma 2), or None.
      final_logit_softcap: the same on output logits (Gemma 2/3), or None.
      sliding_window: window of local layers (a key is seen when query - key < window), or None.
      global_every: with `sliding_window`, every `global_every`-th layer (1-indexed) is global and
        the others are local (Gemma 2: 2, Gemma 3: 6). 1 makes every layer global.
      dtype: compute dtype (activations and matmuls), e.g. "bfloat16".
      param_dtype: dtype parameters are created in (keep "float32" for trained weights).
      attention_impl: implementation passed to `jax.nn.dot_product_attention`: "xla", "cudnn",
        or "auto" (cuDNN's fused attention on a GPU where it applies, XLA's otherwise; see
        `calm_jax.models.attention.choose_attention_impl`).
      remat_policy: rematerialisation of each scanned block: "none" (keep everything), "full"
        (recompute everything), "dots" (save matmul outputs without batch dimensions),
        "dots_attention" ("dots" and the fused attention's output and softmax statistics, so
        that cuDNN's attention forward is not run again in the backward pass; the same as
        "dots" where XLA's attention runs).
      scan_unroll: unroll factor of the scan over layers.
    """

    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    max_len: int = 2048
    norm: NormType = "rmsnorm"
    norm_eps: float = 1e-6
    norm_scale_plus_one: bool = False
    post_norms: bool = False
    qk_norm: bool = False
    activation: Activation = "silu"
    gated_mlp: bool = True
    use_bias: bool = False
    qkv_bias: bool = False
    position: PositionType = "rope"
    rope_theta: float = 10_000.0
    rope_local_theta: float | None = None
    rope_scaling: RopeScaling = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    tie_embeddings: bool = False
    scale_embeddings: bool = False
    query_scale: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    global_every: int = 1
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    attention_impl: AttentionImpl = "auto"
    remat_policy: str = "none"
    scan_unroll: int = 1

    def __post_init__(self):
        for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "mlp_dim", "max_len",
                     "global_every", "scan_unroll"):
            _check_positive(name, getattr(self, name))
        for name in ("num_kv_heads", "head_dim", "sliding_window", "rope_original_max_len"):
            value = getattr(self, name)
            if value is not None:
                _check_positive(name, value)
        if self.head_dim is None and self.embed_dim % self.num_heads:
            raise ValueError(
                f"num_heads: expected a divisor of embed_dim={self.embed_dim} (or set head_dim), "
                f"got {self.num_heads}")
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"num_kv_heads: expected a divisor of num_heads={self.num_heads}, "
                f"got {self.num_kv_heads}")
        _check_choice("norm", self.norm, ("rmsnorm", "layernorm"))
        _check_choice("position", self.position, ("rope", "learned", "none"))
        _check_choice("activation", self.activation, ("gelu", "gelu_tanh", "silu", "relu"))
        _check_choice("attention_impl", self.attention_impl, ("auto", "xla", "cudnn"))
        _check_choice("rope_scaling", self.rope_scaling, ("none", "linear", "llama3"))
        _check_choice("remat_policy", self.remat_policy, REMAT_POLICY_NAMES)
        if self.position == "rope" and self.dims_per_head % 2:
            raise ValueError(f"head_dim: expected an even value for RoPE, got {self.dims_per_head}")
        for name in BOOL_FIELDS:
            check_bool(name, getattr(self, name))
        for name in ("norm_eps", "rope_scaling_factor", "rope_low_freq_factor",
                     "rope_high_freq_factor"):
            check_real(name, getattr(self, name))
        # A RoPE base <= 1 turns every rotary pair at the same rate or faster at higher
        # dimensions (0 and below give NaN).
        check_real("rope_theta", self.rope_theta, above=1.0)
        check_real("rope_local_theta", self.rope_local_theta, above=1.0, allow_none=True)
        if self.rope_scaling == "llama3" and (
                self.rope_high_freq_factor <= self.rope_low_freq_factor):
            raise ValueError(f"rope_high_freq_factor: expected a value > rope_low_freq_factor="
                             f"{self.rope_low_freq_factor} with rope_scaling='llama3', got "
                             f"{self.rope_high_freq_factor!r}")
        for name in ("attn_logit_softcap", "final_logit_softcap", "query_scale"):
            check_real(name, getattr(self, name), allow_none=True)
        if self.norm_scale_plus_one and self.norm != "rmsnorm":
            raise ValueError("norm_scale_plus_one: expected False unless norm='rmsnorm', got True")
        resolve_dtype(self.dtype, "dtype")
        resolve_dtype(self.param_dtype, "param_dtype")

    # Derived quantities -------------------------------------------------------------------------

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def dims_per_head(self) -> int:
        return self.embed_dim // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def compute_dtype(self) -> jnp.dtype:
        return resolve_dtype(self.dtype, "dtype")

    @property
    def params_dtype(self) -> jnp.dtype:
        return resolve_dtype(self.param_dtype, "param_dtype")

    def layer_is_global(self) -> tuple[bool, ...]:
        """Per layer (0-indexed position in the tuple), whether attention is global."""
        if self.sliding_window is None:
            return (True,) * self.num_layers
        return tuple((i + 1) % self.global_every == 0 for i in range(self.num_layers))

    def replace(self, **changes: Any) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self, *, include_embedding: bool = True) -> int:
        """Closed-form parameter count of this configuration."""
        d, h, k, dh, f = (self.embed_dim, self.num_heads, self.kv_heads, self.dims_per_head,
                          self.mlp_dim)
        norm = d * (2 if self.norm == "layernorm" else 1)
        attn = d * h * dh + 2 * d * k * dh + h * dh * d
        if self.use_bias:
            attn += h * dh + 2 * k * dh + d
        elif self.qkv_bias:
            attn += h * dh + 2 * k * dh
        if self.qk_norm:
            attn += 2 * dh
        mlp = (3 if self.gated_mlp else 2) * d * f
        if self.use_bias:
            mlp += (2 if self.gated_mlp else 1) * f + d
        block = attn + mlp + norm * (4 if self.post_norms else 2)
        total = self.num_layers * block + norm  # final norm
        if not self.tie_embeddings:
            total += d * self.vocab_size
        if include_embedding:
            total += self.vocab_size * d
            if self.position == "learned":
                total += self.max_len * d
        return total

    # Family presets -----------------------------------------------------------------------------

    @classmethod
    def gpt2_style(cls, **kw: Any) -> "TransformerConfig":
        base = dict(norm="layernorm", norm_eps=1e-5, activation="gelu_tanh", gated_mlp=False,
                    use_bias=True, position="learned", tie_embeddings=True)
        return cls(**{**base, **kw})

    @classmethod
    def llama_style(cls, **kw: Any) -> "TransformerConfig":
        base = dict(norm="rmsnorm", norm_eps=1e-5, activation="silu", gated_mlp=True,
                    position="rope", tie_embeddings=False)
        return cls(**{**base, **kw})

    @classmethod
    def gemma_style(cls, **kw: Any) -> "TransformerConfig":
        base = dict(norm="rmsnorm", norm_eps=1e-6, norm_scale_plus_one=True,
                    activation="gelu_tanh", gated_mlp=True, position="rope",
                    tie_embeddings=True, scale_embeddings=True)
        return cls(**{**base, **kw})

    @classmethod
    def tiny(cls, **kw: Any) -> "TransformerConfig":
        """A few-hundred-thousand-parameter Llama-style model for tests and CPU demos."""
        base = dict(vocab_size=384, embed_dim=64, num_layers=4, num_heads=4, num_kv_heads=2,
                    mlp_dim=128, max_len=256)
        return cls.llama_style(**{**base, **kw})
