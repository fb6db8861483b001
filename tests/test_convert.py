"""Importers of real checkpoints (calm_jax.convert) and model tokenizers (calm_jax.tokenizers).

* Hugging Face families: `transformers` builds a tiny random model (every weight, bias and norm
  randomised), saves it, we import it, and our logits must match transformers' (fp32, CPU).
* GGUF: tiny files written the way llama.cpp's converter writes them (Llama q/k rows permuted,
  Gemma norms stored as 1 + w) must reproduce the source model. The real SmolLM2-135M and
  Gemma-3-270m files are tested in tests/test_real_weights.py.
* CLI round trip, error messages, seqio wrapper.

Tests needing torch / transformers / gguf / the model packages skip with the reason when those
are not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import flax.linen as nn
import pytest

from calm_jax.models import TransformerConfig, init_decoder
from convert_support import forward as _forward, needs as _needs, torch_logits

VOCAB = 101
LENGTH = 16  # longer than the sliding windows below


def _assert_same_tree(cfg, params):
    # The tree `init_decoder` builds (traced only: running the init eagerly takes seconds).
    want = jax.eval_shape(lambda: nn.unbox(init_decoder(cfg, jax.random.key(0)))["params"])
    assert jax.tree.structure(params) == jax.tree.structure(want)
    for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        assert got.shape == ref.shape and got.dtype == np.float32


# Tiny Hugging Face models ----------------------------------------------------------------------

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2)


def _hf_spec(family: str):
    import transformers as T

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    return {
        "gpt2": (T.GPT2Config, T.GPT2LMHeadModel,
                 dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                      bos_token_id=0, eos_token_id=0)),
        "llama": (T.LlamaConfig, T.LlamaForCausalLM,
                  dict(_COMMON, rope_theta=500_000.0, rope_scaling=llama3)),
        "smollm2": (T.LlamaConfig, T.LlamaForCausalLM,  # tied, kv_heads=1, rope 1e5
                    dict(_COMMON, num_key_value_heads=1, rope_theta=100_000.0,
                         tie_word_embeddings=True)),
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(_COMMON)),
        "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(_COMMON, head_dim=8)),
        "gemma": (T.GemmaConfig, T.GemmaForCausalLM, dict(_COMMON, head_dim=8)),
        "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM,
                   dict(_COMMON, head_dim=8, sliding_window=4, query_pre_attn_scalar=12,
                        attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
        "gemma3_text": (T.Gemma3TextConfig, T.Gemma3ForCausalLM,
                        dict(_COMMON, num_hidden_layers=4, head_dim=8, sliding_window=4,
                             query_pre_attn_scalar=12, sliding_window_pattern=2,
                             rope_theta=10_000.0, rope_local_base_freq=100.0)),
    }[family]


def _randomise(model, gemma: bool, seed: int = 0):
    """Every parameter random (norms around their identity, so the maths is exercised)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and name.endswith("weight") and ("norm" in name or "ln_" in name):
                p.copy_((0.0 if gemma else 1.0) + 0.2 * noise)
            else:
                p.copy_(0.15 * noise)


def make_hf_model(family: str, directory, seed: int = 0, **overrides):
    """Saves a random tiny `family` model to `directory`; returns the torch model."""
    _needs("torch", "the Hugging Face importer tests build reference models with it")
    _needs("transformers", "the Hugging Face importer tests build reference models with it")
    import torch

    config_cls, model_cls, kw = _hf_spec(family)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**kw, **overrides})).eval()
    _randomise(model, gemma=family.startswith("gemma"), seed=seed)
    model.save_pretrained(str(directory))
    return model


def random_ids(vocab=VOCAB, batch=2, length=LENGTH, seed=1):
    return np.random.RandomState(seed).randint(0, vocab, size=(batch, length))


