"""Numpy batches: a pure function of the step, epochs, per-process slices, resume state, config
checks."""

import jax
import numpy as np
import pytest

from calm_jax import partitioning as part
from calm_jax import data as data_lib
from calm_jax.data import DatasetConfig, NumpySource, make_source, to_global

ROWS, LENGTH = 20, 6


def _arrays(rows=ROWS, length=LENGTH):
    ids = np.arange(rows * length, dtype=np.int32).reshape(rows, length)
    return {"decoder_input_tokens": ids, "decoder_target_tokens": ids + 1,
            "decoder_loss_weights": np.ones((rows, length), np.float32),
            "decoder_segment_ids": np.ones((rows, length), np.int32)}


def _row_ids(batch):
    return [int(r[0]) // LENGTH for r in batch["decoder_input_tokens"]]


def test_a_batch_is_a_pure_function_of_the_step():
    first, again = NumpySource(_arrays(), 4, seed=3), NumpySource(_arrays(), 4, seed=3)
    for step in (7, 0, 12, 7):  # any order, as a resumed run asks for them
        a, b = first.batch(step), again.batch(step)
        assert a.keys() == b.keys() == _arrays().keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    other = NumpySource(_arrays(), 4, seed=4)
    assert [_row_ids(first.batch(s)) for s in range(5)] != \
        [_row_ids(other.batch(s)) for s in range(5)]


def test_each_epoch_sees_every_row_once_in_a_new_order():
    source = NumpySource(_arrays(), 4, seed=0)  # 5 batches per epoch
    epochs = [[r for s in range(e * 5, e * 5 + 5) for r in _row_ids(source.batch(s))]
              for e in range(3)]
    assert all(sorted(rows) == list(range(ROWS)) for rows in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    # Rows travel with all their features.
    batch = source.batch(3)
    np.testing.assert_array_equal(batch["decoder_target_tokens"],
                                  batch["decoder_input_tokens"] + 1)


def test_a_tail_that_does_not_fill_a_batch_waits_for_the_next_epoch():
    source = NumpySource(_arrays(rows=10), 4, seed=0)  # 2 batches per epoch, 2 rows left over
    seen = _row_ids(source.batch(0)) + _row_ids(source.batch(1))
    assert len(set(seen)) == 8 and len(_row_ids(source.batch(2))) == 4


def test_processes_take_disjoint_slices_of_the_same_global_batch():
    whole = NumpySource(_arrays(), 8, seed=1, process_index=0, process_count=1)
    parts = [NumpySource(_arrays(), 8, seed=1, process_index=i, process_count=4)
             for i in range(4)]
    for step in (0, 1, 6):
        assert sum((_row_ids(p.batch(step)) for p in parts), []) == _row_ids(whole.batch(step))
    assert [len(list(p.sequential())) for p in parts] == [2] * 4
    assert sum((_row_ids(b) for p in parts for b in list(p.sequential())[:1]), []) == \
        list(range(8))


def test_sequential_batches_are_in_order_and_drop_the_tail():
    source = NumpySource(_arrays(), 6, seed=0)
    assert [_row_ids(b) for b in source.sequential()] == [list(range(i, i + 6))
                                                          for i in (0, 6, 12)]
    assert len(list(source.sequential(2))) == 2 and len(list(source.sequential(99))) == 3


def test_only_known_features_are_kept():
    arrays = {**_arrays(), "inputs_pretokenized": np.array(["x"] * ROWS)}
    assert set(NumpySource(arrays, 4).arrays) == set(_arrays())


@pytest.mark.parametrize("change, kwargs, message", [
    (lambda a: {k: v for k, v in a.items() if k != "decoder_loss_weights"}, {},
     r"dataset: expected features \['decoder_input_tokens', 'decoder_target_tokens', "
     r"'decoder_loss_weights'\], missing \['decoder_loss_weights'\]"),
    (lambda a: a, {"batch_size": 21},
     r"dataset.batch_size: expected at most the 20 examples available, got 21"),
    (lambda a: a, {"batch_size": 6, "process_count": 4, "process_index": 0},
     r"dataset.batch_size: expected a multiple of the 4 processes, got 6"),
    (lambda a: {**a, "decoder_loss_weights": a["decoder_loss_weights"][:, :5]}, {},
     r"dataset.decoder_loss_weights: expected shape \(20, 6\) like decoder_input_tokens, "
     r"got \(20, 5\)"),
    (lambda a: {**a, "decoder_segment_ids": a["decoder_segment_ids"][:19]}, {},
     r"dataset.decoder_segment_ids: expected shape \(20, 6\) like decoder_input_tokens, "
     r"got \(19, 6\)"),
    (lambda a: {k: v.reshape(-1) for k, v in a.items()}, {},
     r"dataset.decoder_input_tokens: expected \[examples, length\], got shape \(120,\)"),
])
def test_bad_arrays_are_refused_with_the_feature_named(change, kwargs, message):
    kwargs = {"batch_size": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        NumpySource(change(_arrays()), **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"source": "arrow"}, r"dataset.source: expected one of 'numpy', 'seqio', 'tfds', 'text', "
                          r"'jsonl', got 'arrow'"),
    ({"source": "tfds"}, r"dataset.name: expected a TFDS dataset name with source='tfds', "
                         r"got None"),
    ({"source": "text"}, r"dataset.paths: expected files or glob patterns with "
                         r"source='text', got \(\)"),
    ({"source": "text", "paths": "a.txt", "inputs_field": "q"},
     r"dataset.inputs_field: expected None with source='text'"),
    ({"num_epochs": 0}, r"dataset.num_epochs: expected a positive integer or None, got 0"),
    ({"block_bytes": -1}, r"dataset.block_bytes: expected a positive integer, got -1"),
    ({"arrays_fn": None}, r"dataset.arrays_fn: expected a callable"),
    ({"source": "seqio"}, r"dataset.name: expected a seqio task or mixture name"),
    ({"batch_size": 0}, r"dataset.batch_size: expected a positive integer, got 0"),
    ({"length": 2.5}, r"dataset.length: expected a positive integer, got 2.5"),
])
def test_bad_dataset_configs_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DatasetConfig(**{"arrays_fn": _arrays, **kwargs})


