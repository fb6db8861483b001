"""Evaluation examples and the prompts built from them (`calm_jax.evaluate` decodes them).

An example is a dict `{"input": str, "target": str, "group": str (optional), "id": str
(optional)}`. `ExampleSource` reads them from a JSONL file, a seqio task's split (its text
features "inputs" and "targets"), HumanEval's problems, or a Python list.

A prompt (`PromptConfig`) is `prefix`, then `num_shots` solved examples ("shots", written with
`shot_template`), then the example (`template`), joined by `separator`. Shots come from their
own source (a training split or file) and are drawn with seeded numpy generators, so the same
config gives the same prompts; a shot whose input (or id) is one of the evaluated examples' is
never drawn (`shot_pool`).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from calm_jax import evaluation
from calm_jax.data import json_object

SHOT_SELECTIONS = ("fixed", "per_example")


# Examples ------------------------------------------------------------------------------------


def check_examples(examples: Any, what: str = "examples") -> list[dict[str, str]]:
    """`examples` as a list of {"input", "target", and "group"/"id" when given} dicts of
    strings (ids as given, made str); ValueError naming the first bad entry."""
    if isinstance(examples, (str, bytes, Mapping)) or not isinstance(examples, Sequence):
        raise ValueError(f"{what}: expected a list of dicts with 'input' and 'target', got "
                         f"{type(examples).__name__}")
    out = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, Mapping):
            raise ValueError(f"{what}[{i}]: expected a dict with 'input' and 'target', got "
                             f"{type(ex).__name__}")
        row = {}
        for key in ("input", "target"):
            if not isinstance(ex.get(key), str):
                raise ValueError(f"{what}[{i}].{key}: expected a str, got "
                                 f"{type(ex.get(key)).__name__} {ex.get(key)!r:.60}")
            row[key] = ex[key]
        for key in ("group", "id"):
            if ex.get(key) is not None:
                if not isinstance(ex[key], (str, int)) or isinstance(ex[key], bool):
                    raise ValueError(f"{what}[{i}].{key}: expected a str (or an int id), got "
                                     f"{type(ex[key]).__name__}")
                row[key] = str(ex[key])
        out.append(row)
    return out


def read_jsonl(path: str, *, input_key: str = "input", target_key: str = "target",
               group_key: str = "group", id_key: str = "id") -> list[dict[str, str]]:
    """Examples from a JSONL file: one JSON object per non-empty line, its `input_key` and
    `target_key` strings and, when present, `group_key` and `id_key`."""
    if not os.path.isfile(path):
        raise ValueError(f"jsonl: expected an existing JSONL file, got {path!r}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json_object(line, f"{path}:{number}: expected a JSON object")
            rows.append({"input": record.get(input_key), "target": record.get(target_key),
                         "group": record.get(group_key), "id": record.get(id_key)})
    if not rows:
        raise ValueError(f"jsonl: expected at least one example in {path}, got none")
    return check_examples(rows, f"{path}: examples")


def seqio_examples(name: str, split: str, *, input_key: str = "inputs",
                   target_key: str = "targets", group_key: str = "group", id_key: str = "id",
                   max_examples: int | None = None) -> list[dict[str, str]]:
    """Examples from a registered seqio task or mixture's split, in order, unshuffled: the text
    of its `input_key` and `target_key` features (their "_pretokenized" copies when the task
    tokenizes, else the feature itself, decoded with the task's vocabulary when it is ids).
    Needs seqio (and TensorFlow)."""
    from calm_jax import seqio_utils  # only here: the core runs without TensorFlow

    task = seqio_utils.get_task(name)
    if split not in task.splits:
        raise ValueError(f"split: expected one of {sorted(task.splits)} for {name!r}, "
                         f"got {split!r}")
    ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1,
                          use_cached=False)
    if max_examples is not None:
        ds = ds.take(max_examples)
    features = task.output_features

    def text(record, key: str, required: bool) -> str | None:
        for k in (f"{key}_pretokenized", key):
            value = record.get(k)
            if isinstance(value, bytes):
                return value.decode("utf-8")
            if isinstance(value, np.ndarray) and value.dtype.kind in "iu" and key in features:
                return features[key].vocabulary.decode(value.tolist())  # token ids
            if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                return str(value)  # a numeric id
        if required:
            raise ValueError(f"task {name!r}: expected a text feature {key!r} (or "
                             f"{key}_pretokenized), got features {sorted(record)}")
        return None

    rows = [{"input": text(r, input_key, True), "target": text(r, target_key, True),
             "group": text(r, group_key, False), "id": text(r, id_key, False)}
            for r in ds.as_numpy_iterator()]
    if not rows:
        raise ValueError(f"task {name!r}: split {split!r} has no examples")
    return check_examples(rows, f"task {name!r} examples")


def humaneval_examples() -> list[dict[str, str]]:
    """HumanEval's problems as examples: input = the prompt, target = the canonical solution,
    id = the task id (`evaluation.humaneval_problems`)."""
    return [{"input": p["prompt"], "target": p["canonical_solution"], "id": task_id}
            for task_id, p in evaluation.humaneval_problems().items()]


@dataclasses.dataclass(frozen=True)
class ExampleSource:
    """Where examples come from: exactly one of `jsonl`, `task`, `humaneval` or `examples`.

    Attributes:
      jsonl: a JSONL file, one object per line.
      task: a seqio task or mixture name (read with `split`).
      humaneval: HumanEval's 164 problems (for pass@k).
      examples: the examples themselves, a list of dicts (Python callers).
      split: the seqio split.
      max_examples: keep the first that many (None: all).
      input_key, target_key: the field (JSONL) or text feature (seqio) names; None: "input"
        and "target" for JSONL, "inputs" and "targets" for seqio.
      group_key, id_key: the optional group and id fields / features.
      module: a module imported first (the one that registers a seqio task, e.g. "tasks").
    """

    jsonl: str | None = None
    task: str | None = None
    humaneval: bool = False
    examples: Sequence[Mapping[str, Any]] | None = None
    split: str = "validation"
    max_examples: int | None = None
    input_key: str | None = None
    target_key: str | None = None
    group_key: str = "group"
    id_key: str = "id"
    module: str | None = None

    def __post_init__(self):
        given = [k for k in ("jsonl", "task", "humaneval", "examples")
                 if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"ExampleSource: expected exactly one of jsonl, task, humaneval "
                             f"or examples, got {given or 'none'}")
        if self.max_examples is not None and (not isinstance(self.max_examples, int)
                                              or self.max_examples < 1):
            raise ValueError(f"ExampleSource.max_examples: expected None or a positive "
                             f"integer, got {self.max_examples!r}")

    def describe(self) -> str:
        if self.jsonl is not None:
            return f"jsonl {self.jsonl}"
        if self.task is not None:
            return f"seqio {self.task}:{self.split}"
        return "humaneval" if self.humaneval else "examples"

    def load(self) -> list[dict[str, str]]:
        if self.module:
            importlib.import_module(self.module)
        if self.jsonl is not None:
            rows = read_jsonl(self.jsonl, input_key=self.input_key or "input",
                              target_key=self.target_key or "target",
                              group_key=self.group_key, id_key=self.id_key)
        elif self.task is not None:
            rows = seqio_examples(self.task, self.split, input_key=self.input_key or "inputs",
                                  target_key=self.target_key or "targets",
                                  group_key=self.group_key, id_key=self.id_key,
                                  max_examples=self.max_examples)
        elif self.humaneval:
            rows = humaneval_examples()
        else:
            rows = check_examples(list(self.examples))
        return rows[:self.max_examples] if self.max_examples else rows

    def metric_fns(self) -> list[Callable]:
        """The seqio task's own predict metric functions (none for other sources)."""
        if self.task is None:
            return []
        from calm_jax import seqio_utils

        task = seqio_utils.get_task(self.task)
        return list(getattr(task, "predict_metric_fns", None) or
                    getattr(task, "metric_fns", None) or [])


# Prompts -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How an example becomes a prompt: `prefix`, then `num_shots` shots, then the example, all
    joined by `separator`.

    Attributes:
      template: the example's part, a `str.format` template over its fields ({input}, {group},
        {id}); the model continues it.
      shot_template: a shot's part (it also knows {target}); None: `template + "{target}"`.
      num_shots: solved examples before the example (k of k-shot).
      separator: between the prefix, the shots and the example.
      prefix: text before everything (an instruction); "" for none.
      selection: "fixed" (the same shots, drawn once, for every example) or "per_example" (each
        example draws its own, seeded by its position).
      seed: seeds the draws.
    """

    template: str = "{input}"
    shot_template: str | None = None
    num_shots: int = 0
    separator: str = "\n\n"
    prefix: str = ""
    selection: str = "fixed"
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.num_shots, int) or self.num_shots < 0:
            raise ValueError(f"prompt.num_shots: expected an integer >= 0, "
                             f"got {self.num_shots!r}")
        if self.selection not in SHOT_SELECTIONS:
            raise ValueError(f"prompt.selection: expected one of {SHOT_SELECTIONS}, "
                             f"got {self.selection!r}")
        sample = {"input": "", "target": "", "group": "", "id": ""}
        for field in ("template", "shot_template"):
            value = getattr(self, field)
            if value is None and field == "shot_template":
                continue
            if not isinstance(value, str):
                raise ValueError(f"prompt.{field}: expected a str, got {type(value).__name__}")
            try:
                value.format_map(sample)
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"prompt.{field}: expected a str.format template over "
                                 f"{{input}}, {{target}}, {{group}}, {{id}}, got {value!r} "
                                 f"({type(e).__name__}: {e})") from None
        if "{target}" in self.template:
            raise ValueError(f"prompt.template: expected no {{target}} (the model writes it), "
                             f"got {self.template!r}")

    def example_text(self, example: Mapping[str, str]) -> str:
        return self.template.format_map(_fields(example))

    def shot_text(self, shot: Mapping[str, str]) -> str:
        template = self.template + "{target}" if self.shot_template is None else (
            self.shot_template)
        return template.format_map(_fields(shot))


def _fields(example: Mapping[str, str]) -> dict[str, str]:
    return {"input": example["input"], "target": example.get("target", ""),
            "group": example.get("group", ""), "id": example.get("id", "")}


def shot_pool(shots: Sequence[Mapping[str, str]],
              examples: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """The shots that may be drawn: those whose input, and id when both have one, is not an
    evaluated example's (so a prompt never holds its own answer or another evaluated one)."""
    inputs = {e["input"] for e in examples}
    ids = {e["id"] for e in examples if "id" in e}
    return [dict(s) for s in shots if s["input"] not in inputs and s.get("id", None) not in ids]


