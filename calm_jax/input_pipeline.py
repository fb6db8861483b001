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

Across tokenizers (`augment_vocabularies`) both give the rows `calm_jax.sources` gives text
files: each record's text becomes an `AlignedExample` (the anchor's tokens with
`dataset.vocabulary`, each augment's own) and `AlignedPacker` lays them into rows, so a row
equals `calm_jax.alignment.text_examples`' row for the same texts. For seqio the text is the
record's 'targets' before the feature converter, decoded with the task's own vocabulary, and
packing is ours, not seqio's (see `seqio_source`).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

import numpy as np

from calm_jax import sources
from calm_jax.data import DatasetConfig, processes


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


def _need(module: str, source: str, what: str) -> Any:
    """`module`, imported; ImportError saying that `dataset.source=source` needs `what`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"dataset.source={source!r} needs {what}: "
                          f"pip install 'calm-jax[data]'") from e


def _deterministic(dataset):
    import tensorflow as tf  # imported already: seqio and TFDS import it

    options = tf.data.Options()
    options.deterministic = True
    return dataset.with_options(options)


def _converted_row(row: dict) -> dict[str, np.ndarray]:
    """A row of t5x's feature converters with `prompt_mask` for `decoder_causal_attention`."""
    row = dict(row)
    if "decoder_causal_attention" in row:
        row["prompt_mask"] = row.pop("decoder_causal_attention").astype(bool)
    return row


def seqio_source(config: DatasetConfig, *, process_index: int | None = None,
                 process_count: int | None = None) -> sources.BatchSource:
    """A `BatchSource` over a registered seqio task or mixture (`config.name`).

    Without `augment_vocabularies` a record is a row of t5x's feature converter (seqio packs).
    With them, the records are taken before any feature converter and untrimmed
    (`sequence_length=None`); each record's 'targets' ids are decoded to text with the task's
    own vocabulary (`output_features['targets'].vocabulary.decode`, which stops at its EOS),
    and that text is tokenized again with `dataset.vocabulary` (the anchor's) and each
    augment's vocabulary into an `AlignedExample`, packed by `AlignedPacker` (our packing,
    `dataset.pack`, not seqio's). Decoding then tokenizing again is what lets one task feed
    models with other tokenizers; where the task's vocabulary does not give the text back
    exactly (a normalising tokenizer, unknown pieces) the models see its decoding.
    """
    seqio = _need("seqio", "seqio", "seqio and TensorFlow")
    _need("tasks", "seqio", "seqio and TensorFlow")  # registers the project's tasks
    process_index, process_count = processes(process_index, process_count)
    try:
        provider = seqio.get_mixture_or_task(config.name)
    except ValueError as e:
        raise ValueError(f"dataset.name: expected a registered seqio task or mixture, "
                         f"got {config.name!r}") from e
    make_packer, convert = None, _converted_row
    if config.augment_vocabularies:
        if "targets" not in provider.output_features:
            raise ValueError(f"dataset.name: expected a seqio task or mixture with a 'targets' "
                             f"feature (the text across tokenizers), got {config.name!r} with "
                             f"features {sorted(provider.output_features)}")
        maker, make_packer = sources.example_maker(config)
        decode = provider.output_features["targets"].vocabulary.decode
        lengths, converter = None, None

        def text_example(record: dict) -> sources.AlignedExample | None:
            return maker.from_text(decode(record["targets"].tolist()))

        convert = text_example
    elif config.prefix_lm:
        targets = config.target_length or config.length // 2
        lengths = {"inputs": config.length - targets, "targets": targets}
        converter = seqio.PrefixLMFeatureConverter(pack=config.pack)
    else:
        lengths = {"targets": config.length}
        converter = seqio.DecoderFeatureConverter(pack=config.pack)
    # A mixture's get_dataset has no shuffle buffer argument (each task uses its default).
    buffer = ({"shuffle_buffer_size": config.shuffle_buffer}
              if isinstance(provider, seqio.Task) else {})

    def make_dataset(shuffle: bool, num_epochs: int | None):
        ds = provider.get_dataset(lengths, split=config.split, shuffle=shuffle,
                                  seed=config.seed, use_cached=False, num_epochs=1,
                                  shard_info=seqio.ShardInfo(process_index, process_count),
                                  **buffer)
        if config.max_examples:
            ds = ds.take(config.max_examples)
        ds = ds.repeat(num_epochs)
        return _deterministic(ds if converter is None else converter(ds, lengths))

    def open_stream(shuffle: bool, num_epochs: int | None) -> TFRecords:
        return TFRecords(lambda: make_dataset(shuffle, num_epochs), convert)

    return sources.config_source(config, open_stream, process_count=process_count,
                                 make_packer=make_packer, packed_rows=converter is not None)


def tfds_source(config: DatasetConfig, *, process_index: int | None = None,
                process_count: int | None = None) -> sources.BatchSource:
    """A `BatchSource` over a prepared TFDS dataset: each record's `text_field` (and
    `inputs_field`) made into examples and rows by `sources.example_maker`'s maker and packer,
    as text files are (across tokenizers too)."""
    _need("tensorflow", "tfds", "TensorFlow")
    tfds = _need("tensorflow_datasets", "tfds", "tensorflow-datasets")
    process_index, process_count = processes(process_index, process_count)
    try:
        builder = tfds.builder(config.name, data_dir=config.data_dir)
        builder.info.splits[config.split]  # noqa: B018  (the split must exist)
    except Exception as e:  # noqa: BLE001  (tfds raises several kinds for a missing dataset)
        raise ValueError(f"dataset.name: expected a prepared TFDS dataset with split "
                         f"{config.split!r} in data_dir={config.data_dir!r}, got "
                         f"{config.name!r}: {e}") from e
    maker, make_packer = sources.example_maker(config)
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

    return sources.config_source(config, open_stream, process_count=process_count,
                                 make_packer=make_packer)
