"""Byte-level tokenisation of text examples and their numpy arrays (pure Python + numpy).

The ids are those of ``seqio.ByteVocabulary`` (PAD=0, EOS=1, UNK=2, byte b -> b+3), so the
numpy path and the seqio path of the key-value tasks give the same tokens; the arrays follow
t5x's decoder-only feature conventions (see ``to_numpy_arrays``). ``tasks.kv_arithmetic``
re-exports every name here.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from calm_jax.tokenizers import ByteTokenizer


_BYTES = ByteTokenizer()
PAD_ID = _BYTES.pad_id
EOS_ID = _BYTES.eos_id
UNK_ID = _BYTES.unk_id
BYTE_OFFSET = _BYTES.offset  # seqio.ByteVocabulary: byte b -> b + 3
BYTE_VOCAB_SIZE = _BYTES.vocab_size  # 259, == seqio.ByteVocabulary().vocab_size
PADDED_VOCAB_SIZE = 384  # 259 rounded up to a multiple of 128 (embedding table size)

FEATURE_KEYS = (
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
    "decoder_segment_ids",
    "decoder_positions",
    "prompt_mask",
)


def encode_text(text: str) -> list[int]:
    """UTF-8 bytes shifted by 3 (as seqio.ByteVocabulary.encode)."""
    return _BYTES.encode(text)


def decode_ids(ids: Iterable[int]) -> str:
    """Inverse of ``encode_text``; stops at the first EOS, skips PAD/UNK (like ByteVocabulary)."""
    return _BYTES.decode(ids)


def tokenize_example(example: Mapping[str, str]) -> tuple[list[int], list[int]]:
    """-> (input ids, target ids + [EOS]). Inputs get no EOS (seqio task: add_eos=False)."""
    return encode_text(example["inputs"]), encode_text(example["targets"]) + [EOS_ID]


def _empty(rows: int, seq_len: int) -> dict[str, np.ndarray]:
    return {
        "decoder_input_tokens": np.zeros((rows, seq_len), np.int32),
        "decoder_target_tokens": np.zeros((rows, seq_len), np.int32),
        "decoder_loss_weights": np.zeros((rows, seq_len), np.float32),
        "decoder_segment_ids": np.zeros((rows, seq_len), np.int32),
        "decoder_positions": np.zeros((rows, seq_len), np.int32),
        "prompt_mask": np.zeros((rows, seq_len), bool),
    }


def to_numpy_arrays(
    examples: Sequence[Mapping[str, str]],
    seq_len: int,
    pack: bool = False,
    on_overflow: str = "error",
) -> dict[str, np.ndarray]:
    """Tokenises examples into fixed-length ``[rows, seq_len]`` arrays (decoder-only, t5x style).

    One example is the sequence ``s = inputs_ids + targets_ids + [EOS]`` of length L. In its
    segment (positions p .. p+L-1 of a row):

    * ``decoder_target_tokens[p+k] = s[k]``;
    * ``decoder_input_tokens`` is ``s`` shifted right by one inside the segment, with 0 (PAD, used
      as BOS as in t5x) at the segment start;
    * ``decoder_loss_weights`` is 1.0 where the target token is a target byte or the EOS, 0.0 on
      prompt bytes and padding (loss on targets only);
    * ``decoder_segment_ids`` is 1, 2, ... per packed example in the row, 0 on padding;
    * ``decoder_positions`` restarts at 0 in each segment, 0 on padding;
    * ``prompt_mask`` is True where the *input* token is BOS or a prompt byte, i.e. the first
      len(inputs)+1 positions of the segment: exactly the positions a prefix-LM / "mA as encoder"
      model may see bidirectionally (equal to seqio's PrefixLM ``decoder_causal_attention``).

    Args:
      examples: dicts with 'inputs' and 'targets' strings.
      seq_len: row length.
      pack: if False, one example per row (rows = len(examples)); if True, examples are packed
        greedily in order into as few rows as possible (an example is never split across rows).
      on_overflow: an example longer than ``seq_len``: "error" raises ValueError, "skip" drops it.
        (Truncation is not offered: it would silently cut answers.)

    Returns:
      dict of numpy arrays named in ``FEATURE_KEYS``; int32 tokens/ids/positions, float32 loss
      weights, bool prompt_mask.
    """
    if on_overflow not in ("error", "skip"):
        raise ValueError("on_overflow must be 'error' or 'skip'")
    seqs = []
    for ex in examples:
        inp, tgt = tokenize_example(ex)
        if len(inp) + len(tgt) > seq_len:
            if on_overflow == "error":
                raise ValueError(
                    f"example of {len(inp) + len(tgt)} tokens exceeds seq_len={seq_len}: "
                    f"{ex['inputs']!r} -> {ex['targets']!r}"
                )
            continue
        seqs.append((inp, tgt))

    # Assign each sequence to (row, start).
    placements = []
    row, fill = -1, seq_len
    for inp, tgt in seqs:
        length = len(inp) + len(tgt)
        if not pack or fill + length > seq_len:
            row, fill = row + 1, 0
        placements.append((row, fill))
        fill += length
    arrays = _empty(row + 1, seq_len)

    seg_counter: dict[int, int] = {}
    for (inp, tgt), (r, p) in zip(seqs, placements):
        s = inp + tgt
        n, n_in = len(s), len(inp)
        seg = seg_counter.get(r, 0) + 1
        seg_counter[r] = seg
        arrays["decoder_target_tokens"][r, p : p + n] = s
        arrays["decoder_input_tokens"][r, p] = PAD_ID
        arrays["decoder_input_tokens"][r, p + 1 : p + n] = s[:-1]
        arrays["decoder_loss_weights"][r, p + n_in : p + n] = 1.0
        arrays["decoder_segment_ids"][r, p : p + n] = seg
        arrays["decoder_positions"][r, p : p + n] = np.arange(n)
        arrays["prompt_mask"][r, p : p + n_in + 1] = True
    return arrays


def to_numpy_batches(
    examples: Sequence[Mapping[str, str]],
    batch_size: int,
    seq_len: int,
    pack: bool = False,
    shuffle: bool = False,
    seed: int = 0,
    drop_remainder: bool = False,
    on_overflow: str = "error",
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over ``examples`` as ``[batch_size, seq_len]`` numpy batches (see
    ``to_numpy_arrays`` for the features).

    Args:
      shuffle: shuffle example order (with ``seed``) before packing/batching; for several epochs
        call again with a different seed.
      drop_remainder: drop a last incomplete batch; otherwise it is filled with empty rows
        (all-zero: segment id 0, loss weight 0, prompt_mask False), so every batch has the same
        shape (jit-friendly) and evaluation covers every example.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order = np.arange(len(examples))
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(examples))
    arrays = to_numpy_arrays(
        [examples[int(i)] for i in order], seq_len, pack=pack, on_overflow=on_overflow
    )
    rows = arrays["decoder_target_tokens"].shape[0]
    for start in range(0, rows, batch_size):
        stop = start + batch_size
        if stop > rows:
            if drop_remainder:
                return
            batch = _empty(batch_size, seq_len)
            for k, v in arrays.items():
                batch[k][: rows - start] = v[start:]
            yield batch
        else:
            yield {k: v[start:stop] for k, v in arrays.items()}


def max_sequence_length(examples: Iterable[Mapping[str, str]]) -> int:
    """Longest ``inputs + targets + EOS`` in tokens (to choose ``seq_len``); 0 for no examples."""
    return max((sum(len(x) for x in tokenize_example(ex)) for ex in examples), default=0)
