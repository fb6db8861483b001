"""CALM composition: exact start, causality, frozen models, parameter count, transfer, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn
import pytest

from calm_jax import partitioning as part
from calm_jax.composition import ComposedLM, CompositionConfig, default_connections
from calm_jax.losses import cross_entropy
from calm_jax.models import Decoder, TransformerConfig, init_decoder
from jaxpr_support import equations

VOCAB = 384
ANCHOR = TransformerConfig.tiny(vocab_size=VOCAB, num_layers=4)
GPT2_AUG = TransformerConfig.gpt2_style(vocab_size=VOCAB, embed_dim=32, num_layers=8,
                                        num_heads=2, mlp_dim=64, max_len=64)
LLAMA_AUG = TransformerConfig.tiny(vocab_size=VOCAB, embed_dim=48, num_layers=4, num_heads=3,
                                   num_kv_heads=1)


def tokens(batch=2, length=12, seed=1):
    return jax.random.randint(jax.random.key(seed), (batch, length), 3, VOCAB)


def randomize_out(params, seed=7):
    """Gives every cross-attention output projection random values (init has them at 0)."""
    params = jax.tree.map(lambda x: x, params)
    for i, name in enumerate(sorted(params["composition"])):
        w = params["composition"][name]["out"]
        params["composition"][name]["out"] = 0.2 * jax.random.normal(
            jax.random.key(seed + i), w.shape)
    return params


def test_default_connections_every_fourth_augment_layer_evenly_spaced_anchor_layers():
    big = lambda n: TransformerConfig.tiny(num_layers=n)  # noqa: E731
    assert default_connections(big(24), big(24)) == tuple((4 * k, 4 * k) for k in range(1, 7))
    assert default_connections(big(8), big(12)) == ((4, 6), (8, 12))
    assert default_connections(big(12), big(4)) == ((4, 1), (8, 2), (12, 4))
    assert default_connections(big(2), big(6)) == ((2, 6),)


@pytest.mark.parametrize("augments", [{"kv": GPT2_AUG}, {"kv": GPT2_AUG, "code": LLAMA_AUG}])
@pytest.mark.parametrize("kind", ["cross_attention", "fusion"])
def test_composed_equals_anchor_at_init_exactly(augments, kind):
    model = ComposedLM(ANCHOR, augments, CompositionConfig(kind=kind))
    params = nn.unbox(model.init(jax.random.key(0)))
    x = tokens()
    composed = jax.jit(model.apply)(params, x)
    anchor = jax.jit(model.anchor_logits)(params, x)
    np.testing.assert_array_equal(composed, anchor)
    # And the composition is wired in: a non-zero output projection changes the logits.
    assert not np.allclose(jax.jit(model.apply)(randomize_out(params), x), anchor)


def test_a_connection_into_anchor_layer_0_updates_the_embeddings():
    """Anchor layer 0 is the embedding output: its update is read by every anchor block."""
    conns = {"kv": ((2, 0), (8, 4))}
    model = ComposedLM(ANCHOR, {"kv": GPT2_AUG}, CompositionConfig(connections=conns))
    assert model.connections == conns
    params = nn.unbox(model.init(jax.random.key(0)))
    x = tokens()
    np.testing.assert_array_equal(jax.jit(model.apply)(params, x),
                                  jax.jit(model.anchor_logits)(params, x))
    # Only the layer-0 connection non-zero: the logits equal the anchor's run on embeddings
    # plus that connection's update.
    p = randomize_out(params)
    p["composition"]["kv"]["out"] = p["composition"]["kv"]["out"].at[1].set(0.0)
    anchor = Decoder(ANCHOR)
    v = {"params": p["anchor"]}
    positions, ctx = anchor.apply(v, x, method=Decoder.context)
    h = anchor.apply(v, x, positions, method=Decoder.embed)
    memory = model.memories(p, x, positions, None)["kv"]
    h = h + model.bridges["kv"].apply({"params": p["composition"]["kv"]}, 0, h, memory, None)
    h = anchor.apply(v, h, ctx, 0, ANCHOR.num_layers, method=Decoder.run_layers)
    want = anchor.apply(v, h, method=Decoder.head)
    np.testing.assert_allclose(jax.jit(model.apply)(p, x), want, rtol=1e-5, atol=1e-5)


def test_rotary_cross_attention_reads_by_relative_position():
    """With rope_theta the update depends on positions only through their differences: the
    same stream shifted to later positions gives the same logits; without it, position-free."""
    model = ComposedLM(ANCHOR, {"kv": LLAMA_AUG}, CompositionConfig(rope_theta=50.0))
    params = randomize_out(nn.unbox(model.init(jax.random.key(0))))
    x = tokens(length=10)
    apply = jax.jit(model.apply)
    base = apply(params, x)
    shifted = apply(params, x, positions=jnp.broadcast_to(jnp.arange(10) + 7, x.shape))
    np.testing.assert_allclose(base, shifted, rtol=1e-4, atol=1e-4)
    # The rotation is in use: dropping it changes the logits.
    plain = ComposedLM(ANCHOR, {"kv": LLAMA_AUG})
    assert not np.allclose(jax.jit(plain.apply)(params, x), base, atol=1e-3)
    with pytest.raises(ValueError, match=r"composition.rope_theta: expected None or a number > 1"):
        CompositionConfig(rope_theta=-1.0)
    with pytest.raises(ValueError, match=r"rope_theta: expected None with kind='fusion'"):
        CompositionConfig(rope_theta=10.0, kind="fusion")


def test_causal_over_the_shared_token_stream():
    model = ComposedLM(ANCHOR, {"kv": GPT2_AUG, "code": LLAMA_AUG})
    params = randomize_out(nn.unbox(model.init(jax.random.key(0))))
    x = tokens(length=10)
    apply = jax.jit(model.apply)
    for t in (0, 4, 8):
        changed = x.at[:, t + 1].set((x[:, t + 1] + 1) % VOCAB)
        np.testing.assert_array_equal(apply(params, x)[:, : t + 1],
                                      apply(params, changed)[:, : t + 1])


def test_packed_and_padded_segments_equal_separate_sequences():
    model = ComposedLM(ANCHOR, {"kv": GPT2_AUG})
    params = randomize_out(nn.unbox(model.init(jax.random.key(0))))
    a, b = tokens(1, 5, seed=2), tokens(1, 6, seed=3)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)
    seg = jnp.array([[1] * 5 + [2] * 6 + [0] * 3])
    got = model.apply(params, packed, segment_ids=seg)
    np.testing.assert_allclose(got[:, :5], model.apply(params, a), atol=2e-5)
    np.testing.assert_allclose(got[:, 5:11], model.apply(params, b), atol=2e-5)


def test_augment_sees_prompt_only_mode():
    prompt_cfg = CompositionConfig(augment_sees="prompt")
    model = ComposedLM(ANCHOR, {"kv": GPT2_AUG}, prompt_cfg)
    params = randomize_out(nn.unbox(model.init(jax.random.key(0))))
    x = tokens(1, 6)
    prompt = jnp.array([[True, True, True, False, False, False]])
    mask = model.cross_mask(x, None, prompt)[0, 0]
    expected = np.tril(np.ones((6, 6), bool)) & np.array([1, 1, 1, 0, 0, 0], bool)[None, :]
    np.testing.assert_array_equal(mask, expected)
    # A prompt covering everything is the ordinary composition.
    full = jnp.ones((1, 6), bool)
    ordinary = ComposedLM(ANCHOR, {"kv": GPT2_AUG})
    np.testing.assert_allclose(model.apply(params, x, prompt_mask=full),
                               ordinary.apply(params, x), atol=1e-5)
    with pytest.raises(ValueError, match="prompt_mask: expected a \\[batch, length\\] bool"):
        model.apply(params, x)


def test_gradients_reach_only_the_composition():
    model = ComposedLM(ANCHOR, {"kv": GPT2_AUG})
    params = nn.unbox(model.init(jax.random.key(0)))
    x = tokens(length=10)

    def loss(p):
        return cross_entropy(model.apply(p, x[:, :-1]), x[:, 1:])["loss"]

    grads = jax.grad(loss)(params)
    assert all(not np.any(g) for g in jax.tree.leaves(grads["augments"]))
    assert np.any(grads["composition"]["kv"]["out"])


@pytest.mark.parametrize("remat", ["full", "dots", "dots_attention"])
def test_remat_changes_neither_the_loss_nor_the_composition_gradients(remat):
    """The anchor's remat policy also covers the composition (memory projection and
    cross-attention) and the partial-stack layer loops: same numbers, fewer residuals."""
    comp = CompositionConfig(connections={"kv": ((4, 2), (8, 4))}, rope_theta=1e4)
    x = tokens(length=12)
    seg = jnp.array([[1] * 7 + [2] * 5, [1] * 10 + [0] * 2])

    def loss_and_grads(anchor):
        model = ComposedLM(anchor, {"kv": GPT2_AUG}, comp)
        params = randomize_out(nn.unbox(model.init(jax.random.key(0))))

        def loss(c):
            logits = model.apply({**params, "composition": c}, x[:, :-1],
                                 segment_ids=seg[:, :-1])
            return cross_entropy(logits, x[:, 1:], seg[:, 1:] > 0)["loss"]

        return jax.jit(jax.value_and_grad(loss))(params["composition"])

    loss, grads = loss_and_grads(ANCHOR)
    loss_r, grads_r = loss_and_grads(ANCHOR.replace(remat_policy=remat))
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    assert any(np.any(g) for g in jax.tree.leaves(grads))
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        np.testing.assert_allclose(g_r, g, rtol=1e-5, atol=1e-7)


def _train_composition(model, params, batches, steps, lr):
    """Adam on the composition only; the frozen trees are closed over, never differentiated."""
    opt = optax.adam(lr)
    state = opt.init(params["composition"])
    frozen = {k: params[k] for k in ("anchor", "augments")}

    @jax.jit
    def step(comp, state, batch):
        def loss(c):
            logits = model.apply({**frozen, "composition": c}, batch["inputs"])
            return cross_entropy(logits, batch["targets"], batch["weights"])["loss"]

        value, grads = jax.value_and_grad(loss)(comp)
        updates, state = opt.update(grads, state, comp)
        return optax.apply_updates(comp, updates), state, value

    comp = params["composition"]
    for i in range(steps):
        comp, state, _ = step(comp, state, batches(i))
    return {**frozen, "composition": comp}


def test_frozen_trees_are_bit_identical_after_training_and_all_composition_params_move():
    model = ComposedLM(ANCHOR, {"kv": GPT2_AUG, "code": LLAMA_AUG})
    params = nn.unbox(model.init(jax.random.key(0)))
    before = jax.tree.map(np.asarray, params)
    x = tokens(4, 9)
    batch = {"inputs": x[:, :-1], "targets": x[:, 1:], "weights": jnp.ones((4, 8))}
    trained = _train_composition(model, params, lambda i: batch, steps=3, lr=1e-2)
    for key in ("anchor", "augments"):
        for a, b in zip(jax.tree.leaves(before[key]), jax.tree.leaves(trained[key])):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(before["composition"]),
                    jax.tree.leaves(trained["composition"])):
        assert not np.array_equal(a, b)


@pytest.mark.parametrize("kind", ["cross_attention", "fusion"])
@pytest.mark.parametrize("normalize_inputs,proj_bias", [(True, True), (False, False)])
def test_composition_parameter_count_closed_form(kind, normalize_inputs, proj_bias):
    comp = CompositionConfig(kind=kind, normalize_inputs=normalize_inputs, proj_bias=proj_bias)
    model = ComposedLM(ANCHOR, {"kv": GPT2_AUG, "code": LLAMA_AUG}, comp)
    params = nn.unbox(model.init(jax.random.key(0)))
    counted = sum(x.size for x in jax.tree.leaves(params["composition"]))
    db = ANCHOR.embed_dim
    expected = 0
    for da, n in ((GPT2_AUG.embed_dim, 2), (LLAMA_AUG.embed_dim, 1)):
        per = da * db + 4 * db * db  # f_proj, then W_q, W_k, W_v, W_o (or the fusion's 4 D^2)
        per += db if proj_bias else 0
        per += da + db if normalize_inputs else 0
        expected += n * per
    assert counted == expected == model.num_composition_params()


def _memory_reference(tree, states, positions, bridge):
    """Bridge.memory in the paper's order: project the normalised states, then the keys and
    values (float32, full precision)."""
    hi = jax.lax.Precision.HIGHEST
    eps = bridge.config.norm_eps
    x = states * jax.lax.rsqrt(jnp.mean(states ** 2, -1, keepdims=True) + eps)
    x = x * tree["augment_norm"][:, None, None]
    p = jnp.einsum("nbsa,nad->nbsd", x, tree["proj"], precision=hi)
    p = p + tree["proj_bias"][:, None, None]
    key = jnp.einsum("nbsd,ndhk->nbshk", p, tree["key"], precision=hi)
    value = jnp.einsum("nbsd,ndhk->nbshk", p, tree["value"], precision=hi)
    dim = bridge.head_dim
    inv = 1.0 / (bridge.config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angles = positions.astype(jnp.float32)[..., None] * inv
    sin, cos = jnp.sin(angles)[:, :, None], jnp.cos(angles)[:, :, None]
    k1, k2 = key[..., : dim // 2], key[..., dim // 2:]
    key = jnp.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin], axis=-1)
    return {"key": key, "value": value}


@pytest.mark.parametrize("length", [1, 64])
def test_memory_projection_in_either_order_gives_the_same_keys_values_and_gradients(length):
    # With many states the memory multiplies the projection (and the states' norm scale)
    # into the key and value kernels first (one product per state instead of three); with few
    # it projects first. Both are the paper's function of the same parameters: values and
    # parameter gradients agree.
    model = ComposedLM(ANCHOR, {"kv": GPT2_AUG}, CompositionConfig(rope_theta=1e4))
    bridge = model.bridges["kv"]
    n = len(model.connections["kv"])
    tree = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(x.size), x.shape),
                        nn.unbox(model.init(jax.random.key(0)))["composition"]["kv"])
    states = 3.0 * jax.random.normal(jax.random.key(1), (n, 2, length, GPT2_AUG.embed_dim))
    positions = jnp.broadcast_to(jnp.arange(length), (2, length)) + 5
    cot = {k: jax.random.normal(jax.random.key(i), (n, 2, length, bridge.num_heads,
                                                   bridge.head_dim))
           for i, k in enumerate(("key", "value"))}

    def memory(t):
        return bridge.apply({"params": t}, states, positions, method="memory")

    def reference(t):
        return _memory_reference(t, states, positions, bridge)

    precomposed_shape = (n, GPT2_AUG.embed_dim, 2, bridge.num_heads, bridge.head_dim)

    def products(fn):
        return [tuple(v.aval.shape) for e in equations(jax.make_jaxpr(fn)(tree))
                if e.primitive.name == "dot_general" for v in e.outvars]

    assert (precomposed_shape in products(memory)) == (length == 64)
    # The choice counts the states each device holds: the product is computed whole on every
    # device with a share of the batch (2 x 64 states in 4 shares: 32 each, too few).
    mesh = part.make_mesh(part.PartitioningConfig(mesh_shape=(2, 2, 2)))
    with part.mesh_context(mesh), nn.logical_axis_rules(list(part.DEFAULT_RULES)):
        assert precomposed_shape not in products(memory)
    got, want = memory(tree), reference(tree)
    for k in ("key", "value"):
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-5)

    def loss(fn):
        return lambda t: sum(jnp.vdot(fn(t)[k], cot[k]) for k in cot)

    grads, ref_grads = jax.grad(loss(memory))(tree), jax.grad(loss(reference))(tree)
    # Projecting first, the norm scale's gradient needs the gradient of every normalised
    # state [n, batch, length, D_aug] (a product with the kernels); with the scale inside the
    # precomposed kernel it comes from the kernel's gradient, and no such product is formed.
    states_grad = (n, 2, length, GPT2_AUG.embed_dim)
    grad_program = jax.make_jaxpr(jax.grad(loss(memory)))(tree)
    shapes = [tuple(v.aval.shape) for e in equations(grad_program)
              if e.primitive.name == "dot_general" for v in e.outvars]
    assert (states_grad in shapes) == (length == 1), shapes
    assert set(grads) == set(ref_grads) and set(grads) >= {"proj", "proj_bias", "key", "value"}
    for k in ref_grads:
        scale = float(np.abs(ref_grads[k]).max())
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-4, atol=1e-5 * scale)
        assert k in ("query", "query_norm", "out") or scale > 0, k


# Transfer: the augmenting model knows a key -> value mapping; the anchor only the format. ------

KEYS = np.arange(10, 74)          # 64 key tokens
VALUES = np.arange(100, 108)      # 8 value tokens
SEP, BOS = 3, 2


def _mapping(seed=0):
    rng = np.random.default_rng(seed)
    return dict(zip(rng.permutation(KEYS), np.resize(VALUES, len(KEYS))))


def _batch(keys, values):
    seq = np.stack([np.full_like(keys, BOS), keys, np.full_like(keys, SEP), values], axis=1)
    weights = np.zeros((len(keys), 3), np.float32)
    weights[:, 2] = 1.0  # loss on the value only
    return {"inputs": jnp.asarray(seq[:, :3]), "targets": jnp.asarray(seq[:, 1:]),
            "weights": jnp.asarray(weights)}


def _pretrain(cfg, sampler, steps, seed):
    params = nn.unbox(init_decoder(cfg, jax.random.key(seed)))["params"]
    model, opt = Decoder(cfg), optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch):
        def loss(p):
            logits, _ = model.apply({"params": p}, batch["inputs"])
            return cross_entropy(logits, batch["targets"], batch["weights"])["loss"]

        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for i in range(steps):
        params, state = step(params, state, sampler(i))
    return params


def test_composition_transfers_a_mapping_only_the_augment_knows():
    mapping = _mapping()
    keys_in, keys_out = KEYS[::2], KEYS[1::2]  # composition data: held-in keys only
    lookup = np.vectorize(mapping.get)

    def sample(keys, seed, random_values=False):
        rng = np.random.default_rng(seed)
        k = rng.choice(keys, 64)
        v = rng.choice(VALUES, 64) if random_values else lookup(k)
        return _batch(k, v)

    aug_cfg = TransformerConfig.tiny(vocab_size=VOCAB, embed_dim=64, num_layers=4)
    anchor_cfg = TransformerConfig.tiny(vocab_size=VOCAB, embed_dim=64, num_layers=4)
    augment = _pretrain(aug_cfg, lambda i: sample(KEYS, i), 300, seed=1)
    # The anchor learns the format and the value set, never the mapping.
    anchor = _pretrain(anchor_cfg, lambda i: sample(KEYS, 10_000 + i, True), 150, seed=2)

    model = ComposedLM(anchor_cfg, {"kv": aug_cfg})
    params = nn.unbox(model.init(jax.random.key(3)))
    params = {**params, "anchor": anchor, "augments": {"kv": augment}}
    trained = _train_composition(model, params, lambda i: sample(keys_in, 20_000 + i), 200, 3e-3)

    held_out = _batch(keys_out, lookup(keys_out))

    def loss(p, fn):
        return float(cross_entropy(fn(p, held_out["inputs"]), held_out["targets"],
                                   held_out["weights"])["loss"])

    anchor_loss = loss(trained, model.anchor_logits)
    composed_loss = loss(trained, model.apply)
    assert anchor_loss > 1.5          # about log(8): it only knows the value set
    assert composed_loss < 0.25 * anchor_loss, (composed_loss, anchor_loss)


# Bad configurations ------------------------------------------------------------------------


@pytest.mark.parametrize("augments,comp,message", [
    ({"kv": GPT2_AUG}, CompositionConfig(connections={"kv": ((4, 2), (9, 4))}),
     r"composition.connections\['kv'\]: expected augment layers in \[1, 8\].*got 9"),
    ({"kv": GPT2_AUG}, CompositionConfig(connections={"kv": ((4, 5),)}),
     r"composition.connections\['kv'\]: expected anchor layers in \[0, 4\].*got 5"),
    ({"kv": GPT2_AUG}, CompositionConfig(connections={"kv": ((4, 3), (8, 2))}),
     r"composition.connections\['kv'\]: expected strictly increasing anchor layers, got \[3, 2\]"),
    ({"kv": GPT2_AUG}, CompositionConfig(connections={"kv": ((4, 2), (4, 3))}),
     r"expected strictly increasing augment layers, got \[4, 4\]"),
    ({"kv": GPT2_AUG}, CompositionConfig(num_heads=5),
     r"composition.num_heads: expected a divisor of the anchor's embed_dim=64.*got 5"),
    ({"kv": GPT2_AUG.replace(vocab_size=512)}, None,
     r"augments\['kv'\].vocab_size: expected the anchor's vocab_size=384.*got 512"),
    ({"kv": GPT2_AUG}, CompositionConfig(connections={"kw": ((4, 2),)}),
     r"composition.connections: expected names among augments \['kv'\], got unknown \['kw'\]"),
    ({}, None, "augments: expected at least one augmenting model"),
])
def test_bad_configs_raise_naming_the_field(augments, comp, message):
    with pytest.raises(ValueError, match=message):
        ComposedLM(ANCHOR, augments, comp)


def test_bad_composition_options_raise():
    with pytest.raises(ValueError, match="composition.kind: expected"):
        CompositionConfig(kind="gated")
    with pytest.raises(ValueError, match="composition.augment_sees: expected 'all' with kind"):
        CompositionConfig(kind="fusion", augment_sees="prompt")
