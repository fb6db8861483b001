"""Tests of the key-value arithmetic data (tasks/kv_arithmetic.py) and its seqio tasks.

The numpy/generator tests need no TensorFlow; the seqio tests are skipped where seqio is absent.
"""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from calm_jax import evaluation  # noqa: E402
from tasks import kv_arithmetic as kv  # noqa: E402

SMALL = kv.KVConfig(num_keys=60, value_max=99, num_train=400, num_eval=80, seed=3)
# Zero-padded operands, no negative results, shorter sums mixed into mB's training data.
PADDED = kv.KVConfig(num_keys=60, value_max=99, operators=("+", "-"), operator_weights=(0.5, 0.5),
                     max_multiplications=None, operands_min=3, operands_max=3,
                     numeric_operands_min=2, operand_width=3, nonnegative=True, num_train=400,
                     num_eval=80, seed=5)
# Arithmetic targets restate the expression in numbers before the answer.
SCRATCH = PADDED.replace(scratchpad=True, seed=7)
ARITH_SETS = ("numeric_arithmetic", "kv_arithmetic_heldin", "kv_arithmetic_heldout")


# ---------------------------------------------------------------- independent reference helpers


def tokens_of(expr):
  """Operands of an expression, split independently of the module (regex on operators)."""
  expr = expr[:-1] if expr.endswith("=") else expr
  return re.split(r"[+\-x]", expr)


def reference_value(numeric_expr):
  """Python's own evaluator: 'x' -> '*' gives standard precedence, left-associative."""
  numeric_expr = numeric_expr[:-1] if numeric_expr.endswith("=") else numeric_expr
  assert re.fullmatch(r"[0-9+\-x]+", numeric_expr), numeric_expr
  numeric_expr = re.sub(r"(?<![0-9])0+(?=[0-9])", "", numeric_expr)  # "007" -> "7"
  return eval(numeric_expr.replace("x", "*"), {"__builtins__": {}})  # noqa: S307


def reference_decode(answer, config):
  if config.answer_format == "plain":
    return int(answer)
  if config.nonnegative:
    assert len(answer) == config.width and answer.isdigit(), answer
    return int("".join(reversed(answer)))
  assert len(answer) == config.width + 1 and answer[0] in "+-", answer
  magnitude = int("".join(reversed(answer[1:])))
  return -magnitude if answer[0] == "-" else magnitude


def substitute(expr, mapping, width=None):
  expr = expr[:-1] if expr.endswith("=") else expr
  return re.sub(r"[a-wyz]+", lambda m: str(mapping[m.group(0)]).zfill(width or 0), expr)


@pytest.fixture(scope="module", params=["small", "padded", "scratch", "laptop"])
def config(request):
  return {"small": SMALL, "padded": PADDED, "scratch": SCRATCH,
          "laptop": kv.LAPTOP}[request.param]


@pytest.fixture(scope="module")
def data(config):
  return kv.build_datasets(config)


# ---------------------------------------------------------------- generation


def test_deterministic_for_a_seed():
  first = kv.build_datasets(SMALL)
  kv._build.cache_clear()
  kv.make_key_table.cache_clear()
  second = kv.build_datasets(SMALL)
  assert first == second
  other = kv.build_datasets(SMALL.replace(seed=SMALL.seed + 1))
  assert other != first
  assert kv.make_key_table(SMALL).keys != kv.make_key_table(SMALL.replace(seed=4)).keys
  for name in first:
    for split in first[name]:
      if name != "kv_dictionary" and first[name][split]:  # SMALL has no development keys
        assert first[name][split] != other[name][split], (name, split)


def test_returned_lists_are_fresh():
  a = kv.build_datasets(SMALL)
  a["kv_substitution"]["train"][0]["inputs"] = "mutated"
  assert kv.build_datasets(SMALL)["kv_substitution"]["train"][0]["inputs"] != "mutated"


