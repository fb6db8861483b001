"""GGUF files -> Decoder: Llama-family (Llama, SmolLM2, Qwen2/3) and Gemma 1/2/3.

What llama.cpp's converter changed, and how it is undone here:

* Llama q/k rows. llama.cpp rotates interleaved pairs (x[2j], x[2j+1]); Hugging Face and
  calm_jax rotate halves (x[j], x[j + head_dim/2]). The converter therefore permutes the rows
  of each head of `attn_q` / `attn_k` from half-split order to pair order: HF row
  `half * head_dim/2 + j` goes to GGUF row `2 j + half`. `_unpermute` reverses that. Qwen2/3
  and Gemma use the "NeoX" (half-split) rotation in llama.cpp and are stored unpermuted.
* Gemma norms. llama.cpp computes Gemma's RMSNorm as a plain `x * w`, so its converter stores
  `1 + w` for every `*norm.weight` (block, final, post and q/k norms); calm_jax stores `w`
  (`norm_scale_plus_one`), so 1 is subtracted on read.
* Gemma embeddings are still multiplied by sqrt(embed_dim) at run time (not folded in).

Hyper-parameters GGUF does not store follow llama.cpp's own choices: Gemma 2/3 attention
scale `head_dim ** -0.5` (the 27B models: `(embed / heads) ** -0.5`), Gemma 3 local RoPE base
10 000 and every 6th layer global, Gemma 2 every 2nd layer global.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from calm_jax.models.config import TransformerConfig
from calm_jax.convert import common
from calm_jax.convert.common import LayerNames, Params, TensorSource
from calm_jax.convert.gguf_file import GGUFFile

ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """GGUF pair-ordered rows of q/k (weight [heads*hd, in] or bias [heads*hd]) -> half-split."""
    rows = w.shape[0]
    hd = rows // heads
    # GGUF row (head, j, half) at head*hd + 2j + half  ->  HF row head*hd + half*hd/2 + j.
    x = w.reshape(heads, hd // 2, 2, *w.shape[1:])
    return np.swapaxes(x, 1, 2).reshape(w.shape)


def _meta(f: GGUFFile, key: str, default: Any = None, *, required: bool = False) -> Any:
    if key in f.metadata:
        return f.metadata[key]
    if required:
        raise ValueError(f"{f.path}: missing metadata field {key!r}")
    return default


def _uniform(f: GGUFFile, key: str, value: Any) -> Any:
    """Per-layer arrays (some files store head counts per layer) must be uniform here."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(f"{f.path}: {key}: calm_jax needs the same value in every layer, "
                             f"got {value}")
        return value[0]
    return value


def _llama3_rope(f: GGUFFile, inv_factors: np.ndarray, head_dim: int, theta: float
                 ) -> dict[str, Any]:
    """Recognises llama.cpp's `rope_freqs` tensor (per-frequency divisors) as llama3 scaling."""
    from calm_jax.models.layers import rope_frequencies

    plain = TransformerConfig.tiny(embed_dim=head_dim, num_heads=1, num_kv_heads=1)
    base = np.asarray(rope_frequencies(plain, theta))
    if np.allclose(inv_factors, 1.0):
        return {}
    orig = int(_meta(f, "llama.rope.scaling.original_context_length", 8192))
    # Llama 3.1 / 3.2 / 3.3 all use low 1, high 4; the factor is 8 or 32.
    for factor in (8.0, 32.0, 16.0, 4.0, 2.0):
        cand = dict(rope_scaling="llama3", rope_scaling_factor=factor, rope_low_freq_factor=1.0,
                    rope_high_freq_factor=4.0, rope_original_max_len=orig)
        scaled = np.asarray(rope_frequencies(plain.replace(**cand), theta))
        if np.allclose(base / scaled, inv_factors, rtol=1e-3):
            return cand
    raise ValueError(f"{f.path}: tensor 'rope_freqs.weight' is not a llama3 RoPE scaling that "
                     f"calm_jax recognises (factors {inv_factors[:4]}...)")


