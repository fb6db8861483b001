"""Composition across tokenizers: byte offsets, the byte-causal cross mask, batches, cached
decoding that re-runs what the augment's tokenizer re-segments, transfer, the real pair."""

import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn
import pytest

from calm_jax import alignment
from calm_jax.alignment import AugmentInput
from calm_jax.composition import ComposedLM, CompositionConfig
from calm_jax.cross_decoding import anchor_ends, generate_text, readable_prefix
from calm_jax.losses import cross_entropy
from calm_jax.models import Decoder, TransformerConfig, init_decoder
from calm_jax.tokenizers import ByteTokenizer, Tokenizer

WORDS = ("the cat sat on a mat and then ran far away from big red dogs who were chasing it "
         "around parks near rivers under trees at night while stars shone").split()


def _corpus(n=400, seed=0):
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(3, 12))) for _ in range(n)]


def _bpe(directory, texts, vocab_size, all_bytes=True, normalizer=None) -> Tokenizer:
    """A byte-level BPE trained here (with every byte in its alphabet unless not all_bytes)."""
    hf = pytest.importorskip("tokenizers", reason="the [convert] extra builds BPE tokenizers")
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    if normalizer is not None:
        tok.normalizer = normalizer
    alphabet = hf.pre_tokenizers.ByteLevel.alphabet() if all_bytes else []
    tok.train_from_iterator(texts, hf.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[], show_progress=False,
        initial_alphabet=alphabet))
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    return Tokenizer.load(str(directory))


@pytest.fixture(scope="module")
def chars(tmp_path_factory):
    """Nearly a character tokenizer: the corpus's characters and a few merges."""
    return _bpe(tmp_path_factory.mktemp("chars"), _corpus(), 34, all_bytes=False)


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    """Whole words: re-segments a word's end as its letters arrive."""
    return _bpe(tmp_path_factory.mktemp("words"), _corpus(seed=1), 360)


def _model(anchor_vocab, augment_vocab, **comp):
    anchor = TransformerConfig.tiny(vocab_size=anchor_vocab, num_layers=4)
    augment = TransformerConfig.tiny(vocab_size=augment_vocab, embed_dim=48, num_layers=4,
                                     num_heads=3, num_kv_heads=1)
    return ComposedLM(anchor, {"b": augment}, CompositionConfig(shared_vocabulary=False, **comp))


def _params(model, seed=0):
    params = nn.unbox(model.init(jax.random.key(seed)))
    for i, name in enumerate(sorted(params["composition"])):  # init has W_o = 0
        w = params["composition"][name]["out"]
        params["composition"][name]["out"] = 0.5 * jax.random.normal(jax.random.key(9 + i),
                                                                     w.shape)
    return params


def _inputs(features, names=("b",)):
    return dict(byte_ends=jnp.asarray(features["decoder_byte_ends"]),
                segment_ids=(None if "decoder_segment_ids" not in features
                             else jnp.asarray(features["decoder_segment_ids"])),
                positions=(None if "decoder_positions" not in features
                           else jnp.asarray(features["decoder_positions"])),
                augment_inputs=alignment.augment_inputs_from_batch(features, names))


# Offsets --------------------------------------------------------------------------------------


def test_offsets_tile_the_text(words, chars):
    text = "the cat sat on the mat, naïve café 🙂"
    for tok in (words, ByteTokenizer()):
        ids, spans = alignment.tokenize(tok, text)
        assert ids.tolist() == tok.encode(text)
        alignment.check_spans(spans, len(text.encode()), "tokenizer")
        pieces = tok.token_bytes(ids)
        assert [e - s for s, e in spans] == [len(p) for p in pieces]
    # chars has no byte for "ï": its tokens leave the text, and the error says so.
    with pytest.raises(ValueError, match="its tokens do not spell the text"):
        chars.encode_with_offsets(text)