def draw_shots(pool: Sequence[Mapping[str, str]], num_examples: int,
               config: PromptConfig) -> list[list[dict[str, str]]]:
    """Each example's shots: `config.num_shots` distinct entries of `pool`, the same for every
    example ("fixed") or drawn per example ("per_example"), from numpy generators seeded by
    (`config.seed`, example position): the same inputs give the same shots."""
    k = config.num_shots
    if k == 0:
        return [[] for _ in range(num_examples)]
    if len(pool) < k:
        raise ValueError(f"prompt.num_shots: expected at most the {len(pool)} shots available "
                         f"(the shot source less the evaluated examples), got {k}")

    def draw(position: int) -> list[dict[str, str]]:
        rng = np.random.default_rng([config.seed, position])
        return [dict(pool[i]) for i in rng.choice(len(pool), size=k, replace=False)]

    if config.selection == "fixed":
        fixed = draw(0)
        return [fixed for _ in range(num_examples)]
    return [draw(i) for i in range(num_examples)]


def build_prompts(examples: Sequence[Mapping[str, str]], config: PromptConfig,
                  shots: Sequence[Mapping[str, str]] | None = None) -> list[str]:
    """The prompt text of every example (see `PromptConfig`); `shots` is the source of shots
    (required when `config.num_shots > 0`), filtered by `shot_pool`."""
    examples = check_examples(examples)
    if config.num_shots and shots is None:
        raise ValueError(f"shots: expected a source of shots for prompt.num_shots="
                         f"{config.num_shots}, got None")
    pool = shot_pool(check_examples(shots, "shots"), examples) if config.num_shots else []
    drawn = draw_shots(pool, len(examples), config)
    prompts = []
    for example, chosen in zip(examples, drawn):
        parts = ([config.prefix] if config.prefix else []) + [
            config.shot_text(s) for s in chosen] + [config.example_text(example)]
        prompts.append(config.separator.join(parts))
    return prompts
