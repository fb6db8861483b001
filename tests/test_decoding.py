"""Cached decoding: at every step the cached logits equal the uncached forward of the same prefix
(Llama-, GPT-2- and Gemma-style models; composed models in both `augment_sees` modes and the
fusion kind; ragged batches), greedy equals an uncached loop, cache layout, EOS, sampling, a
decode program that does not grow with depth (stacked layout), the per-layer layout's equality
with it and absence of per-layer copies, and errors.

Parameters are drawn with numpy (`random_params`) rather than a jitted flax init: compiling the
init programs would cost more CPU time than the tests themselves.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from calm_jax import decoding
from calm_jax.composition import ComposedLM, CompositionConfig
from calm_jax.decoding import SamplingConfig, decode_step, generate, pad_prompts, prefill
from calm_jax.models import Decoder, TransformerConfig, init_decoder
from jaxpr_support import equations

VOCAB = 384
FAMILIES = {
    "gpt2": TransformerConfig.gpt2_style(vocab_size=VOCAB, embed_dim=32, num_layers=2,
                                         num_heads=4, mlp_dim=64, max_len=64),
    "llama": TransformerConfig.llama_style(vocab_size=VOCAB, embed_dim=32, num_layers=3,
                                           num_heads=4, num_kv_heads=2, mlp_dim=64,
                                           qkv_bias=True),
    "gemma": TransformerConfig.gemma_style(
        vocab_size=VOCAB, embed_dim=32, num_layers=4, num_heads=4, num_kv_heads=1, head_dim=16,
        mlp_dim=64, qk_norm=True, post_norms=True, sliding_window=3, global_every=2,
        rope_theta=1e6, rope_local_theta=1e4, attn_logit_softcap=50.0, final_logit_softcap=30.0,
        query_scale=0.25),
}
# A Gemma-style anchor (sliding window, soft-caps, QK-norm) reading a GPT-2-style augment
# (learned positions; 8 layers: two connections) and a Llama-style one (GQA; one connection,
# into the same anchor layer as the GPT-2 augment's second).
ANCHOR = FAMILIES["gemma"].replace(embed_dim=64, num_heads=4, num_kv_heads=2, mlp_dim=128)
AUGMENTS = {
    "kv": TransformerConfig.gpt2_style(vocab_size=VOCAB, embed_dim=32, num_layers=8,
                                       num_heads=2, mlp_dim=64, max_len=64),
    "code": TransformerConfig.tiny(vocab_size=VOCAB, embed_dim=48, num_layers=4, num_heads=3,
                                   num_kv_heads=1),
}
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18]]  # ragged: lengths 5, 2, 7
STEPS = 6


def random_params(init, seed=0):
    """Parameters shaped like `init()`'s, drawn with numpy: N(0, 1/fan_in) weights (fan_in: the
    axes between a stacked `layers`/`connections` axis and the last one), norm scales near 1,
    small biases. Unlike a jitted flax init, there is no init program to compile."""
    abstract = jax.eval_shape(init)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        names = [str(getattr(k, "key", "")) for k in path]
        noise = rng.standard_normal(leaf.shape)
        if names[-1] == "scale" or names[-1].endswith("_norm"):
            value = 1.0 + 0.1 * noise
        elif names[-1].endswith("bias"):
            value = 0.02 * noise
        elif names[-1] == "embedding":
            value = 0.1 * noise
        else:
            lead = 1 if "layers" in names or names[0] == "composition" else 0
            value = noise / np.sqrt(max(np.prod(leaf.shape[lead:-1]), 1))
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


@functools.lru_cache(maxsize=None)
def plain(family):
    cfg = FAMILIES[family]
    return Decoder(cfg), random_params(
        lambda: nn.unbox(init_decoder(cfg, jax.random.key(0)))["params"])


@functools.lru_cache(maxsize=None)
def composed(augment_sees="all", kind="cross_attention", variant=""):
    """"all": the Gemma-style ANCHOR with both AUGMENTS; the other modes (cheaper to compile) a
    Llama-style anchor with the Llama-style augment only. Every composition parameter is random,
    the output projections included (they start at zero in `ComposedLM.init`), so the
    cross-attention (or fusion) changes the logits. variant="embed" adds the first connection
    to the anchor's embedding output (anchor layer 0); "rope" rotates the cross-attention's
    queries and keys by position."""
    if (augment_sees, kind, variant) == ("all", "cross_attention", ""):
        anchor, augments = ANCHOR, AUGMENTS
    else:
        anchor, augments = TransformerConfig.tiny(vocab_size=VOCAB), {"code": AUGMENTS["code"]}
    conns = {"code": ((2, 0), (4, 3))} if variant == "embed" else {}
    rope = 100.0 if variant == "rope" else None
    model = ComposedLM(anchor, augments, CompositionConfig(kind=kind, augment_sees=augment_sees,
                                                           connections=conns, rope_theta=rope))
    return model, random_params(lambda: nn.unbox(model.init(jax.random.key(0))))


def build(which):
    return plain(which) if which in FAMILIES else composed(*which.split(":"))


@functools.partial(jax.jit, static_argnames="model")
def full_logits(model, params, tokens, segment_ids, prompt_mask):
    """The uncached forward of right-padded rows [batch, length] (segment 0 = padding)."""
    if isinstance(model, ComposedLM):
        return model.apply(params, tokens, segment_ids=segment_ids, prompt_mask=prompt_mask)
    return model.apply({"params": params}, tokens, segment_ids=segment_ids)[0]


def right_padded(prompts, continuations, width):
    """Rows prompt + continuation, right-padded to width: tokens, segment ids, prompt mask."""
    tokens = np.zeros((len(prompts), width), np.int32)
    for b, (p, c) in enumerate(zip(prompts, continuations)):
        tokens[b, :len(p) + len(c)] = list(p) + list(c)
    lengths = np.array([len(p) + len(c) for p, c in zip(prompts, continuations)])
    prompt_lengths = np.array([len(p) for p in prompts])
    cols = np.arange(width)[None, :]
    return (tokens, (cols < lengths[:, None]).astype(np.int32),
            cols < prompt_lengths[:, None])


def reference_step_logits(model, params, prompts, fed):
    """Full-forward logits after each prefix prompt + fed[:, :i], i = 0..steps-1 (causality
    makes one forward of the longest sequence give them all): [steps, batch, vocab]."""
    width = max(map(len, prompts)) + fed.shape[1]
    tokens, seg, prompt_mask = right_padded(prompts, fed, width)
    logits = np.asarray(full_logits(model, params, tokens, seg, prompt_mask))
    return np.stack([np.stack([logits[b, len(p) - 1 + i] for b, p in enumerate(prompts)])
                     for i in range(fed.shape[1] + 1)])


def uncached_greedy(model, params, prompts, steps):
    """Greedy decoding that re-runs the full forward every step (fixed shapes, one compile)."""
    width = max(map(len, prompts)) + steps - 1  # the last token is never fed back
    generated = [[] for _ in prompts]
    for _ in range(steps):
        tokens, seg, prompt_mask = right_padded(prompts, generated, width)
        logits = np.asarray(full_logits(model, params, tokens, seg, prompt_mask))
        for b, p in enumerate(prompts):
            generated[b].append(int(np.argmax(logits[b, len(p) + len(generated[b]) - 1])))
    return np.array(generated)


def assert_logits_close(got, want):
    scale = max(1.0, float(np.abs(want).max()))  # fp32 agreement relative to the logits' size
    np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=1e-5)


@pytest.mark.parametrize("which", ["gpt2", "llama", "gemma", "all", "prompt", "all:fusion",
                                   "all:cross_attention:embed", "all:cross_attention:rope"])
def test_cached_logits_equal_full_forward_and_greedy_equals_uncached(which):
    """Ragged greedy generation: the logits of every step equal the uncached forward of the
    same prefix, and the tokens equal an uncached greedy loop's."""
    model, params = build(which)
    result = generate(model, params, PROMPTS, max_new_tokens=STEPS, return_logits=True)
    tokens = np.asarray(result.tokens)
    want = reference_step_logits(model, params, PROMPTS, tokens[:, :-1])
    assert_logits_close(np.swapaxes(np.asarray(result.logits), 0, 1), want)
    np.testing.assert_array_equal(tokens, uncached_greedy(model, params, PROMPTS, STEPS))
    np.testing.assert_array_equal(result.lengths, [STEPS] * 3)
    if which not in FAMILIES:  # guard: the composition does change the logits checked above
        zero = jax.tree.map(lambda x: x, params)
        for name in zero["composition"]:
            zero["composition"][name]["out"] = jnp.zeros_like(zero["composition"][name]["out"])
        assert not np.allclose(reference_step_logits(model, zero, PROMPTS, tokens[:, :-1]),
                               want, atol=1e-3)


