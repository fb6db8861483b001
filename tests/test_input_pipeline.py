"""seqio bridge: a registered task read through t5x's prefix-LM feature converter."""

import numpy as np
import pytest

seqio = pytest.importorskip("seqio", reason="seqio/TensorFlow are the optional [data] extra")

from calm_jax.data import DatasetConfig, make_source  # noqa: E402
from tasks import kv_arithmetic as kv  # noqa: E402


def test_seqio_task_gives_the_same_examples_as_the_numpy_path():
    length = 48
    config = DatasetConfig(source="seqio", name="kv_arithmetic_heldin", split="validation",
                           batch_size=4, length=length, target_length=8, max_examples=16)
    source = make_source(config)
    got = source.arrays
    assert got["decoder_input_tokens"].shape == (16, length)
    want = kv.numpy_features("kv_arithmetic_heldin", "validation", length)
    # Same examples, same loss on targets only; seqio pads inputs/targets to fixed lengths,
    # so compare the decoded prompt and target strings row by row.
    for row in range(16):
        for arrays in (got, want):
            assert arrays["prompt_mask"][row].sum() > 0
        g_tgt = got["decoder_target_tokens"][row][got["decoder_loss_weights"][row] > 0]
        w_tgt = want["decoder_target_tokens"][row][want["decoder_loss_weights"][row] > 0]
        np.testing.assert_array_equal(g_tgt, w_tgt)
    batch = source.batch(0)
    assert batch["decoder_target_tokens"].shape == (4, length)


def test_unknown_seqio_name_is_a_clear_error():
    with pytest.raises(ValueError, match="dataset.name: expected a registered seqio task"):
        make_source(DatasetConfig(source="seqio", name="no_such_task", length=32))