def test_sentencepiece_offsets_drop_each_dummy_prefix(tmp_path):
    """SentencePiece puts a space before each text it encodes (here each piece of text between
    user-defined pieces): the spans still tile the text's own bytes."""
    import io

    spm = pytest.importorskip("sentencepiece", reason="backs SentencePiece tokenizers")

    def train(directory, **options):
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_corpus(200)), model_writer=model, vocab_size=320,
            model_type="bpe", byte_fallback=True, add_dummy_prefix=True,
            user_defined_symbols=["<x>"], minloglevel=2, **options)
        directory.mkdir()
        (directory / "tokenizer.model").write_bytes(model.getvalue())
        return Tokenizer.load(str(directory))

    text = "the cat<x>sat on naïve  mats"
    # SentencePiece's default normaliser collapses the two spaces: named, at the byte.
    with pytest.raises(ValueError, match=r"do not spell the text .* at byte 24 the tokens give "
                                         r"b'mats', the text b' mats'"):
        train(tmp_path / "nfkc").encode_with_offsets(text)
    tok = train(tmp_path / "identity", normalization_rule_name="identity",
                remove_extra_whitespaces=False)
    ids, spans = alignment.tokenize(tok, text)
    assert ids.tolist() == tok.encode(text) and tok.piece_to_id("<x>") in ids.tolist()
    alignment.check_spans(spans, len(text.encode()), "sentencepiece")
    data = text.encode()
    assert [data[s:e] for s, e in spans][:2] == [b"the", b" cat"]  # "▁the": no dummy byte
    x = ids.tolist().index(tok.piece_to_id("<x>"))
    assert data[spans[x][0]:spans[x][1]] == b"<x>" and data[spans[x + 1][0]:][:3] == b"sat"


def test_tokenizers_that_do_not_cover_the_same_bytes_are_named(tmp_path, words):
    hf = pytest.importorskip("tokenizers")
    lower = _bpe(tmp_path / "lower", _corpus(), 300, normalizer=hf.normalizers.Lowercase())
    with pytest.raises(ValueError, match=(
            r"tokenizers: expected the anchor tokenizer .*vocab_size=360.* and the "
            r"augments\['b'\] tokenizer .*vocab_size=300.* to cover the same 12 bytes.*"
            r"augments\['b'\]'s do not.*at byte 0 the tokens give b'the cat sits', the text "
            r"b'The Cat sits'")):
        alignment.tokenize_pair("The Cat sits", words, {"b": lower})
    with pytest.raises(ValueError, match=r"tokenizers: .*augments\['b'\]"):
        alignment.text_examples(["The Cat"], words, {"b": lower}, length=16)


# The forward ----------------------------------------------------------------------------------


@pytest.mark.parametrize("segments", [False, True])
def test_one_tokenizer_through_the_new_path_equals_the_shared_stream_exactly(segments):
    """Byte ends that grow with the tokens make the byte-causal mask the causal one."""
    anchor = TransformerConfig.tiny(vocab_size=384, num_layers=4)
    augment = TransformerConfig.tiny(vocab_size=384, embed_dim=48, num_layers=4, num_heads=3,
                                     num_kv_heads=1)
    model = ComposedLM(anchor, {"b": augment})
    params = _params(model)
    x = jax.random.randint(jax.random.key(1), (2, 12), 3, 384)
    ends = jnp.broadcast_to(1 + 3 * jnp.arange(12, dtype=jnp.int32), x.shape)
    seg = jnp.asarray([[1] * 5 + [2] * 7, [1] * 10 + [0] * 2]) if segments else None
    pos = jnp.asarray([list(range(5)) + list(range(7)), list(range(12))]) if segments else None
    shared = jax.jit(lambda p: model.apply(p, x, segment_ids=seg, positions=pos))(params)
    own = jax.jit(lambda p: model.apply(
        p, x, segment_ids=seg, positions=pos, byte_ends=ends,
        augment_inputs={"b": AugmentInput(x, ends, pos, seg)}))(params)
    # Equal at every real token (a padding query reads nothing here, where the shared stream's
    # padding attends uniformly to masked keys: neither is ever read).
    real = np.ones(x.shape, bool) if seg is None else np.asarray(seg) > 0
    np.testing.assert_array_equal(np.asarray(own)[real], np.asarray(shared)[real])
    assert not np.allclose(shared, jax.jit(model.anchor_logits)(params, x), atol=1e-3)
    # The host's mask (numpy) is the shared stream's causal one.
    mask = alignment.cross_mask(np.asarray(ends), np.asarray(ends))
    np.testing.assert_array_equal(mask[0, 0], np.tril(np.ones((12, 12), bool)))


