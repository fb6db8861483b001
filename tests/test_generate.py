"""`python -m calm_jax.generate`: text from composition and model exports."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from calm_jax import checkpoints as ckpt
from calm_jax import decoding
from calm_jax import generate
from calm_jax.composition import ComposedLM
from calm_jax.exports import save_composition
from calm_jax.models import Decoder, TransformerConfig
from tasks import byte_data

ANCHOR = TransformerConfig.tiny(vocab_size=byte_data.PADDED_VOCAB_SIZE, embed_dim=32,
                                num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=64,
                                max_len=48)
AUGMENT = ANCHOR.replace(embed_dim=16, num_heads=2, num_kv_heads=2)
PROMPTS = ["abc+de=", "x"]


@pytest.fixture(scope="module")
def composition_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    model = ComposedLM(ANCHOR, {"kv": AUGMENT})
    params = nn.unbox(model.init(jax.random.key(0)))
    params["composition"] = jax.tree.map(lambda x: x + 0.1, params["composition"])
    ckpt.save_model(str(root / "anchor"), ANCHOR, params["anchor"])
    save_composition(str(root / "export"), params["composition"], model=model,
                     frozen={"anchor": params["anchor"], "augments": params["augments"]},
                     sources={"anchor": str(root / "anchor"), "augments": {"kv": None}},
                     fingerprints={"anchor": ckpt.params_fingerprint(ANCHOR, params["anchor"])})
    return root, model, params


def test_a_composition_export_generates_what_decoding_gives(composition_export, capsys):
    root, model, params = composition_export
    rows = generate.run(["--model", str(root / "export"), "--tokenizer", "bytes",
                         "--max_new_tokens", "6", *[f"--prompt={p}" for p in PROMPTS]])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == rows and [r["prompt"] for r in rows] == PROMPTS
    want = decoding.generate(model, params, [byte_data.encode_text(p) for p in PROMPTS],
                             max_new_tokens=6, eos_id=byte_data.EOS_ID)
    for row, tokens, n in zip(rows, np.asarray(want.tokens), np.asarray(want.lengths)):
        expected = [int(t) for t in tokens[:n] if t != byte_data.EOS_ID]
        assert row["tokens"] == expected
        assert row["completion"] == byte_data.decode_ids(expected)


def test_a_model_export_generates_with_the_plain_decoder(composition_export):
    root, _, params = composition_export
    rows = generate.run(["--model", str(root / "anchor"), "--tokenizer", "bytes", "--prompt",
                         "abc", "--max_new_tokens", "4", "--temperature", "0.7", "--seed", "3"])
    want = decoding.generate(Decoder(ANCHOR), params["anchor"], [byte_data.encode_text("abc")],
                             max_new_tokens=4, eos_id=byte_data.EOS_ID,
                             sampling=decoding.SamplingConfig(temperature=0.7),
                             rng=jax.random.key(3))
    n = int(want.lengths[0])
    assert rows[0]["tokens"] == [int(t) for t in np.asarray(want.tokens)[0, :n]
                                 if t != byte_data.EOS_ID]


def test_bad_arguments_are_named(composition_export, tmp_path):
    root, _, _ = composition_export
    with pytest.raises(ValueError, match=r"--tokenizer: expected 'bytes' .*; got 'auto', and "
                                         r".*anchor has no tokenizer/"):
        generate.run(["--model", str(root / "export"), "--prompt", "a"])
    with pytest.raises(ValueError, match=r"--prompt: expected text that encodes to at least one "
                                         r"token, got ''"):
        generate.run(["--model", str(root / "export"), "--tokenizer", "bytes", "--prompt", ""])
    with pytest.raises(ValueError, match=r"max_new_tokens: expected at most"):
        generate.run(["--model", str(root / "export"), "--tokenizer", "bytes", "--prompt", "a",
                      "--max_new_tokens", "100"])


def test_the_command_line_reports_a_directory_that_is_no_export(tmp_path):
    result = subprocess.run([sys.executable, "-m", "calm_jax.generate", "--model",
                             str(tmp_path), "--prompt", "a"], capture_output=True, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --model: expected a composition export (composition.json) or a model export "
        f"(config.json), got {str(tmp_path)!r}, which holds neither")


# Across tokenizers: the anchor reads bytes, the augment a BPE saved beside its own export. ----


@pytest.fixture(scope="module")
def cross_export(tmp_path_factory):
    hf = pytest.importorskip("tokenizers", reason="the [convert] extra builds BPE tokenizers")
    from calm_jax.composition import CompositionConfig
    from calm_jax.convert import save_converted
    from calm_jax.tokenizers import Tokenizer

    root = tmp_path_factory.mktemp("generate_cross")
    words = "the cat sat on a mat and then ran far away".split()
    rng = np.random.default_rng(0)
    hf_tok = hf.Tokenizer(hf.models.BPE())
    hf_tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tok.decoder = hf.decoders.ByteLevel()
    hf_tok.train_from_iterator(
        [" ".join(rng.choice(words, 8)) for _ in range(200)],
        hf.trainers.BpeTrainer(vocab_size=290, special_tokens=[], show_progress=False,
                               initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet()))
    (root / "bpe").mkdir()
    hf_tok.save(str(root / "bpe" / "tokenizer.json"))
    bpe = Tokenizer.load(str(root / "bpe"))
    augment = AUGMENT.replace(vocab_size=bpe.vocab_size, max_len=128)
    model = ComposedLM(ANCHOR, {"b": augment}, CompositionConfig(shared_vocabulary=False))
    params = nn.unbox(model.init(jax.random.key(0)))
    params["composition"] = jax.tree.map(
        lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), params["composition"])
    ckpt.save_model(str(root / "anchor"), ANCHOR, params["anchor"])
    save_converted(str(root / "augment"), augment, jax.tree.map(np.asarray, params["augments"]["b"]),
                   tokenizer=bpe)
    ckpt.save_model(str(root / "bare"), augment, params["augments"]["b"])  # no tokenizer/
    fingerprints = {"anchor": ckpt.params_fingerprint(ANCHOR, params["anchor"]),
                    "augments['b']": ckpt.params_fingerprint(augment, params["augments"]["b"])}
    for name, source in (("export", "augment"), ("bare_export", "bare")):
        save_composition(str(root / name), params["composition"], model=model,
                         frozen={"anchor": params["anchor"], "augments": params["augments"]},
                         sources={"anchor": str(root / "anchor"),
                                  "augments": {"b": str(root / source)}},
                         fingerprints=fingerprints)
    return root, model, params, bpe


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_cross_tokenizer_export_decodes_with_each_models_tokenizer(cross_export, temperature):
    from calm_jax.cross_decoding import generate_text
    from calm_jax.tokenizers import ByteTokenizer

    root, model, params, bpe = cross_export
    prompts = ["the cat sat", "a mat and"]
    rows = generate.run(["--model", str(root / "export"), "--tokenizer", "bytes",
                         "--max_new_tokens", "8", "--temperature", str(temperature),
                         "--seed", "4", *[f"--prompt={p}" for p in prompts]])
    assert [r["prompt"] for r in rows] == prompts
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        want = generate_text(model, params, prompt, anchor_tokenizer=ByteTokenizer(),
                             augment_tokenizers={"b": bpe}, max_new_tokens=8,
                             sampling=decoding.SamplingConfig(temperature=temperature),
                             rng=jax.random.fold_in(jax.random.key(4), i))
        assert row["tokens"] == [t for t in want.tokens if t != byte_data.EOS_ID]
        assert row["completion"] == want.text
    if temperature:
        return
    # The augment's own tokenizer matters: read as bytes, the same export continues otherwise.
    as_bytes = generate.run(["--model", str(root / "export"), "--tokenizer", "bytes",
                             "--augment_tokenizer", "b=bytes", "--max_new_tokens", "8",
                             "--temperature", str(temperature), "--seed", "4",
                             *[f"--prompt={p}" for p in prompts]])
    assert [r["tokens"] for r in as_bytes] != [r["tokens"] for r in rows]


def test_cross_tokenizer_bad_arguments_are_named(cross_export, composition_export):
    root, _, _, _ = cross_export
    with pytest.raises(ValueError, match=r"--augment_tokenizer b: expected 'bytes' .*; got "
                                         r"'auto', and .*bare has no tokenizer/"):
        generate.run(["--model", str(root / "bare_export"), "--tokenizer", "bytes",
                      "--prompt", "a"])
    with pytest.raises(ValueError, match=r"--augment_tokenizer: expected NAME=CHOICE with NAME "
                                         r"one of \['b'\] .*got 'c=bytes'"):
        generate.run(["--model", str(root / "export"), "--tokenizer", "bytes",
                      "--augment_tokenizer", "c=bytes", "--prompt", "a"])
    shared, _, _ = composition_export
    with pytest.raises(ValueError, match=r"--augment_tokenizer: expected none for .*share one "
                                         r"vocabulary"):
        generate.run(["--model", str(shared / "export"), "--tokenizer", "bytes",
                      "--augment_tokenizer", "kv=bytes", "--prompt", "a"])


def test_evaluate_scores_a_cross_tokenizer_export(cross_export, tmp_path):
    from calm_jax import evaluate
    from calm_jax.cross_decoding import generate_text
    from calm_jax.tokenizers import ByteTokenizer

    root, model, params, bpe = cross_export
    prompts = ["the cat sat", "a mat and"]
    want = [generate_text(model, params, p, anchor_tokenizer=ByteTokenizer(),
                          augment_tokenizers={"b": bpe}, max_new_tokens=6).text
            for p in prompts]
    examples = [{"input": prompts[0], "target": want[0]}, {"input": prompts[1], "target": "no"}]
    config = evaluate.EvalConfig(max_new_tokens=6, metrics=("exact_match",))
    results = evaluate.run(model=str(root / "export"),
                           examples=evaluate.ExampleSource(examples=examples),
                           output_dir=str(tmp_path / "eval"), tokenizer="bytes", config=config)
    assert [e["output"] for e in results["examples"]] == want
    assert results["metrics"]["exact_match"] == 50.0
    with pytest.raises(ValueError, match=r"augment_tokenizers: expected \{augmenting model name: "
                                         r"tokenizer\} for a composition across tokenizers"):
        evaluate.evaluate(model, params, examples, tokenizer=ByteTokenizer(), config=config)
    with pytest.raises(ValueError, match=r"config.start_id: expected None for a composition "
                                         r"across tokenizers"):
        evaluate.evaluate(model, params, examples, tokenizer=ByteTokenizer(),
                          augment_tokenizers={"b": bpe},
                          config=evaluate.EvalConfig(max_new_tokens=6, start_id=0))
