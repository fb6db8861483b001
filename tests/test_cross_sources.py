"""Compositions across tokenizers through the TFDS and seqio sources: rows equal
`calm_jax.alignment.text_examples`' rows of the same texts (packed and not), exact resume batch
for batch, and the prefix-LM refusal."""

import numpy as np
import pytest

pytest.importorskip("seqio", reason="seqio/TensorFlow are the optional [data] extra")
pytest.importorskip("tensorflow_datasets", reason="TFDS is the optional [data] extra")

from calm_jax import alignment  # noqa: E402
from calm_jax.data import DatasetConfig, make_source  # noqa: E402
from calm_jax.tokenizers import ByteTokenizer, Tokenizer  # noqa: E402
import test_input_pipeline  # noqa: E402
import test_sources  # noqa: E402
from test_input_pipeline import TEXTS, _resumes_batch_for_batch, _tfds, register_task  # noqa: E402
from test_sources import _word_lines  # noqa: E402

# The fixtures of those modules: a TFDS dataset of TEXTS, and a byte-level BPE export.
tfds_dir, bpe_export = test_input_pipeline.tfds_dir, test_sources.bpe_export

LINES = _word_lines(40, seed=2)
CROSS = dict(length=32, batch_size=2)
# Unpacked, 16 positions cut the longer texts; packed, 24 hold two short ones.
AUGMENT_LENGTH = {False: 16, True: 24}


def _augments(bpe_export):
    return {"b": bpe_export, "c": "byte"}


def _seqio(bpe_export, pack=True, **kw):
    name = register_task("calm_test_word_lines", [f"q{i}" for i in range(len(LINES))], LINES)
    args = dict(source="seqio", name=name, prefix_lm=False, shuffle_buffer=8, seed=4,
                augment_vocabularies=_augments(bpe_export), pack=pack,
                augment_length=AUGMENT_LENGTH[pack], **CROSS)
    args.update(kw)
    return DatasetConfig(**args)


def _tfds_cross(data_dir, bpe_export, pack, **kw):
    return _tfds(data_dir, augment_vocabularies=_augments(bpe_export), pack=pack,
                 augment_length=AUGMENT_LENGTH[pack], **CROSS, **kw)


def _all_rows(config):
    batches = list(make_source(config).sequential())
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _text_examples(texts, bpe_export, pack):
    return alignment.text_examples(
        texts, ByteTokenizer(), {"b": Tokenizer.load(bpe_export + "/tokenizer"),
                                 "c": ByteTokenizer()},
        length=CROSS["length"], augment_length=AUGMENT_LENGTH[pack], pack=pack)


def _assert_rows_equal(got, want, pack, texts):
    # An odd number of rows leaves the last batch short; sequential() gives full batches only.
    rows = len(got["decoder_input_tokens"])
    assert rows == len(want["decoder_input_tokens"]) // 2 * 2 and got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k][:rows], err_msg=k)
    if pack:  # rows hold several texts
        assert want["decoder_segment_ids"].max() >= 2
    else:  # a row per text, and the byte augment's 16 positions cut some
        assert len(want["decoder_input_tokens"]) == len(texts)
        assert (want["augments/c/segment_ids"] > 0).all(axis=1).any()


@pytest.mark.parametrize("pack", [False, True])
def test_tfds_rows_equal_text_examples(tfds_dir, bpe_export, pack):
    config = _tfds_cross(tfds_dir, bpe_export, pack, shuffle=False, num_epochs=1)
    _assert_rows_equal(_all_rows(config), _text_examples(TEXTS, bpe_export, pack), pack, TEXTS)


@pytest.mark.parametrize("pack", [False, True])
def test_seqio_rows_equal_text_examples_of_the_decoded_targets(bpe_export, pack):
    config = _seqio(bpe_export, pack, shuffle=False, num_epochs=1)
    _assert_rows_equal(_all_rows(config), _text_examples(LINES, bpe_export, pack), pack, LINES)


def _assert_past_an_epoch_with_texts_pending(config, texts, batches):
    """After `batches` batches the stream has read more records than there are texts, and a
    packed stream holds the example read but not yet placed as its text."""
    source = make_source(config)
    for _ in range(batches):
        source.next_batch()
    state = source.get_state()
    assert state["stream"]["taken"] > len(texts)
    assert set(state["pending"]) <= set(texts) and (len(state["pending"]) == 1) == config.pack


@pytest.mark.parametrize("pack", [True, False])
def test_tfds_resumes_batch_for_batch_across_epochs(tfds_dir, bpe_export, pack):
    config = _tfds_cross(tfds_dir, bpe_export, pack)
    want = _resumes_batch_for_batch(config, 30, (1, 9, 22))
    assert "augments/b/tokens" in want[0] and want[0]["decoder_byte_ends"].any()
    _assert_past_an_epoch_with_texts_pending(config, TEXTS, 30)


@pytest.mark.parametrize("pack", [True, False])
def test_seqio_resumes_batch_for_batch_across_epochs(bpe_export, pack):
    config = _seqio(bpe_export, pack)
    want = _resumes_batch_for_batch(config, 30, (2, 11, 23))
    assert "augments/b/tokens" in want[0] and want[0]["decoder_byte_ends"].any()
    _assert_past_an_epoch_with_texts_pending(config, LINES, 30)


def test_seqio_across_tokenizers_refuses_prefix_lm(bpe_export):
    with pytest.raises(ValueError, match=r"dataset.prefix_lm: expected False with "
                                         r"augment_vocabularies and source='seqio' .*got True"):
        _seqio(bpe_export, prefix_lm=True)
    # Only the seqio source reads prefix_lm: TFDS across tokenizers takes its default (True).
    assert DatasetConfig(source="tfds", name="set", augment_vocabularies={"c": "byte"}).prefix_lm