def test_prefill_and_decode_steps_equal_full_forward_on_given_tokens():
    """The low-level API, teacher-forced with arbitrary tokens (not the model's own)."""
    model, params = plain("gemma")
    tokens, lengths = pad_prompts(PROMPTS)
    fed = np.asarray(jax.random.randint(jax.random.key(3), (3, STEPS - 1), 3, VOCAB))
    logits, cache = prefill(model, params, tokens, lengths, cache_len=7 + STEPS)
    got = [logits]
    for i in range(STEPS - 1):
        logits, cache = decode_step(model, params, cache, jnp.asarray(fed[:, i]))
        got.append(logits)
    assert_logits_close(np.stack(got), reference_step_logits(model, params, PROMPTS, fed))
    cfg = FAMILIES["gemma"]  # the cache is stacked like the layers
    assert cache.k.shape == (cfg.num_layers, 3, 7 + STEPS, cfg.kv_heads, cfg.dims_per_head)
    np.testing.assert_array_equal(cache.start, [2, 5, 0])
    assert int(cache.index) == 7 + STEPS - 1


@pytest.mark.parametrize("augment_sees", ["all", "prompt"])
def test_composed_cache_layout(augment_sees):
    model, params = composed(augment_sees)
    tokens, lengths = pad_prompts(PROMPTS)
    run = functools.partial(prefill, model, cache_len=12)
    _, cache = jax.eval_shape(run, params, tokens, lengths)
    cfg = model.anchor_config
    assert cache.anchor.k.shape == (cfg.num_layers, 3, 12, cfg.kv_heads, cfg.dims_per_head)
    if augment_sees == "all":  # augmenting caches stop at the deepest connected layer
        assert {n: c.k.shape[0] for n, c in cache.augments.items()} == {"kv": 8, "code": 4}
        assert cache.memory["kv"]["key"].shape == (2, 3, 12, 4, 16)  # [n, batch, slots, ...]
        assert cache.memory["code"]["value"].shape == (1, 3, 12, 4, 16)
    else:  # the memory covers the prompt and is fixed: no augmenting model runs any more
        assert cache.augments == {}
        assert cache.memory["code"]["key"].shape == (1, 3, 7, 4, 16)


