r"""Decode and score: `python -m calm_jax.evaluate --gin_file=eval/jsonl.gin --gin.KEY=VALUE ...`.

A model export (`config.json`) or a composition export (`composition.json`) reads prompts built
from examples, continues them with batched cached decoding (`calm_jax.decoding.generate`,
greedy or sampled) and is scored by name: exact match, chrF, chrF++, BLEU (`calm_jax.evaluation`,
sacrebleu) and pass@k (HumanEval in the sandbox). Results go to `results.json` (the config, the
metrics, the metrics per group, every example's prompt, output, reference and scores) and
`results.md`.

Examples (dicts `{"input", "target", optional "group" and "id"}`) come from an `ExampleSource`
and become prompts (k-shot, shots never drawn from the evaluated examples) by a `PromptConfig`:
see `calm_jax.prompts` (both are importable from here too).

Python API: `evaluate(model, params, examples, tokenizer=..., config=EvalConfig(...))` returns
the results dict; `run(...)` (gin-configurable) loads an export and writes the files;
`DecodeEval` is the trainer's hook (`trainer.train(decode_eval=...)`), the same evaluation every
`eval_every` steps and at the end.

Command line: as `calm_jax.train`, gin files (`--gin_file`, repeatable, also looked up under the
repository's `gin/`) configure the keyword-only `run`, and `--gin.KEY=VALUE` adds bindings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from calm_jax import decoding, evaluation, validation
from calm_jax.prompts import (ExampleSource, PromptConfig, build_prompts,  # noqa: F401
                              check_examples, draw_shots, read_jsonl, shot_pool)

log = logging.getLogger("calm_jax")

PASS_AT = re.compile(r"pass@([1-9][0-9]*)$")
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"


# Configuration -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to decode and how to score it.

    Attributes:
      metrics: names among `evaluation.TEXT_METRICS` ("exact_match", "chrf", "chrf++", "bleu";
        percentages in [0, 100]) and "pass@K" (HumanEval, fractions in [0, 1]; K <=
        num_samples; examples' ids are HumanEval task ids).
      prompt: how prompts are built.
      max_new_tokens: tokens generated per prompt (prompt + these must fit every model's
        max_len).
      batch_size: rows decoded together (the last batch is filled up to it: one compile).
      sampling: greedy (default) or sampling (`decoding.SamplingConfig`).
      num_samples: continuations per example (text metrics score the first; pass@K uses all).
      stop: strings that end an output (it is cut before the first one), e.g. ("\n",);
        decoding also stops at the tokenizer's EOS.
      seed: seeds sampling (batch i uses `fold_in(key(seed), i)`).
      start_id: a token id put before every prompt's tokens (e.g. 0 for models trained on
        seqio's shifted decoder inputs, which begin with 0); None: none.
      task_metrics: also run a seqio source's own metric functions (keys "task/<name>").
      sandbox_timeout_s: per-program limit when pass@K runs HumanEval programs.
    """

    metrics: Sequence[str] = ("exact_match",)
    prompt: PromptConfig = PromptConfig()
    max_new_tokens: int = 32
    batch_size: int = 8
    sampling: decoding.SamplingConfig = decoding.SamplingConfig()
    num_samples: int = 1
    stop: Sequence[str] = ()
    seed: int = 0
    start_id: int | None = None
    task_metrics: bool = True
    sandbox_timeout_s: float = 10.0

    def __post_init__(self):
        metrics = (self.metrics,) if isinstance(self.metrics, str) else tuple(self.metrics)
        object.__setattr__(self, "metrics", metrics)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        if not metrics:
            raise ValueError("metrics: expected at least one metric name, got none")
        for name in metrics:
            if name not in evaluation.TEXT_METRICS and not PASS_AT.match(str(name)):
                raise ValueError(f"metrics: expected names among "
                                 f"{list(evaluation.TEXT_METRICS)} or 'pass@K' (K >= 1), "
                                 f"got {name!r}")
        for field in ("max_new_tokens", "batch_size", "num_samples"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field}: expected a positive integer, got {value!r}")
        for k in self.pass_at:
            if k > self.num_samples:
                raise ValueError(f"metrics: pass@{k} needs at least {k} samples per example, "
                                 f"got num_samples={self.num_samples}")
        if self.num_samples > 1 and self.sampling.greedy:
            raise ValueError(f"num_samples: expected 1 with greedy decoding (every sample "
                             f"would be the same), got {self.num_samples}; set "
                             f"sampling.temperature > 0")
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop: expected non-empty strings, got {list(stop)!r}")
        if not isinstance(self.prompt, PromptConfig):
            raise ValueError(f"prompt: expected a PromptConfig, got {type(self.prompt).__name__}")
        if not isinstance(self.sampling, decoding.SamplingConfig):
            raise ValueError(f"sampling: expected a decoding.SamplingConfig, got "
                             f"{type(self.sampling).__name__}")

    @property
    def pass_at(self) -> list[int]:
        return [int(PASS_AT.match(m).group(1)) for m in self.metrics if PASS_AT.match(m)]

    @property
    def text_metrics(self) -> list[str]:
        return [m for m in self.metrics if m in evaluation.TEXT_METRICS]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Decoding and scoring ------------------------------------------------------------------------