def test_rotary_positions_are_byte_ends():
    """With rope_theta, queries and keys turn by their byte ends: ends 1, 2, ... (a byte
    tokenizer) give the shared stream's relative positions (0, 1, ... shifted by one)."""
    anchor = TransformerConfig.tiny(vocab_size=384, num_layers=4)
    model = ComposedLM(anchor, {"b": anchor}, CompositionConfig(rope_theta=100.0))
    params = _params(model)
    x = jax.random.randint(jax.random.key(1), (2, 12), 3, 384)
    ends = jnp.broadcast_to(jnp.arange(1, 13, dtype=jnp.int32), x.shape)
    shared = jax.jit(model.apply)(params, x)
    apply = jax.jit(lambda p, e: model.apply(p, x, byte_ends=e,
                                             augment_inputs={"b": AugmentInput(x, e)}))
    np.testing.assert_allclose(apply(params, ends), shared, rtol=1e-5, atol=1e-5)
    # Other byte ends (same order, other distances) turn them differently.
    assert not np.allclose(apply(params, ends * 3), shared, atol=1e-3)


def test_causal_in_bytes(chars, words):
    """Changing the text after byte b leaves the anchor's logits unchanged at every token that
    ends at or before b, though the augment's tokenization of the text around b changes."""
    model = _model(chars.vocab_size, words.vocab_size)
    params = _params(model)
    prefix = "the cat sat on the m"
    texts = [prefix + "at and ran", prefix + "ountain by rivers", prefix + "oon"]
    b = len(prefix.encode())
    feats = alignment.text_examples(texts, chars, {"b": words}, length=32, add_eos=False)
    logits = np.asarray(jax.jit(lambda p: model.apply(
        p, jnp.asarray(feats["decoder_input_tokens"]), **_inputs(feats)))(params))
    # Input t is target t - 1 (after the start token): the inputs 0 .. k-1 end by byte b.
    k = 1 + int((alignment.tokenize(chars, texts[0])[1][:, 1] <= b).sum())
    assert k > 5 and (feats["decoder_input_tokens"][:, :k] ==
                      feats["decoder_input_tokens"][0, :k]).all()
    assert (feats["decoder_byte_ends"][:, :k] <= b).all()
    for row in (1, 2):
        np.testing.assert_array_equal(logits[row][:k], logits[0][:k])
        assert not np.allclose(logits[row][k:k + 3], logits[0][k:k + 3], atol=1e-4)
    # Reading up to each token's own end instead leaks: "Ġ" ends at byte 19 only where the
    # word after it is one the augment's tokenizer does not know.
    leaky = alignment.text_examples(texts, chars, {"b": words}, length=32, add_eos=False,
                                    stable_only=False)
    logits = np.asarray(jax.jit(lambda p: model.apply(
        p, jnp.asarray(leaky["decoder_input_tokens"]), **_inputs(leaky)))(params))
    assert not np.array_equal(logits[1][:k], logits[0][:k])
    # The augment's tokens around b differ between the texts (it reads "m" in other words).
    spans = [alignment.tokenize(words, t)[1] for t in texts]
    assert len({tuple(map(tuple, s[s[:, 1] > b - 2][:2])) for s in spans}) > 1