@pytest.mark.parametrize("which", ["gemma", "all", "prompt", "all:fusion"])
def test_stacked_and_per_layer_layouts_decode_alike(which):
    """The per-layer layout (generate's default; or weights split beforehand) gives the tokens
    and logits of the scanned, stacked layout."""
    model, params = build(which)
    run = functools.partial(generate, model, prompts=PROMPTS, max_new_tokens=STEPS,
                            return_logits=True)
    stacked = run(params, layout="stacked")
    for per_layer in (run(params), run(decoding.unstack_params(model, params))):
        np.testing.assert_array_equal(per_layer.tokens, stacked.tokens)
        assert_logits_close(np.asarray(per_layer.logits), np.asarray(stacked.logits))


def test_per_layer_cache_and_weights_layout():
    model, params = composed("all")
    split = decoding.unstack_params(model, params)
    assert decoding.params_layout(model, split) == "per_layer"
    assert decoding.params_layout(model, params) == "stacked"
    # Per layer, and the projections sharing an input fused: the GLU's gate and up, and (this
    # anchor has fewer KV heads than query heads) its keys and values; no unfused copy is kept.
    stacked, layers = params["anchor"]["layers"], split["anchor"]["layers"]
    assert set(layers["mlp"]) == {"gate_up", "down"}
    assert set(layers["attn"]) >= {"query", "kv", "out"}
    assert not set(layers["attn"]) & {"key", "value", "qkv"}
    gate_up = layers["mlp"]["gate_up"]["kernel"].arrays
    kv = layers["attn"]["kv"]["kernel"].arrays
    assert len(gate_up) == len(kv) == stacked["mlp"]["up"]["kernel"].shape[0]
    for i, (w, w_kv) in enumerate(zip(gate_up, kv)):
        np.testing.assert_array_equal(w[:, 0], stacked["mlp"]["gate"]["kernel"][i])
        np.testing.assert_array_equal(w[:, 1], stacked["mlp"]["up"]["kernel"][i])
        np.testing.assert_array_equal(w_kv[:, 0], stacked["attn"]["key"]["kernel"][i])
        np.testing.assert_array_equal(w_kv[:, 1], stacked["attn"]["value"]["kernel"][i])
    assert decoding.unstack_params(model, split)["anchor"]["layers"]["mlp"].keys() == {
        "gate_up", "down"}  # idempotent
    # the composition's [connections, ...] leaves are split per connection (fuse=False: as
    # they are) ...
    plain = decoding.unstack_params(model, params, fuse=False)
    for name, tree in params["composition"].items():
        for key, stacked in tree.items():
            arrays = plain["composition"][name][key].arrays
            assert len(arrays) == len(model.connections[name]) == stacked.shape[0]
            for i, w in enumerate(arrays):
                np.testing.assert_array_equal(w, stacked[i])
    # ... and by default with each memory projection (and the augmenting states' norm
    # scale) multiplied into its key and value kernels: [D_aug, 2, heads, head_dim] per
    # connection, the bias [2, heads, head_dim]
    for name, tree in params["composition"].items():
        fused = split["composition"][name]
        assert set(fused) == set(tree) - {"proj", "proj_bias", "key", "value",
                                          "augment_norm"} | {"memory_kv", "memory_kv_bias"}
        for i in range(len(model.connections[name])):
            p = tree["proj"][i] * tree["augment_norm"][i][:, None]  # the norm scale folded in
            b = tree["proj_bias"][i]
            for t, which in enumerate(("key", "value")):
                w = np.asarray(tree[which][i], np.float64)
                np.testing.assert_allclose(fused["memory_kv"].arrays[i][:, t],
                                           np.einsum("ad,dhk->ahk", p, w), rtol=1e-5,
                                           atol=1e-6)
                np.testing.assert_allclose(fused["memory_kv_bias"].arrays[i][t],
                                           np.einsum("d,dhk->hk", b, w), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"params\['composition'\]: expected stacked "
                                         r"\[connections, \.\.\.\] arrays \(the training "
                                         r"layout\), got per-connection LayerLists"):
        model.apply({**params, "composition": split["composition"]}, jnp.asarray([PROMPTS[1]]))
    with pytest.raises(ValueError, match=r"params: expected every model's block weights "
                                         r"and the composition in one layout .*'anchor': "
                                         r"'stacked'.*'composition': 'per_layer'"):
        generate(model, {**params, "composition": split["composition"]}, PROMPTS,
                 max_new_tokens=2)
    tokens, lengths = pad_prompts(PROMPTS)
    _, cache = jax.eval_shape(functools.partial(prefill, model, cache_len=12), split, tokens,
                              lengths)
    cfg = model.anchor_config
    assert cache.anchor.per_layer and cache.anchor.num_layers == cfg.num_layers
    assert cache.anchor.length == 12
    # one [batch, kv_heads, slots, head_dim] array per layer (heads first; see KVCache)
    assert {x.shape for x in cache.anchor.k + cache.anchor.v} == {
        (3, cfg.kv_heads, 12, cfg.dims_per_head)}
    assert {n: len(c.k) for n, c in cache.augments.items()} == {"kv": 8, "code": 4}
    assert [m.shape for m in cache.memory["kv"]["key"]] == [(3, 4, 12, 16)] * 2
    assert [m.shape for m in cache.memory["code"]["value"]] == [(3, 4, 12, 16)]


