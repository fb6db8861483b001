"""Decoder transformer: config validation, shapes, masks, states, dtypes, logical axes."""

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from calm_jax.models import Decoder, TransformerConfig, default_positions, init_decoder

VOCAB = 384


def families():
    return {
        "gpt2": TransformerConfig.gpt2_style(vocab_size=VOCAB, embed_dim=32, num_layers=2,
                                             num_heads=4, mlp_dim=64, max_len=64),
        "llama": TransformerConfig.llama_style(vocab_size=VOCAB, embed_dim=32, num_layers=3,
                                               num_heads=4, num_kv_heads=2, mlp_dim=64,
                                               qkv_bias=True),
        "gemma": TransformerConfig.gemma_style(
            vocab_size=VOCAB, embed_dim=32, num_layers=4, num_heads=4, num_kv_heads=1,
            head_dim=16, mlp_dim=64, qk_norm=True, post_norms=True, sliding_window=3,
            global_every=2, rope_theta=1e6, rope_local_theta=1e4, attn_logit_softcap=50.0,
            final_logit_softcap=30.0, query_scale=0.25),
    }


def make(cfg, seed=0):
    variables = init_decoder(cfg, jax.random.key(seed))
    return Decoder(cfg), variables, nn.unbox(variables)["params"]


def tokens(batch=2, length=12, seed=1):
    return jax.random.randint(jax.random.key(seed), (batch, length), 3, VOCAB)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma"])
def test_param_count_matches_closed_form(family):
    cfg = families()[family]
    _, _, params = make(cfg)
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma"])
def test_every_parameter_has_logical_axes(family):
    cfg = families()[family]
    _, variables, _ = make(cfg)
    boxed = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert boxed and all(isinstance(x, nn.Partitioned) for x in boxed)
    for box in boxed:
        assert len(box.names) == box.value.ndim
    stacked = variables["params"]["layers"]["attn"]["query"]["kernel"]
    assert stacked.names == ("layers", "embed", "heads", "head_dim")
    assert stacked.value.shape[0] == cfg.num_layers


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma"])
def test_causal(family):
    cfg = families()[family]
    model, _, params = make(cfg)
    x = tokens()
    logits, _ = model.apply({"params": params}, x)
    changed, _ = model.apply({"params": params}, x.at[:, 7].set(5))
    np.testing.assert_array_equal(logits[:, :7], changed[:, :7])
    assert not np.allclose(logits[:, 7:], changed[:, 7:])


def test_states_are_the_residual_stream_after_each_layer():
    cfg = families()["llama"]
    model, _, params = make(cfg)
    x = tokens()
    logits, states = model.apply({"params": params}, x, return_states=(0, 1, 3))
    assert sorted(states) == [0, 1, 3]
    # The last state run through the head reproduces the logits.
    np.testing.assert_allclose(model.apply({"params": params}, states[3], method=Decoder.head),
                               logits, atol=1e-5)
    # Layer 1's state is block 1 applied to the embedding (state 0).
    _, ctx = model.apply({"params": params}, x, method=Decoder.context)
    one = model.apply({"params": params}, states[0], ctx, 0, 1, method=Decoder.run_layers)
    np.testing.assert_allclose(one, states[1], atol=1e-6)
    # hidden_states agrees and stops early: it never reads the layers past the deepest one.
    hidden = model.apply({"params": params}, x, (1,), method=Decoder.hidden_states)
    np.testing.assert_array_equal(hidden[1], states[1])
    jaxpr = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, x, (1,),
                                                     method=Decoder.hidden_states))(params))
    assert "length=1" in jaxpr and f"length={cfg.num_layers}" not in jaxpr


def test_no_states_requested_keeps_none():
    cfg = families()["llama"]
    model, _, params = make(cfg)
    _, states = model.apply({"params": params}, tokens())
    assert states == {}


def test_bad_state_layer_raises():
    cfg = families()["llama"]
    model, _, params = make(cfg)
    with pytest.raises(ValueError, match=r"return_states: expected layer numbers in \[0, 3\]"):
        model.apply({"params": params}, tokens(), return_states=(4,))


