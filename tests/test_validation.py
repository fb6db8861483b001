"""Inputs checked at the API: configs, token arrays, parameter trees, batches, checked mode."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from calm_jax import trainer, validation
from calm_jax.composition import ComposedLM, CompositionConfig
from calm_jax.data import DatasetConfig
from calm_jax.decoding import SamplingConfig, decode_step, prefill
from calm_jax.models import Decoder, TransformerConfig, init_decoder

VOCAB = 64
TINY = TransformerConfig.tiny(vocab_size=VOCAB, embed_dim=32, num_layers=2, num_heads=2,
                              num_kv_heads=1, mlp_dim=32, max_len=16)
LEARNED = TransformerConfig.gpt2_style(vocab_size=VOCAB, embed_dim=16, num_layers=1,
                                       num_heads=2, mlp_dim=32, max_len=8)
AUG = TransformerConfig.tiny(vocab_size=VOCAB, embed_dim=16, num_layers=2, num_heads=2,
                             num_kv_heads=1, mlp_dim=32, max_len=16)


def _tokens(batch=2, length=6):
    return np.arange(batch * length, dtype=np.int32).reshape(batch, length) % VOCAB


@pytest.fixture(scope="module")
def decoder():
    return Decoder(TINY), nn.unbox(init_decoder(TINY, jax.random.key(0)))["params"]


@pytest.fixture(scope="module")
def composed():
    model = ComposedLM(TINY, {"g": AUG}, CompositionConfig(connections={"g": ((2, 1),)}))
    return model, nn.unbox(model.init(jax.random.key(0)))


# Configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    # bool fields take only bools
    (dict(tie_embeddings=1), r"tie_embeddings: expected True or False, got 1"),
    (dict(qk_norm="yes"), r"qk_norm: expected True or False, got 'yes'"),
    (dict(use_bias=0), r"use_bias: expected True or False, got 0"),
    # float fields: no bools, NaN or infinities
    (dict(norm_eps=True), r"norm_eps: expected a positive number, got True"),
    (dict(norm_eps=math.nan), r"norm_eps: expected a positive number, got nan"),
    (dict(query_scale=True), r"query_scale: expected None or a positive number, got True"),
    (dict(final_logit_softcap=math.inf),
     r"final_logit_softcap: expected None or a positive number, got inf"),
    # RoPE: a base > 1 and positive scaling factors (0 and below give NaN logits)
    (dict(rope_theta=0.0), r"rope_theta: expected a number > 1, got 0.0"),
    (dict(rope_theta=-10.0), r"rope_theta: expected a number > 1, got -10.0"),
    (dict(rope_theta=True), r"rope_theta: expected a number > 1, got True"),
    (dict(rope_local_theta=0.5), r"rope_local_theta: expected None or a number > 1, got 0.5"),
    (dict(rope_scaling="linear", rope_scaling_factor=0),
     r"rope_scaling_factor: expected a positive number, got 0"),
    (dict(rope_low_freq_factor=-1.0), r"rope_low_freq_factor: expected a positive number"),
    (dict(rope_scaling="llama3", rope_low_freq_factor=4.0, rope_high_freq_factor=4.0),
     r"rope_high_freq_factor: expected a value > rope_low_freq_factor=4.0 .*got 4.0"),
])
def test_transformer_config_rejects_bools_non_finite_and_non_positive_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig.tiny(**kwargs)


def test_rope_theta_zero_would_give_nan_logits():
    """Why rope_theta must be checked: the frequencies of a base of 0 are not finite."""
    from calm_jax.models.layers import rope_frequencies
    bad = TransformerConfig.tiny()
    object.__setattr__(bad, "rope_theta", 0.0)  # what the config used to accept
    assert not np.all(np.isfinite(rope_frequencies(bad, bad.rope_theta)))
    with pytest.raises(ValueError, match="rope_theta"):
        TransformerConfig.tiny(rope_theta=0.0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(norm_eps=0.0), r"composition.norm_eps: expected a positive number, got 0.0"),
    (dict(norm_eps=-1e-6), r"composition.norm_eps: expected a positive number"),
    (dict(norm_eps=math.nan), r"composition.norm_eps: expected a positive number, got nan"),
    (dict(norm_eps=True), r"composition.norm_eps: expected a positive number, got True"),
    (dict(num_heads=True), r"composition.num_heads: expected None or a positive integer, "
                           r"got True"),
    (dict(head_dim=True), r"composition.head_dim: expected None or a positive integer"),
    (dict(normalize_inputs=1), r"composition.normalize_inputs: expected True or False, got 1"),
    (dict(proj_bias="yes"), r"composition.proj_bias: expected True or False, got 'yes'"),
    (dict(rope_theta=True), r"composition.rope_theta: expected None or a number > 1, got True"),
    (dict(connections=[(4, 2)]), r"composition.connections: expected a mapping"),
])
def test_composition_config_rejects_bad_field_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompositionConfig(**kwargs)


@pytest.mark.parametrize("pairs,message", [
    ((), r"composition.connections\['g'\]: expected at least one \(augment_layer, "
         r"anchor_layer\) pair .*got \(\)"),
    (((4.7, 2.9),), r"composition.connections\['g'\]: expected pairs of integers .*"
                    r"got \(\(4.7, 2.9\),\)"),
    (((True, 1),), r"composition.connections\['g'\]: expected pairs of integers"),
    (((2, 1, 0),), r"composition.connections\['g'\]: expected pairs of integers"),
])
def test_connections_must_be_a_non_empty_list_of_integer_pairs(pairs, message):
    with pytest.raises(ValueError, match=message):
        CompositionConfig(connections={"g": pairs})


def test_float_layer_numbers_are_not_truncated(decoder):
    model, params = decoder
    with pytest.raises(ValueError, match=r"layers: expected integer layer numbers, got \[1.5\]"):
        model.apply({"params": params}, _tokens(), (1.5,), method=Decoder.hidden_states)


# Token arrays at trace time --------------------------------------------------------------------


BAD_TOKENS = [
    (_tokens().astype(np.float32), r"tokens: expected integer token ids .*got dtype float32"),
    (_tokens() > 3, r"tokens: expected integer token ids .*got dtype bool"),
    (_tokens()[0], r"tokens: expected an integer array \[batch, length\] \(rank 2\), got rank 1"),
    (_tokens()[None], r"tokens: expected an integer array .*got rank 3"),
]


@pytest.mark.parametrize("tokens,message", BAD_TOKENS)
def test_decoder_rejects_float_bool_and_wrong_rank_tokens(decoder, tokens, message):
    model, params = decoder
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda t: model.apply({"params": params}, t), tokens)


@pytest.mark.parametrize("tokens,message", BAD_TOKENS)
def test_composed_lm_rejects_float_bool_and_wrong_rank_tokens(composed, tokens, message):
    model, params = composed
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda t: model.apply(params, t), tokens)


@pytest.mark.parametrize("which", ["decoder", "composed"])
@pytest.mark.parametrize("kwargs,message", [
    (dict(segment_ids=np.ones((2, 5), np.int32)),
     r"segment_ids: expected shape \(2, 6\) like tokens, got \(2, 5\)"),
    (dict(positions=np.zeros((6,), np.int32)),
     r"positions: expected shape \(2, 6\) like tokens, got \(6,\)"),
    (dict(positions=np.zeros((2, 6), np.float32)),
     r"positions: expected integer values, got dtype float32"),
])
def test_segment_ids_and_positions_of_another_shape_raise(decoder, composed, which, kwargs,
                                                         message):
    model, params = decoder if which == "decoder" else composed
    variables = {"params": params} if which == "decoder" else params
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda t: model.apply(variables, t, **kwargs), _tokens())


def test_prompt_mask_of_another_shape_raises(composed):
    model, params = composed
    with pytest.raises(ValueError, match=r"prompt_mask: expected shape \(2, 6\) like tokens, "
                                         r"got \(2, 3\)"):
        jax.eval_shape(lambda t: model.apply(params, t, prompt_mask=jnp.ones((2, 3), bool)),
                       _tokens())


def test_learned_positions_model_rejects_sequences_past_max_len():
    model = Decoder(LEARNED)
    params = nn.unbox(init_decoder(LEARNED, jax.random.key(0)))
    tokens = np.ones((1, LEARNED.max_len + 1), np.int32)
    with pytest.raises(ValueError, match=r"tokens: expected length <= max_len=8 .*got length 9"):
        jax.eval_shape(lambda t: model.apply(params, t), tokens)
    # Explicit positions may restart (packing), so only their values can be checked.
    positions = np.tile(np.arange(LEARNED.max_len + 1) % 4, (1, 1)).astype(np.int32)
    logits = model.apply(params, tokens, positions=positions)[0]
    assert np.all(np.isfinite(logits))


def test_composed_lm_rejects_sequences_past_an_augments_learned_max_len():
    model = ComposedLM(TINY, {"g": LEARNED}, CompositionConfig(connections={"g": ((1, 2),)}))
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0))))
    with pytest.raises(ValueError, match=r"tokens: expected length <= max_len=8 \(the "
                                         r"smallest learned position table .*got length 9"):
        jax.eval_shape(lambda p, t: model.apply(p, t), params, np.ones((1, 9), np.int32))


# Parameter trees -------------------------------------------------------------------------------


def test_params_missing_an_augment_name_it(composed):
    model, params = composed
    for key in ("augments", "composition"):
        broken = {**params, key: {}}
        with pytest.raises(ValueError, match=rf"params\['{key}'\]: expected an entry for every "
                                             rf"augmenting model \['g'\], got \[\]"):
            jax.eval_shape(lambda p: model.apply(p, _tokens()), broken)
    with pytest.raises(ValueError, match=r"params: expected a mapping with 'anchor', "
                                         r"'augments' and 'composition', got \['anchor'\]"):
        jax.eval_shape(lambda p: model.apply(p, _tokens()), {"anchor": params["anchor"]})


def test_composition_params_of_another_width_name_the_leaf(composed):
    model, params = composed
    wider = ComposedLM(TINY, {"g": AUG.replace(embed_dim=32, num_heads=4)},
                       CompositionConfig(connections={"g": ((2, 1),)}))
    other = nn.unbox(wider.init_composition(jax.random.key(1)))
    broken = {**params, "composition": other}
    with pytest.raises(ValueError, match=r"params\['composition'\]\['g'\]\['augment_norm'\]: "
                                         r"expected shape \(1, 16\) .*got \(1, 32\)"):
        jax.eval_shape(lambda p: model.apply(p, _tokens()), broken)


# Host-side value checks ------------------------------------------------------------------------


def test_token_ids_out_of_range_give_nan_or_wrapped_logits_unchecked(decoder):
    """What the host-side checks prevent: an id >= vocab_size makes its whole row NaN (earlier
    positions included) and a negative id reads the last embedding row."""
    model, params = decoder
    tokens = _tokens()
    logits = np.asarray(model.apply({"params": params}, tokens.copy())[0])
    high = tokens.copy()
    high[0, -1] = VOCAB
    assert np.isnan(np.asarray(model.apply({"params": params}, high)[0])[0, 0]).all()
    wrapped, last = tokens.copy(), tokens.copy()
    wrapped[0, 0], last[0, 0] = -1, VOCAB - 1
    np.testing.assert_array_equal(model.apply({"params": params}, wrapped)[0],
                                  model.apply({"params": params}, last)[0])
    assert np.isfinite(logits).all()
    for bad in (high, wrapped):
        with pytest.raises(ValueError, match=rf"tokens: expected token ids in \[0, {VOCAB}\)"):
            validation.check_tokens(bad, vocab_size=VOCAB)


@pytest.mark.parametrize("tokens,kwargs,message", [
    (np.array([[1, 2, 70]]), {}, r"prompt: expected token ids in \[0, 64\), got 70 \.\. 70 at "
                                 r"1 place\(s\), the first at index \(0, 2\)"),
    (np.array([[-1, 2]]), {}, r"prompt: expected token ids in \[0, 64\), got -1 \.\. -1"),
    (np.array([[1.0, 2.0]]), {}, r"prompt: expected integer token ids .*got dtype float64"),
    (np.array([[True]]), {}, r"prompt: expected integer token ids .*got dtype bool"),
    (np.array([1, 2]), {}, r"prompt: expected an integer array .*got rank 1"),
    (np.ones((1, 9), int), dict(max_len=8), r"prompt: expected length <= max_len=8 .*got "
                                            r"length 9"),
])
def test_check_tokens_names_the_argument_the_expected_and_the_given(tokens, kwargs, message):
    with pytest.raises(ValueError, match=message):
        validation.check_tokens(tokens, vocab_size=VOCAB, name="prompt", **kwargs)


def test_check_tokens_accepts_good_ids_and_ignores_invalid_positions():
    tokens = np.array([[1, 2, -1], [3, 63, 0]])
    out = validation.check_tokens(tokens, vocab_size=VOCAB, valid=tokens >= 0)
    np.testing.assert_array_equal(out, tokens)
    with pytest.raises(ValueError, match="check_tokens reads concrete values"):
        jax.jit(lambda t: validation.check_tokens(t, vocab_size=VOCAB))(tokens)


def test_model_limits():
    assert validation.model_limits(TINY) == {"vocab_size": VOCAB, "max_len": None}
    assert validation.model_limits(Decoder(LEARNED)) == {"vocab_size": VOCAB, "max_len": 8}
    assert validation.model_limits(TINY, LEARNED) == {"vocab_size": VOCAB, "max_len": 8}
    other = LEARNED.replace(vocab_size=128)  # its own tokenizer: not this stream's limit
    assert validation.model_limits(TINY, other) == {"vocab_size": VOCAB, "max_len": None}


def _batch(tokens):
    tokens = np.asarray(tokens, np.int32)
    return {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens,
            "decoder_loss_weights": np.ones(tokens.shape, np.float32)}


@pytest.mark.parametrize("change,message", [
    (dict(decoder_input_tokens=np.full((2, 4), VOCAB, np.int32)),
     r"batch\['decoder_input_tokens'\]: expected token ids in \[0, 64\)"),
    (dict(decoder_target_tokens=np.full((2, 4), -3, np.int32)),
     r"batch\['decoder_target_tokens'\]: expected token ids in \[0, 64\), got -3"),
    (dict(decoder_segment_ids=np.ones((2, 3), np.int32)),
     r"batch\['decoder_segment_ids'\]: expected shape \(2, 4\) like decoder_input_tokens"),
    (dict(decoder_positions=np.full((2, 4), 8, np.int32)),
     r"batch\['decoder_positions'\]: expected positions in \[0, 8\), got 8"),
    (dict(prompt_mask=np.ones((2, 4), np.float32)),
     r"batch\['prompt_mask'\]: expected bool values, got dtype float32"),
    (dict(decoder_input_tokens=np.ones((2, 9), np.int32),
          decoder_target_tokens=np.ones((2, 9), np.int32),
          decoder_loss_weights=np.ones((2, 9), np.float32)),
     r"batch\['decoder_input_tokens'\]: expected length <= max_len=8"),
])
def test_check_batch_names_the_feature(change, message):
    batch = {**_batch(np.ones((2, 4))), **change}
    with pytest.raises(ValueError, match=message):
        validation.check_batch(batch, vocab_size=VOCAB, max_len=8)


def test_trainer_checks_each_batch_before_it_reaches_the_step(tmp_path):
    def arrays():
        batch = _batch(np.tile(np.arange(8) + 1, (8, 1)))
        batch["decoder_input_tokens"] = batch["decoder_input_tokens"].copy()
        batch["decoder_input_tokens"][5, 3] = VOCAB + 1
        return batch

    with pytest.raises(ValueError, match=r"dataset\['decoder_input_tokens'\]: expected token "
                                         r"ids in \[0, 64\), got 65"):
        trainer.train(mode="pretrain", model_dir=str(tmp_path), num_steps=1,
                      anchor=trainer.ModelSpec(config=TINY),
                      dataset=DatasetConfig(arrays_fn=arrays, batch_size=8, length=8))


def test_trainer_evaluation_checks_each_batch():
    class Source:
        def sequential(self, num_batches):
            yield _batch(np.full((2, 4), VOCAB))

    def eval_step(*args):
        raise AssertionError("the batch reached the evaluation step")

    with pytest.raises(ValueError, match=r"eval_dataset\['decoder_input_tokens'\]: expected "
                                         r"token ids in \[0, 64\)"):
        trainer._evaluate(eval_step, None, None, Source(), {"vocab_size": VOCAB, "max_len": None},
                          1, None)


# Decoding --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=True), r"sampling.temperature: expected a float >= 0"),
    (dict(temperature=math.nan), r"sampling.temperature: expected a float >= 0"),
    (dict(top_p=True), r"sampling.top_p: expected a float in \(0, 1\]"),
])
def test_sampling_config_rejects_bools_and_nan(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_prefill_and_decode_step_check_token_shapes(decoder):
    model, params = decoder
    with pytest.raises(ValueError, match=r"lengths: expected shape \(2,\) \(one per prompt\), "
                                         r"got \(3,\)"):
        prefill(model, params, _tokens(), np.ones(3, np.int32), cache_len=8)
    _, cache = prefill(model, params, _tokens(), np.full(2, 6, np.int32), cache_len=8)
    with pytest.raises(ValueError, match=r"tokens: expected integer token ids \[batch\] \(one "
                                         r"per row\), got int32 array of shape \(2, 1\)"):
        decode_step(model, params, cache, np.ones((2, 1), np.int32))


# Checked mode ----------------------------------------------------------------------------------


def test_checked_apply_raises_on_bad_ids_and_equals_apply_on_good_ones(decoder, composed):
    for model, params in (decoder, composed):
        good = _tokens()
        want = (model.apply({"params": params}, good)[0] if isinstance(model, Decoder)
                else model.apply(params, good))
        np.testing.assert_allclose(validation.checked_apply(model, params, good), want,
                                   rtol=1e-5, atol=1e-5)
        bad = good.copy()
        bad[1, 2] = VOCAB + 5
        with pytest.raises(ValueError, match=r"tokens: expected token ids in \[0, 64\), got "
                                             r"ids in \[\d+, 69\]$"):
            validation.checked_apply(model, params, bad)


def test_checked_apply_checks_learned_positions():
    model = Decoder(LEARNED)
    params = nn.unbox(init_decoder(LEARNED, jax.random.key(0)))
    tokens = np.ones((1, 4), np.int32)
    with pytest.raises(ValueError, match=r"positions: expected positions in \[0, 8\), got "
                                         r"positions in \[0, 9\]"):
        validation.checked_apply(model, params, tokens,
                                 positions=np.array([[0, 1, 2, 9]], np.int32))