def test_keys_and_values(config):
  table = kv.make_key_table(config)
  assert len(table.keys) == len(set(table.keys)) == config.num_keys
  assert len(set(table.values)) == config.num_keys
  for key, value in zip(table.keys, table.values):
    assert config.key_len_min <= len(key) <= config.key_len_max
    assert "x" not in key
    # English-like: letters alternate between consonants and vowels.
    kinds = ["v" if ch in kv.VOWELS else "c" for ch in key]
    assert all(ch in kv.VOWELS + kv.CONSONANTS for ch in key)
    assert all(a != b for a, b in zip(kinds, kinds[1:])), key
    assert config.value_min <= value <= config.value_max
  assert len(table.heldin) == round(0.2 * config.num_keys)
  assert set(table.heldin).isdisjoint(table.heldout)
  assert set(table.heldin) | set(table.heldout) == set(table.keys)


def test_split_sizes(config, data):
  assert set(data) == set(kv.DATASET_SPLITS)
  for name, splits in kv.DATASET_SPLITS.items():
    assert tuple(data[name]) == splits
    for split in splits:
      expected = (config.num_keys if name == "kv_dictionary"
                  else config.num_train if split == "train" else config.num_eval)
      if name == "kv_arithmetic_dev":  # as many as its keys allow (test_development_keys)
        assert len(data[name][split]) <= expected, (name, split)
      else:
        assert len(data[name][split]) == expected, (name, split)
      inputs = [ex["inputs"] for ex in data[name][split]]
      assert len(set(inputs)) == len(inputs), "inputs repeat within a split"
      assert all(set(ex) == {"inputs", "targets"} for ex in data[name][split])
      assert all(i.endswith("=") for i in inputs)


def test_composition_data_has_no_heldout_key(config, data):
  table = kv.make_key_table(config)
  heldin, heldout = set(table.heldin), set(table.heldout)
  for split in ("train", "validation"):
    for ex in data["kv_arithmetic_heldin"][split]:
      toks = tokens_of(ex["inputs"])
      assert set(toks) <= heldin, ex
      assert not set(toks) & heldout, ex
      assert not re.search(r"[a-z]", ex["targets"]), ex


def test_heldout_evaluation_uses_only_heldout_keys(config, data):
  heldout = set(kv.make_key_table(config).heldout)
  for ex in data["kv_arithmetic_heldout"]["validation"]:
    assert set(tokens_of(ex["inputs"])) <= heldout, ex
  for ex in data["kv_substitution"]["validation"]:
    assert set(tokens_of(ex["inputs"])) <= heldout, ex


@pytest.mark.parametrize("config", [kv.LAPTOP_SCRATCHPAD, kv.TINY_SCRATCHPAD],
                         ids=["laptop_scratchpad", "tiny_scratchpad"])
def test_development_keys_are_in_no_composition_data_and_no_evaluation(config):
  """kv_arithmetic_dev, for choosing a composition, is over held-out keys that no evaluation
  expression uses, and is written as KV-Arithmetic is."""
  data = kv.build_datasets(config)
  table = kv.make_key_table(config)
  dev = set(kv.dev_keys(config))
  assert dev and dev <= set(table.heldout)
  in_evaluation = {t for name in ("kv_arithmetic_heldout", "kv_substitution")
                   for ex in data[name]["validation"] for t in tokens_of(ex["inputs"])}
  in_composition = {t for split in ("train", "validation")
                    for ex in data["kv_arithmetic_heldin"][split]
                    for t in tokens_of(ex["inputs"])}
  assert dev == set(table.heldout) - in_evaluation
  assert not dev & in_composition
  rows = data["kv_arithmetic_dev"]["validation"]
  assert len(rows) == config.num_eval
  assert len({ex["inputs"] for ex in rows}) == len(rows)
  for ex in rows:
    assert set(tokens_of(ex["inputs"])) <= dev, ex
    numbers = substitute(ex["inputs"][:-1], table.mapping, config.operand_width)
    written, answer = kv.split_target(ex["targets"], config)
    assert written == numbers, ex
    assert reference_decode(answer, config) == reference_value(numbers), ex
  # Configs whose evaluation uses every held-out key have none.
  assert kv.dev_keys(kv.LAPTOP) == () and kv.get_examples("kv_arithmetic_dev", "validation",
                                                          kv.LAPTOP) == []