def _products(fn, *args) -> int:
    """dot_general equations in fn's jaxpr, nested ones included."""
    return sum(eqn.primitive.name == "dot_general"
               for eqn in equations(jax.make_jaxpr(fn)(*args)))


@pytest.mark.parametrize("which, saved", [
    ("gpt2", 2),   # query, key, value in one product (as many heads; biases too)
    ("llama", 2),  # grouped-query: key and value in one; the GLU's gate and up in one
    ("gemma", 2),  # one KV head, QK-norm
])
def test_fused_projections_decode_alike_with_fewer_products(which, saved):
    model, params = plain(which)
    fused = decoding.unstack_params(model, params)
    unfused = decoding.unstack_params(model, params, fuse=False)
    assert {"query", "key", "value"} <= unfused["layers"]["attn"].keys()
    tokens, lengths = pad_prompts(PROMPTS)
    out = {}
    for name, run in (("fused", fused), ("unfused", unfused)):
        logits, cache = prefill(model, run, tokens, lengths, cache_len=12)
        step = functools.partial(decode_step, model, run)
        out[name] = (logits, step(cache, jnp.argmax(logits, -1))[0],
                     _products(step, cache, jnp.zeros((3,), jnp.int32)))
    for a, b in zip(out["fused"][:2], out["unfused"][:2]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    layers = model.config.num_layers
    assert out["unfused"][2] - out["fused"][2] == saved * layers, out


@pytest.mark.parametrize("which", ["gpt2", "llama", "gemma"])
def test_stack_layers_undoes_the_per_layer_layout(which):
    # query/key/value fused (gpt2: as many heads, biases), key/value (llama, gemma: grouped),
    # gate/up: every leaf comes back as the Decoder initialised it, bit for bit.
    from calm_jax.models.transformer import stack_layers, unstack_layers

    _, params = plain(which)
    for fuse in (True, False):
        again = stack_layers(unstack_layers(params, fuse=fuse))
        assert jax.tree.structure(again) == jax.tree.structure(params)
        for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
            assert a.shape == b.shape and a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    # Already stacked: the same arrays back.
    assert all(a is b for a, b in zip(jax.tree.leaves(stack_layers(params)),
                                      jax.tree.leaves(params)))
    with pytest.raises(ValueError, match="expected a Decoder's parameter tree"):
        stack_layers({"embedder": params["embedder"]})


def test_fused_projections_keep_a_sharded_heads_axis_and_decode_alike():
    # Weights sharded as the trainer places them on a (data, fsdp, tensor) = (1, 2, 2) mesh:
    # heads, KV heads and the MLP axis over "tensor". The fused kernels are stacked on a new
    # axis after the input one, so those axes keep their sharding, and decoding gives the
    # unsharded tokens.
    from calm_jax import partitioning as part

    model, params = plain("llama")  # 4 heads, 2 KV heads
    mesh = part.make_mesh(part.PartitioningConfig(mesh_shape=(1, 2, 2), num_devices=4))
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    shardings = part.shardings_for(abstract, mesh, part.DEFAULT_RULES)["params"]
    with part.mesh_context(mesh), nn.logical_axis_rules(list(part.DEFAULT_RULES)):
        placed = jax.device_put(params, shardings)
        fused = decoding.unstack_params(model, placed)
        kv = fused["layers"]["attn"]["kv"]["kernel"].arrays[0]  # [embed, 2, kv_heads, head_dim]
        gate_up = fused["layers"]["mlp"]["gate_up"]["kernel"].arrays[0]  # [embed, 2, mlp]
        key_spec = shardings["layers"]["attn"]["key"]["kernel"].spec  # [layers, embed, kv, hd]
        up_spec = shardings["layers"]["mlp"]["up"]["kernel"].spec
        assert kv.sharding.is_equivalent_to(jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(key_spec[1], None, *key_spec[2:])), kv.ndim)
        assert gate_up.sharding.is_equivalent_to(jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(up_spec[1], None, up_spec[2])), gate_up.ndim)
        sharded = generate(model, fused, PROMPTS, max_new_tokens=STEPS).tokens
    np.testing.assert_array_equal(sharded, generate(model, params, PROMPTS,
                                                    max_new_tokens=STEPS).tokens)


