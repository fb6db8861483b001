"""Evaluating compositions across tokenizers: prompts decoded together exactly as one at a time,
and the trainer's decode evaluation of such a composition."""

import json

import jax
import numpy as np
import pytest

from calm_jax import alignment, evaluate, trainer
from calm_jax.composition import CompositionConfig
from calm_jax.cross_decoding import generate_text, generate_texts
from calm_jax.data import DatasetConfig
from calm_jax.decoding import SamplingConfig
from calm_jax.optim import OptimizerConfig
from calm_jax.tokenizers import ByteTokenizer
# Tiny tokenizers and models across tokenizers, as built there (fixtures by import).
from test_cross_tokenizer import _corpus, _model, _params, chars, words  # noqa: F401
from test_generate import cross_export  # noqa: F401

PROMPTS = ["the cat", "a", "the dogs who were chasing it around", "ran far aw"]


# Prompts decoded together --------------------------------------------------------------------


@pytest.fixture(scope="module")
def composed(chars, words):  # noqa: F811 (fixtures)
    model = _model(chars.vocab_size, words.vocab_size, rope_theta=100.0)
    return model, _params(model)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_prompts_decoded_together_equal_each_decoded_alone(composed, chars, words,  # noqa: F811
                                                           temperature):
    model, params = composed
    sampling = SamplingConfig(temperature=temperature)
    rngs = [jax.random.fold_in(jax.random.key(3), i) for i in range(len(PROMPTS))]
    together = generate_texts(model, params, PROMPTS, anchor_tokenizer=chars,
                              augment_tokenizers={"b": words}, max_new_tokens=10,
                              sampling=sampling, rngs=rngs)
    for prompt, rng, got in zip(PROMPTS, rngs, together):
        alone = generate_text(model, params, prompt, anchor_tokenizer=chars,
                              augment_tokenizers={"b": words}, max_new_tokens=10,
                              sampling=sampling, rng=rng)
        assert (got.tokens, got.text, got.rerun) == (alone.tokens, alone.text, alone.rerun)
    assert len({r.text for r in together}) == len(PROMPTS)


def test_rows_that_resegment_and_end_early_decode_together_as_alone(composed, chars,  # noqa: F811
                                                                    words):  # noqa: F811
    """Forced continuations of other lengths: the rows stop at other steps, and in the first
    the augment's tokenizer re-segments the tail at nearly every byte ("Ġs", "Ġsa", "Ġsat")."""
    model, params = composed
    rests = [" sat on the mat while", " red", " parks", " away"]
    forced = [alignment.tokenize(chars, p + r)[0][len(alignment.tokenize(chars, p)[0]):].tolist()
              for p, r in zip(PROMPTS, rests)]
    assert len({len(f) for f in forced}) >= 3
    kw = dict(anchor_tokenizer=chars, augment_tokenizers={"b": words}, return_logits=True,
              max_new_tokens=max(len(f) for f in forced))
    together = generate_texts(model, params, PROMPTS, forced=forced, **kw)
    assert together[0].rerun >= 5
    for prompt, rest, ids, got in zip(PROMPTS, rests, forced, together):
        alone = generate_text(model, params, prompt, forced=ids, **kw)
        assert got.tokens == alone.tokens == ids and got.text == alone.text == rest
        assert got.rerun == alone.rerun
        assert got.logits.shape == (len(ids), chars.vocab_size)
        np.testing.assert_allclose(got.logits, alone.logits, rtol=2e-5, atol=2e-5)
        np.testing.assert_array_equal(got.logits.argmax(-1), alone.logits.argmax(-1))


def test_bad_batches_are_named(composed, chars, words):  # noqa: F811
    model, params = composed
    kw = dict(anchor_tokenizer=chars, augment_tokenizers={"b": words}, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompts: expected a non-empty sequence of str"):
        generate_texts(model, params, "the cat", **kw)
    with pytest.raises(ValueError, match=r"rngs: expected a jax.random.key per prompt when "
                                         r"sampling.temperature > 0, got None"):
        generate_texts(model, params, PROMPTS, sampling=SamplingConfig(temperature=1.0), **kw)
    with pytest.raises(ValueError, match=r"rngs: expected one key per prompt \(4\), got 1"):
        generate_texts(model, params, PROMPTS, rngs=[jax.random.key(0)], **kw)
    with pytest.raises(ValueError, match=r"prompts\[1\]: expected text the anchor tokenizer "
                                         r"gives tokens for, got ''"):
        generate_texts(model, params, ["a", ""], **kw)
    with pytest.raises(ValueError, match=r"cache_len: expected an integer in \[.* = 7, "
                                         r"anchor.max_len = .*\], got 4"):
        generate_texts(model, params, PROMPTS[:2], cache_len=4, **kw)


# The evaluation's batches --------------------------------------------------------------------


def _examples(prompts):
    return [{"input": p, "target": "the", "group": f"g{i % 2}"} for i, p in enumerate(prompts)]


def test_evaluate_decodes_batches_as_one_example_at_a_time(cross_export):  # noqa: F811
    """Sampled, two samples per example, batches of 3 rows (the last filled up) against
    batches of one row: the same outputs (row i keyed by fold_in(key(seed), i))."""
    _, model, params, bpe = cross_export
    examples = _examples(["the cat sat", "a mat and", "ran"])
    outputs = {}
    for size in (1, 4):
        config = evaluate.EvalConfig(metrics=("chrf",), max_new_tokens=5, batch_size=size,
                                     num_samples=2, seed=7,
                                     sampling=SamplingConfig(temperature=1.0))
        results = evaluate.evaluate(model, params, examples, tokenizer=ByteTokenizer(),
                                    augment_tokenizers={"b": bpe}, config=config)
        outputs[size] = [e["outputs"] for e in results["examples"]]
    assert outputs[4] == outputs[1]
    assert len({o for row in outputs[1] for o in row}) > 3  # the keys differ per row
    want = generate_text(model, params, "the cat sat", anchor_tokenizer=ByteTokenizer(),
                         augment_tokenizers={"b": bpe}, max_new_tokens=5,
                         sampling=SamplingConfig(temperature=1.0),
                         rng=jax.random.fold_in(jax.random.key(7), 1))
    assert outputs[4][0][1] == want.text


# The trainer's decode evaluation -------------------------------------------------------------


def _train(root, bpe, model_dir, decode_eval, augment=None, num_steps=3):
    texts = _corpus(40, seed=5)

    def arrays():
        return alignment.text_examples(texts, ByteTokenizer(), {"b": bpe}, length=48,
                                       augment_length=32, pack=True)

    return trainer.train(
        mode="compose", model_dir=str(model_dir), num_steps=num_steps, eval_every=2,
        log_every=1, anchor=trainer.ModelSpec(checkpoint=str(root / "anchor")),
        augments={"b": augment or trainer.ModelSpec(checkpoint=str(root / "augment"))},
        composition=CompositionConfig(shared_vocabulary=False),
        dataset=DatasetConfig(arrays_fn=arrays, batch_size=8, length=48),
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=0),
        checkpoint=trainer.ckpt.CheckpointConfig(save_every=0, use_async=False),
        decode_eval=decode_eval)