def test_packed_rows_equal_separate_rows(chars, words):
    model = _model(chars.vocab_size, words.vocab_size, rope_theta=1000.0)
    params = _params(model)
    texts = _corpus(6, seed=3)
    packed = alignment.text_examples(texts, chars, {"b": words}, length=96, augment_length=48,
                                     pack=True)
    single = alignment.text_examples(texts, chars, {"b": words}, length=96, augment_length=48)
    assert len(packed["decoder_input_tokens"]) < len(texts) == len(single[
        "decoder_input_tokens"])
    run = jax.jit(lambda p, f: model.apply(p, f.pop("tokens"), **f))
    got = np.asarray(run(params, {"tokens": jnp.asarray(packed["decoder_input_tokens"]),
                                  **_inputs(packed)}))
    want = np.asarray(run(params, {"tokens": jnp.asarray(single["decoder_input_tokens"]),
                                   **_inputs(single)}))
    k = 0
    for r in range(len(got)):
        seg = packed["decoder_segment_ids"][r]
        for s in range(1, seg.max() + 1):
            at = seg == s
            n = int(at.sum())
            np.testing.assert_array_equal(packed["decoder_target_tokens"][r][at],
                                          single["decoder_target_tokens"][k][:n])
            np.testing.assert_allclose(got[r][at], want[k][:n], rtol=2e-5, atol=2e-5)
            k += 1
    assert k == len(texts)


def test_bad_inputs_raise_naming_the_argument(chars, words):
    model = _model(chars.vocab_size, words.vocab_size)
    params = nn.unbox(model.init(jax.random.key(0)))
    x = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"augment_inputs: expected \{name: AugmentInput\} for "
                                         r"\['b'\] with composition.shared_vocabulary=False"):
        model.apply(params, x)
    with pytest.raises(ValueError, match=r"byte_ends: expected the anchor tokens' byte ends"):
        model.apply(params, x, augment_inputs={"b": AugmentInput(x, x)})
    with pytest.raises(ValueError, match=r"augment_inputs\['b'\].byte_ends: expected shape "
                                         r"\(1, 4\)"):
        model.apply(params, x, byte_ends=x, augment_inputs={"b": AugmentInput(x, x[:, :2])})
    with pytest.raises(ValueError, match=r"composition.shared_vocabulary: expected True with "
                                         r"kind='fusion'"):
        CompositionConfig(kind="fusion", shared_vocabulary=False)
    with pytest.raises(ValueError, match=r"augments\['b'\].vocab_size: expected the anchor's "
                                         r"vocab_size=.*shared_vocabulary=False"):
        ComposedLM(model.anchor_config, model.augment_configs)


# Cached decoding ------------------------------------------------------------------------------


@pytest.mark.parametrize("anchor", ["chars", "bytes"])
def test_cached_decoding_equals_the_full_forward_while_the_augment_resegments(
        anchor, request, words):
    tok = ByteTokenizer() if anchor == "bytes" else request.getfixturevalue("chars")
    model = _model(384 if anchor == "bytes" else tok.vocab_size, words.vocab_size,
                   rope_theta=100.0)
    params = _params(model)
    prompt = "the cat"
    rest = " sat on the café naïve mat" if anchor == "bytes" else " sat on the mat while"
    ids, spans = alignment.tokenize(tok, prompt)
    forced = alignment.tokenize(tok, prompt + rest)[0][len(ids):].tolist()
    result = generate_text(model, params, prompt, anchor_tokenizer=tok,
                           augment_tokenizers={"b": words}, max_new_tokens=len(forced),
                           forced=forced, return_logits=True)
    assert result.tokens == forced and result.text == rest
    assert result.rerun >= 5  # "Ġs", "Ġsa", "Ġsat": the augment's tail was re-run

    # The full forward on the text at every step (padded to one width: one compilation).
    width = 48
    full = jax.jit(lambda p, x, e, a, ae, aseg: model.apply(
        p, x, byte_ends=e, augment_inputs={"b": AugmentInput(a, ae, segment_ids=aseg)}))
    for step in range(len(forced)):
        a_ids = np.concatenate([ids, forced[:step]]).astype(np.int32)
        ends = anchor_ends(tok, spans, forced[:step])
        text = readable_prefix(b"".join(tok.token_bytes(a_ids)))
        b_ids, b_spans = alignment.tokenize(words, text)
        reads = alignment.read_ends(text, ends)
        pad = lambda v, n=width: np.pad(v, (0, n - len(v)))[None]  # noqa: E731
        out = full(params, pad(a_ids), pad(reads), pad(b_ids), pad(b_spans[:, 1]),
                   pad(np.ones(len(b_ids), np.int32)))
        np.testing.assert_allclose(result.logits[step], out[0, len(a_ids) - 1],
                                   rtol=2e-5, atol=2e-5)