def test_substitution_covers_all_keys_and_resubstitutes(config, data):
  mapping = kv.make_key_table(config).mapping
  seen = set()
  for split in ("train", "validation"):
    for ex in data["kv_substitution"][split]:
      assert substitute(ex["inputs"], mapping, config.operand_width) == ex["targets"], ex
      seen |= set(tokens_of(ex["inputs"]))
  assert seen <= set(mapping)
  if config.num_train >= 20 * config.num_keys:
    assert seen == set(mapping), "mA's substitution data should mention every key"
  for ex in data["kv_dictionary"]["train"]:
    assert mapping[ex["inputs"][:-1]] == int(ex["targets"])
  assert {ex["inputs"][:-1] for ex in data["kv_dictionary"]["train"]} == set(mapping)


def test_answers_are_correct(config, data):
  mapping = kv.make_key_table(config).mapping
  for name in ARITH_SETS:
    for split, examples in data[name].items():
      for ex in examples:
        numeric = ex["inputs"] if name == "numeric_arithmetic" else substitute(ex["inputs"],
                                                                              mapping)
        if name == "numeric_arithmetic":
          assert not re.search(r"[a-wyz]", ex["inputs"])
        value = reference_value(numeric)
        answer = ex["targets"]
        if config.scratchpad and name != "numeric_arithmetic":  # "<substitution>=<answer>"
          restated, answer = ex["targets"].split("=")
          assert restated == substitute(ex["inputs"], mapping, config.operand_width)
        assert reference_decode(answer, config) == value, (name, split, ex)
        assert kv.parse_answer(ex["targets"], config) == value
        assert kv.format_answer(value, config) == answer
        sign = 0 if config.nonnegative else 1
        assert len(answer) == config.width + sign, "answers must have a fixed width"
        if config.nonnegative:
          assert value >= 0


def test_written_numeric_examples_are_mb_sums_in_the_kv_arithmetic_format(config, data):
  """`numeric_arithmetic_written`: mB's training sums without context words, each target
  written as a KV-Arithmetic target is (restated, then answered, with a scratchpad)."""
  heldout = {ex["targets"].split("=")[0] if config.scratchpad else None
             for ex in data["kv_arithmetic_heldout"]["validation"]}
  bare = data["numeric_arithmetic"]["train"]
  written = data["numeric_arithmetic_written"]["train"]
  assert len(written) == len(bare)
  for b, w in zip(bare, written):
    expression = w["inputs"][:-1]
    assert b["inputs"].endswith(w["inputs"])  # mB's prompt after its context words
    assert re.fullmatch(r"[0-9+\-x]+", expression), w
    value = reference_value(w["inputs"])
    assert kv.parse_answer(w["targets"], config) == value
    if config.scratchpad:
      assert w["targets"] == f"{expression}={kv.format_answer(value, config)}"
      assert expression not in heldout
    else:
      assert w["targets"] == b["targets"]


def test_negative_and_multiplied_answers_occur():
  data = kv.build_datasets(SMALL)
  targets = [ex["targets"] for ex in data["kv_arithmetic_heldout"]["validation"]]
  assert any(t.startswith("-") for t in targets)
  assert any(t.startswith("+") for t in targets)
  inputs = [ex["inputs"] for ex in data["numeric_arithmetic"]["train"]]
  assert any("x" in i for i in inputs)


def test_expression_shapes(config, data):
  for name in ("kv_substitution", *ARITH_SETS):
    for examples in data[name].values():
      for ex in examples:
        toks = tokens_of(ex["inputs"])
        fewest = config.operands_min
        if name == "numeric_arithmetic" and config.numeric_operands_min is not None:
          fewest = config.numeric_operands_min
        assert fewest <= len(toks) <= config.operands_max
        if config.max_multiplications is not None:
          assert ex["inputs"].count("x") - sum(t.count("x") for t in toks) \
              <= config.max_multiplications
  written = [t for ex in data["numeric_arithmetic"]["train"] for t in tokens_of(ex["inputs"])]
  numbers = [int(t) for t in written]
  assert config.value_min <= min(numbers) and max(numbers) <= config.value_max
  if config.numeric_operands_min is not None:  # the shorter sums really are mixed in
    counts = {len(tokens_of(ex["inputs"])) for ex in data["numeric_arithmetic"]["train"]}
    assert counts == set(range(config.numeric_operands_min, config.operands_max + 1))
  # Every written number (operands, substitutions, dictionary values) has the same format.
  written += [t for ex in data["kv_substitution"]["train"] for t in tokens_of(ex["targets"])]
  written += [ex["targets"] for ex in data["kv_dictionary"]["train"]]
  if config.operand_width:
    assert {len(t) for t in written} == {config.operand_width}
  else:
    assert all(t == str(int(t)) for t in written)