def test_the_trainer_logs_decode_metrics_of_a_composition_across_tokenizers(cross_export,  # noqa: F811
                                                                            tmp_path):
    """The augment's tokenizer is the one saved beside its export ("auto"); the logged metrics
    and written outputs are what `evaluate` gives for the trained parameters."""
    root, model, _, bpe = cross_export
    examples = _examples(["the cat sat", "a mat and", "ran far"])
    decode_eval = evaluate.DecodeEval(
        examples=evaluate.ExampleSource(examples=examples), tokenizer="bytes",
        config=evaluate.EvalConfig(metrics=("exact_match", "chrf"), max_new_tokens=6,
                                   batch_size=2))
    result = _train(root, bpe, tmp_path, decode_eval)
    logged = [(step, m) for step, m in result["history"] if "decode_eval/chrf" in m]
    assert [step for step, _ in logged] == [2, 3]
    final = json.loads((tmp_path / "decode_eval" / "step_3" / "results.json").read_text())
    assert logged[-1][1] == {"decode_eval/exact_match": final["metrics"]["exact_match"],
                             "decode_eval/chrf": pytest.approx(final["metrics"]["chrf"])}
    params = {**result["frozen"], "composition": result["params"]}
    direct = evaluate.evaluate(model, params, examples, tokenizer=ByteTokenizer(),
                               augment_tokenizers={"b": bpe}, config=decode_eval.config)
    assert [e["output"] for e in final["examples"]] == [e["output"] for e in direct["examples"]]
    assert final["metrics"] == direct["metrics"]
    # Trained: the composition now changes what the anchor alone would say.
    alone = evaluate.evaluate(model, {**params, "composition": jax.tree.map(
        np.zeros_like, result["params"])}, examples, tokenizer=ByteTokenizer(),
        augment_tokenizers={"b": bpe}, config=decode_eval.config)
    assert [e["output"] for e in alone["examples"]] != [e["output"] for e in direct["examples"]]


@pytest.mark.parametrize("choice, augment, message", [
    ("bytes", None, r"decode_eval.augment_tokenizers: expected 'auto' or \{augmenting model "
                    r"name: 'auto', 'bytes' or a converted model's directory\}, got 'bytes'"),
    ({"c": "bytes"}, None, r"decode_eval.augment_tokenizers: expected NAME=CHOICE with NAME "
                           r"one of \['b'\] .*got 'c=bytes'"),
    ("auto", "config", r"decode_eval.augment_tokenizers b: expected 'bytes' or a converted "
                       r"model's directory \(the model was not loaded from an export.*got "
                       r"'auto'"),
])
def test_the_trainer_refuses_augment_tokenizers_it_cannot_use(cross_export, tmp_path,  # noqa: F811
                                                              choice, augment, message):
    root, model, _, bpe = cross_export
    spec = (trainer.ModelSpec(config=model.augment_configs["b"]) if augment == "config"
            else None)
    decode_eval = evaluate.DecodeEval(
        examples=evaluate.ExampleSource(examples=_examples(["a"])), tokenizer="bytes",
        augment_tokenizers=choice)
    with pytest.raises(ValueError, match=message):
        _train(root, bpe, tmp_path, decode_eval, augment=spec)
    assert not (tmp_path / "checkpoints").exists()


def test_augment_tokenizers_are_refused_for_one_token_stream(cross_export):  # noqa: F811
    root, model, _, _ = cross_export
    from calm_jax.composition import ComposedLM

    shared = ComposedLM(model.anchor_config, {"b": model.anchor_config})
    decode_eval = evaluate.DecodeEval(
        examples=evaluate.ExampleSource(examples=_examples(["a"])), tokenizer="bytes",
        augment_tokenizers={"b": "bytes"})
    with pytest.raises(ValueError, match=r"decode_eval.augment_tokenizers: expected 'auto' for "
                                         r"a model that reads one token stream .*got "
                                         r"\{'b': 'bytes'\}"):
        decode_eval.prepare(shared, tokenizer_dir=None)
    # The default asks for nothing there.
    evaluate.DecodeEval(examples=decode_eval.examples, tokenizer="bytes").prepare(
        shared, tokenizer_dir=None)
