"""Batches for the trainer: one source interface over in-memory, file and seqio/TFDS data.

A batch is a dict of [batch, length] arrays with t5x's decoder feature names:
`decoder_input_tokens`, `decoder_target_tokens`, `decoder_loss_weights` (loss on targets only),
and optionally `decoder_segment_ids`, `decoder_positions` (packing) and `prompt_mask` (True on
prompt positions; t5x's prefix-LM `decoder_causal_attention`).

Every source (`make_source`) has the same interface, which is all the trainer uses:

* `next_batch()`: this process's rows of the next global batch (`batch_size / process_count`
  rows; each process reads its own shard);
* `get_state()` -> a small JSON-able dict: where this process's stream stands;
  `set_state(state)` puts a fresh source there, so the batches that follow are exactly those an
  uninterrupted run would have read next;
* `sequential(num_batches)`: batches in order, without shuffling, from the start (evaluation);
* `length`: the row length.

The kinds (`DatasetConfig.source`):

* "numpy": `NumpySource`, arrays in memory (synthetic tasks). Batch i is a pure function of i
  (`batch(step)`): rows `perm[i*B:(i+1)*B]` of an epoch-wise seeded permutation; its state is
  the step.
* "text", "jsonl": `calm_jax.sources`, files streamed in plain Python + numpy (no TensorFlow),
  tokenized with `vocabulary`, packed into rows, shuffled by blocks.
* "seqio", "tfds": `calm_jax.input_pipeline`, tf.data pipelines (needs `calm-jax[data]`).

With `augment_vocabularies` ("text", "jsonl", "tfds", "seqio") every augmenting model also
gets its own tokens of each text and the rows carry `decoder_byte_ends` (a composition across
tokenizers, `calm_jax.alignment`).

The trainer stores every process's state in the training checkpoint's metadata
(`checkpoint_meta`) and gives it back on resume (`restore_state`); see docs/data.md.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

REQUIRED = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")
OPTIONAL = ("decoder_segment_ids", "decoder_positions", "prompt_mask", "decoder_byte_ends")
# Features of an augmenting model's own token stream (`calm_jax.alignment.text_examples`).
AUGMENT_PREFIX = "augments/"
SOURCES = ("numpy", "seqio", "tfds", "text", "jsonl")


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """Where batches come from.

    Attributes:
      source: one of SOURCES: "numpy" (arrays from `arrays_fn`, e.g. a `tasks` generator),
        "text" (one example per non-empty line of `paths`), "jsonl" (one JSON object per line
        of `paths`), "seqio" (a registered seqio task or mixture) or "tfds" (a prepared TFDS
        dataset); "seqio" and "tfds" need `calm-jax[data]`.
      name: seqio task/mixture name (source="seqio"), TFDS name such as "my_set:1.0.0"
        (source="tfds").
      arrays_fn: callable returning {feature: [N, length] array} (source="numpy").
      paths: files or glob patterns (source="text"/"jsonl"); a single string is one pattern.
      data_dir: TFDS data directory (source="tfds"; None: TFDS's default).
      vocabulary: "byte" (`calm_jax.tokenizers.ByteTokenizer`, seqio's ByteVocabulary ids) or
        a tokenizer directory (`Tokenizer.save`, a Hugging Face model directory, or a model
        export with a `tokenizer/` folder), for "text", "jsonl" and "tfds", and the anchor's
        vocabulary for "seqio" with `augment_vocabularies` (the task's vocabulary otherwise).
      text_field: the text of an example ("jsonl", "tfds"); its target when `inputs_field`
        is set.
      inputs_field: if set, the prompt of an example ("jsonl", "tfds"): rows are prefix-LM
        (loss on the text only, `prompt_mask` set).
      add_eos: append the vocabulary's EOS to every example ("text", "jsonl", "tfds", and
        "seqio" with `augment_vocabularies`).
      split: dataset split ("seqio", "tfds").
      batch_size: global batch size (all processes together).
      length: sequence length.
      seed: shuffling seed.
      shuffle: shuffle the streamed sources ("numpy" always shuffles by epoch).
      shuffle_buffer: tf.data shuffle buffer in examples ("seqio", "tfds").
      block_bytes: shuffling unit of "text"/"jsonl" files: each epoch visits the blocks of this
        many bytes in a new order and the examples of a block in a new order.
      num_epochs: passes over the data of the streamed sources (None: without end).
      pack: pack several examples per row (seqio's feature converters for "seqio", ours with
        `augment_vocabularies`).
      prefix_lm: seqio `PrefixLMFeatureConverter` (loss on targets only, prompt_mask set)
        instead of the plain LM converter; must be False with `augment_vocabularies`.
      target_length: seqio prefix-LM target length (inputs get `length - target_length`);
        None splits the length in half.
      max_examples: cap on examples read per epoch ("seqio", "tfds").
      augment_vocabularies: for a composition across tokenizers ("text", "jsonl", "tfds",
        "seqio"): {augmenting model name: "byte" or a tokenizer directory (as `vocabulary`)};
        every row then also holds `decoder_byte_ends` and each augment's own tokens
        (`augments/{name}/tokens|positions|segment_ids|byte_ends`, as
        `calm_jax.alignment.text_examples` gives them). A seqio task's text is its 'targets'
        decoded with the task's vocabulary (`calm_jax.input_pipeline.seqio_source`). None: one
        token stream.
      augment_length: positions of each augment's rows (None: `length`).
    """

    source: str = "numpy"
    name: str | None = None
    arrays_fn: Callable[[], Mapping[str, np.ndarray]] | None = None
    paths: tuple[str, ...] | str = ()
    data_dir: str | None = None
    vocabulary: str = "byte"
    text_field: str = "text"
    inputs_field: str | None = None
    add_eos: bool = True
    split: str = "train"
    batch_size: int = 8
    length: int = 64
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 10_000
    block_bytes: int = 1 << 20
    num_epochs: int | None = None
    pack: bool = False
    prefix_lm: bool = True
    target_length: int | None = None
    max_examples: int | None = None
    augment_vocabularies: Mapping[str, str] | None = None
    augment_length: int | None = None

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"dataset.source: expected one of {', '.join(map(repr, SOURCES))}, "
                             f"got {self.source!r}")
        if isinstance(self.paths, str):
            object.__setattr__(self, "paths", (self.paths,))
        object.__setattr__(self, "paths", tuple(self.paths))
        if self.source == "numpy" and self.arrays_fn is None:
            raise ValueError("dataset.arrays_fn: expected a callable returning the feature "
                             "arrays with source='numpy', got None")
        if self.source == "seqio" and not self.name:
            raise ValueError("dataset.name: expected a seqio task or mixture name with "
                             "source='seqio', got None")
        if self.source == "tfds" and not self.name:
            raise ValueError("dataset.name: expected a TFDS dataset name with source='tfds', "
                             "got None")
        if self.source in ("text", "jsonl") and not self.paths:
            raise ValueError(f"dataset.paths: expected files or glob patterns with "
                             f"source={self.source!r}, got {self.paths!r}")
        if self.source == "text" and self.inputs_field is not None:
            raise ValueError(f"dataset.inputs_field: expected None with source='text' (a line "
                             f"is one text), got {self.inputs_field!r}")
        for name in ("batch_size", "length", "shuffle_buffer", "block_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"dataset.{name}: expected a positive integer, got {value!r}")
        self._check_augment_vocabularies()
        for name in ("num_epochs", "max_examples", "augment_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"dataset.{name}: expected a positive integer or None, "
                                 f"got {value!r}")

    def _check_augment_vocabularies(self) -> None:
        value = self.augment_vocabularies
        if value is None:
            return
        if not isinstance(value, Mapping) or not value or not all(
                isinstance(k, str) and k and isinstance(v, str) for k, v in value.items()):
            raise ValueError(f"dataset.augment_vocabularies: expected {{augmenting model name: "
                             f"'byte' or a tokenizer directory}} or None, got {value!r}")
        object.__setattr__(self, "augment_vocabularies", dict(value))
        if self.source == "numpy":
            raise ValueError(f"dataset.augment_vocabularies: expected None with source='numpy' "
                             f"(put calm_jax.alignment.text_examples' features in arrays_fn), "
                             f"got {value!r}")
        if self.inputs_field is not None:
            raise ValueError(f"dataset.inputs_field: expected None with augment_vocabularies "
                             f"(across tokenizers an example is one text, loss on all of it), "
                             f"got {self.inputs_field!r}")
        if self.source == "seqio" and self.prefix_lm:
            raise ValueError("dataset.prefix_lm: expected False with augment_vocabularies and "
                             "source='seqio' (across tokenizers an example is the text of the "
                             "task's 'targets', loss on all of it), got True")


class NumpySource:
    """Deterministic, resumable batches over in-memory arrays (see the module docstring)."""

    kind = "numpy"

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, seed: int = 0, *,
                 process_index: int | None = None, process_count: int | None = None):
        missing = [k for k in REQUIRED if k not in arrays]
        if missing:
            raise ValueError(f"dataset: expected features {list(REQUIRED)}, missing {missing}")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()
                       if k in REQUIRED + OPTIONAL or k.startswith(AUGMENT_PREFIX)}
        shape = self.arrays["decoder_input_tokens"].shape
        if len(shape) != 2:
            raise ValueError(f"dataset.decoder_input_tokens: expected [examples, length], "
                             f"got shape {shape}")
        for name, array in self.arrays.items():
            if name.startswith(AUGMENT_PREFIX):  # an augment's own tokens: its own length
                if array.ndim != 2 or array.shape[0] != shape[0]:
                    raise ValueError(f"dataset.{name}: expected [examples={shape[0]}, "
                                     f"augment_length], got shape {array.shape}")
            elif array.shape != shape:
                raise ValueError(f"dataset.{name}: expected shape {shape} like "
                                 f"decoder_input_tokens, got {array.shape}")
        self.num_rows = len(self.arrays["decoder_input_tokens"])
        if self.num_rows < batch_size:
            raise ValueError(f"dataset.batch_size: expected at most the {self.num_rows} "
                             f"examples available, got {batch_size}")
        self.batch_size, self.seed = batch_size, seed
        self.process_index, self.process_count = processes(process_index, process_count)
        if batch_size % self.process_count:
            raise ValueError(f"dataset.batch_size: expected a multiple of the "
                             f"{self.process_count} processes, got {batch_size}")
        self._perm_cache: dict[int, np.ndarray] = {}
        self.step = 0  # the batch next_batch() gives

    @property
    def length(self) -> int:
        return self.arrays["decoder_input_tokens"].shape[1]

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(
                self.num_rows)}
        return self._perm_cache[epoch]

    def global_rows(self, step: int) -> np.ndarray:
        per_epoch = self.num_rows // self.batch_size
        epoch, i = divmod(step, per_epoch)
        return self._perm(epoch)[i * self.batch_size:(i + 1) * self.batch_size]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of global batch `step`."""
        rows = self.global_rows(step)
        local = self.batch_size // self.process_count
        rows = rows[self.process_index * local:(self.process_index + 1) * local]
        return {k: v[rows] for k, v in self.arrays.items()}

    def next_batch(self) -> dict[str, np.ndarray]:
        batch = self.batch(self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"source": self.kind, "step": self.step}

    def set_state(self, state: Mapping[str, Any]) -> None:
        check_state_kind(state, self.kind)
        self.step = int(state["step"])

    def sequential(self, num_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Batches in order without shuffling (for evaluation); the tail batch is dropped."""
        total = self.num_rows // self.batch_size
        for i in range(total if num_batches is None else min(num_batches, total)):
            rows = np.arange(i * self.batch_size, (i + 1) * self.batch_size)
            local = self.batch_size // self.process_count
            rows = rows[self.process_index * local:(self.process_index + 1) * local]
            yield {k: v[rows] for k, v in self.arrays.items()}


def make_source(config: DatasetConfig, *, process_index: int | None = None,
                process_count: int | None = None):
    """The source `config` names (see the module docstring for the interface).

    `process_index`/`process_count` default to JAX's; each process reads its own shard.
    """
    where = dict(process_index=process_index, process_count=process_count)
    if config.source == "numpy":
        arrays = dict(config.arrays_fn())
        got = arrays["decoder_input_tokens"].shape[1]
        if got != config.length:
            raise ValueError(f"dataset.length: expected the arrays' length {got}, "
                             f"got {config.length}")
        return NumpySource(arrays, config.batch_size, config.seed, **where)
    if config.source in ("text", "jsonl"):
        from calm_jax import sources

        return sources.file_source(config, **where)
    from calm_jax import input_pipeline  # seqio / TFDS / TensorFlow, only here

    if config.source == "seqio":
        return input_pipeline.seqio_source(config, **where)
    return input_pipeline.tfds_source(config, **where)


def processes(index: int | None, count: int | None) -> tuple[int, int]:
    """(this process's index, the number of processes): the given ones, JAX's where None."""
    return (jax.process_index() if index is None else index,
            jax.process_count() if count is None else count)


def json_object(line: str | bytes, where: str) -> dict[str, Any]:
    """`line` parsed as a JSON object; else ValueError "{where}, got {line!r} (...)", where
    `where` says what was expected (e.g. "corpus.jsonl:3: expected a JSON object")."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}, got {line[:80]!r} (invalid JSON: {e.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}, got {line[:80]!r} (a JSON {type(value).__name__})")
    return value


def check_state_kind(state: Mapping[str, Any], kind: str) -> None:
    """Raises ValueError unless `state` was saved by a source of this `kind`."""
    if not isinstance(state, Mapping) or state.get("source") != kind:
        got = state.get("source") if isinstance(state, Mapping) else state
        raise ValueError(f"checkpoint: the data position was saved by a {got!r} source; this "
                         f"run reads dataset.source={kind!r}. Resume with the dataset it was "
                         f"saved with, or use another model_dir")


def checkpoint_meta(source) -> dict[str, Any]:
    """{'data_state': [state of process 0, 1, ...]} for the checkpoint's metadata.

    Collective: with several processes every process must call it at the same step.
    """
    return {"data_state": _gather_json(source.get_state())}


def restore_state(source, meta: Mapping[str, Any]) -> None:
    """Puts `source` where the checkpoint with metadata `meta` stopped reading.

    A checkpoint without 'data_state' (saved before streamed sources) holds only
    'data_position', the step, which is the position of a numpy source.
    """
    states = meta.get("data_state")
    if states is None:
        if not isinstance(source, NumpySource):
            raise ValueError(f"checkpoint: it stores no data_state (only data_position="
                             f"{meta.get('data_position')}), so a dataset.source="
                             f"{source.kind!r} stream cannot resume where it stopped; use "
                             f"another model_dir")
        source.set_state({"source": "numpy", "step": int(meta["data_position"])})
        return
    if isinstance(source, NumpySource):  # the same position in every process
        source.set_state(states[0])
        return
    if len(states) != jax.process_count():
        raise ValueError(f"checkpoint: its data_state holds the stream positions of "
                         f"{len(states)} processes, this run has {jax.process_count()}; "
                         f"resume with {len(states)} processes (each reads its own shard)")
    source.set_state(states[jax.process_index()])


def _gather_json(value: Any) -> list[Any]:
    """[value of process 0, 1, ...] for a JSON-able value (collective)."""
    if jax.process_count() == 1:
        return [json.loads(json.dumps(value))]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    every = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(every[i, :int(sizes[i, 0])]).decode())
            for i in range(every.shape[0])]


def to_global(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, Any]:
    """Per-process batch -> global jax.Arrays split over the batch axis of the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}