def test_train_and_evaluation_are_disjoint(data):
  def inputs(name, split):
    return {ex["inputs"] for ex in data[name][split]}

  assert not inputs("kv_substitution", "train") & inputs("kv_substitution", "validation")
  assert not inputs("numeric_arithmetic", "train") & inputs("numeric_arithmetic", "validation")
  assert not (inputs("kv_arithmetic_heldin", "train")
              & inputs("kv_arithmetic_heldin", "validation"))
  assert not inputs("kv_arithmetic_heldin", "train") & inputs("kv_arithmetic_heldout",
                                                              "validation")


def test_three_evaluation_rows_share_expressions(config, data):
  kv_eval = data["kv_arithmetic_heldout"]["validation"]
  sub_eval = data["kv_substitution"]["validation"]
  num_eval = data["numeric_arithmetic"]["validation"]
  for a, s, n in zip(kv_eval, sub_eval, num_eval):
    assert a["inputs"] == s["inputs"]
    assert n["inputs"] == s["targets"] + "="
    if config.scratchpad:  # KV-Arithmetic = KV-Substitution, then Numeric-Arithmetic
      assert a["targets"] == n["inputs"] + n["targets"]
    else:
      assert n["targets"] == a["targets"]


def test_precedence_is_standard():
  assert kv.evaluate([2, 3, 4, 5], ["+", "x", "-"]) == 9
  assert kv.evaluate([10, 22, 24], ["+", "-"]) == 8
  assert kv.evaluate([5, 3, 2], ["-", "-"]) == 0
  assert kv.evaluate([2, 3, 4], ["x", "x"]) == 24
  assert kv.evaluate([1, 2, 3, 4], ["-", "x", "x"]) == -23
  rng = np.random.default_rng(0)
  for _ in range(500):
    n = int(rng.integers(2, 7))
    nums = [int(v) for v in rng.integers(1, 1000, size=n)]
    ops = [str(o) for o in rng.choice(list("+-x"), size=n - 1)]
    assert kv.evaluate(nums, ops) == reference_value(kv.join_expression(
        [str(v) for v in nums], ops))


def test_answer_formats():
  cfg = kv.LAPTOP
  assert cfg.width == 5 and kv.max_abs_answer(cfg) == 199 ** 2 + 2 * 199
  assert kv.format_answer(8, cfg) == "+80000"
  assert kv.format_answer(-1234, cfg) == "-43210"
  assert kv.format_answer(0, cfg) == "+00000"
  assert kv.parse_answer("-43210", cfg) == -1234
  assert kv.parse_answer("43210", cfg) is None
  assert kv.parse_answer("+4321", cfg) is None
  plain = cfg.replace(answer_format="plain")
  assert kv.format_answer(-1234, plain) == "-1234"
  assert kv.parse_answer("-1234", plain) == -1234
  assert kv.parse_answer("12a", plain) is None
  with pytest.raises(ValueError):
    kv.format_answer(10 ** 5, cfg)
  with pytest.raises(ValueError):
    cfg.replace(answer_width=3)
  assert cfg.replace(answer_width=8).width == 8
  assert kv.LAPTOP_ADDSUB.width == 3
  assert kv.PAPER.width == len(str(25_000 ** 6))