HF_FAMILIES = ["gpt2", "llama", "smollm2", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"]


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_hf_import_matches_transformers(family, tmp_path):
    from calm_jax.convert import from_hf

    model = make_hf_model(family, tmp_path)
    cfg, params = from_hf(str(tmp_path))
    _assert_same_tree(cfg, params)
    ids = random_ids()
    ref = torch_logits(model, ids)
    ours = _forward(cfg, params, ids)
    err = np.abs(ours - ref).max()
    print(f"{family}: max |logit diff| = {err:.3g} (max |logit| {np.abs(ref).max():.3g})")
    assert np.abs(ref).std() > 0.3  # the comparison is not between near-zero logits
    assert err <= 1e-4 * max(1.0, np.abs(ref).max())
    if cfg.position == "rope":  # far positions, where RoPE scaling and bases matter (further
        # out, float32 rounding of the angles alone reaches 1e-4)
        positions = np.broadcast_to(np.arange(LENGTH) + 1000, ids.shape)
        ref = torch_logits(model, ids, positions)
        err = np.abs(_forward(cfg, params, ids, positions) - ref).max()
        print(f"{family} at positions 1000+: max |logit diff| = {err:.3g}")
        assert err <= 1e-4 * max(1.0, np.abs(ref).max())


def test_hf_config_features_are_read(tmp_path):
    from calm_jax.convert.hf import config_from_hf

    _needs("transformers", "needs transformers to write the config")
    make_hf_model("gemma3_text", tmp_path / "g3")
    with open(tmp_path / "g3" / "config.json") as fh:
        cfg = config_from_hf(json.load(fh))
    assert (cfg.sliding_window, cfg.global_every, cfg.qk_norm, cfg.post_norms) == (4, 2, True, True)
    assert (cfg.rope_theta, cfg.rope_local_theta) == (10_000.0, 100.0)
    assert cfg.query_scale == pytest.approx(12 ** -0.5)
    assert cfg.norm_scale_plus_one and cfg.scale_embeddings and cfg.tie_embeddings
    make_hf_model("llama", tmp_path / "llama")
    with open(tmp_path / "llama" / "config.json") as fh:
        cfg = config_from_hf(json.load(fh))
    assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_original_max_len) == (
        "llama3", 8.0, 16)


def test_transformers4_style_configs_give_the_same_config():
    """Released checkpoints carry the Transformers 4 field names; both styles must agree."""
    from calm_jax.convert.hf import config_from_hf

    base = dict(model_type="gemma3_text", vocab_size=VOCAB, hidden_size=32,
                intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                rms_norm_eps=1e-6)
    v4 = dict(base, rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=3,
              rope_scaling=None)
    v5 = dict(base, layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
              rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default",
                                                     "rope_theta": 1e4}})
    assert config_from_hf(v4) == config_from_hf(v5)
    assert config_from_hf(v4).global_every == 3
    llama = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                 num_hidden_layers=2, num_attention_heads=4)
    scaling = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    old = config_from_hf(dict(llama, rope_theta=5e5,
                              rope_scaling=dict(scaling, rope_type="llama3")))
    new = config_from_hf(dict(llama, rope_parameters=dict(scaling, rope_type="llama3",
                                                          rope_theta=5e5)))
    assert old == new and old.rope_scaling == "llama3" and old.rope_theta == 5e5
    # A multimodal Gemma 3 config imports its text tower.
    mm = config_from_hf({"model_type": "gemma3", "text_config": v4, "vision_config": {}})
    assert mm == config_from_hf(v4)


def test_hf_bfloat16_sharded_and_bin_checkpoints(tmp_path):
    from calm_jax.convert import from_hf

    torch = _needs("torch", "writes the checkpoints")
    model = make_hf_model("llama", tmp_path / "f32")
    cfg, ref = from_hf(str(tmp_path / "f32"))
    # Sharded safetensors with an index.
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    _, params = from_hf(str(tmp_path / "sharded"))
    jax.tree.map(np.testing.assert_array_equal, params, ref)
    # bfloat16 safetensors (our own reader handles bf16).
    model.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    _, bf16 = from_hf(str(tmp_path / "bf16"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2), bf16, ref)
    emb = model.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(bf16["embedder"]["embedding"], emb)
    # PyTorch .bin (of the bf16-rounded weights, in float32).
    model.float()
    os.makedirs(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "f32" / "config.json").read_text())
    _, params = from_hf(str(tmp_path / "bin"))
    jax.tree.map(np.testing.assert_array_equal, params, bf16)