def test_packed_segments_equal_separate_sequences():
    cfg = families()["gemma"]
    model, _, params = make(cfg)
    a, b = tokens(1, 5, seed=2), tokens(1, 7, seed=3)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 4), jnp.int32)], axis=1)
    seg = jnp.array([[1] * 5 + [2] * 7 + [0] * 4])
    got, _ = model.apply({"params": params}, packed, segment_ids=seg)
    want_a, _ = model.apply({"params": params}, a)
    want_b, _ = model.apply({"params": params}, b)
    np.testing.assert_allclose(got[:, :5], want_a, atol=2e-5)
    np.testing.assert_allclose(got[:, 5:12], want_b, atol=2e-5)


def test_padding_does_not_change_real_tokens():
    cfg = families()["llama"]
    model, _, params = make(cfg)
    x = tokens(1, 6)
    padded = jnp.concatenate([x, jnp.zeros((1, 3), jnp.int32)], axis=1)
    seg = jnp.array([[1] * 6 + [0] * 3])
    got, _ = model.apply({"params": params}, padded, segment_ids=seg)
    want, _ = model.apply({"params": params}, x)
    np.testing.assert_allclose(got[:, :6], want, atol=2e-5)


def test_default_positions_restart_per_segment():
    seg = jnp.array([[1, 1, 1, 2, 2, 0, 0]])
    np.testing.assert_array_equal(default_positions(seg, seg), [[0, 1, 2, 0, 1, 0, 1]])


def test_sliding_window_limits_reach():
    cfg = families()["llama"].replace(sliding_window=2, global_every=100)  # every layer local
    model, _, params = make(cfg)
    x = tokens(1, 12)
    logits, _ = model.apply({"params": params}, x)
    changed, _ = model.apply({"params": params}, x.at[:, 0].set(7))
    # Each local layer reaches one token back, so three layers reach three back.
    np.testing.assert_array_equal(logits[:, 4:], changed[:, 4:])
    assert not np.allclose(logits[:, 3], changed[:, 3])


def test_grouped_query_attention_equals_repeated_heads():
    gqa = families()["llama"].replace(qkv_bias=False)
    mha = gqa.replace(num_kv_heads=4)
    model, _, params = make(gqa)
    rep = jax.tree.map(lambda x: x, params)
    for name in ("key", "value"):
        rep["layers"]["attn"][name]["kernel"] = jnp.repeat(
            params["layers"]["attn"][name]["kernel"], 2, axis=2)
    x = tokens()
    np.testing.assert_allclose(model.apply({"params": params}, x)[0],
                               Decoder(mha).apply({"params": rep}, x)[0], atol=1e-5)


def test_softcap_path_matches_fused_attention_when_cap_is_huge():
    cfg = families()["llama"]
    model, _, params = make(cfg)
    x = tokens()
    capped = Decoder(cfg.replace(attn_logit_softcap=1e6)).apply({"params": params}, x)[0]
    np.testing.assert_allclose(capped, model.apply({"params": params}, x)[0], atol=1e-4)