@dataclasses.dataclass
class Prepared:
    """Examples with their prompts as text and token ids, ready to decode."""

    examples: list[dict[str, str]]
    prompts: list[str]
    prompt_ids: list[list[int]]
    config: EvalConfig
    tokenizer: Any
    task_metric_fns: list[Callable] = dataclasses.field(default_factory=list)
    # {name: tokenizer} of a composition across tokenizers (each augment reads the prompt's
    # text through its own); None: one token stream.
    augment_tokenizers: Mapping[str, Any] | None = None


def _max_len(model) -> int:
    return min(cfg.max_len for _, cfg in decoding._configs(model))


def prepare(model, examples: Sequence[Mapping[str, Any]], *, tokenizer,
            config: EvalConfig = EvalConfig(),
            shots: Sequence[Mapping[str, Any]] | None = None,
            task_metric_fns: Sequence[Callable] = (),
            augment_tokenizers: Mapping[str, Any] | None = None) -> Prepared:
    """Checks the examples, builds and tokenizes every prompt, and checks that each fits the
    model with `config.max_new_tokens` new tokens; ValueError naming the example otherwise.
    `augment_tokenizers` ({name: tokenizer}) is required by, and only by, a composition across
    tokenizers (`shared_vocabulary=False`). Runs nothing on a device."""
    if not isinstance(config, EvalConfig):
        raise ValueError(f"config: expected an EvalConfig, got {type(config).__name__}")
    cross = _crosses_tokenizers(model)
    if cross and augment_tokenizers is None:
        raise ValueError("augment_tokenizers: expected {augmenting model name: tokenizer} for a "
                         "composition across tokenizers (shared_vocabulary=False), got None")
    if not cross and augment_tokenizers is not None:
        raise ValueError("augment_tokenizers: expected None for a model that reads one token "
                         "stream, got tokenizers for " + repr(sorted(augment_tokenizers)))
    if cross and config.start_id is not None:
        raise ValueError(f"config.start_id: expected None for a composition across tokenizers "
                         f"(each model reads the prompt's text), got {config.start_id}")
    examples = check_examples(examples)
    if not examples:
        raise ValueError("examples: expected at least one example, got none")
    if config.pass_at:
        missing = [i for i, e in enumerate(examples) if "id" not in e]
        if missing:
            raise ValueError(f"examples[{missing[0]}].id: expected a HumanEval task id for "
                             f"metrics {config.metrics}, got none")
    prompts = build_prompts(examples, config.prompt, shots)
    start = [] if config.start_id is None else [int(config.start_id)]
    ids = [start + list(tokenizer.encode(p)) for p in prompts]
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise ValueError(f"examples[{empty[0]}]: expected a prompt of at least one token, got "
                         f"{prompts[empty[0]]!r}")
    width = max(len(x) for x in ids)
    right = np.zeros((len(ids), width), np.int64)
    for i, x in enumerate(ids):
        right[i, :len(x)] = x
    validation.check_tokens(right, vocab_size=decoding._vocab_size(model),
                            name="prompt tokens [example, position]",
                            valid=np.arange(width)[None, :] < np.array([len(x) for x in ids])[:, None])
    room = _max_len(model) - config.max_new_tokens
    longest = max(range(len(ids)), key=lambda i: len(ids[i]))
    if len(ids[longest]) > room:
        raise ValueError(f"examples[{longest}]: its prompt has {len(ids[longest])} tokens; "
                         f"expected at most max_len - max_new_tokens = {_max_len(model)} - "
                         f"{config.max_new_tokens} = {room} (use fewer shots, shorter "
                         f"inputs or fewer new tokens)")
    return Prepared(examples, prompts, ids, config, tokenizer, list(task_metric_fns),
                    None if augment_tokenizers is None else dict(augment_tokenizers))


