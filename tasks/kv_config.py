"""Configuration of the key-value arithmetic data (``tasks.kv_arithmetic``): ``KVConfig`` and the
named scales. Pure Python; ``tasks.kv_arithmetic`` re-exports every name.

Scale: the default ``LAPTOP`` config and why
--------------------------------------------
The paper uses 25K keys with values in [1, 25K], 3-6 operands and PaLM2 models (``PAPER``
config below; the paper gives no example counts, ours are a guess). That does not train on a
2-core CPU. ``LAPTOP`` (the default ``KVConfig()``) is sized so that tiny byte-level transformers
train each stage in minutes:

* 128 keys -> 26 held-in, 102 held-out. Memorising 128 key -> value facts is a small job for a
  tiny mA, and 26 held-in keys still give ~26^3*9 ~= 150K distinct 3-operand composition
  expressions, so the composition data never runs out of variety.
* Values in [1, 199] (unique per key, so the range must be >= num_keys): 1-3 digit numbers, the
  regime in which Lee et al. show tiny transformers learn addition/subtraction quickly with
  reversed answers.
* 3-4 operands (paper: 3-6) keeps inputs short (<= 28 bytes) and answers bounded.
* ``x`` appears with weight 0.2 and **at most once per expression** (``max_multiplications=1``):
  a product of two 3-digit numbers is the hardest thing mB must learn; an unbounded number of
  products would make answers up to 10 digits long. Answers are then at most 199^2+2*199 = 39999
  in magnitude -> fixed width 5, answer string length 6. If mB cannot learn multiplication in the
  time budget, use ``LAPTOP_ADDSUB`` (``+``/``-`` only, width 3) and say so.
* 8000 training examples per training set, 500 per evaluation set: enough distinct examples that
  a tiny model learns the rule instead of memorising (generation takes well under a second).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

CONSONANTS = "bcdfghjklmnprstvwz"  # no 'x' (the multiplication operator), no 'q', no 'y'
VOWELS = "aeiou"
OPERATORS = ("+", "-", "x")
PROMPT_SUFFIX = "="

ANSWER_FORMATS = ("reversed", "plain")


@dataclasses.dataclass(frozen=True)
class KVConfig:
    """Everything that determines the generated data. Frozen and hashable (used as a cache key).

    Attributes:
      num_keys: number of distinct keys.
      key_len_min, key_len_max: inclusive range of key lengths in letters (paper: 2-6).
      value_min, value_max: inclusive range the unique key values are drawn from (without
        replacement). Also the operand range of Numeric-Arithmetic training expressions.
      operands_min, operands_max: inclusive range of the number of operands per expression.
      operators: operator symbols used, a subset of ('+', '-', 'x').
      operator_weights: sampling weights of ``operators`` (same length; normalised).
      max_multiplications: at most this many 'x' per expression (None = unlimited). Once the limit
        is reached the remaining operators are sampled from the others (renormalised weights).
      heldin_fraction: fraction of keys in the held-in set (paper: 0.2); rounded, at least 1 key
        on each side.
      num_train: examples in each training split (except kv_dictionary: one per key).
      num_train_numeric: training examples of Numeric-Arithmetic, whose supply is not limited by
        the keys (mB must learn the arithmetic itself); None means ``num_train``.
      num_train_substitution: training examples of KV-Substitution (over all keys, so not
        limited by the held-in keys as the composition data is); None means ``num_train``.
      num_eval: examples in each evaluation split (except kv_dictionary).
      seed: master seed; every dataset uses its own stream derived from it.
      answer_format: "reversed" (sign + fixed-width least-significant-digit-first; default) or
        "plain" (``str(n)``). See the module docstring.
      answer_width: digits of a "reversed" answer; None = just enough for ``max_abs_answer``.
      operand_width: zero-pad every written number (operands of Numeric-Arithmetic, targets of
        KV-Substitution and of the dictionary) to this many digits, e.g. 3: ``7 -> "007"``, so
        digits of equal significance sit at fixed offsets; None writes plain decimals.
      numeric_operands_min: fewest operands of a Numeric-Arithmetic TRAINING expression (None:
        ``operands_min``). Shorter sums are a curriculum for mB: the last digit of a sum of n
        digits modulo 10 carries no signal about any n-1 of them, so gradient descent finds
        3-operand sums far sooner when 2-operand ones are mixed in.
      nonnegative: draw only expressions whose result is >= 0 (rejection sampling), so the
        answer's leading sign is always ``+`` and every answer digit follows from the lower ones.
      context_words: Numeric-Arithmetic TRAINING prompts are preceded by a "sentence" of 0 to
        this many random words (letter strings that are never keys, or numbers) joined by
        operators and ending in ``=``, e.g. ``ehaca-071=463-229=``, read without loss. A tiny mB trained only on bare
        expressions finds operands relative to the sequence start; a general LM reads arithmetic
        wherever it appears, which is what the scratchpad composition needs of the anchor
        (the keys' expression precedes the substituted one). 0: bare prompts.
      scratchpad: KV-Arithmetic targets (composition data and evaluation) first write the
        substitution, then ``=`` and the answer: ``bako+tilu=`` -> ``123+045=8610``, i.e. the
        KV-Substitution target followed by the Numeric-Arithmetic example it makes. Other
        datasets are unchanged. See "Scratchpad" in the module docstring.
    """

    num_keys: int = 128
    key_len_min: int = 2
    key_len_max: int = 6
    value_min: int = 1
    value_max: int = 199
    operands_min: int = 3
    operands_max: int = 4
    operators: tuple[str, ...] = ("+", "-", "x")
    operator_weights: tuple[float, ...] = (0.4, 0.4, 0.2)
    max_multiplications: int | None = 1
    heldin_fraction: float = 0.2
    num_train: int = 8000
    num_train_numeric: int | None = None
    num_train_substitution: int | None = None
    num_eval: int = 500
    seed: int = 0
    answer_format: str = "reversed"
    answer_width: int | None = None
    operand_width: int | None = None
    nonnegative: bool = False
    numeric_operands_min: int | None = None
    context_words: int = 0
    scratchpad: bool = False

    def __post_init__(self):
        if self.num_keys < 2:
            raise ValueError("num_keys must be >= 2 (one held-in and one held-out key at least)")
        if not 1 <= self.key_len_min <= self.key_len_max:
            raise ValueError("need 1 <= key_len_min <= key_len_max")
        if not 1 <= self.value_min <= self.value_max:
            raise ValueError("need 1 <= value_min <= value_max (operands are positive)")
        if self.value_max - self.value_min + 1 < self.num_keys:
            raise ValueError(
                f"value range [{self.value_min}, {self.value_max}] is smaller than num_keys="
                f"{self.num_keys}; values must be unique"
            )
        if not 2 <= self.operands_min <= self.operands_max:
            raise ValueError("need 2 <= operands_min <= operands_max")
        if not self.operators or any(op not in OPERATORS for op in self.operators):
            raise ValueError(f"operators must be a non-empty subset of {OPERATORS}")
        if len(set(self.operators)) != len(self.operators):
            raise ValueError("operators must not repeat")
        if len(self.operator_weights) != len(self.operators):
            raise ValueError("operator_weights must have one weight per operator")
        if any(w < 0 for w in self.operator_weights) or sum(self.operator_weights) <= 0:
            raise ValueError("operator_weights must be >= 0 with a positive sum")
        if self.max_multiplications is not None and self.max_multiplications < 0:
            raise ValueError("max_multiplications must be >= 0 or None")
        non_mul = [w for op, w in zip(self.operators, self.operator_weights) if op != "x"]
        if self.max_multiplications is not None and sum(non_mul) <= 0:
            raise ValueError("with max_multiplications set, '+' or '-' must have positive weight")
        if not 0.0 < self.heldin_fraction < 1.0:
            raise ValueError("heldin_fraction must be in (0, 1)")
        if self.num_train < 1 or self.num_eval < 1:
            raise ValueError("num_train and num_eval must be >= 1")
        if self.num_train_numeric is not None and self.num_train_numeric < 1:
            raise ValueError(
                f"num_train_numeric: expected None or >= 1, got {self.num_train_numeric}"
            )
        if self.num_train_substitution is not None and self.num_train_substitution < 1:
            raise ValueError(
                f"num_train_substitution: expected None or >= 1, got {self.num_train_substitution}"
            )
        if self.numeric_operands_min is not None and not (
            2 <= self.numeric_operands_min <= self.operands_max
        ):
            raise ValueError(
                f"numeric_operands_min: expected None or 2..{self.operands_max}, got "
                f"{self.numeric_operands_min}"
            )
        if not isinstance(self.context_words, int) or self.context_words < 0:
            raise ValueError(f"context_words: expected an integer >= 0, got {self.context_words!r}")
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}")
        if self.operand_width is not None and self.operand_width < len(str(self.value_max)):
            raise ValueError(
                f"operand_width: expected at least {len(str(self.value_max))} digits "
                f"(value_max={self.value_max}), got {self.operand_width}"
            )
        if self.answer_width is not None:
            if self.answer_width < len(str(max_abs_answer(self))):
                raise ValueError(
                    f"answer_width={self.answer_width} cannot hold answers up to {max_abs_answer(self)}"
                )

    @property
    def num_heldin(self) -> int:
        n = int(round(self.heldin_fraction * self.num_keys))
        return min(max(n, 1), self.num_keys - 1)

    @property
    def width(self) -> int:
        """Digits of a 'reversed' answer (resolved ``answer_width``)."""
        if self.answer_width is not None:
            return self.answer_width
        return len(str(max_abs_answer(self)))

    def replace(self, **changes) -> "KVConfig":
        return dataclasses.replace(self, **changes)


def max_abs_answer(config: KVConfig) -> int:
    """Largest |result| any expression of this config can have (exact, Python ints).

    With standard precedence an expression is a signed sum of products. For n operands and m
    multiplications the largest magnitude puts all m multiplications into one term of m+1
    operands of value_max and adds the other n-m-1 terms (each <= value_max).
    """
    vmax = config.value_max
    best = 0
    has_mul = "x" in config.operators
    for n in range(config.operands_min, config.operands_max + 1):
        m_hi = n - 1 if has_mul else 0
        if has_mul and config.max_multiplications is not None:
            m_hi = min(m_hi, config.max_multiplications)
        for m in range(0, m_hi + 1):
            best = max(best, vmax ** (m + 1) + (n - m - 1) * vmax)
    return best


# The default: laptop scale (see module docstring for the reasons).
LAPTOP = KVConfig()
# Same, without multiplication: a fallback if mB cannot learn products in the time budget.
LAPTOP_ADDSUB = KVConfig(
    operators=("+", "-"), operator_weights=(0.5, 0.5), max_multiplications=None
)
# The paper's D_KV: 25K keys, unique values in [1, 25K], 3-6 operands, +, -, x. The paper states
# no limit on multiplications, so none is set (answers then need up to 27 digits: 25000**6), and
# gives no example counts or operator mix; those below are our guess.
PAPER = KVConfig(
    num_keys=25_000,
    value_min=1,
    value_max=25_000,
    operands_min=3,
    operands_max=6,
    operator_weights=(1.0, 1.0, 1.0),
    max_multiplications=None,
    num_train=200_000,
    num_eval=2_000,
)

# Two-operand sums at laptop scale: what the 4-layer, 64-wide laptop models can learn. Measured
# on the 2-core CPU (2026-11-23): mB reaches 100% on its Numeric-Arithmetic in 2500 steps, while
# with 3 operands (values <= 99) it stays at chance on the answer's last digit after 4000 steps,
# with or without 2-operand sums mixed in (the last digit of a sum of three digits modulo 10
# gives no gradient signal through any two of them). 512 keys leave 102 held-in keys for the
# composition data; operands are zero-padded so equal digits sit at equal offsets, and results
# are never negative so answers need no sign.
LAPTOP_2OP = KVConfig(
    num_keys=512,
    value_min=1,
    value_max=999,
    operands_min=2,
    operands_max=2,
    operators=("+", "-"),
    operator_weights=(0.5, 0.5),
    max_multiplications=None,
    operand_width=3,
    nonnegative=True,
    num_train=8000,
    num_train_numeric=100_000,
)

# The laptop reproduction (gin/experiments/kv_reproduction.gin): LAPTOP_2OP with the
# KV-Arithmetic scratchpad (``bako+tilu=`` -> ``123+045=8610``) and Numeric-Arithmetic training
# prompts read in context (up to 2 random words or numbers before them). Measured on the CPU
# (2026-12-01, 4-layer 64-wide models): with bare answers the composition cannot make this mB
# compute on values it reads from mA (its operand-reading attention looks at token positions
# that hold letters), while with the scratchpad mA's own substitution, read through rotary
# cross-attention, carries held-out keys and mB computes on the digits it has just written;
# mB trained on bare prompts fails there (it finds operands relative to the sequence start),
# mB trained with context words does not. See README, "The key-value experiment".
LAPTOP_SCRATCHPAD = LAPTOP_2OP.replace(scratchpad=True, context_words=2)

# A minute-scale version for CI: 48 keys, 2-3 operands, + and - only, short sequences.
TINY = KVConfig(
    num_keys=48,
    value_min=1,
    value_max=60,
    operands_min=2,
    operands_max=3,
    operators=("+", "-"),
    operator_weights=(0.5, 0.5),
    max_multiplications=None,
    num_train=2000,
    num_eval=200,
)

# The CI version of the reproduction: LAPTOP_SCRATCHPAD with 96 keys and two-digit values.
TINY_SCRATCHPAD = LAPTOP_SCRATCHPAD.replace(
    num_keys=96,
    value_max=99,
    operand_width=2,
    num_train=400,
    num_train_numeric=10_000,
    num_train_substitution=4000,
    num_eval=60,
)

CONFIGS: Mapping[str, KVConfig] = {
    "laptop": LAPTOP,
    "laptop_addsub": LAPTOP_ADDSUB,
    "laptop_2op": LAPTOP_2OP,
    "laptop_scratchpad": LAPTOP_SCRATCHPAD,
    "paper": PAPER,
    "tiny": TINY,
    "tiny_scratchpad": TINY_SCRATCHPAD,
}