def test_per_layer_decode_step_copies_no_weights_or_cache_slots():
    """Compiled decode steps: with stacked weights and cache, each layer's weights and cache
    slots are copied out of the stacks (dynamic-slice) at every step, and each connection's
    composition matrices (slice); in the per-layer layout no instruction copies anything of a
    layer kernel's, cache array's or connection matrix's size. (Models with kv_heads >= 2:
    with one KV head XLA's CPU backend transposes each layer's keys for its dot whatever the
    layout.)"""
    from bench.decode import large_copies, layer_array_elements

    two = ComposedLM(FAMILIES["llama"], {"aug": FAMILIES["gpt2"].replace(num_layers=8)})
    assert len(two.connections["aug"]) == 2
    tokens, lengths = pad_prompts(PROMPTS)
    for model, params in (plain("llama"),
                          (two, random_params(lambda: nn.unbox(two.init(jax.random.key(0)))))):
        counts = {}
        for layout, run in (("stacked", params),
                            ("per_layer", decoding.unstack_params(model, params))):
            _, cache = prefill(model, run, tokens, lengths, cache_len=12)
            hlo = decode_step.lower(model, run, cache, jnp.zeros((3,), jnp.int32)).compile()
            copies = large_copies(hlo.as_text(), layer_array_elements(model, params, 3, 12))
            counts[layout] = {op for op, _, _ in copies}, len(copies)
        assert "dynamic-slice" in counts["stacked"][0], counts
        if model is two:
            assert "slice" in counts["stacked"][0], counts  # composition weights, connection i
        assert counts["per_layer"] == (set(), 0), counts


