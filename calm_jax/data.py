"""Batches for the trainer: an in-memory numpy source (no TensorFlow) and the seqio bridge.

A batch is a dict of [batch, length] arrays with t5x's decoder feature names:
`decoder_input_tokens`, `decoder_target_tokens`, `decoder_loss_weights` (loss on targets only),
and optionally `decoder_segment_ids`, `decoder_positions` (packing) and `prompt_mask` (True on
prompt positions; t5x's prefix-LM `decoder_causal_attention`).

`NumpySource.batch(step)` is a pure function of the step: batch i is rows `perm[i*B:(i+1)*B]` of
an epoch-wise seeded permutation, so a resumed run sees exactly the batches it would have seen.
With several processes each takes its own slice of every global batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np

REQUIRED = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")
OPTIONAL = ("decoder_segment_ids", "decoder_positions", "prompt_mask")


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """Where batches come from.

    Attributes:
      source: "numpy" (arrays from `arrays_fn`, a callable returning the feature dict, e.g. a
        `tasks` generator) or "seqio" (a registered seqio task or mixture, `calm_jax[data]`).
      name: seqio task/mixture name (source="seqio").
      arrays_fn: callable returning {feature: [N, length] array} (source="numpy").
      split: dataset split.
      batch_size: global batch size (all processes together).
      length: sequence length.
      seed: shuffling seed.
      pack: pack several examples per row (seqio feature converters).
      prefix_lm: seqio `PrefixLMFeatureConverter` (loss on targets only, prompt_mask set)
        instead of the plain LM converter.
      target_length: seqio prefix-LM target length (inputs get `length - target_length`);
        None splits the length in half.
      max_examples: cap on examples read from seqio into memory.
    """

    source: str = "numpy"
    name: str | None = None
    arrays_fn: Callable[[], Mapping[str, np.ndarray]] | None = None
    split: str = "train"
    batch_size: int = 8
    length: int = 64
    seed: int = 0
    pack: bool = False
    prefix_lm: bool = True
    target_length: int | None = None
    max_examples: int | None = None

    def __post_init__(self):
        if self.source not in ("numpy", "seqio"):
            raise ValueError(f"dataset.source: expected 'numpy' or 'seqio', got {self.source!r}")
        if self.source == "numpy" and self.arrays_fn is None:
            raise ValueError("dataset.arrays_fn: expected a callable returning the feature "
                             "arrays with source='numpy', got None")
        if self.source == "seqio" and not self.name:
            raise ValueError("dataset.name: expected a seqio task or mixture name with "
                             "source='seqio', got None")
        for name in ("batch_size", "length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"dataset.{name}: expected a positive integer, got {value!r}")


class NumpySource:
    """Deterministic, resumable batches over in-memory arrays (see the module docstring)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, seed: int = 0, *,
                 process_index: int | None = None, process_count: int | None = None):
        missing = [k for k in REQUIRED if k not in arrays]
        if missing:
            raise ValueError(f"dataset: expected features {list(REQUIRED)}, missing {missing}")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items() if k in REQUIRED + OPTIONAL}
        shape = self.arrays["decoder_input_tokens"].shape
        if len(shape) != 2:
            raise ValueError(f"dataset.decoder_input_tokens: expected [examples, length], "
                             f"got shape {shape}")
        for name, array in self.arrays.items():
            if array.shape != shape:
                raise ValueError(f"dataset.{name}: expected shape {shape} like "
                                 f"decoder_input_tokens, got {array.shape}")
        self.num_rows = len(self.arrays["decoder_input_tokens"])
        if self.num_rows < batch_size:
            raise ValueError(f"dataset.batch_size: expected at most the {self.num_rows} "
                             f"examples available, got {batch_size}")
        self.batch_size, self.seed = batch_size, seed
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if batch_size % self.process_count:
            raise ValueError(f"dataset.batch_size: expected a multiple of the "
                             f"{self.process_count} processes, got {batch_size}")
        self._perm_cache: dict[int, np.ndarray] = {}

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

    def sequential(self, num_batches: int | None = None):
        """Batches in order without shuffling (for evaluation); the tail batch is dropped."""
        total = self.num_rows // self.batch_size
        for i in range(total if num_batches is None else min(num_batches, total)):
            rows = np.arange(i * self.batch_size, (i + 1) * self.batch_size)
            local = self.batch_size // self.process_count
            rows = rows[self.process_index * local:(self.process_index + 1) * local]
            yield {k: v[rows] for k, v in self.arrays.items()}


def make_source(config: DatasetConfig) -> NumpySource:
    if config.source == "numpy":
        arrays = config.arrays_fn()
    else:
        from calm_jax import input_pipeline  # seqio / TensorFlow, only here

        arrays = input_pipeline.seqio_arrays(config)
    arrays = dict(arrays)
    got = arrays["decoder_input_tokens"].shape[1]
    if got != config.length:
        raise ValueError(f"dataset.length: expected the arrays' length {got}, "
                         f"got {config.length}")
    return NumpySource(arrays, config.batch_size, config.seed)


def to_global(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, Any]:
    """Per-process batch -> global jax.Arrays split over the batch axis of the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}
