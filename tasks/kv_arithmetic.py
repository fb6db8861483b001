"""Key-value arithmetic data for CALM's Experiment 1 (pure Python + numpy).

This module has NO TensorFlow / seqio dependency: it generates the datasets of the paper's
key-value arithmetic experiment deterministically from a seed and turns them into padded or
packed numpy arrays with a byte-level tokenisation identical to ``seqio.ByteVocabulary``.
``tasks/__init__.py`` wraps the same generator in seqio tasks when seqio is installed.

The experiment (Bansal et al. 2024, section 4.1, Table 1)
---------------------------------------------------------
A set of keys (English-like letter strings, 2-6 letters) is mapped to unique integer values.

* KV-Substitution    ``bako+tilu-meso=`` -> ``10+22-24``  (mA's pretraining and evaluation)
* Numeric-Arithmetic ``10+22-24=``       -> answer of 8   (mB's pretraining and evaluation)
* KV-Arithmetic      ``bako+tilu-meso=`` -> answer of 8   (composition data and evaluation)

mA knows every key (it is trained on KV-Substitution over all keys plus a key -> value
"dictionary" set); mB only ever sees numbers; the composition data covers only the held-in keys
(20%); KV-Arithmetic is evaluated on expressions made only of held-out keys (the other 80%).

Formats (decided here; the paper does not specify them)
-------------------------------------------------------
* Every ``inputs`` string ends with ``=`` (a prompt delimiter), e.g. ``bako+tilu-meso=``. The
  decoder-only models see ``inputs + targets + EOS`` as one byte stream.
* Keys use only lowercase letters from ``CONSONANTS`` / ``VOWELS``, alternating consonant and
  vowel (``bakor``, ``eti``...). The letter ``x`` is never used in keys because ``x`` is the
  multiplication operator. Keys are unique; values are unique integers drawn without
  replacement from ``[value_min, value_max]``.
* Operands inside expressions (inputs of Numeric-Arithmetic, targets of KV-Substitution,
  dictionary targets) are plain decimal numbers, most-significant digit first: ``10+22-24``.
* Operators ``+``, ``-``, ``x``. **Standard precedence**: ``x`` binds tighter than ``+`` and ``-``;
  operators of equal precedence associate left to right. So ``2+3x4-5 = 2+(3*4)-5 = 9``, exactly
  what Python's ``eval`` gives after replacing ``x`` by ``*``. Results are exact Python ints and
  may be negative (no unary minus ever appears in an input: every operand is >= value_min >= 1).
* Arithmetic answers (targets of Numeric-Arithmetic and KV-Arithmetic, i.e. every dataset whose
  target is a computed result) use ``KVConfig.answer_format``:

  - ``"reversed"`` (default): a sign character (``+`` or ``-``, always present) followed by the
    absolute value zero-padded to a fixed width and written least-significant digit first, as in
    Lee et al. 2023 ("Teaching Arithmetic to Small Transformers"). With width 5:
    ``8 -> "+80000"``, ``-1234 -> "-43210"``, ``0 -> "+00000"``. The sign comes first so the model
    decides it before emitting digits (the digits of a difference depend on its sign). The width
    is ``KVConfig.answer_width`` or, if None, the number of digits of the largest possible
    magnitude (``max_abs_answer``), so every answer of a config has the same length.
  - ``"plain"``: ``str(result)``, e.g. ``"8"``, ``"-1234"``.

  The same format is applied to every dataset and every model alike; ``parse_answer`` inverts it.

Scratchpad (``KVConfig.scratchpad``) and context words (``KVConfig.context_words``)
------------------------------------------------------------------------------------
With ``scratchpad`` a KV-Arithmetic target first writes the substitution, then ``=`` and the
answer: ``bako+tilu=`` -> ``123+045=8610``, i.e. the KV-Substitution target followed by the
Numeric-Arithmetic example it makes. The other datasets keep their formats, and evaluation
scores each Table-1 row on its own part (the substitution before the first ``=`` for
KV-Substitution, the answer after it for the arithmetic rows). This is how the laptop models
compose (measured, see README): the composed model writes mA's substitution token by token,
reading mA as mA itself decodes the same stream (the paper's decoding: every generated token is
fed to both models), and mB then computes on digits it has written. With bare answers, mB
would have to compute on values the cross-attention adds to its residual stream, and the 4-layer
mB reads its operands from token positions, which hold letters.

With ``context_words`` = k > 0, each Numeric-Arithmetic TRAINING prompt is preceded by a random
"sentence" of 0..k words (letter strings that are never keys, or numbers) joined by ``+``/``-``
and ending in ``=``, without loss: ``ehaca-071=463-229=`` -> ``4320``. mB then reads arithmetic in context, as a general LM
does, and not only at the start of a sequence (in the scratchpad stream the keys' expression
comes first). mB still never sees a key or a value of one.

Scale: see ``tasks/kv_config.py`` (the named configs and why each is sized as it is).

Datasets and splits (``build_datasets``)
----------------------------------------
``kv_dictionary``      train, validation: every key once, ``bako=`` -> ``123`` (mA pretraining).
``numeric_substitution`` train: numeric expressions "substituted", i.e. unchanged,
                       ``123+045=`` -> ``123+045`` (mA pretraining: numbers stand for
                       themselves, so mA substitutes a numeric prompt as it is).
``kv_substitution``    train: expressions over ALL keys (mA pretraining); validation: the
                       held-out evaluation expressions (below), substituted.
``numeric_arithmetic`` train: expressions over uniform random numbers in [value_min, value_max]
                       (mB pretraining); validation: the held-out evaluation expressions with
                       their keys substituted, so the three Table-1 rows are measured on the same
                       expressions.
``numeric_arithmetic_written`` train: mB's training expressions (no context words) with the
                       KV-Arithmetic target format, e.g. ``123+045=`` -> ``123+045=8610`` with
                       ``scratchpad``: numeric prompts written as the composed model writes
                       keys (composition data, ``run(compose_numeric_format="written")``).
``kv_arithmetic_heldin``  train: composition data over held-in keys only; validation: more
                       held-in expressions, disjoint from train (for monitoring).
``kv_arithmetic_heldout`` validation: expressions over held-out keys only (Table 1's KV-Arithmetic).
``kv_arithmetic_dev``  validation: expressions over the development keys (``dev_keys``): the
                       held-out keys that no evaluation expression uses, so they are in neither
                       the composition data nor the evaluation. For choosing a composition (a
                       composition's check and retry in the experiment), never for reporting.
                       Up to ``num_eval`` expressions; empty when every held-out key is used.
                       mA's substitution training, drawn over all keys, may hold a few of them
                       (15 of 500 for ``LAPTOP_SCRATCHPAD``); only evaluation inputs are kept
                       out of it.

Within a split, inputs are unique. Training splits never contain an input of the corresponding
evaluation split (kv_substitution/train excludes the held-out evaluation expressions,
numeric_arithmetic/train excludes their numeric forms, heldin train and validation are disjoint).

Byte tokenisation (``encode_text`` / ``to_numpy_arrays`` / ``to_numpy_batches``)
---------------------------------------------------------------------------------
Identical to ``seqio.ByteVocabulary()``: PAD=0, EOS=1, UNK=2, UTF-8 byte b -> id b+3
(vocab size 259; ``PADDED_VOCAB_SIZE`` = 384 rounds it up to a multiple of 128 for embedding
tables). A sequence is ``inputs_ids + targets_ids + [EOS]``; arrays follow t5x's decoder-only
conventions (see ``to_numpy_arrays``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterable, Mapping, Sequence

import numpy as np

from tasks.kv_config import (  # noqa: F401  (re-exported)
    CONSONANTS,
    VOWELS,
    OPERATORS,
    PROMPT_SUFFIX,
    ANSWER_FORMATS,
    KVConfig,
    max_abs_answer,
    LAPTOP,
    LAPTOP_ADDSUB,
    PAPER,
    LAPTOP_2OP,
    LAPTOP_SCRATCHPAD,
    TINY,
    TINY_SCRATCHPAD,
    CONFIGS,
)

# Dataset names and their splits.
DATASET_SPLITS: Mapping[str, tuple[str, ...]] = {
    "kv_dictionary": ("train", "validation"),
    "numeric_substitution": ("train",),
    "kv_substitution": ("train", "validation"),
    "numeric_arithmetic": ("train", "validation"),
    "numeric_arithmetic_written": ("train",),
    "kv_arithmetic_heldin": ("train", "validation"),
    "kv_arithmetic_heldout": ("validation",),
    "kv_arithmetic_dev": ("validation",),
}

# --------------------------------------------------------------------------------------------
# Expressions and answers
# --------------------------------------------------------------------------------------------


def evaluate(operands: Sequence[int], ops: Sequence[str]) -> int:
    """Exact value of ``operands[0] ops[0] operands[1] ...`` with standard precedence.

    'x' binds tighter than '+'/'-'; equal precedence associates left to right.
    """
    if len(ops) != len(operands) - 1:
        raise ValueError("need exactly one operator between consecutive operands")
    total = 0
    sign = 1
    term = int(operands[0])
    for op, v in zip(ops, operands[1:]):
        v = int(v)
        if op == "x":
            term *= v
        elif op in ("+", "-"):
            total += sign * term
            sign = 1 if op == "+" else -1
            term = v
        else:
            raise ValueError(f"unknown operator {op!r}")
    return total + sign * term


def join_expression(tokens: Sequence[str], ops: Sequence[str]) -> str:
    """``['a','b','c'], ['+','-'] -> 'a+b-c'``."""
    out = [tokens[0]]
    for op, t in zip(ops, tokens[1:]):
        out.append(op)
        out.append(t)
    return "".join(out)


def split_expression(expr: str) -> tuple[list[str], list[str]]:
    """Inverse of ``join_expression`` (a trailing '=' is ignored): returns (operands, operators).

    Operands are keys or decimal numbers; neither contains '+', '-' or 'x' (keys never use 'x').
    """
    if expr.endswith(PROMPT_SUFFIX):
        expr = expr[: -len(PROMPT_SUFFIX)]
    tokens: list[str] = []
    ops: list[str] = []
    cur = []
    for ch in expr:
        if ch in OPERATORS:
            tokens.append("".join(cur))
            ops.append(ch)
            cur = []
        else:
            cur.append(ch)
    tokens.append("".join(cur))
    if any(not t for t in tokens):
        raise ValueError(f"malformed expression {expr!r}")
    return tokens, ops


def format_answer(value: int, config: KVConfig) -> str:
    """Arithmetic result -> target string, following ``config.answer_format``."""
    value = int(value)
    if config.answer_format == "plain":
        return str(value)
    width = config.width
    digits = str(abs(value))
    if len(digits) > width:
        raise ValueError(f"|{value}| does not fit answer width {width}")
    if config.nonnegative:
        if value < 0:
            raise ValueError(f"{value} is negative but the config is nonnegative")
        return digits.zfill(width)[::-1]
    return ("-" if value < 0 else "+") + digits.zfill(width)[::-1]


def format_operand(value: int, config: KVConfig) -> str:
    """A number as written inside expressions and substitutions (``config.operand_width``)."""
    return str(int(value)).zfill(config.operand_width or 0)


def arithmetic_target(numeric_expression: str, value: int, config: KVConfig) -> str:
    """A KV-Arithmetic target: the answer, after the substituted expression when
    ``config.scratchpad``."""
    answer = format_answer(value, config)
    return f"{numeric_expression}{PROMPT_SUFFIX}{answer}" if config.scratchpad else answer


def split_target(text: str, config: KVConfig) -> tuple[str | None, str]:
    """An arithmetic target or prediction -> (substituted expression or None, answer text).

    Without ``config.scratchpad``, or without a ``=`` in the text, the whole text is the answer.
    With it, the text is cut at its first ``=``.
    """
    substitution, sep, answer = text.partition(PROMPT_SUFFIX)
    if not config.scratchpad or not sep:
        return None, text
    return substitution, answer


def parse_answer(text: str, config: KVConfig) -> int | None:
    """Target/prediction string -> int, or None if it is not a well-formed answer.

    With ``config.scratchpad`` the answer after the restated expression is parsed.
    """
    text = split_target(text.strip(), config)[1].strip()
    if config.answer_format == "plain":
        body = text[1:] if text.startswith("-") else text
        if not body or not body.isdigit():
            return None
        return int(text)
    width = config.width
    if config.nonnegative:
        return int(text[::-1]) if len(text) == width and text.isdigit() else None
    if len(text) != width + 1 or text[0] not in "+-" or not text[1:].isdigit():
        return None
    magnitude = int(text[1:][::-1])
    return -magnitude if text[0] == "-" else magnitude


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------

# One independent random stream per purpose, derived from config.seed.
(
    _STREAM_KEYS,
    _STREAM_HELDOUT,
    _STREAM_HELDIN,
    _STREAM_SUBST,
    _STREAM_NUMERIC,
    _STREAM_CONTEXT,
    _STREAM_NUMSUB,
    _STREAM_DEV,
) = range(8)


def _rng(config: KVConfig, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([config.seed, stream]))


def _make_key(rng: np.random.Generator, length: int) -> str:
    start_with_vowel = bool(rng.integers(0, 2))
    letters = []
    for i in range(length):
        vowel = (i % 2 == 0) == start_with_vowel
        pool = VOWELS if vowel else CONSONANTS
        letters.append(pool[int(rng.integers(0, len(pool)))])
    return "".join(letters)


def _context_sentences(config: KVConfig, count: int, keys: Iterable[str]) -> list[str]:
    """``count`` prefixes for Numeric-Arithmetic training prompts (``KVConfig.context_words``):
    0 to context_words random words joined by + or -, then ``=`` (or "" for 0). A word is a
    random letter string that is not a key, or (with probability 1/2) a written number."""
    rng = _rng(config, _STREAM_CONTEXT)
    keys = set(keys)
    out = []
    for _ in range(count):
        n = int(rng.integers(0, config.context_words + 1))
        words = []
        while len(words) < n:
            if rng.integers(0, 2):
                words.append(
                    format_operand(
                        int(rng.integers(config.value_min, config.value_max + 1)), config
                    )
                )
                continue
            word = _make_key(rng, int(rng.integers(config.key_len_min, config.key_len_max + 1)))
            if word not in keys:
                words.append(word)
        ops = [("+", "-")[int(i)] for i in rng.integers(0, 2, size=max(n - 1, 0))]
        out.append(join_expression(words, ops) + PROMPT_SUFFIX if words else "")
    return out


def _num_possible_keys(config: KVConfig) -> int:
    total = 0
    nc, nv = len(CONSONANTS), len(VOWELS)
    for n in range(config.key_len_min, config.key_len_max + 1):
        a, b = (n + 1) // 2, n // 2  # letters at even / odd positions
        total += nc**a * nv**b + nv**a * nc**b
    return total


@dataclasses.dataclass(frozen=True)
class KeyTable:
    """The key -> value dictionary and the held-in / held-out split of the keys."""

    keys: tuple[str, ...]  # in a random (seeded) order
    values: tuple[int, ...]  # values[i] belongs to keys[i]
    heldin: tuple[str, ...]
    heldout: tuple[str, ...]

    @property
    def mapping(self) -> dict[str, int]:
        return dict(zip(self.keys, self.values))


@functools.lru_cache(maxsize=8)
def make_key_table(config: KVConfig) -> KeyTable:
    """Unique English-like keys, unique values, and the held-in/held-out split (deterministic)."""
    if _num_possible_keys(config) < config.num_keys:
        raise ValueError("key length range too small for num_keys unique keys")
    rng = _rng(config, _STREAM_KEYS)
    keys: list[str] = []
    seen = set()
    attempts = 0
    max_attempts = 100 * config.num_keys + 10_000
    while len(keys) < config.num_keys:
        attempts += 1
        if attempts > max_attempts:
            raise RuntimeError("could not draw enough unique keys; widen key_len range")
        # Lengths are drawn uniformly; when short keys run out (2 letters allow only 180 keys)
        # collisions are simply redrawn, which shifts the mix towards longer keys.
        length = int(rng.integers(config.key_len_min, config.key_len_max + 1))
        key = _make_key(rng, length)
        if key not in seen:
            seen.add(key)
            keys.append(key)
    values = rng.choice(
        np.arange(config.value_min, config.value_max + 1), size=config.num_keys, replace=False
    )
    values = tuple(int(v) for v in values)
    order = rng.permutation(config.num_keys)
    n_in = config.num_heldin
    heldin = tuple(keys[i] for i in order[:n_in])
    heldout = tuple(keys[i] for i in order[n_in:])
    return KeyTable(keys=tuple(keys), values=values, heldin=heldin, heldout=heldout)


def _unused(table: KeyTable, key_lists: Iterable[Sequence[str]]) -> tuple[str, ...]:
    used = {t for toks in key_lists for t in toks}
    return tuple(k for k in table.heldout if k not in used)


def dev_keys(config: KVConfig) -> tuple[str, ...]:
    """The development keys: held-out keys (never in the composition data) that no held-out
    evaluation expression uses. ``kv_arithmetic_dev`` is written over them."""
    evaluation = _build(config)["kv_arithmetic_heldout"]["validation"]
    return _unused(make_key_table(config), (split_expression(i)[0] for i, _ in evaluation))


def _sample_ops(rng: np.random.Generator, config: KVConfig, count: int) -> list[str]:
    ops_all = list(config.operators)
    w_all = np.asarray(config.operator_weights, dtype=np.float64)
    ops: list[str] = []
    n_mul = 0
    for _ in range(count):
        if config.max_multiplications is not None and n_mul >= config.max_multiplications:
            w = np.where(np.array([o == "x" for o in ops_all]), 0.0, w_all)
        else:
            w = w_all
        op = ops_all[int(rng.choice(len(ops_all), p=w / w.sum()))]
        n_mul += op == "x"
        ops.append(op)
    return ops


def _sample_shape(
    rng: np.random.Generator, config: KVConfig, operands_min: int | None = None
) -> list[str]:
    lo = config.operands_min if operands_min is None else operands_min
    n = int(rng.integers(lo, config.operands_max + 1))
    return _sample_ops(rng, config, n - 1)


def count_expressions(config: KVConfig, num_symbols: int) -> int:
    """Number of distinct expressions of this config over ``num_symbols`` possible operands."""
    non_mul = sum(
        1 for op, w in zip(config.operators, config.operator_weights) if op != "x" and w > 0
    )
    has_mul = any(op == "x" and w > 0 for op, w in zip(config.operators, config.operator_weights))
    total = 0
    for n in range(config.operands_min, config.operands_max + 1):
        m_hi = (n - 1) if has_mul else 0
        if has_mul and config.max_multiplications is not None:
            m_hi = min(m_hi, config.max_multiplications)
        shapes = sum(math.comb(n - 1, m) * non_mul ** (n - 1 - m) for m in range(m_hi + 1))
        total += shapes * num_symbols**n
    return total


def _unique_samples(
    sample,
    count: int,
    exclude: Iterable[str] = (),
    what: str = "examples",
    capacity: int | None = None,
):
    """Draws ``count`` samples with distinct keys ``sample()[0]`` not in ``exclude``.

    ``capacity`` (number of distinct possible samples) lets an impossible request fail at once.
    """
    excluded = set(exclude)
    if capacity is not None and count > capacity - len(excluded):
        raise RuntimeError(
            f"cannot draw {count} distinct {what}: the config allows only {capacity} "
            f"({len(excluded)} of them reserved for evaluation); lower num_train/num_eval"
        )
    seen = set()
    out = []
    attempts = 0
    max_attempts = 50 * count + 10_000
    while len(out) < count:
        attempts += 1
        if attempts > max_attempts:
            raise RuntimeError(
                f"could not draw {count} distinct {what}; the config allows too few expressions"
            )
        item = sample()
        if item is None:  # rejected by the sampler (e.g. a negative result under `nonnegative`)
            continue
        if item[0] in seen or item[0] in excluded:
            continue
        seen.add(item[0])
        out.append(item)
    return out


def _key_expressions(
    rng, config, pool: Sequence[str], count: int, value_of: Mapping[str, int], exclude=(), what=""
):
    """Distinct expressions over keys from ``pool``: list of (expr, key tokens, ops)."""

    def sample():
        ops = _sample_shape(rng, config)
        idx = rng.integers(0, len(pool), size=len(ops) + 1)
        toks = [pool[int(i)] for i in idx]
        if config.nonnegative and evaluate([value_of[t] for t in toks], ops) < 0:
            return None
        return join_expression(toks, ops), toks, ops

    return _unique_samples(
        sample, count, exclude, what, capacity=count_expressions(config, len(pool))
    )


def _ex(inputs: str, targets: str) -> tuple[str, str]:
    return (inputs + PROMPT_SUFFIX, targets)


@functools.lru_cache(maxsize=8)
def _build(config: KVConfig) -> dict[str, dict[str, tuple[tuple[str, str], ...]]]:
    table = make_key_table(config)
    value_of = table.mapping

    def subst(toks):
        return [format_operand(value_of[t], config) for t in toks]

    def answer(toks, ops):
        return format_answer(evaluate([value_of[t] for t in toks], ops), config)

    def kv_answer(toks, ops):
        return arithmetic_target(
            join_expression(subst(toks), ops), evaluate([value_of[t] for t in toks], ops), config
        )

    # Held-out evaluation expressions: the same expressions feed the three Table-1 rows.
    heldout = _key_expressions(
        _rng(config, _STREAM_HELDOUT),
        config,
        table.heldout,
        config.num_eval,
        value_of,
        what="held-out expressions",
    )
    heldout_inputs = {e for e, _, _ in heldout}
    heldout_numeric = {join_expression(subst(t), o) for _, t, o in heldout}

    # Composition data (held-in keys only): validation first, then a disjoint train split.
    heldin = _key_expressions(
        _rng(config, _STREAM_HELDIN),
        config,
        table.heldin,
        config.num_eval + config.num_train,
        value_of,
        what="held-in expressions",
    )
    heldin_val, heldin_train = heldin[: config.num_eval], heldin[config.num_eval :]

    # Development expressions over the held-out keys that no evaluation expression uses (its own
    # stream: every other dataset is the same with or without it).
    dev_pool = _unused(table, (toks for _, toks, _ in heldout))
    dev = (
        _key_expressions(
            _rng(config, _STREAM_DEV),
            config,
            dev_pool,
            min(config.num_eval, count_expressions(config, len(dev_pool)) // 4),
            value_of,
            what="development expressions",
        )
        if dev_pool
        else []
    )

    # mA's substitution training data over ALL keys, never one of the evaluation inputs.
    num_subst = (
        config.num_train if config.num_train_substitution is None else config.num_train_substitution
    )
    subst_train = _key_expressions(
        _rng(config, _STREAM_SUBST),
        config,
        table.keys,
        num_subst,
        value_of,
        exclude=heldout_inputs,
        what="substitution expressions",
    )

    def numeric_sampler(rng):
        """Numeric expressions over uniform numbers: (written expression, numbers, operators)."""

        def sample():
            ops = _sample_shape(rng, config, config.numeric_operands_min)
            nums = [
                int(v)
                for v in rng.integers(config.value_min, config.value_max + 1, size=len(ops) + 1)
            ]
            if config.nonnegative and evaluate(nums, ops) < 0:
                return None
            return join_expression([format_operand(v, config) for v in nums], ops), nums, ops

        return sample

    # mA's "numbers stand for themselves": numeric expressions substituted (unchanged).
    numeric_substitution = _unique_samples(
        numeric_sampler(_rng(config, _STREAM_NUMSUB)),
        config.num_train,
        exclude=heldout_numeric,
        what="numeric substitution expressions",
        capacity=count_expressions(config, config.value_max - config.value_min + 1),
    )

    # mB's numeric training data over uniform numbers, never one of the evaluation inputs.
    sample_numeric = numeric_sampler(_rng(config, _STREAM_NUMERIC))
    num_numeric = (
        config.num_train if config.num_train_numeric is None else (config.num_train_numeric)
    )
    numeric_train = _unique_samples(
        sample_numeric,
        num_numeric,
        exclude=heldout_numeric,
        what="numeric expressions",
        capacity=count_expressions(
            config.replace(operands_min=config.numeric_operands_min or config.operands_min),
            config.value_max - config.value_min + 1,
        ),
    )

    context = (
        _context_sentences(config, len(numeric_train), table.keys)
        if config.context_words
        else [""] * len(numeric_train)
    )
    dictionary = tuple(_ex(k, format_operand(value_of[k], config)) for k in table.keys)
    return {
        "kv_dictionary": {"train": dictionary, "validation": dictionary},
        "numeric_substitution": {"train": tuple(_ex(e, e) for e, _, _ in numeric_substitution)},
        "kv_substitution": {
            "train": tuple(_ex(e, join_expression(subst(t), o)) for e, t, o in subst_train),
            "validation": tuple(_ex(e, join_expression(subst(t), o)) for e, t, o in heldout),
        },
        "numeric_arithmetic": {
            "train": tuple(
                _ex(c + e, format_answer(evaluate(n, o), config))
                for c, (e, n, o) in zip(context, numeric_train)
            ),
            "validation": tuple(
                _ex(join_expression(subst(t), o), answer(t, o)) for _, t, o in heldout
            ),
        },
        "numeric_arithmetic_written": {
            "train": tuple(
                _ex(e, arithmetic_target(e, evaluate(n, o), config)) for e, n, o in numeric_train
            ),
        },
        "kv_arithmetic_heldin": {
            "train": tuple(_ex(e, kv_answer(t, o)) for e, t, o in heldin_train),
            "validation": tuple(_ex(e, kv_answer(t, o)) for e, t, o in heldin_val),
        },
        "kv_arithmetic_heldout": {
            "validation": tuple(_ex(e, kv_answer(t, o)) for e, t, o in heldout),
        },
        "kv_arithmetic_dev": {
            "validation": tuple(_ex(e, kv_answer(t, o)) for e, t, o in dev),
        },
    }


def build_datasets(config: KVConfig = LAPTOP) -> dict[str, dict[str, list[dict[str, str]]]]:
    """All datasets: ``{dataset: {split: [{'inputs': str, 'targets': str}, ...]}}``.

    Deterministic in ``config`` (generation is cached; fresh lists/dicts are returned each call).
    """
    return {
        name: {
            split: [{"inputs": i, "targets": t} for i, t in rows] for split, rows in splits.items()
        }
        for name, splits in _build(config).items()
    }


def get_examples(dataset: str, split: str, config: KVConfig = LAPTOP) -> list[dict[str, str]]:
    """One dataset split as a list of ``{'inputs', 'targets'}`` dicts."""
    built = _build(config)
    if dataset not in built:
        raise KeyError(f"unknown dataset {dataset!r}; known: {sorted(built)}")
    if split not in built[dataset]:
        raise KeyError(
            f"dataset {dataset!r} has no split {split!r}; it has {sorted(built[dataset])}"
        )
    return [{"inputs": i, "targets": t} for i, t in built[dataset][split]]


# --------------------------------------------------------------------------------------------
# Byte-level tokenisation and numpy arrays (tasks/byte_data.py, re-exported here)
# --------------------------------------------------------------------------------------------

from tasks.byte_data import (  # noqa: E402,F401  (re-exported)
    PAD_ID,
    EOS_ID,
    UNK_ID,
    BYTE_OFFSET,
    BYTE_VOCAB_SIZE,
    PADDED_VOCAB_SIZE,
    FEATURE_KEYS,
    encode_text,
    decode_ids,
    tokenize_example,
    to_numpy_arrays,
    to_numpy_batches,
    max_sequence_length,
)


def numpy_features(
    dataset: str, split: str, length: int, config: str = "laptop", pack: bool = False
) -> dict[str, np.ndarray]:
    """Feature arrays of one dataset split, for the trainer's numpy source (`arrays_fn`).

    `config` names an entry of CONFIGS. Rows are in generation order; the trainer shuffles.
    """
    if config not in CONFIGS:
        raise ValueError(f"config: expected one of {sorted(CONFIGS)}, got {config!r}")
    return to_numpy_arrays(get_examples(dataset, split, CONFIGS[config]), length, pack=pack)