# Transfer: only the augment knows a key -> value mapping; the two read different tokens. ------


def test_composition_transfers_across_tokenizers(tmp_path):
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    keys = sorted({"".join(rng.choice(letters, 3)) for _ in range(80)})[:64]
    mapping = {k: str(rng.integers(0, 8)) for k in keys}
    # Texts "key value". The augment's tokenizer holds every key as one token and every
    # " value" as another; the anchor reads bytes. The anchor's input " " (it predicts the
    # value) reads the augment up to the key's end: the held-back tail is the " " itself.
    aug_tok = _bpe(tmp_path / "kv", [f"{k} {v}" for k in keys for v in "01234567"] * 4, 400)
    assert all(len(aug_tok.encode(f"{k} 3")) == 2 for k in keys)
    anchor_tok = ByteTokenizer()

    def features(tok, chosen, values, augments=None):
        texts = [f"{k} {v}" for k, v in zip(chosen, values)]
        f = alignment.text_examples(texts, tok, augments or {}, length=8, augment_length=4)
        if augments:  # composition and evaluation: the loss on the value only
            digits = [tok.encode(d)[0] for d in "01234567"]
            f["decoder_loss_weights"] = np.isin(f["decoder_target_tokens"], digits).astype(
                np.float32)
        return f

    def sample(tok, pool, seed, random_values=False, augments=None):
        r = np.random.default_rng(seed)
        chosen = r.choice(pool, 64)
        values = (r.integers(0, 8, 64).astype(str) if random_values
                  else [mapping[k] for k in chosen])
        return features(tok, chosen, values, augments)

    def pretrain(cfg, tok, steps, seed, random_values):
        params = nn.unbox(init_decoder(cfg, jax.random.key(seed)))["params"]
        opt = optax.adam(3e-3)
        state = opt.init(params)

        @jax.jit
        def step(params, state, x, y, w):
            def loss(p):
                return cross_entropy(Decoder(cfg).apply({"params": p}, x)[0], y, w)["loss"]
            updates, state = opt.update(jax.grad(loss)(params), state, params)
            return optax.apply_updates(params, updates), state

        for i in range(steps):
            f = sample(tok, keys, 100 * seed + i, random_values)
            params, state = step(params, state, f["decoder_input_tokens"],
                                 f["decoder_target_tokens"], f["decoder_loss_weights"])
        return params

    aug_cfg = TransformerConfig.tiny(vocab_size=aug_tok.vocab_size, embed_dim=64, num_layers=4)
    anchor_cfg = TransformerConfig.tiny(vocab_size=384, embed_dim=64, num_layers=4)
    augment = pretrain(aug_cfg, aug_tok, 300, 1, False)
    anchor = pretrain(anchor_cfg, anchor_tok, 150, 2, True)  # the format, never the mapping

    model = ComposedLM(anchor_cfg, {"kv": aug_cfg}, CompositionConfig(shared_vocabulary=False))
    frozen = {"anchor": anchor, "augments": {"kv": augment}}
    comp = nn.unbox(model.init_composition(jax.random.key(3)))
    opt = optax.adam(3e-3)
    state = opt.init(comp)

    def loss(comp, f, fn="apply"):
        p = {**frozen, "composition": comp}
        x = f["decoder_input_tokens"]
        logits = (model.anchor_logits(p, x) if fn == "anchor" else model.apply(
            p, x, byte_ends=f["decoder_byte_ends"],
            augment_inputs=alignment.augment_inputs_from_batch(f, ["kv"])))
        return cross_entropy(logits, f["decoder_target_tokens"],
                             f["decoder_loss_weights"])["loss"]

    @jax.jit
    def step(comp, state, f):
        updates, state = opt.update(jax.grad(loss)(comp, f), state, comp)
        return optax.apply_updates(comp, updates), state

    held_in, held_out = keys[::2], keys[1::2]
    for i in range(200):
        comp, state = step(comp, state, sample(anchor_tok, held_in, 20_000 + i,
                                               augments={"kv": aug_tok}))
    test = features(anchor_tok, held_out, [mapping[k] for k in held_out], {"kv": aug_tok})
    anchor_loss = float(jax.jit(loss, static_argnums=2)(comp, test, "anchor"))
    composed_loss = float(jax.jit(loss)(comp, test))
    assert anchor_loss > 1.5  # about log(8): it only knows the value set
    reads = test["decoder_byte_ends"][test["decoder_loss_weights"] > 0]
    assert (reads == 3).all()  # the value's input reads the augment up to the key's end
    assert composed_loss < 0.25 * anchor_loss, (composed_loss, anchor_loss)