def test_right_padded_array_prompts_equal_token_lists():
    model, params = plain("llama")
    right = np.zeros((3, 7), np.int32)
    for b, p in enumerate(PROMPTS):
        right[b, :len(p)] = p
    by_list = generate(model, params, PROMPTS, max_new_tokens=STEPS)
    by_array = generate(model, {"params": params}, right, lengths=[5, 2, 7],
                        max_new_tokens=STEPS)
    np.testing.assert_array_equal(by_list.tokens, by_array.tokens)


def test_eos_stops_each_row_and_pads_the_rest():
    model, params = plain("llama")
    free = np.asarray(generate(model, params, PROMPTS, max_new_tokens=STEPS).tokens)
    eos, pad = int(free[0, 2]), 1
    result = generate(model, params, PROMPTS, max_new_tokens=STEPS, eos_id=eos, pad_id=pad)
    tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
    assert lengths[0] <= 3
    for b in range(3):
        hits = np.flatnonzero(free[b] == eos)
        n = hits[0] + 1 if hits.size else STEPS
        assert lengths[b] == n
        np.testing.assert_array_equal(tokens[b, :n], free[b, :n])
        assert np.all(tokens[b, n:] == pad)


def _decode_loop_condition(eos_id):
    """The primitives of generate's decode-loop condition (the `while` of its program)."""
    model, params = plain("llama")
    tokens, lengths = pad_prompts(PROMPTS, vocab_size=VOCAB)
    fn = functools.partial(decoding._generate, model, max_new_tokens=STEPS,
                           sampling=SamplingConfig(), return_logits=False, layout="per_layer",
                           early_stop=eos_id is not None)
    jaxpr = jax.make_jaxpr(fn)(params, tokens, lengths, jax.random.key(0),
                               jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(0))
    found = [{e.primitive.name for e in eqn.params["cond_jaxpr"].jaxpr.eqns}
             for eqn in equations(jaxpr) if eqn.primitive.name == "while"]
    assert len(found) == 1, found
    return found[0]


