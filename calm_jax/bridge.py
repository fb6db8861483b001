"""CALM's trained parameters for one augmenting model: the `Bridge` interface, the table of
composition variants, and the per-connection decoding layout.

A `Bridge` holds n stacked connections (leading `connections` axis) of one augmenting model:
per connection what reads the augmenting states into the anchor's residual stream.
`calm_jax.composition.ComposedLM` runs it. A composition variant (`CompositionConfig.kind`) is
one `Bridge` subclass, registered by name with `register_variant`; `ComposedLM` looks it up
(`variant_class`) and calls only this interface:

* parameters: created in `setup`, each with logical axis names and a leading `connections`
  axis (`_param`);
* `memory(states, positions)`: the augmenting states of all n connections
  [n, batch, aug_len, D_aug] -> what the anchor reads, {name: [n, batch, aug_len, ...]};
* `__call__(i, h, memory, mask, positions)`: connection i's update [batch, len, D_anchor],
  added to the anchor's residual stream after its anchor layer;
* the decoding cache (`init_memory`, `write_memory`, `read_memory`, `decode_mask`,
  `keep_memory`): what `ComposedLM.init_cache` / `extend` keep per connection between steps.
  The defaults are those of a position-wise variant, which reads only the current token's
  augmenting state and so keeps nothing;
* `decoding_params(tree)`: the variant's own rewrite of its stacked parameters for cached
  decoding (identity by default), applied by `unstack_connections` before the split;
* `check_config(config)`: the `CompositionConfig` settings the variant cannot serve, raised
  when the config is built (`position_wise` variants refuse `augment_sees="prompt"` and
  `rope_theta`; `cross_tokenizer` says whether it composes across tokenizers).

Every variant takes the whole `CompositionConfig` (`config`) and the widths `ComposedLM`
derives (`anchor_dim`, `augment_dim`, `num_heads`, `head_dim`). The shared pieces (input
norms, the D_aug -> D_anchor projection, the query norm) are helpers here. The built-in
variants, "cross_attention" (CALM) and "fusion" (the attention-free ablation), are in
`calm_jax.variants`.

For cached decoding `unstack_connections` splits each leaf into one array per connection (a
`LayerList`, like the Decoders' per-layer layout; `connection_params` reads connection i back
as a one-connection Bridge's tree).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn

from calm_jax.models import layers as L
from calm_jax.models.transformer import LayerList, layers_unstacked, unstack_leaves

if TYPE_CHECKING:
    from calm_jax.composition import CompositionConfig

Array = jax.Array

# {kind: Bridge subclass}: the composition variants `CompositionConfig.kind` names.
VARIANTS: dict[str, type[Bridge]] = {}


def register_variant(kind: str):
    """Class decorator: registers a `Bridge` subclass as `CompositionConfig.kind=kind`.

    Example:
        @register_variant("mean_read")
        class MeanRead(Bridge):
            ...
    """
    if not isinstance(kind, str) or not kind.isidentifier():
        raise ValueError(f"register_variant: expected an identifier-like kind, got {kind!r}")

    def register(cls: type[Bridge]) -> type[Bridge]:
        if not (isinstance(cls, type) and issubclass(cls, Bridge)):
            raise TypeError(f"register_variant({kind!r}): expected a Bridge subclass, got "
                            f"{cls!r}")
        if VARIANTS.get(kind, cls) is not cls:
            raise ValueError(f"register_variant: kind {kind!r} is already registered to "
                             f"{VARIANTS[kind].__qualname__}; unregister_variant({kind!r}) "
                             f"first to replace it")
        VARIANTS[kind] = cls
        return cls

    return register


def unregister_variant(kind: str) -> None:
    """Removes a registered variant (a no-op for an unknown kind)."""
    VARIANTS.pop(kind, None)


def variant_class(kind: str) -> type[Bridge]:
    """The `Bridge` subclass registered as `kind`; raises ValueError naming
    `composition.kind` and the registered kinds otherwise."""
    import calm_jax.variants  # noqa: F401  (registers the built-in variants)

    if not isinstance(kind, str) or kind not in VARIANTS:
        raise ValueError(f"composition.kind: expected one of {sorted(VARIANTS)} (variants "
                         f"registered with calm_jax.bridge.register_variant), got {kind!r}")
    return VARIANTS[kind]


class Bridge(nn.Module):
    """The composition parameters for one augmenting model: n stacked connections (the
    interface every composition variant implements; see the module docstring).

    Leaves have a leading `connections` axis of size n. `memory` turns the augmenting states
    of all connections into what the anchor reads; `__call__` applies connection i to an
    anchor state.
    """

    config: CompositionConfig
    anchor_dim: int
    augment_dim: int
    num_connections: int
    num_heads: int
    head_dim: int
    attention_impl: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    # True: connection i at anchor position t reads only the augmenting state at t (no
    # decoding memory, no prompt-only mode, no rotary positions).
    position_wise: ClassVar[bool] = True
    # True: the variant composes across tokenizers (`CompositionConfig.shared_vocabulary`).
    cross_tokenizer: ClassVar[bool] = False

    @classmethod
    def check_config(cls, config: CompositionConfig) -> None:
        """Raises ValueError naming the field for settings this variant cannot serve."""
        if not cls.position_wise:
            return
        if config.augment_sees != "all":
            raise ValueError(f"composition.augment_sees: expected 'all' with kind="
                             f"{config.kind!r} (a position-wise variant cannot read a "
                             f"prompt-only memory), got {config.augment_sees!r}")
        if config.rope_theta is not None:
            raise ValueError(f"composition.rope_theta: expected None with kind="
                             f"{config.kind!r} (it reads only the current position), got "
                             f"{config.rope_theta!r}")

    # Parameters and shared pieces -------------------------------------------------------------

    def _param(self, name, init, shape, axes):
        """A parameter of shape (n,) + shape with logical axes ("connections",) + axes."""
        return L.logical_param(self, name, init, (self.num_connections,) + shape,
                               ("connections",) + axes, self.param_dtype)

    def setup_input_norms(self, augment: bool = True) -> None:
        """With `config.normalize_inputs`: the augmenting states' norm scale `augment_norm`
        [n, D_aug] (unless `augment` is False) and the anchor query's `query_norm`
        [n, D_anchor]."""
        if self.config.normalize_inputs:
            if augment:
                self.augment_norm = self._param("augment_norm", nn.initializers.ones,
                                                (self.augment_dim,), ("augment_embed",))
            self.query_norm = self._param("query_norm", nn.initializers.ones,
                                          (self.anchor_dim,), ("embed",))

    def setup_projection(self) -> None:
        """The paper's f_proj: `proj` [n, D_aug, D_anchor] (and `proj_bias` [n, D_anchor] with
        `config.proj_bias`)."""
        self.proj = self._param("proj", L.dense_init(1, 2), (self.augment_dim, self.anchor_dim),
                                ("augment_embed", "embed"))
        if self.config.proj_bias:
            self.proj_b = self._param("proj_bias", nn.initializers.zeros, (self.anchor_dim,),
                                      ("embed",))

    def _norm(self, x: Array, scale: Array) -> Array:
        y = L.normalize(x, "rmsnorm", self.config.norm_eps) * scale.astype(jnp.float32)
        return y.astype(self.dtype)

    def project(self, x: Array) -> Array:
        """x [n, batch, aug_len, D_aug] (in `dtype`) -> f_proj(norm(x)) [n, batch, aug_len,
        D_anchor], connection i's projection applied to x[i]."""
        if self.config.normalize_inputs:
            x = self._norm(x, self.augment_norm[:, None, None, :])
        p = jnp.einsum("nbsa,nad->nbsd", x, self.proj.astype(self.dtype))
        if self.config.proj_bias:
            p = p + self.proj_b[:, None, None, :].astype(self.dtype)
        return p

    def query_input(self, i: int, h: Array) -> Array:
        """The anchor state h [batch, len, D_anchor] as connection i reads it: in `dtype`,
        RMS-normalised with its scale under `config.normalize_inputs`."""
        x = h.astype(self.dtype)
        if self.config.normalize_inputs:
            x = self._norm(x, self.query_norm[i])
        return x

    # The variant -----------------------------------------------------------------------------

    def memory(self, states: Array, positions: Array | None = None) -> dict[str, Array]:
        """states [n, batch, aug_len, D_aug] -> {name: [n, batch, aug_len, ...]}, what the
        anchor reads; `positions` [batch, aug_len] are the states' positions."""
        raise NotImplementedError(f"{type(self).__name__}.memory")

    def __call__(self, i: int, h: Array, memory: dict[str, Array], mask: Array | None,
                 positions: Array | None = None) -> Array:
        """Connection i's update for the anchor state h [batch, len, D_anchor] (same shape),
        reading `memory` (as `memory` returns it, or `read_memory`'s view in decoding);
        `mask` [batch, 1, len, aug_len] (None: causal) and `positions` [batch, len] of the
        queries."""
        raise NotImplementedError(f"{type(self).__name__}.__call__")

    # The decoding cache (defaults: position-wise, nothing kept between steps) ---------------

    @nn.nowrap
    def init_memory(self, batch: int, mem_len: int, per_layer: bool) -> dict[str, Any]:
        """The empty decoding memory of `mem_len` slots ({}: nothing kept). `per_layer`: one
        array per connection (see `calm_jax.composition.ComposedLM.init_cache`)."""
        return {}

    @nn.nowrap
    def write_memory(self, memory: dict[str, Any], new: dict[str, Any],
                     index: Array) -> dict[str, Any]:
        """`memory` with the new tokens' `memory(...)` output (stacked [n, batch, T, ...] or a
        tuple of n [batch, T, ...]) written at slots index .. index+T-1. Position-wise: the new
        tokens' memory alone."""
        return new

    @nn.nowrap
    def read_memory(self, memory: dict[str, Any]) -> dict[str, Any]:
        """What `__call__` indexes in decoding, from `write_memory`'s result."""
        return memory

    @nn.nowrap
    def decode_mask(self, view: dict[str, Any], start: Array, index: Array,
                    length: int) -> Array | None:
        """The mask of `length` new queries at slots index .. over the memory `view` (rows
        left-padded from `start`); None where `__call__` takes no mask."""
        return None

    @nn.nowrap
    def keep_memory(self, memory: dict[str, Any]) -> dict[str, Any]:
        """What the cache keeps of `write_memory`'s result for the next step ({}: nothing)."""
        return {}

    @classmethod
    def decoding_params(cls, tree: dict[str, Any]) -> dict[str, Any]:
        """The stacked parameters rewritten for cached decoding (`unstack_connections` with
        `fuse`); `setup` must accept the result. Identity by default."""
        return tree