def _crosses_tokenizers(model) -> bool:
    from calm_jax.generate import crosses_tokenizers

    return crosses_tokenizers(model)


def _gather(x) -> np.ndarray:
    """A decode output on this host (all of it, also when its array spans processes)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x))


def _cut(text: str, stop: Sequence[str]) -> str:
    ends = [text.find(s) for s in stop if s in text]
    return text[:min(ends)] if ends else text


def decode(model, params, prepared: Prepared) -> list[list[str]]:
    """Every example's `num_samples` continuations as text (cut at the first stop string),
    decoded `batch_size` rows at a time with one compiled program: every batch is a
    [batch_size, longest prompt] array. A composition across tokenizers decodes `batch_size`
    rows at a time too (`calm_jax.cross_decoding.generate_texts`: each row exactly as
    `generate_text` decodes it alone; row i, in example order, sampled with
    `fold_in(key(seed), i)`)."""
    config, tokenizer = prepared.config, prepared.tokenizer
    if prepared.augment_tokenizers is not None:
        return _decode_cross(model, params, prepared)
    rows = [ids for ids in prepared.prompt_ids for _ in range(config.num_samples)]
    width = max(len(r) for r in rows)
    eos = getattr(tokenizer, "eos_id", None)
    pad = getattr(tokenizer, "pad_id", None)
    pad = 0 if pad is None else int(pad)
    texts: list[str] = []
    size = config.batch_size
    for index, begin in enumerate(range(0, len(rows), size)):
        chunk = rows[begin:begin + size]
        filled = chunk + [chunk[-1]] * (size - len(chunk))
        tokens = np.full((size, width), pad, np.int32)
        for i, r in enumerate(filled):
            tokens[i, :len(r)] = r
        result = decoding.generate(
            model, params, tokens, lengths=np.array([len(r) for r in filled], np.int32),
            max_new_tokens=config.max_new_tokens, sampling=config.sampling, eos_id=eos,
            pad_id=pad, rng=jax.random.fold_in(jax.random.key(config.seed), index))
        out, lengths = _gather(result.tokens), _gather(result.lengths)
        for i in range(len(chunk)):
            new = [int(t) for t in out[i, :lengths[i]] if eos is None or int(t) != eos]
            texts.append(_cut(tokenizer.decode(new), config.stop))
    n = config.num_samples
    return [texts[i * n:(i + 1) * n] for i in range(len(prepared.examples))]


def _decode_cross(model, params, prepared: Prepared) -> list[list[str]]:
    from calm_jax import alignment, cross_decoding

    config, n = prepared.config, prepared.config.num_samples
    rows = [(prompt, e * n + k) for e, prompt in enumerate(prepared.prompts) for k in range(n)]
    # One cache size for every batch (and the last batch filled up): compiled once.
    cache_len = config.max_new_tokens + max(
        len(alignment.tokenize(prepared.tokenizer, p)[0]) for p in prepared.prompts)
    augment_len = max(cross_decoding.default_augment_len(model, p, config.max_new_tokens)
                      for p in prepared.prompts)
    key = jax.random.key(config.seed)
    texts: list[str] = []
    size = config.batch_size
    for begin in range(0, len(rows), size):
        chunk = rows[begin:begin + size]
        filled = chunk + [chunk[-1]] * (size - len(chunk))
        results = cross_decoding.generate_texts(
            model, params, [prompt for prompt, _ in filled],
            anchor_tokenizer=prepared.tokenizer, augment_tokenizers=prepared.augment_tokenizers,
            max_new_tokens=config.max_new_tokens, sampling=config.sampling,
            rngs=[jax.random.fold_in(key, i) for _, i in filled], cache_len=cache_len,
            augment_len=augment_len)
        texts += [_cut(r.text, config.stop) for r in results[:len(chunk)]]
    return [texts[i * n:(i + 1) * n] for i in range(len(prepared.examples))]


def _groups(examples: Sequence[Mapping[str, str]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        if "group" in e:
            out.setdefault(e["group"], []).append(i)
    return out


def score(prepared: Prepared, outputs: Sequence[Sequence[str]]) -> dict[str, Any]:
    """The results dict of decoded `outputs` (see `evaluate`)."""
    config, examples = prepared.config, prepared.examples
    first = [o[0] for o in outputs]
    references = [e["target"] for e in examples]
    per_example: list[dict[str, float]] = [{} for _ in examples]
    metrics: dict[str, float] = {}
    for name in config.text_metrics:
        metrics[name] = evaluation.corpus_score(name, first, references)
        for row, value in zip(per_example, evaluation.sentence_scores(name, first, references)):
            row[name] = value
    passed: list[int] | None = None
    if config.pass_at:
        samples: dict[str, list[str]] = {}
        for e, o in zip(examples, outputs):
            if e["id"] in samples:
                raise ValueError(f"examples: expected each HumanEval task id once for pass@k, "
                                 f"got {e['id']!r} twice")
            samples[e["id"]] = list(o)
        runs = evaluation.run_humaneval_samples(samples, timeout_s=config.sandbox_timeout_s)
        passed = [sum(r.passed for r in runs[e["id"]]) for e in examples]
        for k in config.pass_at:
            metrics[f"pass@{k}"] = evaluation.mean_pass_at_k(
                [config.num_samples] * len(examples), passed, k)
            for row, c in zip(per_example, passed):
                row[f"pass@{k}"] = evaluation.pass_at_k(config.num_samples, c, k)
    for fn in prepared.task_metric_fns:
        for key, value in fn(references, first).items():
            metrics[f"task/{key}"] = float(value)

    groups = {}
    for group, members in sorted(_groups(examples).items()):
        g: dict[str, float] = {"count": len(members)}
        for name in config.text_metrics:
            g[name] = evaluation.corpus_score(name, [first[i] for i in members],
                                              [references[i] for i in members])
        for k in config.pass_at:
            g[f"pass@{k}"] = evaluation.mean_pass_at_k(
                [config.num_samples] * len(members), [passed[i] for i in members], k)
        groups[group] = g

    records = []
    for i, (e, prompt, out) in enumerate(zip(examples, prepared.prompts, outputs)):
        record = {"index": i, **{k: e[k] for k in ("id", "group") if k in e},
                  "input": e["input"], "prompt": prompt, "output": out[0],
                  "reference": e["target"], "scores": per_example[i]}
        if config.num_samples > 1:
            record["outputs"] = list(out)
        if passed is not None:
            record["passed"] = passed[i]
        records.append(record)
    return {"config": config.to_dict(), "num_examples": len(examples), "metrics": metrics,
            "groups": groups, "examples": records}


def evaluate(model, params, examples: Sequence[Mapping[str, Any]], *, tokenizer,
             config: EvalConfig = EvalConfig(),
             shots: Sequence[Mapping[str, Any]] | None = None,
             task_metric_fns: Sequence[Callable] = (),
             augment_tokenizers: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Decodes a prompt for every example and scores the outputs.

    Args:
      model: a `Decoder` or a `ComposedLM`.
      params: its parameters, as `decoding.generate` takes them.
      examples: dicts {"input", "target", optional "group" and "id"}.
      tokenizer: `encode(text) -> ids`, `decode(ids) -> text`, `eos_id` (None: no early stop)
        and `pad_id` (e.g. `calm_jax.tokenizers.ByteTokenizer()` or a converted model's).
      config: what to decode and score.
      shots: where k-shot prompts draw their shots (e.g. the training split).
      task_metric_fns: seqio-style `fn(targets, predictions) -> dict` run on the first
        outputs, reported as "task/<key>".
      augment_tokenizers: {name: tokenizer} of every augmenting model of a composition across
        tokenizers (`shared_vocabulary=False`); else None.

    Returns:
      {"config", "num_examples", "metrics" {name: value}, "groups" {group: {"count", name:
      value}}, "examples" [{"index", "id"?, "group"?, "input", "prompt", "output",
      "reference", "scores" {name: value}, "outputs"? (num_samples > 1), "passed"? (pass@K)}]}.
    """
    prepared = prepare(model, examples, tokenizer=tokenizer, config=config, shots=shots,
                       task_metric_fns=task_metric_fns, augment_tokenizers=augment_tokenizers)
    return score(prepared, decode(model, params, prepared))