def test_nonnegative_answers_have_no_sign():
  assert PADDED.width == 3  # 3 x 99
  assert kv.format_answer(142, PADDED) == "241"
  assert kv.format_answer(0, PADDED) == "000"
  assert kv.parse_answer("241", PADDED) == 142
  assert kv.parse_answer("+241", PADDED) is None
  assert kv.parse_answer("24", PADDED) is None
  with pytest.raises(ValueError, match="negative"):
    kv.format_answer(-1, PADDED)
  assert kv.format_operand(7, PADDED) == "007" and kv.format_operand(7, SMALL) == "7"


def test_scratchpad_targets_extend_the_substitution():
  data = kv.build_datasets(SCRATCH)
  sub = data["kv_substitution"]["validation"]
  arith = data["kv_arithmetic_heldout"]["validation"]
  for s, a in zip(sub, arith):
    assert a["targets"].startswith(s["targets"] + "=")
  assert kv.split_target("123+045=8610", SCRATCH) == ("123+045", "8610")
  assert SCRATCH.width == 3
  assert kv.split_target("861", SCRATCH) == (None, "861")
  assert kv.split_target("8610", PADDED) == (None, "8610")
  assert kv.parse_answer("123+045=861", SCRATCH) == 168
  assert kv.parse_answer("861", SCRATCH) == 168
  assert kv.parse_answer("123+045", SCRATCH) is None
  numeric = data["numeric_arithmetic"]["validation"]
  for s, n in zip(sub, numeric):  # Numeric-Arithmetic keeps the bare answer
    assert n["inputs"] == s["targets"] + "=" and "=" not in n["targets"]
  assert kv.arithmetic_target("123+045", 168, SCRATCH) == "123+045=861"
  assert kv.arithmetic_target("123+045", 168, PADDED) == "861"


def test_context_words_precede_numeric_training_prompts_and_are_never_keys():
  cfg = PADDED.replace(context_words=3, seed=9)
  data = kv.build_datasets(cfg)
  keys = set(kv.make_key_table(cfg).keys)
  counts = set()
  for ex in data["numeric_arithmetic"]["train"]:
    context, numeric = re.fullmatch(r"((?:[a-wyz0-9+\-]+=)?)([0-9+\-]+=)",
                                    ex["inputs"]).groups()
    words = re.findall(r"[a-wyz]+", context)
    counts.add(len(re.findall(r"[a-wyz0-9]+", context)))
    assert not keys & set(words)
    assert reference_decode(ex["targets"], cfg) == reference_value(numeric)
  assert counts == {0, 1, 2, 3}
  # Evaluation prompts stay bare, and so does everything else.
  assert all(not re.search(r"[a-wyz]", ex["inputs"])
             for ex in data["numeric_arithmetic"]["validation"])
  bare = kv.build_datasets(cfg.replace(context_words=0))
  assert [e["targets"] for e in bare["numeric_arithmetic"]["train"]] == [
      e["targets"] for e in data["numeric_arithmetic"]["train"]]
  assert bare["kv_arithmetic_heldin"] == data["kv_arithmetic_heldin"]
  assert kv.build_datasets(cfg) == data  # deterministic
  with pytest.raises(ValueError, match="context_words: expected an integer >= 0, got -1"):
    cfg.replace(context_words=-1)


def test_plain_format_dataset_is_correct():
  cfg = SMALL.replace(answer_format="plain", seed=11)
  data = kv.build_datasets(cfg)
  mapping = kv.make_key_table(cfg).mapping
  for ex in data["kv_arithmetic_heldout"]["validation"]:
    assert int(ex["targets"]) == reference_value(substitute(ex["inputs"], mapping))


def test_config_validation():
  with pytest.raises(ValueError):
    kv.KVConfig(num_keys=300, value_max=199)  # values could not be unique
  with pytest.raises(ValueError):
    kv.KVConfig(operators=("+", "/"), operator_weights=(1.0, 1.0))
  with pytest.raises(ValueError):
    kv.KVConfig(operator_weights=(1.0, 1.0))
  with pytest.raises(ValueError, match=r"operand_width: expected at least 3 digits.*got 2"):
    kv.KVConfig(operand_width=2)  # value_max=199
  with pytest.raises(ValueError, match=r"numeric_operands_min: expected None or 2\.\.4, got 5"):
    kv.KVConfig(numeric_operands_min=5)
  with pytest.raises(RuntimeError):
    kv.build_datasets(kv.KVConfig(num_keys=10, value_max=20, operands_min=2, operands_max=2,
                                  num_train=10_000, num_eval=10))