# The real pair: SmolLM2-135M (anchor) and Gemma-3-270m (augment), each with its tokenizer. -----


def test_real_pair_composes_across_tokenizers_and_starts_at_the_anchor(tmp_path_factory):
    from convert_support import gemma3_path, needs, smollm2_path

    needs("gguf", "dequantises the real GGUF files")
    needs("tokenizers", "builds SmolLM2's BPE tokenizer")
    needs("sentencepiece", "backs Gemma's tokenizer")
    from calm_jax.convert import from_gguf

    smol_path, gemma_path = smollm2_path(), gemma3_path(tmp_path_factory)
    smol_cfg, smol = from_gguf(smol_path)
    gemma_cfg, gemma = from_gguf(gemma_path)
    smol_tok, gemma_tok = Tokenizer.from_gguf(smol_path), Tokenizer.from_gguf(gemma_path)
    assert smol_cfg.vocab_size != gemma_cfg.vocab_size
    model = ComposedLM(smol_cfg, {"gemma": gemma_cfg},
                       CompositionConfig(shared_vocabulary=False, rope_theta=10_000.0))
    params = {"anchor": smol, "augments": {"gemma": gemma},
              "composition": nn.unbox(model.init_composition(jax.random.key(0)))}
    text = "The capital of France is"
    feats = alignment.text_examples([text], smol_tok, {"gemma": gemma_tok}, length=8,
                                    add_eos=False)
    x = jnp.asarray(feats["decoder_input_tokens"])
    inputs = alignment.augment_inputs_from_batch(feats, ["gemma"])
    assert inputs["gemma"].tokens[0, 0] == gemma_tok.bos_id  # Gemma reads its own BOS first
    composed = jax.jit(lambda p: model.apply(p, x, byte_ends=feats["decoder_byte_ends"],
                                             augment_inputs=inputs))(params)
    np.testing.assert_array_equal(composed, jax.jit(model.anchor_logits)(params, x))
    n = int((feats["decoder_loss_weights"][0] > 0).sum())
    ids = smol_tok.encode(text)
    assert n == len(ids) and x[0, 1:n].tolist() == ids[:-1]
    # Neither tokenizer's tokens cross a settled cut (read_ends' assumption) on real text.
    sample = ("The capital of France is Paris. It is known for the Eiffel Tower, and its "
              "museums hold 1234 paintings (about 3.5%)!\n\nNew lines\ttabs  and naïve café.")
    cuts = set(alignment.read_ends(sample, np.arange(len(sample.encode()) + 1)).tolist())
    for tok in (smol_tok, gemma_tok):
        spans = alignment.tokenize(tok, sample)[1]
        assert not [c for c in cuts for s, e in spans if s < c < e], tok
    # And in cached decoding, text in, text out (at init the anchor's own continuation).
    result = generate_text(model, params, text, anchor_tokenizer=smol_tok,
                           augment_tokenizers={"gemma": gemma_tok}, max_new_tokens=1)
    assert result.text == " Paris"


