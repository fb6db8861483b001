"""Shared machinery of the importers: tensor sources, the layer mapping, tree checks.

Every importer ends in the same place: a `TransformerConfig` and a plain nested dict of float32
numpy arrays laid out exactly like `nn.unbox(init_decoder(cfg, key))['params']`:

    embedder/embedding              [vocab, embed]
    pos_embedder/embedding          [max_len, embed]            (learned positions only)
    layers/attn/query/kernel        [layers, embed, heads, head_dim]    (+ bias [layers, heads, hd])
    layers/attn/key|value/kernel    [layers, embed, kv_heads, head_dim] (+ bias)
    layers/attn/out/kernel          [layers, heads, head_dim, embed]    (+ bias [layers, embed])
    layers/attn/query_norm|key_norm/scale  [layers, head_dim]   (qk_norm only)
    layers/mlp/gate|up/kernel       [layers, embed, mlp]        (gate only for gated MLPs)
    layers/mlp/down/kernel          [layers, mlp, embed]
    layers/{attn,mlp}_norm/scale    [layers, embed]  (+ bias for LayerNorm; post_* with post_norms)
    final_norm/scale                [embed]
    lm_head/kernel                  [embed, vocab]              (untied output only)

Checkpoints store linear weights PyTorch-style, `[out, in]`; `TensorSource.linear` transposes
them. Rotary embeddings use the half-split (Hugging Face) layout, which is what the q/k rows of
a Hugging Face checkpoint already are; GGUF's Llama tensors are converted back to it on read.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from calm_jax.models.config import TransformerConfig

Params = dict[str, Any]


class TensorSource:
    """Named tensors of one checkpoint, loaded on demand and converted to float32.

    `take` marks a tensor as used; `check_all_used` then names any tensor the mapping did not
    consume, which is how a feature the model lacks (an extra bias, a new norm) is caught
    instead of silently dropped.
    """

    def __init__(self, loaders: Mapping[str, Callable[[], np.ndarray]],
                 shapes: Mapping[str, tuple[int, ...]], origin: str):
        self._loaders = dict(loaders)
        self._shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        self.origin = origin
        self._used: set[str] = set()

    def names(self) -> list[str]:
        return sorted(self._loaders)

    def __contains__(self, name: str) -> bool:
        return name in self._loaders

    def shape(self, name: str) -> tuple[int, ...]:
        self._require(name)
        return self._shapes[name]

    def _require(self, name: str) -> None:
        if name not in self._loaders:
            raise ValueError(f"{self.origin}: missing tensor {name!r}")

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The tensor `name` as float32, checking its shape when `shape` is given."""
        self._require(name)
        if shape is not None and self._shapes[name] != tuple(shape):
            raise ValueError(f"{self.origin}: tensor {name!r} has shape {self._shapes[name]}, "
                             f"expected {tuple(shape)}")
        # A copy: loaders return views of memory-mapped files, which must not outlive them.
        array = np.array(self._loaders[name](), dtype=np.float32)
        if array.shape != self._shapes[name]:  # a loader that disagrees with its own header
            raise ValueError(f"{self.origin}: tensor {name!r} loaded with shape {array.shape}, "
                             f"header says {self._shapes[name]}")
        self._used.add(name)
        return array

    def linear(self, name: str, out_dim: int, in_dim: int) -> np.ndarray:
        """A PyTorch-layout linear weight [out, in], returned as a kernel [in, out]."""
        return self.take(name, (out_dim, in_dim)).T

    def skip(self, name: str) -> None:
        """Marks a tensor as deliberately unused (e.g. a tied output copy)."""
        self._used.add(name)

    def check_all_used(self, ignore: Callable[[str], bool] = lambda name: False) -> None:
        left = [n for n in self.names() if n not in self._used and not ignore(n)]
        if left:
            shown = ", ".join(repr(n) for n in left[:8])
            more = f" and {len(left) - 8} more" if len(left) > 8 else ""
            raise ValueError(
                f"{self.origin}: {len(left)} tensor(s) have no place in calm_jax's Decoder for "
                f"this config: {shown}{more} (a feature the model does not implement?)")


@dataclasses.dataclass(frozen=True)
class LayerNames:
    """Tensor names of one family, as format strings of the layer index `{i}`.

    Names set to None do not exist in that format. `norm_offset` is subtracted from every norm
    weight (GGUF stores Gemma's `1 + scale`); `fix_qk` rewrites q/k weights and biases after
    loading (GGUF's Llama row permutation).
    """

    q: str
    k: str
    v: str
    o: str
    gate: str | None
    up: str
    down: str
    attn_norm: str
    mlp_norm: str
    post_attn_norm: str | None = None
    post_mlp_norm: str | None = None
    q_norm: str | None = None
    k_norm: str | None = None
    bias_suffix: tuple[str, str] = (".weight", ".bias")
    norm_offset: float = 0.0
    fix_qk: Callable[[np.ndarray, int], np.ndarray] | None = None


def _bias_name(weight_name: str, names: LayerNames) -> str:
    w, b = names.bias_suffix
    if not weight_name.endswith(w):
        raise ValueError(f"internal: weight name {weight_name!r} does not end in {w!r}")
    return weight_name[: -len(w)] + b


