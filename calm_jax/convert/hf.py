"""Hugging Face checkpoint directories (config.json + safetensors or PyTorch .bin) -> Decoder.

Families (`config.json`'s `model_type`):

* `gpt2`: learned positions, LayerNorm, fused `c_attn`; its `Conv1D` weights are stored
  `[in, out]` (every other family here stores `[out, in]`).
* `llama` (Llama 1-3 with `linear`/`llama3` RoPE scaling, SmolLM, SmolLM2), `qwen2` (q/k/v
  biases), `qwen3` (q/k RMSNorm).
* `gemma`, `gemma2`, `gemma3_text` (and the text tower of a multimodal `gemma3` checkpoint).
  Gemma's RMSNorm is `x * (1 + w)` and Hugging Face stores `w`, which is what
  `norm_scale_plus_one=True` stores too, so norm weights are copied unchanged.

Both config styles are read: the Transformers 4 one (`rope_theta`, `rope_scaling`,
`rope_local_base_freq`, `sliding_window_pattern`) and the Transformers 5 one (`rope_parameters`,
per layer type for Gemma 3, and `layer_types`).

safetensors files are read with a small reader of our own (a JSON header and raw little-endian
arrays), because the `safetensors` package's numpy path cannot return bfloat16, the dtype most
released checkpoints use. PyTorch `.bin` files need torch, imported only when one is read.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable

import numpy as np

from calm_jax.models.config import TransformerConfig
from calm_jax.convert import common
from calm_jax.convert.common import LayerNames, Params, TensorSource

FAMILIES = ("gpt2", "llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3")


# Reading tensors --------------------------------------------------------------------------------


def _safetensors_dtypes() -> dict[str, Any]:
    import ml_dtypes  # a dependency of jax

    return {"F64": np.float64, "F32": np.float32, "F16": np.float16,
            "BF16": ml_dtypes.bfloat16}


def _read_safetensors(path: str, loaders: dict, shapes: dict) -> None:
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    base = 8 + header_len
    data = np.memmap(path, dtype=np.uint8, mode="r")
    dtypes = _safetensors_dtypes()
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape = tuple(info["shape"])
        start, end = info["data_offsets"]
        kind = info["dtype"]

        def load(start=start, end=end, kind=kind, shape=shape, name=name):
            if kind not in dtypes:
                raise ValueError(f"{path}: tensor {name!r} has dtype {kind}, expected one of "
                                 f"{sorted(dtypes)}")
            return data[base + start: base + end].view(dtypes[kind]).reshape(shape)

        loaders[name], shapes[name] = load, shape


def _read_torch_bin(path: str, loaders: dict, shapes: dict) -> None:
    try:
        import torch
    except ImportError as e:
        raise ValueError(f"{path}: reading PyTorch .bin checkpoints needs torch "
                         f"(pip install torch), or convert it to safetensors") from e
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for name, tensor in state.items():
        if not torch.is_tensor(tensor):
            continue
        loaders[name] = (lambda t=tensor: t.detach().to(torch.float32).numpy())
        shapes[name] = tuple(tensor.shape)


def read_checkpoint(directory: str) -> TensorSource:
    """All tensors of a Hugging Face checkpoint directory (single file or sharded)."""
    loaders: dict[str, Callable[[], np.ndarray]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    files = sorted(os.listdir(directory))
    for index_name, reader in (("model.safetensors.index.json", _read_safetensors),
                               ("pytorch_model.bin.index.json", _read_torch_bin)):
        if index_name in files:
            with open(os.path.join(directory, index_name)) as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
            for shard in shards:
                reader(os.path.join(directory, shard), loaders, shapes)
            return TensorSource(loaders, shapes, directory)
    st = [f for f in files if f.endswith(".safetensors")]
    bins = [f for f in files if f.endswith(".bin") and f.startswith("pytorch_model")]
    if st:
        for f in st:
            _read_safetensors(os.path.join(directory, f), loaders, shapes)
    elif bins:
        for f in bins:
            _read_torch_bin(os.path.join(directory, f), loaders, shapes)
    else:
        raise ValueError(f"{directory}: no model.safetensors or pytorch_model.bin found "
                         f"(files: {files})")
    return TensorSource(loaders, shapes, directory)


# Reading config.json -------------------------------------------------------------------------


def _get(hf: dict, key: str, default: Any = None, *, required: bool = False) -> Any:
    if key in hf and hf[key] is not None:
        return hf[key]
    if required:
        raise ValueError(f"config.json: missing field {key!r}")
    return default


def _rope_fields(hf: dict, layer_kind: str | None, default_theta: float) -> dict[str, Any]:
    """RoPE base and scaling of one layer kind, from either config style."""
    where = "rope_parameters"
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and layer_kind is not None and layer_kind in params:
        params, where = params[layer_kind], f"rope_parameters.{layer_kind}"
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", hf.get("rope_theta", default_theta))
        scaling = params
    else:  # Transformers 4: top-level fields
        where = "rope_scaling"
        theta = _get(hf, "rope_theta", default_theta)
        scaling = hf.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if kind == "default":
        return {"rope_theta": float(theta), "rope_scaling": "none"}
    if kind == "linear":
        return {"rope_theta": float(theta), "rope_scaling": "linear",
                "rope_scaling_factor": float(scaling["factor"])}
    if kind == "llama3":
        return {"rope_theta": float(theta), "rope_scaling": "llama3",
                "rope_scaling_factor": float(scaling["factor"]),
                "rope_low_freq_factor": float(scaling["low_freq_factor"]),
                "rope_high_freq_factor": float(scaling["high_freq_factor"]),
                "rope_original_max_len": int(scaling["original_max_position_embeddings"])}
    raise ValueError(f"config.json: {where}.rope_type: expected one of "
                     f"('default', 'linear', 'llama3'), got {kind!r}")


def _layer_pattern(hf: dict, num_layers: int, sliding_window: int | None,
                   default_every: int) -> tuple[int | None, int]:
    """(sliding_window, global_every) reproducing `layer_types` (or the family's pattern)."""
    types = hf.get("layer_types")
    if types is None:
        if sliding_window is None:
            return None, 1
        every = int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern")
                    or default_every)
        types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                 for i in range(num_layers)]
    if len(types) != num_layers:
        raise ValueError(f"config.json: layer_types: expected {num_layers} entries, "
                         f"got {len(types)}")
    bad = sorted(set(types) - {"full_attention", "sliding_attention"})
    if bad:
        raise ValueError(f"config.json: layer_types: expected 'full_attention' or "
                         f"'sliding_attention', got {bad}")
    is_global = tuple(t == "full_attention" for t in types)
    if all(is_global):
        return None, 1
    if sliding_window is None:
        raise ValueError("config.json: layer_types has sliding layers but sliding_window is null")
    for every in range(1, num_layers + 2):
        if tuple((i + 1) % every == 0 for i in range(num_layers)) == is_global:
            return int(sliding_window), every
    raise ValueError(f"config.json: layer_types: calm_jax supports 'every k-th layer global' "
                     f"patterns only, got {types}")