def test_decode_loop_without_eos_has_a_known_trip_count():
    # Without an EOS the loop condition is the step counter alone (XLA then knows the trip
    # count: its GPU runtime need not copy the condition back to the host after every token);
    # with one, it also reads whether every row is done.
    assert _decode_loop_condition(None) == {"lt"}
    with_eos = _decode_loop_condition(3)
    assert "lt" in with_eos and with_eos & {"reduce_and", "reduce_or", "not"}, with_eos


def test_sampling_is_seeded():
    model, params = plain("llama")
    hot = SamplingConfig(temperature=1.0)
    run = functools.partial(generate, model, params, PROMPTS, max_new_tokens=STEPS, sampling=hot)
    a, b = run(rng=jax.random.key(1)), run(rng=jax.random.key(1))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, run(rng=jax.random.key(2)).tokens)


sample_tokens = jax.jit(decoding.sample_tokens, static_argnames="sampling")


def test_top_k_1_is_greedy():
    logits = np.random.default_rng(0).standard_normal((64, VOCAB)).astype(np.float32)
    top1 = sample_tokens(logits, jax.random.key(1), SamplingConfig(temperature=1.5, top_k=1))
    np.testing.assert_array_equal(top1, np.argmax(logits, axis=-1))


@pytest.mark.parametrize("sampling,allowed", [
    (SamplingConfig(temperature=1.0, top_k=3), {0, 1, 2}),
    (SamplingConfig(temperature=1.0, top_p=0.7), {0, 1}),
    (SamplingConfig(temperature=1.0, top_p=0.85), {0, 1, 2}),
    (SamplingConfig(temperature=1.0, top_k=2, top_p=0.99), {0, 1}),
    (SamplingConfig(temperature=1e-3), {0}),
    (SamplingConfig(temperature=1.0), {0, 1, 2, 3, 4}),
])
def test_sampling_restricts_to_allowed_tokens(sampling, allowed):
    probs = np.array([0.5, 0.3, 0.15, 0.04, 0.01])
    logits = np.log(np.tile(probs[[2, 0, 4, 1, 3]], (2000, 1))).astype(np.float32)
    order = np.array([2, 0, 4, 1, 3])  # token id of the i-th most likely entry
    drawn = set(np.asarray(sample_tokens(logits, jax.random.key(0), sampling)).tolist())
    assert drawn == {int(np.flatnonzero(order == r)[0]) for r in allowed}