def unstack_connections(composition: Mapping[str, Any], config: CompositionConfig | None = None,
                        fuse: bool = True) -> dict[str, Any]:
    """The composition parameters {name: tree} with every stacked [connections, ...] leaf split
    into a `LayerList` of per-connection arrays (already split ones are kept): the decoding
    layout `ComposedLM.extend` reads without copying a connection's weights out of the stack.
    Training (`apply`) takes the stacked tree. With `fuse`, each tree is first rewritten by its
    variant's `decoding_params` (`config.kind`; None: the default `CompositionConfig`): the
    cross-attention multiplies its memory projection into its key and value kernels
    (`calm_jax.variants.precompose_memory`)."""
    if config is None:
        from calm_jax.composition import CompositionConfig
        config = CompositionConfig()
    variant = variant_class(config.kind)
    out = {}
    for name, tree in nn.unbox(composition).items():
        tree = dict(tree)
        if fuse and not layers_unstacked(tree):
            tree = variant.decoding_params(tree)
        out[name] = unstack_leaves(tree)
    return out


def connection_params(tree: Any, i: int) -> Any:
    """Connection i's parameters from per-connection arrays, as a one-connection Bridge's
    (leading axis 1: a reshape, no copy)."""
    return jax.tree.map(lambda p: p.arrays[i][None], tree,
                        is_leaf=lambda x: isinstance(x, LayerList))