def _check_unsupported(hf: dict, checks: dict[str, Any]) -> None:
    """Fields whose non-default values the Decoder cannot express."""
    for key, allowed in checks.items():
        value = hf.get(key)
        if value is not None and value != allowed:
            raise ValueError(f"config.json: {key}: calm_jax's Decoder supports only {allowed!r}, "
                             f"got {value!r}")


def config_from_hf(hf: dict) -> TransformerConfig:
    """Our `TransformerConfig` for a Hugging Face `config.json` dict."""
    model_type = hf.get("model_type")
    if model_type == "gemma3" and "text_config" in hf:  # multimodal: the text tower
        hf = {**hf["text_config"], "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    if model_type not in FAMILIES:
        raise ValueError(f"config.json: model_type: expected one of {FAMILIES}, "
                         f"got {model_type!r}")
    if model_type == "gpt2":
        return _gpt2_config(hf)
    return _rope_family_config(hf, model_type)


def _gpt2_config(hf: dict) -> TransformerConfig:
    _check_unsupported(hf, {"scale_attn_by_inverse_layer_idx": False,
                            "add_cross_attention": False})
    d = int(_get(hf, "n_embd", required=True))
    return TransformerConfig.gpt2_style(
        vocab_size=int(_get(hf, "vocab_size", required=True)),
        embed_dim=d,
        num_layers=int(_get(hf, "n_layer", required=True)),
        num_heads=int(_get(hf, "n_head", required=True)),
        mlp_dim=int(_get(hf, "n_inner", 4 * d)),
        max_len=int(_get(hf, "n_positions", required=True)),
        norm_eps=float(_get(hf, "layer_norm_epsilon", 1e-5)),
        activation=common.activation_name(_get(hf, "activation_function", "gelu_new"),
                                          "config.json: activation_function"),
        query_scale=None if _get(hf, "scale_attn_weights", True) else 1.0,
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", True)),
    )


def _rope_family_config(hf: dict, model_type: str) -> TransformerConfig:
    gemma = model_type.startswith("gemma")
    d = int(_get(hf, "hidden_size", required=True))
    n = int(_get(hf, "num_attention_heads", required=True))
    num_layers = int(_get(hf, "num_hidden_layers", required=True))
    head_dim = int(_get(hf, "head_dim", d // n))
    kw: dict[str, Any] = dict(
        vocab_size=int(_get(hf, "vocab_size", required=True)),
        embed_dim=d, num_layers=num_layers, num_heads=n,
        num_kv_heads=int(_get(hf, "num_key_value_heads", n)),
        head_dim=head_dim,
        mlp_dim=int(_get(hf, "intermediate_size", required=True)),
        max_len=int(_get(hf, "max_position_embeddings", 2048)),
        norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
    )
    if hf.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise ValueError(f"config.json: partial_rotary_factor: calm_jax rotates whole heads "
                         f"only, got {hf['partial_rotary_factor']!r}")
    if hf.get("use_bidirectional_attention"):
        raise ValueError("config.json: use_bidirectional_attention: calm_jax's Decoder is "
                         "causal only, got True")
    attention_bias = bool(_get(hf, "attention_bias", False))
    mlp_bias = bool(_get(hf, "mlp_bias", False))
    if attention_bias != mlp_bias:
        raise ValueError(
            f"config.json: attention_bias={attention_bias}, mlp_bias={mlp_bias}: calm_jax has "
            f"biases on every dense layer (use_bias) or on q/k/v only (qkv_bias), not this mix")
    kw["use_bias"] = attention_bias and mlp_bias

    if gemma:
        act = _get(hf, "hidden_activation", None) or _get(hf, "hidden_act", "gelu_pytorch_tanh")
        if act == "gelu":  # legacy Gemma value meaning the tanh approximation
            act = "gelu_pytorch_tanh"
        kw["activation"] = common.activation_name(act, "config.json: hidden_activation")
        kw["tie_embeddings"] = bool(_get(hf, "tie_word_embeddings", True))
        if model_type == "gemma":
            kw.update(_rope_fields(hf, None, 10_000.0))
            return TransformerConfig.gemma_style(**kw)
        # Gemma 2 and 3.
        kw["post_norms"] = True
        kw["query_scale"] = float(_get(hf, "query_pre_attn_scalar", head_dim)) ** -0.5
        kw["attn_logit_softcap"] = (None if hf.get("attn_logit_softcapping") is None
                                    else float(hf["attn_logit_softcapping"]))
        kw["final_logit_softcap"] = (None if hf.get("final_logit_softcapping") is None
                                     else float(hf["final_logit_softcapping"]))
        window, every = _layer_pattern(hf, num_layers, hf.get("sliding_window"),
                                       2 if model_type == "gemma2" else 6)
        kw["sliding_window"], kw["global_every"] = window, every
        if model_type == "gemma2":
            kw.update(_rope_fields(hf, None, 10_000.0))
            return TransformerConfig.gemma_style(**kw)
        kw["qk_norm"] = True
        global_rope = _rope_fields(hf, "full_attention", 1_000_000.0)
        local_theta = hf.get("rope_local_base_freq", 10_000.0)
        local_rope = _rope_fields({**hf, "rope_theta": local_theta, "rope_scaling": None},
                                  "sliding_attention", 10_000.0)
        if local_rope["rope_scaling"] != "none":
            raise ValueError(f"config.json: rope_parameters.sliding_attention: calm_jax scales "
                             f"local RoPE like global RoPE; got local scaling "
                             f"{local_rope['rope_scaling']!r}")
        if window is not None and global_rope["rope_scaling"] != "none":
            raise ValueError(
                f"config.json: rope scaling {global_rope['rope_scaling']!r} on global layers "
                f"only (Gemma 3 4B+): calm_jax's Decoder applies rope_scaling to the sliding "
                f"layers too and cannot express this yet")
        kw.update(global_rope)
        if window is not None:
            kw["rope_local_theta"] = float(local_rope["rope_theta"])
        return TransformerConfig.gemma_style(**kw)

    # Llama family.
    kw["activation"] = common.activation_name(_get(hf, "hidden_act", "silu"),
                                              "config.json: hidden_act")
    kw["tie_embeddings"] = bool(_get(hf, "tie_word_embeddings", False))
    kw.update(_rope_fields(hf, None, 10_000.0))
    if model_type == "qwen2":
        kw["qkv_bias"] = True
    if model_type == "qwen3":
        kw["qk_norm"] = True
    if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        window, every = _layer_pattern(hf, num_layers, hf.get("sliding_window"), 1)
        kw["sliding_window"], kw["global_every"] = window, every
    return TransformerConfig.llama_style(**kw)


# Tensor mapping -------------------------------------------------------------------------------


def _find_prefix(src: TensorSource, suffix: str) -> str:
    hits = [name[: -len(suffix)] for name in src.names() if name.endswith(suffix)]
    if len(hits) > 1:
        hits = [h for h in hits if "language_model" in h] or hits
    if len(hits) != 1:
        raise ValueError(f"{src.origin}: expected one tensor named '*{suffix}', found {hits}")
    return hits[0]


_IGNORED = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def _gpt2_params(cfg: TransformerConfig, src: TensorSource) -> Params:
    p = _find_prefix(src, "wte.weight")
    d, n, h, f = cfg.embed_dim, cfg.num_heads, cfg.dims_per_head, cfg.mlp_dim

    def ln(name: str) -> dict[str, np.ndarray]:
        return {"scale": src.take(f"{name}.weight", (d,)), "bias": src.take(f"{name}.bias", (d,))}

    layers = []
    for i in range(cfg.num_layers):
        b = f"{p}h.{i}."
        qkv = src.take(b + "attn.c_attn.weight", (d, 3 * d))  # Conv1D: [in, out]
        qkv_b = src.take(b + "attn.c_attn.bias", (3 * d,))
        attn = {}
        for j, key in enumerate(("query", "key", "value")):
            attn[key] = {"kernel": qkv[:, j * d:(j + 1) * d].reshape(d, n, h),
                         "bias": qkv_b[j * d:(j + 1) * d].reshape(n, h)}
        attn["out"] = {"kernel": src.take(b + "attn.c_proj.weight", (d, d)).reshape(n, h, d),
                       "bias": src.take(b + "attn.c_proj.bias", (d,))}
        mlp = {"up": {"kernel": src.take(b + "mlp.c_fc.weight", (d, f)),
                      "bias": src.take(b + "mlp.c_fc.bias", (f,))},
               "down": {"kernel": src.take(b + "mlp.c_proj.weight", (f, d)),
                        "bias": src.take(b + "mlp.c_proj.bias", (d,))}}
        layers.append({"attn": attn, "mlp": mlp, "attn_norm": ln(b + "ln_1"),
                       "mlp_norm": ln(b + "ln_2")})
    params = {"embedder": {"embedding": src.take(f"{p}wte.weight",
                                                 (cfg.vocab_size, d))},
              "pos_embedder": {"embedding": src.take(f"{p}wpe.weight", (cfg.max_len, d))},
              "layers": common.stack_layers(layers),
              "final_norm": ln(f"{p}ln_f")}
    if cfg.tie_embeddings:
        if "lm_head.weight" in src:
            src.skip("lm_head.weight")
    else:
        params["lm_head"] = {"kernel": src.linear("lm_head.weight", cfg.vocab_size, d)}
    src.check_all_used(lambda name: name.endswith(_IGNORED))
    return params


def _rope_family_params(cfg: TransformerConfig, model_type: str, src: TensorSource) -> Params:
    p = _find_prefix(src, "embed_tokens.weight")
    layer = p + "layers.{i}."
    post = model_type in ("gemma2", "gemma3_text", "gemma3")
    names = LayerNames(
        q=layer + "self_attn.q_proj.weight", k=layer + "self_attn.k_proj.weight",
        v=layer + "self_attn.v_proj.weight", o=layer + "self_attn.o_proj.weight",
        gate=layer + "mlp.gate_proj.weight", up=layer + "mlp.up_proj.weight",
        down=layer + "mlp.down_proj.weight",
        attn_norm=layer + "input_layernorm.weight",
        mlp_norm=layer + ("pre_feedforward_layernorm.weight" if post
                          else "post_attention_layernorm.weight"),
        post_attn_norm=layer + "post_attention_layernorm.weight" if post else None,
        post_mlp_norm=layer + "post_feedforward_layernorm.weight" if post else None,
        q_norm=layer + "self_attn.q_norm.weight", k_norm=layer + "self_attn.k_norm.weight")
    # The output layer sits beside the decoder: "lm_head.weight" next to "model.", or under
    # the multimodal wrapper.
    head = None
    if not cfg.tie_embeddings:
        head = common.first_present(
            src, [n for n in src.names() if n.endswith("lm_head.weight")]) or "lm_head.weight"
    params = common.build_params(cfg, src, names, embedding=p + "embed_tokens.weight",
                                 final_norm=p + "norm.weight", lm_head=head)
    if cfg.tie_embeddings:
        for name in src.names():
            if name.endswith("lm_head.weight"):
                src.skip(name)
    src.check_all_used(lambda name: not name.startswith(p) or name.endswith(_IGNORED))
    return params


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{directory}: no config.json (expected a Hugging Face model directory)")
    with open(path) as fh:
        return json.load(fh)


def from_hf(directory: str) -> tuple[TransformerConfig, Params]:
    """(config, params) of the Hugging Face checkpoint in `directory`; params are float32."""
    hf = read_config(directory)
    cfg = config_from_hf(hf)
    src = read_checkpoint(directory)
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        params = _gpt2_params(cfg, src)
    else:
        params = _rope_family_params(cfg, model_type, src)
    common.check_params(cfg, params, origin=directory)
    return cfg, params