def test_count_expressions_matches_enumeration():
  import itertools
  for cfg in (kv.KVConfig(num_keys=4, value_max=9, operands_min=2, operands_max=4),
              kv.LAPTOP_ADDSUB.replace(operands_min=2, operands_max=3),
              kv.KVConfig(num_keys=4, value_max=9, max_multiplications=None, operands_max=5)):
    symbols = 3
    brute = 0
    for n in range(cfg.operands_min, cfg.operands_max + 1):
      for ops in itertools.product(cfg.operators, repeat=n - 1):
        if cfg.max_multiplications is None or ops.count("x") <= cfg.max_multiplications:
          brute += symbols ** n
    assert kv.count_expressions(cfg, symbols) == brute


def test_paper_config_key_table():
  table = kv.make_key_table(kv.PAPER)
  assert len(set(table.keys)) == 25_000
  assert sorted(table.values) == list(range(1, 25_001))  # a permutation of [1, 25K]
  assert len(table.heldin) == 5_000


# ---------------------------------------------------------------- tokenisation and arrays


def test_byte_encoding_round_trip():
  text = "bako+tilu-mesoxba=+80000"
  ids = kv.encode_text(text)
  assert ids == [b + 3 for b in text.encode()]
  assert kv.decode_ids(ids + [kv.EOS_ID, 50, 60]) == text
  assert kv.decode_ids([kv.PAD_ID] + ids) == text
  assert max(ids) < kv.BYTE_VOCAB_SIZE <= kv.PADDED_VOCAB_SIZE
  assert kv.PADDED_VOCAB_SIZE % 128 == 0


def _check_segment(arrays, row, seg, example):
  sel = arrays["decoder_segment_ids"][row] == seg
  idx = np.nonzero(sel)[0]
  assert np.all(np.diff(idx) == 1), "a segment must be contiguous"
  tgt = arrays["decoder_target_tokens"][row, sel]
  inp = arrays["decoder_input_tokens"][row, sel]
  w = arrays["decoder_loss_weights"][row, sel]
  pm = arrays["prompt_mask"][row, sel]
  pos = arrays["decoder_positions"][row, sel]
  n_in = len(example["inputs"].encode())
  n_tg = len(example["targets"].encode())
  assert len(tgt) == n_in + n_tg + 1
  assert tgt[-1] == kv.EOS_ID and np.sum(tgt == kv.EOS_ID) == 1
  assert kv.decode_ids(tgt[:n_in]) == example["inputs"]
  assert kv.decode_ids(tgt[n_in:]) == example["targets"]
  assert kv.decode_ids(tgt) == example["inputs"] + example["targets"]
  assert inp[0] == 0 and np.array_equal(inp[1:], tgt[:-1])
  assert np.array_equal(pos, np.arange(len(tgt)))
  # Loss on target bytes and EOS only.
  assert np.all(w[:n_in] == 0) and np.all(w[n_in:] == 1)
  assert kv.decode_ids(tgt[w > 0]) == example["targets"]
  # prompt_mask: BOS + prompt bytes as *inputs*, i.e. the first n_in + 1 positions.
  assert np.all(pm[: n_in + 1]) and not np.any(pm[n_in + 1:])


@pytest.mark.parametrize("pack", [False, True])
def test_numpy_arrays(pack):
  examples = kv.get_examples("kv_arithmetic_heldout", "validation", SMALL)[:40]
  examples += kv.get_examples("kv_substitution", "train", SMALL)[:40]
  seq_len = 64
  arrays = kv.to_numpy_arrays(examples, seq_len, pack=pack)
  assert set(arrays) == set(kv.FEATURE_KEYS)
  rows = arrays["decoder_target_tokens"].shape[0]
  for v in arrays.values():
    assert v.shape == (rows, seq_len)
  assert arrays["decoder_target_tokens"].dtype == np.int32
  assert arrays["decoder_loss_weights"].dtype == np.float32
  assert arrays["prompt_mask"].dtype == bool
  if pack:
    assert rows < len(examples)
  else:
    assert rows == len(examples)
  # Walk the rows and match segments to examples in order.
  k = 0
  for r in range(rows):
    segs = arrays["decoder_segment_ids"][r]
    for seg in range(1, segs.max() + 1):
      _check_segment(arrays, r, seg, examples[k])
      k += 1
    pad = segs == 0
    for name in FEATURES_ZERO_ON_PAD:
      assert not np.any(arrays[name][r][pad]), name
  assert k == len(examples)
  assert np.sum(arrays["decoder_target_tokens"] == kv.EOS_ID) == len(examples)