def test_trainer_composes_models_with_their_own_tokenizers(tmp_path, chars, words):
    """The trainer's compose mode reads text_examples' features through the numpy source."""
    from calm_jax import trainer
    from calm_jax.convert import expected_params, save_converted
    from calm_jax.data import DatasetConfig

    rng = np.random.RandomState(0)
    dirs = {}
    for name, cfg in (("anchor", TransformerConfig.tiny(vocab_size=chars.vocab_size)),
                      ("augment", TransformerConfig.tiny(vocab_size=words.vocab_size,
                                                         embed_dim=32))):
        params = jax.tree.map(lambda s: 0.05 * rng.randn(*s.shape).astype(np.float32),
                              expected_params(cfg))
        dirs[name] = save_converted(str(tmp_path / name), cfg, params)
    texts = _corpus(40, seed=5)

    def arrays():
        return alignment.text_examples(texts, chars, {"aug": words}, length=48,
                                       augment_length=24, pack=True)

    assert len(arrays()["decoder_input_tokens"]) >= 8
    result = trainer.train(
        mode="compose", model_dir=str(tmp_path / "calm"), num_steps=2, log_every=1,
        anchor=trainer.ModelSpec(checkpoint=dirs["anchor"]),
        augments={"aug": trainer.ModelSpec(checkpoint=dirs["augment"])},
        composition=CompositionConfig(shared_vocabulary=False, rope_theta=1000.0),
        dataset=DatasetConfig(arrays_fn=arrays, batch_size=8, length=48),
        checkpoint=trainer.ckpt.CheckpointConfig(save_every=0, use_async=False))
    assert int(result["state"]["step"]) == 2
    # (shared_vocabulary=False: a forward without the augment's own tokens would raise.)
    losses = [m["loss"] for _, m in result["history"]]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_streamed_text_composes_across_tokenizers_from_gin_to_generate(tmp_path, chars, words):
    """experiments/compose_text_cross.gin: the text source gives each model its own tokens, the
    trainer composes, and `python -m calm_jax.generate` decodes its export with the tokenizer
    saved beside each model's export."""
    from calm_jax import exports, generate
    from calm_jax import train as train_cli
    from calm_jax.convert import expected_params, save_converted

    rng = np.random.RandomState(0)
    dirs = {}
    for name, cfg, tok in (
            ("anchor", TransformerConfig.tiny(vocab_size=chars.vocab_size), chars),
            ("augment", TransformerConfig.tiny(vocab_size=words.vocab_size, embed_dim=32),
             words)):
        params = jax.tree.map(lambda s: 0.05 * rng.randn(*s.shape).astype(np.float32),
                              expected_params(cfg))
        dirs[name] = save_converted(str(tmp_path / name), cfg, params, tokenizer=tok)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(t + "\n" for t in _corpus(60, seed=7)))
    result = train_cli.run([
        "--gin_file=experiments/compose_text_cross.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
        f"--gin.TRAIN_FILES=['{corpus}']", f"--gin.ANCHOR_CHECKPOINT='{dirs['anchor']}'",
        f"--gin.AUGMENT_CHECKPOINT='{dirs['augment']}'", "--gin.NUM_STEPS=2",
        "--gin.BATCH_SIZE=8", "--gin.LENGTH=48", "--gin.AUGMENT_LENGTH=24",
        "--gin.data.DatasetConfig.add_eos=False", "--gin.trainer.train.log_every=1"])
    assert int(result["state"]["step"]) == 2
    assert all(np.isfinite(m["loss"]) for _, m in result["history"])
    export = str(tmp_path / "run" / "export")
    assert exports.read_spec(export)["composition"]["shared_vocabulary"] is False
    rows = generate.run(["--model", export, "--prompt", "the cat", "--max_new_tokens", "4"])
    model, params = exports.load_composition(export)
    want = generate_text(model, params, "the cat", anchor_tokenizer=chars,
                         augment_tokenizers={"aug": words}, max_new_tokens=4)
    assert rows[0]["tokens"] == want.tokens and rows[0]["completion"] == want.text
