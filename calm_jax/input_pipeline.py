"""seqio and TFDS sources over tf.data (the only trainer module that imports seqio/TensorFlow).

Both are `calm_jax.sources.BatchSource`s, so the trainer sees the same interface as for text
files; their position is the number of records this process has taken from a deterministic
tf.data pipeline, and a resumed source rebuilds the pipeline and skips that many (`skip`, run by
tf.data, reads them again: resuming costs time in proportion to the position, never memory).

* "seqio": a registered task or mixture (importing `tasks` registers ours), this process's
  shard (`seqio.ShardInfo`), seeded shuffling, epochs, then t5x's feature converter
  (prefix-LM: loss on targets only, `decoder_causal_attention` -> `prompt_mask`; or the plain
  decoder LM), packing with seqio's `pack=True`. A record is one converted row.
* "tfds": a prepared TFDS dataset (`name`, `data_dir`), this process's shard (`Dataset.shard`),
  a seeded shuffle buffer, epochs; each record's `text_field` (and `inputs_field`) is tokenized
  and packed by `calm_jax.sources` as text files are.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np

from calm_jax import sources
from calm_jax.data import DatasetConfig


class TFRecords:
    """Records of a deterministic tf.data pipeline as examples; position = records taken."""

    def __init__(self, make_dataset: Callable[[], Any], convert: Callable[[dict], Any]):
        self.make_dataset, self.convert = make_dataset, convert
        self.taken = 0
        self._iterator = None

    def next(self):
        if self._iterator is None:
            dataset = self.make_dataset()
            if self.taken:
                dataset = dataset.skip(self.taken)
            self._iterator = dataset.as_numpy_iterator()
        record = next(self._iterator)
        self.taken += 1
        return self.convert(record)

    def get_state(self) -> dict[str, Any]:
        return {"taken": self.taken}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.taken, self._iterator = int(state["taken"]), None


def _tf():
    try:
        import tensorflow as tf
    except ImportError as e:
        raise ImportError("dataset.source='seqio'/'tfds' needs TensorFlow: "
                          "pip install 'calm-jax[data]'") from e
    return tf


def _deterministic(dataset):
    options = _tf().data.Options()
    options.deterministic = True
    return dataset.with_options(options)


def seqio_source(config: DatasetConfig, *, process_index: int | None = None,
                 process_count: int | None = None) -> sources.BatchSource:
    try:
        import seqio
        import tasks  # noqa: F401  (registers the project's tasks)
    except ImportError as e:
        raise ImportError("dataset.source='seqio' needs seqio and TensorFlow: "
                          "pip install 'calm-jax[data]'") from e
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    try:
        provider = seqio.get_mixture_or_task(config.name)
    except ValueError as e:
        raise ValueError(f"dataset.name: expected a registered seqio task or mixture, "
                         f"got {config.name!r}") from e
    if config.prefix_lm:
        targets = config.target_length or config.length // 2
        lengths = {"inputs": config.length - targets, "targets": targets}
        converter = seqio.PrefixLMFeatureConverter(pack=config.pack)
    else:
        lengths = {"targets": config.length}
        converter = seqio.DecoderFeatureConverter(pack=config.pack)

    def make_dataset(shuffle: bool, num_epochs: int | None):
        ds = provider.get_dataset(lengths, split=config.split, shuffle=shuffle,
                                  seed=config.seed, use_cached=False, num_epochs=1,
                                  shard_info=seqio.ShardInfo(process_index, process_count),
                                  shuffle_buffer_size=config.shuffle_buffer)
        if config.max_examples:
            ds = ds.take(config.max_examples)
        return _deterministic(converter(ds.repeat(num_epochs), lengths))

    def convert(row: dict) -> dict[str, np.ndarray]:
        row = dict(row)
        if "decoder_causal_attention" in row:
            row["prompt_mask"] = row.pop("decoder_causal_attention").astype(bool)
        return row

    def open_stream(shuffle: bool, num_epochs: int | None) -> TFRecords:
        return TFRecords(lambda: make_dataset(shuffle, num_epochs), convert)

    return sources.BatchSource("seqio", open_stream, length=config.length,
                               batch_size=config.batch_size, pack=config.pack, prompts=False,
                               shuffle=config.shuffle, num_epochs=config.num_epochs,
                               process_count=process_count, packed_rows=True)


def tfds_source(config: DatasetConfig, *, process_index: int | None = None,
                process_count: int | None = None) -> sources.BatchSource:
    _tf()
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("dataset.source='tfds' needs tensorflow-datasets: "
                          "pip install 'calm-jax[data]'") from e
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    try:
        builder = tfds.builder(config.name, data_dir=config.data_dir)
        builder.info.splits[config.split]  # noqa: B018  (the split must exist)
    except Exception as e:  # noqa: BLE001  (tfds raises several kinds for a missing dataset)
        raise ValueError(f"dataset.name: expected a prepared TFDS dataset with split "
                         f"{config.split!r} in data_dir={config.data_dir!r}, got "
                         f"{config.name!r}: {e}") from e
    maker = sources.ExampleMaker(sources.load_vocabulary(config.vocabulary),
                                 text_field=config.text_field,
                                 inputs_field=config.inputs_field, add_eos=config.add_eos)
    where = f"TFDS {config.name} split {config.split}"

    def make_dataset(shuffle: bool, num_epochs: int | None):
        ds = builder.as_dataset(split=config.split, shuffle_files=False,
                                read_config=tfds.ReadConfig(try_autocache=False))
        ds = ds.shard(process_count, process_index)
        if config.max_examples:
            ds = ds.take(config.max_examples)
        if shuffle:
            ds = ds.shuffle(config.shuffle_buffer, seed=config.seed,
                            reshuffle_each_iteration=True)
        return _deterministic(ds.repeat(num_epochs))

    def open_stream(shuffle: bool, num_epochs: int | None) -> TFRecords:
        return TFRecords(lambda: make_dataset(shuffle, num_epochs),
                         lambda record: maker.from_dict(record, where))

    return sources.BatchSource("tfds", open_stream, length=config.length,
                               batch_size=config.batch_size, pack=config.pack,
                               prompts=config.inputs_field is not None, shuffle=config.shuffle,
                               num_epochs=config.num_epochs, process_count=process_count)