# Reports -------------------------------------------------------------------------------------


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", "\\n")


def _format(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.4g}" if abs(value) < 1 else (
        f"{value:.2f}")


def markdown(results: Mapping[str, Any], *, title: str = "Evaluation",
             max_examples: int | None = None) -> str:
    """A Markdown report of `results`: the metrics, the metrics per group, the first
    example's full prompt and a table of the examples (all, or the first `max_examples`)."""
    lines = [f"# {title}", ""]
    for key in ("model", "examples_source"):
        if key in results:
            lines.append(f"- {key.replace('_', ' ')}: `{results[key]}`")
    lines += [f"- examples: {results['num_examples']}", "", "## Metrics", "",
              "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_format(v)} |" for k, v in results["metrics"].items()]
    if results["groups"]:
        names = [k for k in next(iter(results["groups"].values())) if k != "count"]
        lines += ["", "## By group", "", "| group | count | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 2) + "|"]
        for group, g in results["groups"].items():
            lines.append(f"| {_md_cell(group)} | {g['count']} | "
                         + " | ".join(_format(g[n]) for n in names) + " |")
    records = results["examples"]
    if records:
        lines += ["", "## The first example's prompt", "", "```", records[0]["prompt"], "```"]
    shown = records if max_examples is None else records[:max_examples]
    score_names = list(records[0]["scores"]) if records else []
    heading = (f"## Examples ({len(shown)} of {len(records)}; every prompt is in "
               f"{RESULTS_JSON})")
    lines += ["", heading, "",
              "| # | group | input | output | reference | " + " | ".join(score_names) + " |",
              "|---" * (5 + len(score_names)) + "|"]
    for r in shown:
        lines.append(f"| {r['index']} | {_md_cell(r.get('group', ''))} | "
                     f"{_md_cell(r['input'])} | {_md_cell(r['output'])} | "
                     f"{_md_cell(r['reference'])} | "
                     + " | ".join(_format(r["scores"][n]) for n in score_names) + " |")
    return "\n".join(lines) + "\n"


def write_results(results: Mapping[str, Any], directory: str, *, title: str = "Evaluation",
                  max_examples: int | None = None) -> dict[str, str]:
    """Writes `results.json` and `results.md` into `directory`; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = {"json": os.path.join(directory, RESULTS_JSON),
             "markdown": os.path.join(directory, RESULTS_MD)}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, ensure_ascii=False, default=str)
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(markdown(results, title=title, max_examples=max_examples))
    return paths


# Entry points --------------------------------------------------------------------------------


def load_model(directory: str, dtype: str | None = None):
    """(model, params, where a converted tokenizer would be) of a model or composition export
    (`calm_jax.generate.load_model`)."""
    from calm_jax import generate

    try:
        return generate.load_model(os.path.abspath(directory), dtype)
    except ValueError as e:
        raise ValueError(str(e).replace("--model:", "model:", 1)) from None


def load_tokenizer(choice: str, beside: str | None):
    """"bytes", "auto" (the tokenizer saved beside the model, or its anchor) or a converted
    model's directory (`calm_jax.generate.load_tokenizer`)."""
    from calm_jax import generate

    if choice == "auto" and beside is None:
        raise ValueError("tokenizer: expected 'bytes' or a converted model's directory (the "
                         "model was not loaded from an export, so there is no tokenizer "
                         "beside it), got 'auto'")
    try:
        return generate.load_tokenizer(choice, beside)
    except ValueError as e:
        raise ValueError(str(e).replace("--tokenizer:", "tokenizer:", 1)) from None


def run(*, model: str, examples: ExampleSource, output_dir: str,
        config: EvalConfig = EvalConfig(), shots: ExampleSource | None = None,
        tokenizer: str = "auto", dtype: str | None = None,
        markdown_examples: int | None = None,
        augment_tokenizers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Evaluates the export in `model` on `examples` and writes `results.json` and `results.md`
    into `output_dir` (process 0). `shots` feeds k-shot prompts; `tokenizer` is "auto",
    "bytes" or a converted model's directory; `dtype` the compute dtype of every model (e.g.
    "float32" on a CPU); `markdown_examples` caps the examples shown in the Markdown. A
    composition export across tokenizers gives each augmenting model the tokenizer beside its
    own export, or `augment_tokenizers` {name: "auto", "bytes" or a converted model's
    directory}."""
    if not isinstance(examples, ExampleSource):
        raise ValueError(f"examples: expected an ExampleSource, got {type(examples).__name__}")
    if shots is not None and not isinstance(shots, ExampleSource):
        raise ValueError(f"shots: expected an ExampleSource or None, got "
                         f"{type(shots).__name__}")
    rows = examples.load()
    shot_rows = shots.load() if shots is not None else None
    loaded, params, beside = load_model(model, dtype)
    tok = load_tokenizer(tokenizer, beside)
    augment_toks = None
    if _crosses_tokenizers(loaded):
        from calm_jax import generate

        augment_toks = generate.load_augment_tokenizers(
            os.path.abspath(model), augment_tokenizers, flag="augment_tokenizers")
    elif augment_tokenizers:
        raise ValueError(f"augment_tokenizers: expected None for {os.path.abspath(model)}, "
                         f"whose models share one vocabulary, got {augment_tokenizers!r}")
    fns = examples.metric_fns() if config.task_metrics else []
    results = evaluate(loaded, params, rows, tokenizer=tok, config=config, shots=shot_rows,
                       task_metric_fns=fns, augment_tokenizers=augment_toks)
    results = {"model": os.path.abspath(model), "output_dir": os.path.abspath(output_dir),
               "examples_source": examples.describe(),
               **({"shots_source": shots.describe()} if shots is not None else {}), **results}
    if jax.process_index() == 0:
        paths = write_results(results, output_dir, max_examples=markdown_examples,
                              title=f"Evaluation of {os.path.basename(os.path.abspath(model))}")
        log.info("metrics %s; wrote %s", json.dumps(results["metrics"]), paths["json"])
    return results


@dataclasses.dataclass(frozen=True)
class DecodeEval:
    """The trainer's decode-and-score evaluation (`trainer.train(decode_eval=...)`): the
    trained model evaluated on `examples` every `eval_every` steps and at the end, its metrics
    logged as "decode_eval/<name>". With `write_results`, process 0 also writes
    `<model_dir>/decode_eval/step_<N>/results.{json,md}`. `tokenizer` "auto" takes the one
    beside the anchor's export. `augment_tokenizers`, for a composition across tokenizers
    only: "auto" gives every augmenting model the tokenizer beside its own export, {name:
    "auto", "bytes" or a converted model's directory} picks some (the others "auto")."""

    examples: ExampleSource
    config: EvalConfig = EvalConfig()
    shots: ExampleSource | None = None
    tokenizer: str = "auto"
    write_results: bool = True
    augment_tokenizers: Mapping[str, str] | str = "auto"

    def prepare(self, model, *, tokenizer_dir: str | None,
                output_dir: str | None = None,
                augment_dirs: Mapping[str, str | None] | None = None
                ) -> Callable[[Any, Any, int], dict[str, float]]:
        """Loads the examples and tokenizers and builds the prompts now (bad settings fail
        before training starts); returns `fn(model, params, step) -> metrics`.
        `augment_dirs` {name: export directory or None} are where each augmenting model was
        loaded from (its "auto" tokenizer lies beside it)."""
        for field in ("examples", "shots"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, ExampleSource):
                raise ValueError(f"decode_eval.{field}: expected an ExampleSource, got "
                                 f"{type(value).__name__}")
        try:
            tok = load_tokenizer(self.tokenizer, tokenizer_dir)
        except ValueError as e:
            raise ValueError(f"decode_eval.{e}") from None
        augment_toks = self._augment_tokenizers(model, augment_dirs or {})
        fns = self.examples.metric_fns() if self.config.task_metrics else []
        prepared = prepare(model, self.examples.load(), tokenizer=tok, config=self.config,
                           shots=self.shots.load() if self.shots is not None else None,
                           task_metric_fns=fns, augment_tokenizers=augment_toks)

        def run_eval(model, params, step: int) -> dict[str, float]:
            results = score(prepared, decode(model, params, prepared))
            if self.write_results and output_dir and jax.process_index() == 0:
                write_results({"step": int(step), "examples_source": self.examples.describe(),
                               **results}, os.path.join(output_dir, f"step_{int(step)}"),
                              title=f"Evaluation at step {int(step)}")
            return results["metrics"]

        return run_eval

    def _augment_tokenizers(self, model, augment_dirs: Mapping[str, str | None]
                            ) -> dict[str, Any] | None:
        """{name: tokenizer} for a composition across tokenizers, else None (after checking
        that `augment_tokenizers` asks for none)."""
        field, choice = "decode_eval.augment_tokenizers", self.augment_tokenizers
        if not _crosses_tokenizers(model):
            if choice != "auto":
                raise ValueError(f"{field}: expected 'auto' for a model that reads one token "
                                 f"stream (no composition across tokenizers), got {choice!r}")
            return None
        if isinstance(choice, str):
            if choice != "auto":
                raise ValueError(f"{field}: expected 'auto' or {{augmenting model name: "
                                 f"'auto', 'bytes' or a converted model's directory}}, got "
                                 f"{choice!r}")
            choice = {}
        elif not isinstance(choice, Mapping):
            raise ValueError(f"{field}: expected 'auto' or {{augmenting model name: 'auto', "
                             f"'bytes' or a converted model's directory}}, got "
                             f"{type(choice).__name__}")
        from calm_jax import generate

        return generate.pick_augment_tokenizers(model.augment_configs, choice,
                                                lambda name: augment_dirs.get(name), flag=field)


def trainer_hook(decode_eval, mode: str, *, anchor, augments: Mapping[str, Any],
                 composition, lora, model_dir: str):
    """`trainer.train`'s `decode_eval` as `fn(step, trained params, frozen trees,
    export_params) -> {"decode_eval/<name>": value}`.

    It builds the model and the full tree the decoding functions take: the decoder with the
    exported tree (`export_params`: no multi-token heads; modes pretrain and finetune), the
    anchor with the LoRA adapters merged (lora), or the `ComposedLM` with
    `{**frozen, "composition": params}` (compose; split per connection when the frozen trees
    are held per layer). `anchor` and `augments` are the run's `trainer.ModelSpec`s; a
    `DecodeEval` loads its examples and tokenizers ("auto": the one beside the anchor's export,
    and across tokenizers each augmenting model's beside its own) and builds its prompts
    here.
    """
    from calm_jax import lora as lora_lib
    from calm_jax.composition import ComposedLM
    from calm_jax.models import Decoder
    from calm_jax.models.transformer import layers_unstacked

    anchor_cfg = anchor.resolve("anchor")
    model = Decoder(anchor_cfg) if mode != "compose" else ComposedLM(
        anchor_cfg, {name: spec.resolve(f"augments[{name!r}]") for name, spec in augments.items()},
        composition)
    if isinstance(decode_eval, DecodeEval):
        fn = decode_eval.prepare(
            model, tokenizer_dir=anchor.checkpoint,
            output_dir=os.path.join(model_dir, "decode_eval"),
            augment_dirs={name: spec.checkpoint for name, spec in augments.items()})
    elif callable(decode_eval):
        fn = decode_eval
    else:
        raise ValueError(f"decode_eval: expected a calm_jax.evaluate.DecodeEval or a callable "
                         f"(model, params, step) -> metrics, got {type(decode_eval).__name__}")

    def full_params(params, frozen, export_params):
        if mode == "compose":
            full = {**frozen, "composition": params}
            if layers_unstacked(frozen["anchor"]):
                full = decoding.unstack_params(model, full)
            return full
        if mode == "lora":
            return lora_lib.merge(frozen["anchor"], params, lora)
        return export_params(params)

    def hook(step: int, params, frozen, export_params) -> dict[str, float]:
        metrics = fn(model, full_params(params, frozen, export_params), step)
        return {f"decode_eval/{k}": float(v) for k, v in metrics.items()}

    return hook


PROG = "python -m calm_jax.evaluate"
USAGE = f"""usage: {PROG} --gin_file=FILE [--gin_file=...] [--gin.KEY=VALUE ...]

Decodes and scores what the gin files configure (calm_jax.evaluate.run), writing results.json,
results.md and config.gin into its output_dir. Flags are those of python -m calm_jax.train:
--gin_file (repeatable; also looked up under --gin_search_paths and the shipped gin folder),
--gin.KEY=VALUE (short for --gin_bindings='KEY = VALUE'; strings need gin quotes:
--gin.OUTPUT_DIR="'/tmp/eval'"), --gin_search_paths, and the multi-process flags.
Example: {PROG} --gin_file=eval/jsonl.gin --gin.MODEL="'/tmp/run/export'" \\
  --gin.EXAMPLES="'/data/test.jsonl'" --gin.OUTPUT_DIR="'/tmp/run/eval'"
"""


def main(argv: Sequence[str]) -> dict[str, Any]:
    """Parses the command line as `calm_jax.train` does (`train.parse_args`, gin files and
    bindings, multi-process flags) and runs the configured `run()`; `--help` prints the usage.
    The gin configuration is written to `<output_dir>/config.gin`."""
    from calm_jax import train

    if train.wants_help(argv):
        print(USAGE)
        return {}
    args = train.parse_args(argv)
    import gin

    from calm_jax import distributed

    distributed.initialize(**args.distributed)  # before anything touches a device
    train.parse_gin_args(args)
    results = gin.get_configurable(run)()
    if jax.process_index() == 0:
        with open(os.path.join(results["output_dir"], "config.gin"), "w") as f:
            f.write(gin.config_str())
    return results


if __name__ == "__main__":
    from calm_jax import evaluate as registered  # gin knows this module's `run`, not __main__'s
    from calm_jax.train import run_cli

    run_cli(registered.main)