def map_layer(src: TensorSource, cfg: TransformerConfig, names: LayerNames, i: int) -> Params:
    """One block's parameters (no leading layer axis) from separate q/k/v/o and MLP tensors."""
    d, n, k, h, f = (cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.dims_per_head,
                     cfg.mlp_dim)
    fmt = lambda s: s.format(i=i)  # noqa: E731

    def qk(name: str, heads: int) -> dict[str, np.ndarray]:
        w = src.take(fmt(name), (heads * h, d))
        if names.fix_qk is not None:
            w = names.fix_qk(w, heads)
        out = {"kernel": w.T.reshape(d, heads, h)}
        if cfg.use_bias or cfg.qkv_bias:
            b = src.take(_bias_name(fmt(name), names), (heads * h,))
            if names.fix_qk is not None:
                b = names.fix_qk(b, heads)
            out["bias"] = b.reshape(heads, h)
        return out

    attn: Params = {"query": qk(names.q, n), "key": qk(names.k, k)}
    value = {"kernel": src.linear(fmt(names.v), k * h, d).reshape(d, k, h)}
    if cfg.use_bias or cfg.qkv_bias:
        value["bias"] = src.take(_bias_name(fmt(names.v), names), (k * h,)).reshape(k, h)
    attn["value"] = value
    out = {"kernel": src.linear(fmt(names.o), d, n * h).reshape(n, h, d)}
    if cfg.use_bias:
        out["bias"] = src.take(_bias_name(fmt(names.o), names), (d,))
    attn["out"] = out

    def norm(name: str | None, dim: int, what: str) -> dict[str, np.ndarray]:
        if name is None:
            raise ValueError(f"{src.origin}: this format has no tensor for {what}, which the "
                             f"config needs")
        p = {"scale": src.take(fmt(name), (dim,)) - np.float32(names.norm_offset)}
        if cfg.norm == "layernorm":
            p["bias"] = src.take(_bias_name(fmt(name), names), (dim,))
        return p

    if cfg.qk_norm:
        attn["query_norm"] = norm(names.q_norm, h, "query_norm")
        attn["key_norm"] = norm(names.k_norm, h, "key_norm")

    def dense(name: str, out_dim: int, in_dim: int) -> dict[str, np.ndarray]:
        p = {"kernel": src.linear(fmt(name), out_dim, in_dim)}
        if cfg.use_bias:
            p["bias"] = src.take(_bias_name(fmt(name), names), (out_dim,))
        return p

    mlp: Params = {"up": dense(names.up, f, d), "down": dense(names.down, d, f)}
    if cfg.gated_mlp:
        if names.gate is None:
            raise ValueError(f"{src.origin}: gated MLP expected but the format has no gate")
        mlp["gate"] = dense(names.gate, f, d)

    layer: Params = {"attn": attn, "mlp": mlp,
                     "attn_norm": norm(names.attn_norm, d, "attn_norm"),
                     "mlp_norm": norm(names.mlp_norm, d, "mlp_norm")}
    if cfg.post_norms:
        layer["post_attn_norm"] = norm(names.post_attn_norm, d, "post_attn_norm")
        layer["post_mlp_norm"] = norm(names.post_mlp_norm, d, "post_mlp_norm")
    return layer


def stack_layers(layers: list[Params]) -> Params:
    """[{...}, {...}] per layer -> {...} with a leading `layers` axis on every leaf."""
    first = layers[0]
    if isinstance(first, dict):
        return {key: stack_layers([layer[key] for layer in layers]) for key in first}
    return np.stack(layers, axis=0)


def expected_params(cfg: TransformerConfig) -> Params:
    """The Decoder's parameter tree as `jax.ShapeDtypeStruct`s (nothing is computed)."""
    import jax
    import flax.linen as nn

    from calm_jax.models.transformer import init_decoder

    return jax.eval_shape(
        lambda: nn.unbox(init_decoder(cfg, jax.random.key(0), length=1))["params"])


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def check_params(cfg: TransformerConfig, params: Mapping[str, Any], origin: str = "params"):
    """Raises ValueError unless `params` has exactly the Decoder's paths and shapes."""
    want = flatten(expected_params(cfg))
    got = flatten(params)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(f"{origin}: parameter tree does not match the Decoder: "
                         f"missing {missing}, unexpected {extra}")
    for path, spec in want.items():
        shape = tuple(np.shape(got[path]))
        if shape != tuple(spec.shape):
            raise ValueError(f"{origin}: parameter {path!r} has shape {shape}, "
                             f"expected {tuple(spec.shape)}")


def build_params(cfg: TransformerConfig, src: TensorSource, names: LayerNames, *,
                 embedding: str, final_norm: str, lm_head: str | None,
                 final_norm_bias: str | None = None) -> Params:
    """The whole tree from a per-layer naming scheme plus the global tensors."""
    d, v = cfg.embed_dim, cfg.vocab_size
    params: Params = {"embedder": {"embedding": src.take(embedding, (v, d))}}
    layers = [map_layer(src, cfg, names, i) for i in range(cfg.num_layers)]
    params["layers"] = stack_layers(layers)
    del layers
    final = {"scale": src.take(final_norm, (d,)) - np.float32(names.norm_offset)}
    if cfg.norm == "layernorm":
        final["bias"] = src.take(final_norm_bias or _bias_name(final_norm, names), (d,))
    params["final_norm"] = final
    if not cfg.tie_embeddings:
        if lm_head is None:
            raise ValueError(f"{src.origin}: untied output layer expected but no lm_head name")
        params["lm_head"] = {"kernel": src.linear(lm_head, v, d)}
    return params


def first_present(src: TensorSource, candidates: Iterable[str]) -> str | None:
    for name in candidates:
        if name in src:
            return name
    return None


def activation_name(value: Any, field: str) -> str:
    """Maps Hugging Face / GGUF activation names onto `TransformerConfig.activation`."""
    table = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
             "gelu_tanh": "gelu_tanh", "gelu": "gelu", "silu": "silu", "swish": "silu",
             "relu": "relu"}
    if value not in table:
        raise ValueError(f"{field}: expected one of {sorted(table)}, got {value!r}")
    return table[value]
