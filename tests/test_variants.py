"""Composition variants as classes: the table, its errors, and a new variant defined in one class
here (no edit elsewhere) that composes, decodes with a cache and trains in the trainer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from calm_jax import checkpoints as ckpt
from calm_jax import decoding, trainer
from calm_jax.bridge import (VARIANTS, Bridge, register_variant, unregister_variant,
                             variant_class)
from calm_jax.composition import ComposedLM, CompositionConfig
from calm_jax.data import DatasetConfig
from calm_jax.models import Decoder, TransformerConfig
from calm_jax.models import layers as L
from calm_jax.optim import OptimizerConfig
from calm_jax.variants import CrossAttention, Fusion

VOCAB = 128
ANCHOR = TransformerConfig.tiny(vocab_size=VOCAB, embed_dim=32, num_layers=4, num_heads=4,
                                num_kv_heads=2, mlp_dim=64, max_len=32)
AUGMENT = ANCHOR.replace(embed_dim=16, num_heads=2, num_kv_heads=2)


class GatedRead(Bridge):
    """A toy variant: connection i adds a gated linear read of the current position's
    projected augmenting state, delta_t = sigmoid(q_t . g_i) * (p_t W_i), W_i zero at init."""

    def setup(self):
        self.setup_input_norms()
        self.setup_projection()
        self.w_g = self._param("gate", L.dense_init(1, 2), (self.anchor_dim, 1), ("embed", None))
        self.w_o = self._param("out", nn.initializers.zeros, (self.anchor_dim, self.anchor_dim),
                               ("mlp", "embed"))

    def memory(self, states, positions=None):
        return {"proj": self.project(states.astype(self.dtype))}

    def __call__(self, i, h, memory, mask, positions=None):
        gate = jax.nn.sigmoid(self.query_input(i, h) @ self.w_g[i].astype(self.dtype))
        return gate * (memory["proj"][i] @ self.w_o[i].astype(self.dtype))


@pytest.fixture
def gated_read():
    register_variant("gated_read")(GatedRead)
    yield GatedRead
    unregister_variant("gated_read")


def _randomize(params, seed=3):
    """Every composition leaf moved off its initial value (W_o starts at zero)."""
    leaves, tree = jax.tree.flatten(params["composition"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return {**params, "composition": jax.tree.unflatten(tree, moved)}


def test_the_table_holds_the_built_in_variants_and_names_the_registered_kinds():
    assert variant_class("cross_attention") is CrossAttention
    assert variant_class("fusion") is Fusion
    model = ComposedLM(ANCHOR, {"kv": AUGMENT}, CompositionConfig(kind="fusion"))
    assert type(model.bridges["kv"]) is Fusion and model.bridges["kv"].config is model.config
    with pytest.raises(ValueError, match=r"composition.kind: expected one of "
                                         r"\['cross_attention', 'fusion'\].*got 'gated_read'"):
        CompositionConfig(kind="gated_read")
    with pytest.raises(ValueError, match=r"kind 'fusion' is already registered to Fusion"):
        register_variant("fusion")(GatedRead)
    with pytest.raises(TypeError, match=r"register_variant\('x'\): expected a Bridge subclass"):
        register_variant("x")(dict)
    with pytest.raises(ValueError, match=r"register_variant: expected an identifier-like kind"):
        register_variant("not a name")
    assert set(VARIANTS) == {"cross_attention", "fusion"}


def test_a_new_variant_is_checked_like_the_built_in_position_wise_one(gated_read):
    assert CompositionConfig(kind="gated_read").kind == "gated_read"
    with pytest.raises(ValueError, match=r"composition.augment_sees: expected 'all' with "
                                         r"kind='gated_read'.*got 'prompt'"):
        CompositionConfig(kind="gated_read", augment_sees="prompt")
    with pytest.raises(ValueError, match=r"composition.rope_theta: expected None with "
                                         r"kind='gated_read'"):
        CompositionConfig(kind="gated_read", rope_theta=100.0)
    with pytest.raises(ValueError, match=r"composition.shared_vocabulary: expected True with "
                                         r"kind='gated_read'"):
        CompositionConfig(kind="gated_read", shared_vocabulary=False)


def test_a_new_variant_composes_starts_at_the_anchor_and_computes_its_own_update(gated_read):
    conns = {"kv": ((2, 0),)}  # augment layer 2 into the embedding output (anchor layer 0)
    model = ComposedLM(ANCHOR, {"kv": AUGMENT}, CompositionConfig(connections=conns,
                                                                  kind="gated_read"))
    params = nn.unbox(model.init(jax.random.key(0)))
    comp = params["composition"]["kv"]
    assert {k: v.shape for k, v in comp.items()} == {
        "augment_norm": (1, 16), "query_norm": (1, 32), "proj": (1, 16, 32),
        "proj_bias": (1, 32), "gate": (1, 32, 1), "out": (1, 32, 32)}
    assert model.num_composition_params() == sum(v.size for v in comp.values())
    x = jax.random.randint(jax.random.key(1), (2, 10), 3, VOCAB)
    apply = jax.jit(model.apply)
    np.testing.assert_array_equal(apply(params, x), jax.jit(model.anchor_logits)(params, x))

    # Moved off init, the logits are the anchor's run on embeddings plus the update, written
    # out here from the parameters alone.
    p = _randomize(params)
    c = p["composition"]["kv"]
    anchor, augment = Decoder(ANCHOR), Decoder(AUGMENT)
    positions, ctx = anchor.apply({"params": p["anchor"]}, x, method=Decoder.context)
    h = anchor.apply({"params": p["anchor"]}, x, positions, method=Decoder.embed)
    states = augment.apply({"params": p["augments"]["kv"]}, x, [2],
                           method=Decoder.hidden_states)[2]

    def rms(v, scale):
        return v * jax.lax.rsqrt(jnp.mean(v ** 2, -1, keepdims=True) + 1e-6) * scale

    proj = rms(states, c["augment_norm"][0]) @ c["proj"][0] + c["proj_bias"][0]
    gate = jax.nn.sigmoid(rms(h, c["query_norm"][0]) @ c["gate"][0])
    h = h + gate * (proj @ c["out"][0])
    h = anchor.apply({"params": p["anchor"]}, h, ctx, 0, ANCHOR.num_layers,
                     method=Decoder.run_layers)
    want = anchor.apply({"params": p["anchor"]}, h, method=Decoder.head)
    got = apply(p, x)
    assert not np.allclose(got, apply(params, x), atol=1e-3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["per_layer", "stacked"])
def test_a_new_variant_decodes_with_a_cache_as_the_full_forward(gated_read, layout):
    model = ComposedLM(ANCHOR, {"kv": AUGMENT}, CompositionConfig(kind="gated_read"))
    params = _randomize(nn.unbox(model.init(jax.random.key(0))))
    assert model.init_cache(2, 12).memory == {}  # position-wise: nothing kept between steps
    prompts = jax.random.randint(jax.random.key(2), (2, 5), 3, VOCAB)
    held = decoding.unstack_params(model, params) if layout == "per_layer" else params
    result = decoding.generate(model, held, prompts, max_new_tokens=4, return_logits=True,
                               layout=layout)
    full = jnp.concatenate([prompts, result.tokens], axis=1)
    logits = jax.jit(model.apply)(params, full)[:, 4:8]
    np.testing.assert_allclose(result.logits, logits, rtol=2e-4, atol=2e-4)
    np.testing.assert_array_equal(result.tokens, jnp.argmax(logits, -1))


def _arrays(seed=0, rows=16, length=16):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, VOCAB, (rows, length)).astype(np.int32)
    inputs = np.zeros_like(tokens)
    inputs[:, 1:] = tokens[:, :-1]
    return {"decoder_input_tokens": inputs, "decoder_target_tokens": tokens,
            "decoder_loss_weights": np.ones((rows, length), np.float32)}


def test_a_new_variant_trains_in_the_trainer(gated_read, tmp_path):
    result = trainer.train(
        mode="compose", model_dir=str(tmp_path / "calm"), num_steps=2,
        anchor=trainer.ModelSpec(config=ANCHOR), augments={"kv": trainer.ModelSpec(config=AUGMENT)},
        composition=CompositionConfig(kind="gated_read"),
        dataset=DatasetConfig(arrays_fn=_arrays, batch_size=8, length=16), log_every=1,
        checkpoint=ckpt.CheckpointConfig(save_every=0, use_async=False),
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=0))
    params = result["state"]["params"]["kv"]
    assert set(params) == {"augment_norm", "query_norm", "proj", "proj_bias", "gate", "out"}
    assert np.any(np.asarray(params["out"]))  # W_o left zero: it trained
    assert all(np.isfinite(m["loss"]) for _, m in result["history"])


def test_gin_picks_a_registered_variant_by_its_kind(gated_read):
    import gin

    from calm_jax import composition

    gin.clear_config()
    try:
        gin.parse_config(["from __gin__ import dynamic_registration",
                          "from calm_jax import composition",
                          "composition.CompositionConfig.kind = 'gated_read'"])
        config = gin.get_configurable(composition.CompositionConfig)()
    finally:
        gin.clear_config()
    assert config.kind == "gated_read"
    model = ComposedLM(ANCHOR, {"kv": AUGMENT}, config)
    assert type(model.bridges["kv"]) is GatedRead