def config_from_gguf(f: GGUFFile) -> TransformerConfig:
    arch = _meta(f, "general.architecture", required=True)
    if arch not in ARCHITECTURES:
        raise ValueError(f"{f.path}: general.architecture: expected one of {ARCHITECTURES}, "
                         f"got {arch!r}")
    m = lambda key, default=None, required=False: _uniform(  # noqa: E731
        f, f"{arch}.{key}", _meta(f, f"{arch}.{key}", default, required=required))
    d = int(m("embedding_length", required=True))
    n = int(m("attention.head_count", required=True))
    head_dim = int(m("attention.key_length", d // n))
    if int(m("attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"{f.path}: {arch}.attention.value_length differs from key_length; "
                         f"calm_jax uses one head_dim")
    rot = int(m("rope.dimension_count", head_dim))
    if rot != head_dim:
        raise ValueError(f"{f.path}: {arch}.rope.dimension_count={rot}: calm_jax rotates whole "
                         f"heads (head_dim={head_dim}) only")
    if "token_embd.weight" not in f.tensors:
        raise ValueError(f"{f.path}: missing tensor 'token_embd.weight'")
    vocab = f.tensors["token_embd.weight"].shape[0]
    num_layers = int(m("block_count", required=True))
    kw: dict[str, Any] = dict(
        vocab_size=vocab, embed_dim=d, num_layers=num_layers, num_heads=n,
        num_kv_heads=int(m("attention.head_count_kv", n)), head_dim=head_dim,
        mlp_dim=int(m("feed_forward_length", required=True)),
        max_len=int(m("context_length", 2048)),
        norm_eps=float(m("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(m("rope.freq_base", 10_000.0)),
        tie_embeddings="output.weight" not in f.tensors,
    )
    scaling = m("rope.scaling.type", "none")
    factor = float(m("rope.scaling.factor", 1.0))
    if scaling not in ("none", "linear") or (scaling == "linear" and factor <= 0):
        raise ValueError(f"{f.path}: {arch}.rope.scaling.type: expected 'none' or 'linear', "
                         f"got {scaling!r}")
    linear = scaling == "linear" and factor != 1.0

    if arch.startswith("gemma"):
        if arch == "gemma":
            if linear:
                kw.update(rope_scaling="linear", rope_scaling_factor=factor)
            return TransformerConfig.gemma_style(**kw)
        big = (arch == "gemma2" and num_layers == 46) or (arch == "gemma3" and num_layers == 62)
        kw["query_scale"] = float(d // n if big else head_dim) ** -0.5
        kw["post_norms"] = True
        cap = m("attn_logit_softcapping")
        kw["attn_logit_softcap"] = None if cap is None else float(cap)
        cap = m("final_logit_softcapping")
        kw["final_logit_softcap"] = None if cap is None else float(cap)
        window = m("attention.sliding_window")
        every = 2 if arch == "gemma2" else 6
        pattern = _meta(f, f"{arch}.attention.sliding_window_pattern")
        if isinstance(pattern, int):
            every = pattern
        elif isinstance(pattern, list):  # per layer: True where the layer is local
            is_global = tuple(not bool(x) for x in pattern)
            every = next((k for k in range(1, num_layers + 2) if is_global == tuple(
                (i + 1) % k == 0 for i in range(num_layers))), None)
            if every is None:
                raise ValueError(f"{f.path}: {arch}.attention.sliding_window_pattern: calm_jax "
                                 f"supports 'every k-th layer global' only, got {pattern}")
        kw["sliding_window"] = None if window is None else int(window)
        kw["global_every"] = every
        if arch == "gemma2":
            if linear:
                kw.update(rope_scaling="linear", rope_scaling_factor=factor)
            return TransformerConfig.gemma_style(**kw)
        kw["qk_norm"] = True
        if linear:
            raise ValueError(f"{f.path}: {arch}.rope.scaling: linear factor {factor} on global "
                             f"layers only (Gemma 3 4B+): calm_jax's Decoder applies "
                             f"rope_scaling to the sliding layers too and cannot express this yet")
        if kw["sliding_window"] is not None:
            kw["rope_local_theta"] = float(m("rope.freq_base_swa", 10_000.0))
        return TransformerConfig.gemma_style(**kw)

    kw["activation"] = "silu"
    if linear:
        kw.update(rope_scaling="linear", rope_scaling_factor=factor)
    if "rope_freqs.weight" in f.tensors:
        if linear:
            raise ValueError(f"{f.path}: both rope_freqs.weight and linear rope scaling")
        kw.update(_llama3_rope(f, f.load("rope_freqs.weight"), head_dim, kw["rope_theta"]))
    if arch == "qwen2":
        kw["qkv_bias"] = True
    if arch == "qwen3":
        kw["qk_norm"] = True
    return TransformerConfig.llama_style(**kw)


def tensor_source(f: GGUFFile) -> TensorSource:
    return TensorSource({name: (lambda name=name: f.load(name)) for name in f.tensors},
                        {name: info.shape for name, info in f.tensors.items()}, f.path)


def from_gguf(path: str) -> tuple[TransformerConfig, Params]:
    """(config, params) of a GGUF file; quantised tensors are dequantised to float32."""
    f = GGUFFile(path)
    cfg = config_from_gguf(f)
    arch = f.metadata["general.architecture"]
    src = tensor_source(f)
    gemma = arch.startswith("gemma")
    post = arch in ("gemma2", "gemma3")
    b = "blk.{i}."
    names = LayerNames(
        q=b + "attn_q.weight", k=b + "attn_k.weight", v=b + "attn_v.weight",
        o=b + "attn_output.weight", gate=b + "ffn_gate.weight", up=b + "ffn_up.weight",
        down=b + "ffn_down.weight", attn_norm=b + "attn_norm.weight",
        mlp_norm=b + "ffn_norm.weight",
        post_attn_norm=b + "post_attention_norm.weight" if post else None,
        post_mlp_norm=b + "post_ffw_norm.weight" if post else None,
        q_norm=b + "attn_q_norm.weight", k_norm=b + "attn_k_norm.weight",
        norm_offset=1.0 if gemma else 0.0,
        fix_qk=_unpermute if arch == "llama" else None)
    params = common.build_params(cfg, src, names, embedding="token_embd.weight",
                                 final_norm="output_norm.weight",
                                 lm_head=None if cfg.tie_embeddings else "output.weight")
    src.skip("rope_freqs.weight")
    src.check_all_used()
    common.check_params(cfg, params, origin=path)
    return cfg, params