# HF errors ---------------------------------------------------------------------------------


def _write_config(directory, **fields):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(fields, fh)


def test_hf_unknown_architecture(tmp_path):
    from calm_jax.convert import from_hf

    _write_config(tmp_path, model_type="mamba")
    with pytest.raises(ValueError, match=r"model_type: expected one of .* got 'mamba'"):
        from_hf(str(tmp_path))
    with pytest.raises(ValueError, match="no config.json"):
        from_hf(str(tmp_path / "nowhere"))


def test_hf_unsupported_config_values():
    from calm_jax.convert.hf import config_from_hf

    llama = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                 num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"rope_scaling.rope_type: .* got 'yarn'"):
        config_from_hf(dict(llama, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="attention_bias=True, mlp_bias=False"):
        config_from_hf(dict(llama, attention_bias=True))
    with pytest.raises(ValueError, match="hidden_act: expected one of"):
        config_from_hf(dict(llama, hidden_act="mish"))
    gemma3 = dict(llama, model_type="gemma3_text", head_dim=8, sliding_window=4,
                  rope_scaling={"rope_type": "linear", "factor": 8.0})
    with pytest.raises(ValueError, match="global layers only"):
        config_from_hf(gemma3)
    with pytest.raises(ValueError, match="layer_types: calm_jax supports 'every k-th layer"):
        config_from_hf(dict(gemma3, rope_scaling=None,
                            layer_types=["full_attention", "sliding_attention"]))


def test_hf_missing_unexpected_and_misshapen_tensors(tmp_path):
    from calm_jax.convert import from_hf

    _needs("safetensors", "rewrites the checkpoint")
    from safetensors.numpy import load_file, save_file

    make_hf_model("llama", tmp_path)
    path = str(tmp_path / "model.safetensors")
    tensors = load_file(path)
    name = "model.layers.1.self_attn.k_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, path)
    with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
        from_hf(str(tmp_path))
    save_file({**tensors, "model.layers.0.self_attn.o_proj.bias": np.zeros(32, np.float32)},
              path)
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.o_proj.bias'"):
        from_hf(str(tmp_path))
    save_file(tensors, path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up_proj.weight' has shape "
                                         r"\(48, 32\), expected \(64, 32\)"):
        from_hf(str(tmp_path))


# GGUF: tiny files written like llama.cpp's converter --------------------------------------------


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k permutation: half-split rows -> interleaved pairs."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}

_SPM_PIECES = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n",
               "  "] + [f"<0x{b:02X}>" for b in range(256)] + [
    "▁", "t", "h", "e", "a", "c", "i", "s", "▁t", "▁th", "▁the", "▁c", "▁ca", "▁cat", "▁i",
    "▁is"]