def test_make_source_checks_the_configured_length():
    source = make_source(DatasetConfig(arrays_fn=_arrays, batch_size=4, length=LENGTH, seed=2))
    assert source.length == LENGTH and source.seed == 2
    with pytest.raises(ValueError, match=r"dataset.length: expected the arrays' length 6, "
                                         r"got 8"):
        make_source(DatasetConfig(arrays_fn=_arrays, batch_size=4, length=8))


def test_to_global_splits_the_batch_over_data_and_fsdp():
    mesh = part.make_mesh(part.PartitioningConfig(mesh_shape=(2, 2, 2)))
    batch = NumpySource(_arrays(), 8).batch(0)
    placed = to_global(batch, part.batch_sharding(mesh))
    for k, v in placed.items():
        assert v.shape == batch[k].shape and v.dtype == batch[k].dtype
        assert {s.data.shape for s in v.addressable_shards} == {(2, LENGTH)}
        np.testing.assert_array_equal(jax.device_get(v), batch[k])


def test_next_batch_walks_the_steps_and_its_state_resumes_there():
    source = NumpySource(_arrays(), 4, seed=3)
    walked = [source.next_batch() for _ in range(7)]  # past an epoch (5 batches)
    for step, batch in enumerate(walked):
        assert _row_ids(batch) == _row_ids(source.batch(step))
    state = source.get_state()
    assert state == {"source": "numpy", "step": 7}
    resumed = NumpySource(_arrays(), 4, seed=3)
    resumed.set_state(state)
    assert [_row_ids(resumed.next_batch()) for _ in range(4)] == \
        [_row_ids(source.next_batch()) for _ in range(4)]


def test_restore_state_reads_data_state_or_an_older_checkpoints_data_position():
    source = NumpySource(_arrays(), 4)
    meta = {"data_position": 6, **data_lib.checkpoint_meta(source)}
    assert meta["data_state"] == [{"source": "numpy", "step": 0}]
    data_lib.restore_state(source, {"data_position": 6})  # no data_state: the step
    assert source.step == 6
    data_lib.restore_state(source, meta)
    assert source.step == 0
    with pytest.raises(ValueError, match=r"checkpoint: the data position was saved by a 'text' "
                                         r"source; this run reads dataset.source='numpy'"):
        data_lib.restore_state(source, {"data_position": 6, "data_state": [
            {"source": "text", "batches": 6}]})
