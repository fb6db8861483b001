"""seqio glue that needs TensorFlow: a `seqio.Vocabulary` over a model's own tokenizer, and
task lookup with a clear error.

Imported only where seqio is wanted (`calm_jax.tokenizers.seqio_vocabulary`, the seqio example
source of `calm_jax.prompts`); the core never imports it, so machines without TensorFlow are
unaffected.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import seqio
import tensorflow as tf

from calm_jax.tokenizers import Tokenizer


def get_task(name: str):
    """The registered seqio task or mixture `name`; a ValueError that says what to do when
    there is none."""
    try:
        return seqio.get_mixture_or_task(name)
    except ValueError as e:
        raise ValueError(f"task: expected a registered seqio task or mixture (import the "
                         f"module that registers it, `ExampleSource.module`), got {name!r}: "
                         f"{e}") from None


class SeqioVocabulary(seqio.Vocabulary):
    """seqio vocabulary over a `calm_jax.tokenizers.Tokenizer`.

    `encode`/`encode_tf` add neither BOS nor EOS (seqio appends EOS); the TF ops wrap the
    Python tokenizer with `tf.numpy_function`, so they run on the host, one string each.
    """

    def __init__(self, tokenizer: Tokenizer, extra_ids: int = 0):
        super().__init__(extra_ids=extra_ids)
        self.tokenizer = tokenizer

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_id

    @property
    def pad_id(self) -> int:
        return 0 if self.tokenizer.pad_id is None else self.tokenizer.pad_id

    @property
    def unk_id(self) -> int | None:
        return self.tokenizer.unk_id

    @property
    def _base_vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _encode(self, s: str) -> Sequence[int]:
        return self.tokenizer.encode(s, add_bos=False)

    def _decode(self, ids) -> str:
        n = self._base_vocab_size
        return self.tokenizer.decode(int(i) for i in ids if 0 <= int(i) < n)

    def _encode_tf(self, s):
        def encode_one(x) -> np.ndarray:
            x = x.item() if isinstance(x, np.ndarray) else x
            text = x.decode("utf-8") if isinstance(x, bytes) else str(x)
            return np.asarray(self._encode(text), np.int32)

        s = tf.convert_to_tensor(s, tf.string)
        if s.shape.rank == 0:
            out = tf.numpy_function(encode_one, [s], tf.int32, stateful=False)
            out.set_shape([None])
            return out
        flat = tf.reshape(s, [-1])
        ragged = tf.map_fn(
            lambda x: tf.RaggedTensor.from_tensor(
                tf.numpy_function(encode_one, [x], tf.int32, stateful=False)[None]),
            flat, fn_output_signature=tf.RaggedTensorSpec([1, None], tf.int32, 1))
        return ragged.merge_dims(0, 1) if s.shape.rank == 1 else ragged

    def _decode_tf(self, ids):
        def decode_rows(x) -> np.ndarray:
            rows = np.asarray(x).reshape(-1, np.asarray(x).shape[-1])
            return np.asarray([self._decode(r).encode("utf-8") for r in rows], object)

        ids = tf.convert_to_tensor(ids)
        out = tf.numpy_function(decode_rows, [ids], tf.string, stateful=False)
        return tf.reshape(out, tf.shape(ids)[:-1])

    def __eq__(self, other) -> bool:
        return (isinstance(other, SeqioVocabulary) and self.tokenizer == other.tokenizer
                and self.extra_ids == other.extra_ids)

    def __hash__(self) -> int:
        return hash((self.tokenizer.fingerprint(), self.extra_ids))

    def __str__(self) -> str:
        return f"SeqioVocabulary({self.tokenizer!r}, extra_ids={self.extra_ids})"