def write_gguf(path, arch: str, model, *, vocab: int, window: int | None = None,
               quantize: str | None = None, raw_types: dict[str, str] | None = None):
    """A GGUF file of a tiny transformers model, converted the way llama.cpp does it."""
    gguf = _needs("gguf", "writes GGUF files")
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}
    rope = rope.get("full_attention", rope)
    w.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "llama3":
        # llama.cpp stores Llama 3 RoPE scaling as per-frequency divisors, "rope_freqs".
        inv = 1.0 / rope["rope_theta"] ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
        lo, hi, old = (rope["low_freq_factor"], rope["high_freq_factor"],
                       rope["original_max_position_embeddings"])
        factors = []
        for wavelen in 2 * np.pi / inv:
            if wavelen < old / hi:
                factors.append(1.0)
            elif wavelen > old / lo:
                factors.append(rope["factor"])
            else:
                smooth = (old / wavelen - lo) / (hi - lo)
                factors.append(1.0 / ((1 - smooth) / rope["factor"] + smooth))
        w.add_tensor("rope_freqs.weight", np.asarray(factors, np.float32))
    if window is not None:
        w.add_sliding_window(window)
    # A SentencePiece-style tokenizer (pieces, scores, types as llama.cpp stores them).
    pieces = _SPM_PIECES + [f"<unused{i}>" for i in range(vocab - len(_SPM_PIECES))]
    types = [3, 3, 3, 3, 3, 3, 4, 4] + [6] * 256 + [1] * (len(_SPM_PIECES) - 264) + [3] * (
        vocab - len(_SPM_PIECES))
    scores = [0.0] * 264 + [-float(i) for i in range(len(_SPM_PIECES) - 264)] + [0.0] * (
        vocab - len(_SPM_PIECES))
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_space_prefix(False)
    gemma = arch.startswith("gemma")
    post_attn = "post_attention_norm" if arch in ("gemma2", "gemma3") else "ffn_norm"
    if getattr(cfg, "attn_logit_softcapping", None):
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
    if getattr(cfg, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    pre_ffw = "ffn_norm"
    for name, tensor in model.state_dict().items():
        x = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            out = "output.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            base, kind = rest.rsplit(".", 1)
            table = dict(_GGUF_NAMES, post_attention_layernorm=post_attn,
                         pre_feedforward_layernorm=pre_ffw)
            out = f"blk.{i}.{table[base]}.{kind}"
            if arch == "llama" and base == "self_attn.q_proj":
                x = _llama_cpp_permute(x, cfg.num_attention_heads)
            if arch == "llama" and base == "self_attn.k_proj":
                x = _llama_cpp_permute(x, cfg.num_key_value_heads)
        if gemma and name.endswith("norm.weight"):
            x = x + 1.0
        if out in (raw_types or {}):  # zero bytes of the given type
            qtype = gguf.GGMLQuantizationType[raw_types[out]]
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            raw = np.zeros((x.shape[0], x.shape[1] // block * size), np.uint8)
            w.add_tensor(out, raw, raw_dtype=qtype)
        elif quantize and x.ndim == 2 and x.shape[1] % gguf.GGML_QUANT_SIZES[
                gguf.GGMLQuantizationType[quantize]][0] == 0:
            qtype = gguf.GGMLQuantizationType[quantize]
            w.add_tensor(out, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(out, np.ascontiguousarray(x, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_gguf(tmp_path, family: str, **kw):
    if family in ("llama", "llama3"):
        scaling = None if family == "llama" else {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        model = make_hf_model("llama", tmp_path / "hf", rope_scaling=scaling, head_dim=8,
                              max_position_embeddings=32768)
        write_gguf(tmp_path / "m.gguf", "llama", model, vocab=VOCAB, **kw)
    elif family in ("qwen2", "qwen3", "gemma"):
        model = make_hf_model(family, tmp_path / "hf", head_dim=8)
        write_gguf(tmp_path / "m.gguf", family, model, vocab=VOCAB, **kw)
    elif family == "gemma2":  # llama.cpp's fixed choices: every 2nd layer global, 1/sqrt(hd)
        model = make_hf_model("gemma2", tmp_path / "hf", query_pre_attn_scalar=8)
        write_gguf(tmp_path / "m.gguf", "gemma2", model, vocab=VOCAB, window=4, **kw)
    else:  # Gemma 3 with llama.cpp's fixed choices: 6-layer pattern, local base 1e4
        model = make_hf_model("gemma3_text", tmp_path / "hf", num_hidden_layers=6,
                              sliding_window_pattern=6, rope_local_base_freq=10_000.0,
                              rope_theta=1e6, query_pre_attn_scalar=8)
        write_gguf(tmp_path / "m.gguf", "gemma3", model, vocab=VOCAB, window=4, **kw)
    return model, str(tmp_path / "m.gguf")


@pytest.mark.parametrize("family", ["llama", "llama3", "qwen2", "qwen3", "gemma", "gemma2",
                                    "gemma3"])
def test_gguf_import_matches_source_model(family, tmp_path):
    from calm_jax.convert import from_gguf

    model, path = _tiny_gguf(tmp_path, family)
    cfg, params = from_gguf(path)
    _assert_same_tree(cfg, params)
    if family == "gemma3":
        assert (cfg.sliding_window, cfg.global_every, cfg.rope_local_theta) == (4, 6, 1e4)
        assert cfg.norm_scale_plus_one and cfg.qk_norm and cfg.post_norms
    if family == "llama3":  # recognised from the rope_freqs tensor
        assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_original_max_len) == (
            "llama3", 8.0, 8192)
    ids = random_ids()
    positions = np.broadcast_to(np.arange(LENGTH) + 5000, ids.shape)
    ref = torch_logits(model, ids, positions)
    err = np.abs(_forward(cfg, params, ids, positions) - ref).max()
    print(f"gguf {family}: max |logit diff| = {err:.3g}")
    assert err <= 1e-4 * max(1.0, np.abs(ref).max())


def test_gguf_quantised_tensors_are_dequantised(tmp_path):
    from calm_jax.convert import from_gguf

    gguf = _needs("gguf", "writes GGUF files")
    model, path = _tiny_gguf(tmp_path, "llama", quantize="Q8_0")
    cfg, params = from_gguf(path)
    w = model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    want = gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                                  gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(params["layers"]["mlp"]["up"]["kernel"][0], want.T)
    ref = torch_logits(model, random_ids())
    ours = _forward(cfg, params, random_ids())
    assert np.abs(ours - ref).max() < 0.05 * np.abs(ref).max()  # Q8_0 rounding only


def test_gguf_reader_agrees_with_gguf_package(tmp_path):
    gguf = _needs("gguf", "reference reader")
    from calm_jax.convert.gguf_file import GGUFFile

    _, path = _tiny_gguf(tmp_path, "gemma3", quantize="Q8_0")
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    assert ours.metadata["tokenizer.ggml.tokens"] == ref.fields["tokenizer.ggml.tokens"].contents()
    assert ours.metadata["gemma3.attention.sliding_window"] == 4
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.ggml_type == int(t.tensor_type) and info.shape == tuple(reversed(t.shape))
        np.testing.assert_array_equal(np.asarray(ours.raw(t.name)),
                                      np.asarray(t.data).reshape(-1).view(np.uint8))


def test_gguf_errors(tmp_path):
    gguf = _needs("gguf", "writes GGUF files")
    from calm_jax.convert import from_gguf

    w = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ValueError, match=r"general.architecture: expected one of .* 'mamba'"):
        from_gguf(str(tmp_path / "mamba.gguf"))

    # An unsupported quantisation (Q8_1: gguf.quants cannot dequantise it) names the tensor.
    _tiny_gguf(tmp_path, "llama", raw_types={"blk.0.ffn_up.weight": "Q8_1"})
    with pytest.raises(ValueError, match="'blk.0.ffn_up.weight' uses quantisation Q8_1"):
        from_gguf(str(tmp_path / "m.gguf"))
    with pytest.raises(ValueError, match="not a GGUF file"):
        from_gguf(str(tmp_path / "hf" / "config.json"))


def test_gguf_sentencepiece_tokenizer(tmp_path):
    _needs("sentencepiece", "backs llama-type GGUF tokenizers")
    from calm_jax.tokenizers import Tokenizer

    _, path = _tiny_gguf(tmp_path, "gemma3")
    tok = Tokenizer.from_gguf(path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.add_bos) == (2, 1, 0, 3, True)
    ids = tok.encode("the cat is á")
    assert ids[0] == 2 and ids[1:4] == [tok.piece_to_id(p) for p in "the"]
    assert [tok.piece_to_id(p) for p in ("▁cat", "▁is", "<0xC3>", "<0xA1>")] == ids[4:6] + ids[7:]
    assert tok.decode(ids) == "the cat is á"  # "á" through byte fallback
    # Control and user-defined pieces are matched in the raw text, as llama.cpp does.
    ids = tok.encode("<start_of_turn>the  cat\n", add_bos=False)
    assert ids[0] == 4 and 7 in ids and ids[-1] == 6
    tok.save(str(tmp_path / "saved"))
    again = Tokenizer.load(str(tmp_path / "saved"))
    assert again == tok and again.encode("the cat") == tok.encode("the cat")


# CLI round trip ------------------------------------------------------------------------------


def _run_cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "calm_jax.convert", *args],
                          capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cli_round_trip_hf(tmp_path):
    from calm_jax.convert import from_hf, load_converted, load_tokenizer
    from calm_jax.tokenizers import Tokenizer

    _needs("tokenizers", "the converted model's tokenizer")
    model = make_hf_model("gemma2", tmp_path / "hf")
    # A tokenizer.json beside the weights travels with the conversion.
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    hf_tok = HFTokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w3"))
    hf_tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    out = tmp_path / "converted"
    result = _run_cli("--source", str(tmp_path / "hf"), "--format", "hf", "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["format"] == "hf" and summary["num_layers"] == 3
    cfg, params = load_converted(str(out))
    ref_cfg, ref_params = from_hf(str(tmp_path / "hf"))
    assert cfg == ref_cfg
    assert json.loads((out / "config.json").read_text())["sliding_window"] == 4
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)
    ids = random_ids()
    np.testing.assert_array_equal(_forward(cfg, params, ids), _forward(ref_cfg, ref_params, ids))
    np.testing.assert_allclose(_forward(cfg, params, ids), torch_logits(model, ids), atol=1e-4)
    tok = load_tokenizer(str(out))
    assert tok == Tokenizer.from_hf_dir(str(tmp_path / "hf"))
    assert tok.encode("w5 w7") == [5, 7] and (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    # A second conversion into the same directory needs --overwrite.
    again = _run_cli("--source", str(tmp_path / "hf"), "--format", "hf", "--out", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert _run_cli("--source", str(tmp_path / "hf"), "--format", "hf", "--out", str(out),
                    "--overwrite").returncode == 0


def test_cli_round_trip_gguf_and_errors(tmp_path):
    from calm_jax.convert import from_gguf, load_converted, load_tokenizer
    from calm_jax.tokenizers import Tokenizer

    _, path = _tiny_gguf(tmp_path, "llama")
    out = tmp_path / "converted"
    result = _run_cli("--source", path, "--format", "gguf", "--out", str(out))
    assert result.returncode == 0, result.stderr
    cfg, params = load_converted(str(out))
    ref_cfg, ref_params = from_gguf(path)
    assert cfg == ref_cfg
    ids = random_ids()
    np.testing.assert_array_equal(_forward(cfg, params, ids), _forward(ref_cfg, ref_params, ids))
    assert load_tokenizer(str(out)) == Tokenizer.from_gguf(path)
    info = json.loads((out / "conversion.json").read_text())
    assert info["format"] == "gguf" and len(info["fingerprint"]) == 64
    # The fingerprint a composition checkpoint will record for this model.
    from calm_jax import checkpoints as ckpt
    assert info["fingerprint"] == ckpt.fingerprint(str(out))

    bad = _run_cli("--source", str(tmp_path / "missing.gguf"), "--format", "gguf", "--out",
                   str(tmp_path / "x"))
    assert bad.returncode == 2 and "--source: expected a .gguf file" in bad.stderr
    bad = _run_cli("--source", path, "--format", "onnx", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "invalid choice: 'onnx'" in bad.stderr
    with pytest.raises(ValueError, match="no config.json"):
        load_converted(str(tmp_path))


def test_load_converted_rejects_a_foreign_config(tmp_path):
    from calm_jax.convert import expected_params, load_converted, save_converted

    cfg = TransformerConfig.tiny(num_layers=2)
    rng = np.random.RandomState(0)
    params = jax.tree.map(lambda s: rng.randn(*s.shape).astype(np.float32),
                          expected_params(cfg))
    save_converted(str(tmp_path), cfg, params)
    _, restored = load_converted(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, restored, params)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "n_embd": 3}))
    with pytest.raises(ValueError, match=r"unknown TransformerConfig fields \[.n_embd.\]"):
        load_converted(str(tmp_path))
    with pytest.raises(ValueError, match="parameter 'embedder/embedding' has shape"):
        save_converted(str(tmp_path / "bad"), cfg.replace(vocab_size=128), params)


# seqio -------------------------------------------------------------------------------------------


def test_seqio_vocabulary(tmp_path):
    """Runs where seqio and TensorFlow are installed (the data extra), e.g. /work/venv-tf."""
    _needs("seqio", "the seqio Vocabulary wrapper is optional")
    spm = _needs("sentencepiece", "trains a tiny tokenizer for the test")
    import io

    import tensorflow as tf

    from calm_jax import tokenizers

    corpus = ["the capital of france is paris", "the cat sat on the mat", "a b c d e f g"] * 20
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=proto,
                                   vocab_size=40, model_type="bpe", pad_id=0, eos_id=1,
                                   bos_id=2, unk_id=3, byte_fallback=False)
    os.makedirs(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.model").write_bytes(proto.getvalue())
    (tmp_path / "tok" / tokenizers.META_FILE).write_text(json.dumps(
        {"backend": "tokenizer.model", "bos_id": 2, "eos_id": 1, "pad_id": 0, "unk_id": 3,
         "add_bos": True}))
    tok = tokenizers.Tokenizer.load(str(tmp_path / "tok"))
    vocab = tokenizers.seqio_vocabulary(tok)
    from calm_jax.seqio_utils import SeqioVocabulary

    assert isinstance(vocab, SeqioVocabulary)
    assert (vocab.eos_id, vocab.pad_id, vocab.unk_id, vocab.vocab_size) == (1, 0, 3, 40)
    text = "the cat is on the mat"
    ids = vocab.encode(text)
    assert ids == tok.encode(text, add_bos=False) and ids[0] != 2  # no BOS, no EOS
    assert vocab.decode(ids + [1, 5, 6]) == text  # stops at EOS
    np.testing.assert_array_equal(vocab.encode_tf(tf.constant(text)).numpy(), ids)
    batch = vocab.encode_tf(tf.constant([text, "paris"]))
    assert batch.to_list() == [ids, tok.encode("paris", add_bos=False)]
    assert vocab.decode_tf(tf.constant(ids + [1, 7])).numpy().decode() == text
    two = vocab.decode_tf(tf.constant([ids, ids])).numpy()
    assert [x.decode() for x in two] == [text, text]
    # Inside a tf.data pipeline (graph mode), as seqio's tokenize preprocessor runs it.
    ds = tf.data.Dataset.from_tensor_slices([text, "paris"]).map(vocab.encode_tf)
    assert [x.tolist() for x in ds.as_numpy_iterator()] == batch.to_list()
    assert vocab == tokenizers.seqio_vocabulary(tok)


def test_cli_a_truncated_gguf_is_one_error_line(tmp_path):
    """A GGUF file cut short, in its header or in its tensor data, ends the command with one
    `error:` line naming the file and exit status 2 (not a struct.error traceback)."""
    from calm_jax.convert.gguf_file import GGUFFile

    _, path = _tiny_gguf(tmp_path, "llama")
    data = open(path, "rb").read()
    cuts = {"header": 40, "metadata": len(data) // 20, "tensor data": len(data) - 7}
    for where, size in cuts.items():
        cut = tmp_path / f"cut_{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(ValueError, match=rf"^{cut}: truncated GGUF file: "):
            GGUFFile(str(cut))
    (tmp_path / "tiny.gguf").write_bytes(data[:10])
    with pytest.raises(ValueError, match="shorter than a GGUF header"):
        GGUFFile(str(tmp_path / "tiny.gguf"))
    result = _run_cli("--source", str(tmp_path / f"cut_{cuts['metadata']}.gguf"), "--format",
                      "gguf", "--out", str(tmp_path / "out"))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and "truncated GGUF file" in errors[0], result.stderr
