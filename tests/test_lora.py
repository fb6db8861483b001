"""LoRA on the anchor: adapter shapes and counts, merge = W + scale * A @ B, config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from calm_jax import lora
from calm_jax.models import Decoder, TransformerConfig, init_decoder

CFG = TransformerConfig.llama_style(vocab_size=128, embed_dim=32, num_layers=3, num_heads=4,
                                    num_kv_heads=2, mlp_dim=48)


@pytest.fixture(scope="module")
def anchor():
    return nn.unbox(init_decoder(CFG, jax.random.key(0)))["params"]


ALL = tuple(lora.TARGETS)


def test_adapters_cover_every_target_and_start_at_the_anchor(anchor):
    config = lora.LoraConfig(targets=ALL)
    adapters = lora.init_lora(jax.random.key(1), anchor, config, rank=3)
    head_dim = CFG.embed_dim // CFG.num_heads
    # [layers, in, rank] and [layers, rank, out], the kernel's head axes flattened.
    expected = {"attn/query": (32, 4 * head_dim), "attn/key": (32, 2 * head_dim),
                "attn/value": (32, 2 * head_dim), "attn/out": (4 * head_dim, 32),
                "mlp/gate": (32, 48), "mlp/up": (32, 48), "mlp/down": (48, 32)}
    assert set(adapters) == set(expected)
    for target, (d_in, d_out) in expected.items():
        assert adapters[target]["a"].shape == (3, d_in, 3)
        assert adapters[target]["b"].shape == (3, 3, d_out)
        assert not jnp.any(adapters[target]["b"])
    assert lora.params_per_rank(anchor, config) == sum(3 * (i + o) for i, o in expected.values())
    merged = lora.merge(anchor, adapters, config)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(anchor)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("alpha, scale", [(None, 1.0), (8.0, 2.0)])
def test_merge_adds_the_scaled_low_rank_product_to_each_kernel(anchor, alpha, scale):
    config = lora.LoraConfig(rank=4, targets=("attn/query", "attn/out", "mlp/down"), alpha=alpha)
    adapters = lora.init_lora(jax.random.key(1), anchor, config, rank=4)
    keys = jax.random.split(jax.random.key(2), len(adapters))
    adapters = {t: {"a": ab["a"], "b": jax.random.normal(k, ab["b"].shape)}
                for (t, ab), k in zip(adapters.items(), keys)}
    before = jax.tree.map(np.asarray, anchor)
    merged = lora.merge(anchor, adapters, config)
    for target, ab in adapters.items():
        module, name = target.split("/")
        w = np.asarray(anchor["layers"][module][name]["kernel"])
        delta = np.einsum("lir,lro->lio", ab["a"], ab["b"]).reshape(w.shape)
        np.testing.assert_allclose(merged["layers"][module][name]["kernel"], w + scale * delta,
                                   rtol=1e-5, atol=1e-6)
    # Untargeted kernels are the anchor's, and the anchor's own tree is not modified.
    np.testing.assert_array_equal(merged["layers"]["attn"]["key"]["kernel"],
                                  anchor["layers"]["attn"]["key"]["kernel"])
    for a, b in zip(jax.tree.leaves(anchor), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)


def test_the_merged_model_changes_only_where_the_adapters_point(anchor):
    config = lora.LoraConfig(rank=2, targets=("mlp/up",))
    adapters = lora.init_lora(jax.random.key(1), anchor, config, rank=2)
    adapters["mlp/up"]["b"] = jnp.ones_like(adapters["mlp/up"]["b"])
    tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, CFG.vocab_size)
    plain, _ = Decoder(CFG).apply({"params": anchor}, tokens)
    adapted, _ = Decoder(CFG).apply({"params": lora.merge(anchor, adapters, config)}, tokens)
    assert adapted.shape == plain.shape and not np.allclose(adapted, plain)


def test_rank_for_budget_picks_the_closest_rank(anchor):
    config = lora.LoraConfig()
    per_rank = lora.params_per_rank(anchor, config)
    assert lora.rank_for_budget(anchor, config, 5 * per_rank) == 5
    assert lora.rank_for_budget(anchor, config, int(5.4 * per_rank)) == 5
    assert lora.rank_for_budget(anchor, config, int(5.6 * per_rank)) == 6
    assert lora.rank_for_budget(anchor, config, 1) == 1  # never below rank 1


@pytest.mark.parametrize("kwargs, message", [
    ({"targets": ("attn/qkv",)}, r"lora.targets: expected a non-empty subset of \['attn/key', "
                                 r"'attn/out', 'attn/query', 'attn/value', 'mlp/down', "
                                 r"'mlp/gate', 'mlp/up'\], got \['attn/qkv'\]"),
    ({"targets": ()}, r"lora.targets: expected a non-empty subset of .*, got \[\]"),
    ({"rank": 0}, r"lora.rank: expected None or a positive integer, got 0"),
    ({"rank": 2.5}, r"lora.rank: expected None or a positive integer, got 2.5"),
    ({"alpha": 0.0}, r"lora.alpha: expected None or a positive scale numerator, got 0.0"),
])
def test_bad_lora_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lora.LoraConfig(**kwargs)