FEATURES_ZERO_ON_PAD = kv.FEATURE_KEYS


def test_numpy_batches_shapes_and_remainder():
  examples = kv.get_examples("numeric_arithmetic", "validation", SMALL)[:10]
  batches = list(kv.to_numpy_batches(examples, batch_size=4, seq_len=32))
  assert len(batches) == 3
  for b in batches:
    assert b["decoder_target_tokens"].shape == (4, 32)
  last = batches[-1]
  assert np.all(last["decoder_segment_ids"][2:] == 0)
  assert np.all(last["decoder_loss_weights"][2:] == 0)
  assert len(list(kv.to_numpy_batches(examples, 4, 32, drop_remainder=True))) == 2
  shuffled = list(kv.to_numpy_batches(examples, 10, 32, shuffle=True, seed=1))[0]
  plain = batches[0]["decoder_target_tokens"]
  assert not np.array_equal(shuffled["decoder_target_tokens"][:4], plain)
  again = list(kv.to_numpy_batches(examples, 10, 32, shuffle=True, seed=1))[0]
  assert np.array_equal(shuffled["decoder_target_tokens"], again["decoder_target_tokens"])
  decoded = sorted(kv.decode_ids(row) for row in shuffled["decoder_target_tokens"])
  assert decoded == sorted(ex["inputs"] + ex["targets"] for ex in examples)


def test_overflow():
  ex = [{"inputs": "ab=", "targets": "12345"}, {"inputs": "a=", "targets": "1"}]
  with pytest.raises(ValueError):
    kv.to_numpy_arrays(ex, seq_len=6)
  arrays = kv.to_numpy_arrays(ex, seq_len=6, on_overflow="skip")
  assert arrays["decoder_target_tokens"].shape == (1, 6)
  assert kv.max_sequence_length(ex) == 9


def test_default_sequences_are_short():
  data = kv.build_datasets(kv.LAPTOP)
  longest = max(kv.max_sequence_length(ex) for s in data.values() for ex in s.values())
  assert longest <= 64


def test_exact_match():
  metric = evaluation.seqio_metric("exact_match", key="accuracy")
  assert metric(["+1", "-3"], ["+1", "-2"]) == {"accuracy": 50.0}  # seqio: targets first


# ---------------------------------------------------------------- TensorFlow-free import path


def test_generator_imports_without_tensorflow():
  code = ("import sys, tasks, tasks.kv_arithmetic as kv; "
          "assert not tasks.SEQIO_AVAILABLE; "
          "assert 'tensorflow' not in sys.modules and 'seqio' not in sys.modules; "
          "kv.to_numpy_arrays(kv.get_examples('kv_dictionary', 'train'), 16)\n"
          "try:\n  tasks.register_all()\nexcept ImportError as e:\n  print('ImportError', e)\n")
  env = dict(os.environ, CALM_JAX_NO_SEQIO="1", PYTHONPATH=str(REPO))
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "ImportError" in out.stdout and "seqio" in out.stdout


# ---------------------------------------------------------------- seqio (skipped without TF)


@pytest.fixture(scope="module")
def seqio_tasks():
  seqio = pytest.importorskip("seqio")
  import tasks
  if not tasks.SEQIO_AVAILABLE:
    pytest.skip("seqio disabled (CALM_JAX_NO_SEQIO)")
  return seqio, tasks


