"""The key-value experiment's scoring: exact match per Table-1 row, scratchpad error kinds, and
the linear probe of the augmenting model's states."""

import pytest

from calm_jax.experiments import kv_scoring
from calm_jax.models import TransformerConfig
from tasks import kv_arithmetic as kv


def test_score_is_exact_match_of_each_rows_own_part_of_the_text():
    plain = kv.CONFIGS["laptop_2op"]  # no scratchpad: the whole text is the answer
    examples = [{"inputs": "bako+tilu=", "targets": "168"}] * 4
    assert kv_scoring.score("kv_arithmetic", ["168", "168 ", "16", "168"], examples,
                            plain) == 50.0
    pad = kv.CONFIGS["laptop_scratchpad"]
    examples = [{"inputs": "bako+tilu=", "targets": "123+045=8610"}] * 4
    predictions = ["123+045=8610", "999+999=8610", "123+045=8611", "8610"]
    # KV-Substitution scores the text before the first `=`, the arithmetic rows what follows.
    assert kv_scoring.score("kv_substitution", predictions, [{"targets": "123+045"}] * 4,
                            pad) == 50.0
    assert kv_scoring.score("kv_arithmetic", predictions, examples, pad) == 75.0
    with pytest.raises(ValueError):  # one prediction per example
        kv_scoring.score("kv_arithmetic", predictions[:3], examples, pad)


def test_scratchpad_errors_tell_a_wrong_substitution_from_a_wrong_sum():
    cfg = kv.CONFIGS["laptop_scratchpad"]  # 3-digit operands, answers reversed to 4 digits
    kv_examples = [{"inputs": "bako+tilu=", "targets": "123+045=8610"}] * 4
    predictions = ["123+045=8610",   # right
                   "123+046=9610",   # wrong number written, its sum right: substitution
                   "123+045=9610",   # right numbers, wrong sum: arithmetic
                   "123+046=8610x"]  # wrong number and a sum of nothing written: other
    errors = kv_scoring.scratchpad_errors(predictions, kv_examples, cfg)
    assert errors == {"correct": 25.0, "substitution": 25.0, "arithmetic": 25.0, "other": 25.0}
    assert errors["correct"] == kv_scoring.score("kv_arithmetic", predictions, kv_examples, cfg)
    # Numeric-Arithmetic: the target is the bare answer, the numbers are the prompt's.
    numeric = [{"inputs": "989-058=", "targets": "1390"}] * 4
    predictions = ["989-058=1390", "1390",           # restated or not: right either way
                   "+89-058=1290",                   # a letter for a digit: other
                   "889-058=1380"]                   # 889 - 58 = 831: substitution
    assert kv_scoring.scratchpad_errors(predictions, numeric, cfg) == {
        "correct": 50.0, "substitution": 25.0, "arithmetic": 0.0, "other": 25.0}
    assert kv_scoring.scratchpad_errors(predictions, numeric, kv.CONFIGS["laptop_2op"]) is None


def test_value_probe_reads_a_value_that_is_written_into_the_states(monkeypatch):
    """The probe must find a value where one is linearly present, and not where none is."""
    model = TransformerConfig.tiny(vocab_size=384, embed_dim=32, num_layers=1, num_heads=2,
                                   num_kv_heads=2, mlp_dim=64, max_len=32)
    table = kv.make_key_table(kv.LAPTOP_2OP)  # 102 held-in keys: every digit occurs
    digit_of = {k: v % 10 for k, v in table.mapping.items()}

    class Planted:  # states carry a one-hot of the key's last value digit at its last letter
        def __init__(self, config):
            pass

        def apply(self, variables, tokens, return_states=()):
            import numpy as np

            states = {}
            for layer in return_states:
                x = np.random.default_rng(layer).normal(size=(*tokens.shape, 16))
                for row, ids in enumerate(np.asarray(tokens)):
                    text = kv.decode_ids(ids[1:])
                    key = kv.split_expression(text.split("=")[0] + "=")[0][0]
                    if layer == 1:
                        x[row, len(key), :10] += 5.0 * np.eye(10)[digit_of[key]]
                states[layer] = x
            return None, states

    monkeypatch.setattr(kv_scoring, "Decoder", Planted)
    probe = kv_scoring.value_probe(model, None, "laptop_2op", num_examples=300)
    assert probe["heldout"][1] == 100.0  # layer 1 holds the digit for every key
    assert probe["heldout"][0] < 40.0  # layer 0 is noise: near chance on unseen keys