def test_decode_step_compiles_to_the_same_program_at_any_depth():
    def program(num_layers):
        cfg = FAMILIES["gemma"].replace(num_layers=num_layers)
        model = Decoder(cfg)
        params = jax.eval_shape(lambda: nn.unbox(init_decoder(cfg, jax.random.key(0))))
        cache = jax.eval_shape(lambda: decoding.KVCache.zeros(cfg, 2, 16))
        step = lambda p, c, t: decoding._extend(model, p["params"], t, c)  # noqa: E731
        return str(jax.make_jaxpr(step)(params, cache, jax.ShapeDtypeStruct((2, 1), jnp.int32)))

    shallow, deep = program(2), program(12)
    assert "length=12" in deep and shallow.count("\n") == deep.count("\n")


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens=0), r"max_new_tokens: expected a positive integer, got 0"),
    (dict(max_new_tokens=2.5), r"max_new_tokens: expected a positive integer, got 2.5"),
    (dict(max_new_tokens=60),
     r"max_new_tokens: expected at most model.max_len - prompt_len = 64 - 7 = 57 .*got 60"),
    (dict(prompts=[list(range(3, 70))]), r"prompts: expected prompt_len <= model.max_len=64, "
                                         r"got prompt_len=67"),
    (dict(prompts=[]), r"prompts: expected at least one prompt, got an empty list"),
    (dict(prompts=[[5, 6], []]), r"lengths: expected every prompt length in \[1, "
                                 r"prompt_len=2\], got \[0\] for rows \[1\]"),
    (dict(prompts=np.ones((2, 4), np.int32), lengths=[4, 5]),
     r"lengths: expected every prompt length in \[1, prompt_len=4\], got \[5\]"),
    (dict(prompts=np.ones((2, 4), np.int32), lengths=[4]),
     r"lengths: expected an integer array of shape \(2,\)"),
    (dict(prompts=[[5, VOCAB]]), rf"prompts: expected token ids in \[0, {VOCAB}\), "
                                 rf"got ids in \[5, {VOCAB}\]"),
    (dict(eos_id=VOCAB), rf"eos_id: expected None or an integer in \[0, {VOCAB}\), "
                         rf"got {VOCAB}"),
    (dict(pad_id=-1), rf"pad_id: expected an integer in \[0, {VOCAB}\), got -1"),
    (dict(sampling=SamplingConfig(temperature=1.0)),
     r"rng: expected a jax.random.key when sampling.temperature > 0, got None"),
    (dict(sampling=SamplingConfig(top_k=VOCAB + 1)),
     rf"sampling.top_k: expected at most vocab_size={VOCAB}, got {VOCAB + 1}"),
])
def test_bad_generate_arguments_raise_naming_them(kwargs, message):
    model, params = plain("gpt2")
    kwargs = {"prompts": PROMPTS, "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, params, kwargs.pop("prompts"), **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1.0), r"sampling.temperature: expected a float >= 0 .*got -1.0"),
    (dict(top_k=-2), r"sampling.top_k: expected an integer >= 0 .*got -2"),
    (dict(top_p=0.0), r"sampling.top_p: expected a float in \(0, 1\] .*got 0.0"),
    (dict(top_p=1.5), r"sampling.top_p: expected a float in \(0, 1\] .*got 1.5"),
])
def test_bad_sampling_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_bad_prefill_and_cache_arguments_raise():
    model, params = plain("gpt2")
    tokens, lengths = pad_prompts(PROMPTS)
    with pytest.raises(ValueError, match=r"cache_len: expected prompt_len=7 <= cache_len <= "
                                         r"model.max_len=64, got 65"):
        prefill(model, params, tokens, lengths, cache_len=65)
    with pytest.raises(ValueError, match=r"cache_len: expected prompt_len=7 <= cache_len"
                                         r".*got 5"):
        prefill(model, params, tokens, lengths, cache_len=5)
    with pytest.raises(ValueError, match=r"model: expected a calm_jax Decoder or ComposedLM, "
                                         r"got str"):
        generate("gpt2", params, PROMPTS, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"layout: expected one of \('per_layer', "
                                         r"'stacked'\), got 'rolled'"):
        generate(model, params, PROMPTS, max_new_tokens=2, layout="rolled")
    split = decoding.unstack_params(model, params)
    with pytest.raises(ValueError, match=r"layout: expected 'per_layer' for parameters split "
                                         r"by unstack_params, got 'stacked'"):
        generate(model, split, PROMPTS, max_new_tokens=2, layout="stacked")
    # A forward pass takes the per-layer (fused) weights too: the layers run unrolled.
    np.testing.assert_allclose(model.apply({"params": split}, jnp.asarray(tokens))[0],
                               model.apply({"params": params}, jnp.asarray(tokens))[0],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"cache: expected a per-layer KVCache"):
        model.apply({"params": split}, jnp.asarray(tokens),
                    decoding.KVCache.zeros(model.config, 3, 8), method=Decoder.extend)
    prompt_model, prompt_params = composed("prompt")
    mixed = {**prompt_params, "anchor": decoding.unstack_params(
        Decoder(prompt_model.anchor_config), prompt_params["anchor"])}
    with pytest.raises(ValueError, match=r"params: expected every model's block weights "
                                         r"and the composition in one layout .*'anchor': "
                                         r"'per_layer', \"augments\['code'\]\": 'stacked'"):
        generate(prompt_model, mixed, PROMPTS, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompt_len: expected an integer in \[1, "
                                         r"cache_len=8\] with composition.augment_sees="
                                         r"'prompt', got None"):
        prompt_model.init_cache(2, 8)