def test_seqio_registration_is_idempotent(seqio_tasks):
  seqio, tasks = seqio_tasks
  names = tasks.register_all()
  assert tasks.register_all() == names
  importlib.reload(tasks)
  for name in ("kv_dictionary", "kv_substitution", "numeric_arithmetic", "kv_arithmetic_heldin",
               "kv_arithmetic_heldout", "paper_kv_substitution"):
    assert name in seqio.TaskRegistry.names(), name
  for name in ("kv_ma_pretrain", "kv_mb_pretrain", "kv_composition"):
    assert name in seqio.MixtureRegistry.names(), name


def test_seqio_vocabulary_matches_numpy_encoding(seqio_tasks):
  seqio, _ = seqio_tasks
  vocab = seqio.ByteVocabulary()
  text = "ozibag-tolutixen=+80760"
  assert vocab.encode(text) == kv.encode_text(text)
  assert vocab.vocab_size == kv.BYTE_VOCAB_SIZE
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (kv.PAD_ID, kv.EOS_ID, kv.UNK_ID)


@pytest.mark.parametrize("name,split", [("kv_arithmetic_heldout", "validation"),
                                        ("kv_arithmetic_heldin", "train"),
                                        ("numeric_arithmetic", "train"),
                                        ("kv_substitution", "validation")])
def test_seqio_task_reads_generated_examples(seqio_tasks, name, split):
  seqio, _ = seqio_tasks
  task = seqio.get_mixture_or_task(name)
  assert task.num_input_examples(split) == len(kv.get_examples(name, split))
  ds = task.get_dataset(sequence_length={"inputs": 64, "targets": 32}, split=split,
                        shuffle=False)
  expected = kv.get_examples(name, split)[:5]
  got = list(ds.take(5).as_numpy_iterator())
  for ex, want in zip(got, expected):
    assert ex["inputs_pretokenized"].decode() == want["inputs"]
    assert ex["targets_pretokenized"].decode() == want["targets"]
    assert list(ex["inputs"]) == kv.encode_text(want["inputs"])  # no EOS on inputs
    assert list(ex["targets"]) == kv.encode_text(want["targets"]) + [kv.EOS_ID]


def test_seqio_mixture_reads(seqio_tasks):
  seqio, _ = seqio_tasks
  ds = seqio.get_mixture_or_task("kv_ma_pretrain").get_dataset(
      sequence_length={"inputs": 64, "targets": 64}, split="train", shuffle=True, seed=0)
  got = list(ds.take(8).as_numpy_iterator())
  assert len(got) == 8
  allowed = {(ex["inputs"], ex["targets"])
             for name in ("kv_dictionary", "kv_substitution", "numeric_substitution")
             for ex in kv.get_examples(name, "train")}
  for ex in got:
    assert ex["targets"][-1] == kv.EOS_ID
    pair = (kv.decode_ids(ex["inputs"]), kv.decode_ids(ex["targets"]))
    assert pair in allowed


def test_numpy_arrays_match_seqio_prefix_lm_converter(seqio_tasks):
  seqio, _ = seqio_tasks
  seq_len = 48
  ds = seqio.get_dataset("kv_arithmetic_heldout", task_feature_lengths={"inputs": 32,
                                                                        "targets": 16},
                         dataset_split="validation", shuffle=False,
                         feature_converter=seqio.PrefixLMFeatureConverter(pack=False))
  got = list(ds.take(4).as_numpy_iterator())
  ours = kv.to_numpy_arrays(kv.get_examples("kv_arithmetic_heldout", "validation")[:4],
                            seq_len)
  for r, ex in enumerate(got):
    n = int(np.sum(ours["decoder_segment_ids"][r] > 0))
    assert np.array_equal(ex["decoder_target_tokens"][:seq_len], ours["decoder_target_tokens"][r])
    assert np.array_equal(ex["decoder_input_tokens"][:n], ours["decoder_input_tokens"][r, :n])
    assert np.array_equal(ex["decoder_loss_weights"][:seq_len],
                          ours["decoder_loss_weights"][r].astype(np.int32))
    assert np.array_equal(ex["decoder_causal_attention"][:seq_len].astype(bool),
                          ours["prompt_mask"][r])
