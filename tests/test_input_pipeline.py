"""seqio and TFDS sources through tf.data: the same examples as the numpy path, exact resume
batch for batch, per-process shards, clear errors."""

import dataclasses
import json

import numpy as np
import pytest

seqio = pytest.importorskip("seqio", reason="seqio/TensorFlow are the optional [data] extra")
tfds = pytest.importorskip("tensorflow_datasets", reason="TFDS is the optional [data] extra")

import tensorflow as tf  # noqa: E402

from calm_jax.data import DatasetConfig, make_source  # noqa: E402
from tasks import byte_data  # noqa: E402
from tasks import kv_arithmetic as kv  # noqa: E402
from test_sources import _equal  # noqa: E402

SEQIO = dict(source="seqio", name="kv_arithmetic_heldin", split="validation", batch_size=4,
             length=48, target_length=8, max_examples=16)
TEXTS = [f"example {i} " + "z" * (i % 7) for i in range(30)]


def _resumes_batch_for_batch(config, batches, stops):
    """Batches of a run interrupted after each of `stops` batches and resumed from its state
    (JSON round trip, a fresh source) equal those of the uninterrupted run."""
    whole = make_source(config)
    want = [whole.next_batch() for _ in range(batches)]
    first, taken = make_source(config), 0
    for stop in stops:
        for _ in range(stop - taken):
            first.next_batch()
        taken = stop
        resumed = make_source(config)
        resumed.set_state(json.loads(json.dumps(first.get_state())))
        _equal([resumed.next_batch() for _ in range(batches - stop)], want[stop:])
    return want


def register_task(name, inputs, targets):
    """A seqio task `name` over in-memory inputs/targets texts (byte vocabulary, EOS after the
    targets), registered once."""
    if name not in seqio.TaskRegistry.names():
        def dataset_fn(split, shuffle_files, seed=None):
            del split, shuffle_files, seed
            return tf.data.Dataset.from_tensor_slices({"inputs": inputs, "targets": targets})

        vocab = seqio.ByteVocabulary()
        seqio.TaskRegistry.add(
            name, source=seqio.FunctionDataSource(dataset_fn, splits=["train"]),
            preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
            output_features={"inputs": seqio.Feature(vocab, add_eos=False),
                             "targets": seqio.Feature(vocab, add_eos=True)})
    return name


def _tiny_task():
    """A seqio task over in-memory question/answer pairs (byte vocabulary)."""
    name = register_task("calm_test_tiny_qa", [f"q{i}=" for i in range(24)],
                         [str(i * 37) for i in range(24)])
    return DatasetConfig(source="seqio", name=name, batch_size=2, length=16, target_length=8,
                         shuffle_buffer=8, seed=1)


def test_seqio_task_gives_the_same_examples_as_the_numpy_path():
    source = make_source(DatasetConfig(**SEQIO, shuffle=False))
    got = {k: np.concatenate([b[k] for b in source.sequential()])
           for k in next(source.sequential(1))}
    assert got["decoder_input_tokens"].shape == (16, 48)
    want = kv.numpy_features("kv_arithmetic_heldin", "validation", 48)
    # Same examples, same loss on targets only; seqio pads inputs/targets to fixed lengths,
    # so compare the target tokens row by row.
    for row in range(16):
        for arrays in (got, want):
            assert arrays["prompt_mask"][row].sum() > 0
        g_tgt = got["decoder_target_tokens"][row][got["decoder_loss_weights"][row] > 0]
        w_tgt = want["decoder_target_tokens"][row][want["decoder_loss_weights"][row] > 0]
        np.testing.assert_array_equal(g_tgt, w_tgt)


def test_seqio_task_resumes_batch_for_batch_across_epochs():
    config = dataclasses.replace(_tiny_task(), pack=True)
    want = _resumes_batch_for_batch(config, 12, (3, 8))  # 24 examples, about 4 to a batch
    assert want[0]["decoder_segment_ids"].max() >= 2 and "prompt_mask" in want[0]
    epochs = [[tuple(r) for b in want[i:i + 5] for r in b["decoder_target_tokens"]]
              for i in (0, 6)]
    assert epochs[0] != epochs[1]  # reshuffled


def test_seqio_processes_read_disjoint_shards():
    config = dataclasses.replace(_tiny_task(), shuffle=False, num_epochs=1)
    rows = [{tuple(r) for b in make_source(config, process_index=p, process_count=2)
             .sequential() for r in b["decoder_target_tokens"]} for p in range(2)]
    assert len(rows[0]) == len(rows[1]) == 12 and not rows[0] & rows[1]


def test_unknown_seqio_name_is_a_clear_error():
    with pytest.raises(ValueError, match="dataset.name: expected a registered seqio task"):
        make_source(DatasetConfig(source="seqio", name="no_such_task", length=32))


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A tiny TFDS dataset prepared locally from in-memory texts (no network)."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    features = tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                           "question": tfds.features.Text()})
    rows = tf.data.Dataset.from_tensor_slices(
        {"text": TEXTS, "question": [f"q{i}?" for i in range(len(TEXTS))]})
    tfds.dataset_builders.store_as_tfds_dataset(
        name="calm_tiny_text", version="1.0.0", features=features,
        split_datasets={"train": rows}, data_dir=data_dir, disable_shuffling=True)
    return data_dir


def _tfds(data_dir, **kw):
    args = dict(source="tfds", name="calm_tiny_text:1.0.0", data_dir=data_dir, batch_size=2,
                length=16, shuffle_buffer=8, seed=3)
    args.update(kw)
    return DatasetConfig(**args)


def test_tfds_texts_are_tokenized_and_packed_like_text_files(tfds_dir):
    source = make_source(_tfds(tfds_dir, shuffle=False, pack=True, num_epochs=1, length=24))
    texts = []
    for batch in source.sequential():
        for tokens, segs in zip(batch["decoder_target_tokens"], batch["decoder_segment_ids"]):
            texts += [byte_data.decode_ids(tokens[segs == s]) for s in range(1, segs.max() + 1)]
    assert texts[:20] == TEXTS[:20]


@pytest.mark.parametrize("kw", [dict(pack=True), dict(pack=False, inputs_field="question")])
def test_tfds_resumes_batch_for_batch_across_epochs(tfds_dir, kw):
    want = _resumes_batch_for_batch(_tfds(tfds_dir, **kw), 40, (1, 9, 22))
    assert ("prompt_mask" in want[0]) == ("inputs_field" in kw)
    assert make_source(_tfds(tfds_dir, **kw)).get_state()["stream"] == {"taken": 0}


def test_tfds_processes_read_disjoint_shards_that_cover_the_split(tfds_dir):
    seen = []
    for p in range(2):
        source = make_source(_tfds(tfds_dir, length=32, num_epochs=1), process_index=p,
                             process_count=2)
        seen.append([byte_data.decode_ids(r) for b in source.sequential()
                     for r in b["decoder_target_tokens"]])
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == sorted(TEXTS)


def test_unknown_tfds_name_is_a_clear_error(tfds_dir):
    with pytest.raises(ValueError, match=r"dataset.name: expected a prepared TFDS dataset with "
                                         r"split 'train' in data_dir=.*, got 'no_such_set'"):
        make_source(_tfds(tfds_dir, name="no_such_set"))