def test_bf16_compute_fp32_params():
    cfg = families()["llama"].replace(dtype="bfloat16")
    model, _, params = make(cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits, states = model.apply({"params": params}, tokens(), return_states=(1,))
    assert logits.dtype == jnp.float32 and states[1].dtype == jnp.bfloat16
    ref, _ = Decoder(cfg.replace(dtype="float32")).apply({"params": params}, tokens())
    err = np.abs(np.asarray(logits) - np.asarray(ref))
    assert err.mean() < 0.03 and err.max() < 0.3  # bf16 keeps ~3 significant digits


@pytest.mark.parametrize("policy", ["full", "dots", "dots_attention"])
def test_remat_gives_same_gradients(policy):
    cfg = families()["llama"]
    _, _, params = make(cfg)
    x = tokens()

    def loss(p, c):
        return Decoder(c).apply({"params": p}, x)[0].std()

    np.testing.assert_allclose(
        jax.tree.leaves(jax.grad(loss)(params, cfg.replace(remat_policy=policy)))[0],
        jax.tree.leaves(jax.grad(loss)(params, cfg))[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("policy", ["none", "full", "dots"])
def test_split_stack_equals_whole_stack_in_value_and_gradient(policy):
    """Layers run in pieces (as CALM runs its anchor) index the stacked weights inside the
    loop; values and weight gradients equal one pass over the whole stack."""
    cfg = families()["llama"].replace(remat_policy=policy)
    model, _, params = make(cfg)
    x = tokens()
    last = cfg.num_layers

    def final(p, layers):
        h = model.apply({"params": p}, x, layers, method=Decoder.hidden_states)[last]
        return jnp.sum(jnp.sin(h))

    whole, g_whole = jax.value_and_grad(final)(params, (last,))
    split, g_split = jax.value_and_grad(final)(params, (1, 3, last))
    np.testing.assert_allclose(split, whole, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_split), jax.tree.leaves(g_whole)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


def test_auto_attention_takes_cudnn_only_where_it_applies():
    from calm_jax.models.attention import choose_attention_impl

    fused = dict(backend="gpu", dtype=jnp.bfloat16, head_dim=64, q_len=16, kv_len=16,
                 has_mask=False, logit_softcap=None)
    assert choose_attention_impl("auto", **fused) == "cudnn"
    for change in (dict(backend="cpu"), dict(backend="tpu"), dict(dtype=jnp.float32),
                   dict(head_dim=256), dict(head_dim=60), dict(has_mask=True),
                   dict(logit_softcap=50.0), dict(kv_len=32)):
        assert choose_attention_impl("auto", **{**fused, **change}) == "xla", change
    # An explicit choice is kept.
    assert choose_attention_impl("cudnn", **{**fused, "backend": "cpu"}) == "cudnn"
    assert choose_attention_impl("xla", **fused) == "xla"
    # The default is "auto", which runs XLA's attention on this CPU.
    assert TransformerConfig.tiny().attention_impl == "auto"
    with pytest.raises(ValueError, match="attention_impl: expected one of"):
        TransformerConfig.tiny(attention_impl="flash")


def test_auto_attention_resolves_for_the_compilation_target(monkeypatch):
    # A program traced here for a GPU that this process does not have (compiled ahead of
    # time, bench/gpu_aot.py) takes cuDNN where a GPU would; the process's own backend
    # decides everywhere else.
    from jax._src.cudnn import fused_attention_stablehlo as fused
    from calm_jax.models.attention import attend, compiling_for
    from calm_jax.models.transformer import FUSED_ATTENTION_FORWARD
    from jaxpr_support import equations

    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)  # traced, never run
    monkeypatch.setattr(fused, "check_is_flash_attention", lambda *args, **kwargs: None)
    q = jnp.zeros((2, 16, 4, 64), jnp.bfloat16)

    def fused_calls():
        jaxpr = jax.make_jaxpr(lambda q: attend(q, q, q, mask=None, is_causal=True,
                                                scale=0.125, impl="auto"))(q)
        return [e for e in equations(jaxpr) if e.primitive.name in FUSED_ATTENTION_FORWARD]

    assert fused_calls() == []
    with compiling_for("gpu"):
        assert len(fused_calls()) == 1
    assert fused_calls() == []  # restored on exit
    with pytest.raises(ValueError, match="backend: expected a platform name"):
        with compiling_for(""):
            pass


@pytest.mark.parametrize("field,kwargs,message", [
    ("num_heads", dict(embed_dim=30, num_heads=4),
     "num_heads: expected a divisor of embed_dim=30"),
    ("num_kv_heads", dict(num_heads=4, num_kv_heads=3),
     "num_kv_heads: expected a divisor of num_heads=4"),
    ("norm", dict(norm="batchnorm"), "norm: expected one of"),
    ("vocab_size", dict(vocab_size=0), "vocab_size: expected a positive integer, got 0"),
    ("dtype", dict(dtype="int8"), "dtype: expected one of"),
    ("remat_policy", dict(remat_policy="some"), "remat_policy: expected one of"),
])
def test_bad_config_names_the_field(field, kwargs, message):
    base = dict(vocab_size=VOCAB, embed_dim=32, num_layers=2, num_heads=4, mlp_dim=64)
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**{**base, **kwargs})
