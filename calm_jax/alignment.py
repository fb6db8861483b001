"""Composing models that do not share a tokenizer: byte offsets, the cross mask, the batches.

Both models read the same text, each through its own tokenizer. Every token has a byte span
[start, end) in the text's UTF-8 bytes (`Tokenizer.encode_with_offsets`); what composition needs
of it is each token's byte END:

    anchor token t may read augmenting token s  <=>  end[s] <= end[t] and s is in t's segment

(causal in bytes: s holds no byte after the last one t has read; `byte_ends` passed for the
anchor are these ends, or the held-back ends below). With one tokenizer on both
sides this is the usual causal mask. An anchor token that can read no augmenting token (its text
ends before the first augmenting token's) gets no update from that model.

Held-back tail. A tokenizer may segment the end of a text differently once more text follows
("the m" -> "Ġ", "m" but "the mat" -> "Ġmat"), so WHICH augmenting tokens end by byte e can
depend on the bytes after e: reading them would leak the future. `read_ends` therefore gives
each anchor token the last byte c <= e where the augment's segmentation is settled by the text
up to e, and the anchor token reads the augmenting tokens that end by c (`byte_ends` = c). A
byte position is settled where the character before it and the one at it are of classes no
pre-tokenizer joins: a letter, then a non-letter; a digit, then a letter, space or symbol; a
symbol, then a digit. The pre-tokenizers of byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen2)
cut there, and so does SentencePiece with its whitespace, script and number splitting (its
defaults; a tokenizer whose tokens cross such a cut leaks again); the rule is conservative
elsewhere (within words, before a letter after a symbol, in whitespace), so an anchor token
reads the augmenting model up to the end of the previous word-like piece. `stable_only=False`
reads up to e itself (exact where both tokenizers are one, leaky across tokenizers).

The cross-attention's rotary positions (`CompositionConfig.rope_theta`) are the byte ends too:
query t at end[t], key s at end[s], so the relative position of a key is the number of bytes
between the two tokens' ends (0: the augmenting token that ends where the anchor token ends).
Each model's own self-attention keeps its own token positions.

Host side (numpy, per batch, in the data pipeline): `text_examples` turns texts into the
anchor's decoder features plus, per augmenting model `name`, the features
`augments/{name}/tokens`, `.../positions`, `.../segment_ids`, `.../byte_ends`, and the anchor's
`decoder_byte_ends`; packed or not. Device side: `ComposedLM.apply(..., byte_ends=...,
augment_inputs={name: AugmentInput(...)})` builds the [batch, 1, anchor_len, aug_len] mask from
the two end arrays inside the program (one comparison, fused; no mask crosses from the host).
`cross_mask` is the same rule in numpy, for checks.

The anchor's inputs follow t5x's decoder convention (inputs = targets shifted right after a
start token 0); input t is target t - 1, so its byte end e is target t - 1's end (the start
token's is 0), and `decoder_byte_ends` holds `read_ends` of it: anchor input t reads the
augmenting tokens of the text it has read, up to the held-back tail.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from flax import struct

Array = Any

AUGMENT_FEATURES = ("tokens", "positions", "segment_ids", "byte_ends")


@struct.dataclass
class AugmentInput:
    """One augmenting model's own token stream of the anchor's text.

    Attributes:
      tokens: [batch, aug_len] int32, its tokenizer's ids.
      byte_ends: [batch, aug_len] int32, each token's byte end in its segment's text.
      positions: [batch, aug_len] int32 or None (0, 1, ... per segment; None: 0 .. aug_len-1).
      segment_ids: [batch, aug_len] int32 or None (0: padding; equal ids: one packed example,
        the same numbering as the anchor's). None: every token is real.
    """

    tokens: Array
    byte_ends: Array
    positions: Array | None = None
    segment_ids: Array | None = None


def feature_name(name: str, feature: str) -> str:
    """The batch key of augmenting model `name`'s `feature` ("augments/{name}/{feature}")."""
    return f"augments/{name}/{feature}"


def augment_inputs_from_batch(batch: Mapping[str, Any],
                              names: Sequence[str]) -> dict[str, AugmentInput] | None:
    """{name: AugmentInput} from a batch holding `text_examples`' features; None when the batch
    has none (one shared token stream)."""
    if not any(feature_name(n, "tokens") in batch for n in names):
        return None
    out = {}
    for n in names:
        missing = [f for f in ("tokens", "byte_ends") if feature_name(n, f) not in batch]
        if missing:
            raise ValueError(f"batch: expected {[feature_name(n, f) for f in missing]} for "
                             f"augmenting model {n!r} (every augment reads its own tokens "
                             f"once one does), got keys {sorted(batch)}")
        out[n] = AugmentInput(**{f: batch.get(feature_name(n, f)) for f in AUGMENT_FEATURES})
    return out


def cross_kwargs(batch: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """`ComposedLM.apply`'s cross-tokenizer keyword arguments from a batch (`byte_ends`,
    `augment_inputs`), or {} for a batch of one shared token stream."""
    inputs = augment_inputs_from_batch(batch, names)
    if inputs is None:
        return {}
    if "decoder_byte_ends" not in batch:
        raise ValueError(f"batch: expected 'decoder_byte_ends' with the augments' own tokens, "
                         f"got keys {sorted(batch)}")
    return {"byte_ends": batch["decoder_byte_ends"], "augment_inputs": inputs}


# Offsets ----------------------------------------------------------------------------------------


def tokenize(tokenizer: Any, text: str, *, add_bos: bool | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n] int32, spans [n, 2] int32) of `text` (`encode_with_offsets`; a BOS the tokenizer
    adds has the empty span (0, 0))."""
    if add_bos is None:
        ids, spans = tokenizer.encode_with_offsets(text)
    else:
        ids, spans = tokenizer.encode_with_offsets(text, add_bos=add_bos)
    return (np.asarray(ids, np.int32).reshape(-1),
            np.asarray(spans, np.int32).reshape(-1, 2))


def check_spans(spans: np.ndarray, num_bytes: int, who: str) -> None:
    """Raises ValueError naming `who` unless spans [n, 2] are contiguous from byte 0 and end at
    `num_bytes` (empty spans allowed)."""
    spans = np.asarray(spans).reshape(-1, 2)
    starts, ends = spans[:, 0], spans[:, 1]
    covered = 0 if not len(spans) else int(ends[-1])
    gap = np.flatnonzero(starts != np.concatenate([[0], ends[:-1]]))
    if gap.size or (ends < starts).any() or covered != num_bytes:
        at = int(gap[0]) if gap.size else None
        raise ValueError(f"{who}: expected token spans that tile the text's {num_bytes} bytes, "
                         f"got {'a gap or overlap at token ' + str(at) if at is not None else ''}"
                         f"{'' if at is not None else f'spans covering {covered} bytes'}")


def tokenize_pair(text: str, anchor: Any, augments: Mapping[str, Any]
                  ) -> tuple[tuple[np.ndarray, np.ndarray], dict[str, tuple[np.ndarray,
                                                                           np.ndarray]]]:
    """`tokenize(text)` with the anchor's tokenizer and every augmenting one; raises ValueError
    naming both tokenizers where their tokens do not cover the same bytes of the text (a
    tokenizer that normalises, lower-cases or drops characters)."""
    num_bytes = len(text.encode("utf-8"))
    out, first = {}, None
    for name, tok in [(None, anchor), *augments.items()]:
        who = "anchor" if name is None else f"augments[{name!r}]"
        try:
            ids, spans = tokenize(tok, text)
            check_spans(spans, num_bytes, f"{who} tokenizer {tok!r}")
        except ValueError as e:
            other = (f"augments[{name!r}] tokenizer {augments[name]!r}" if name is not None
                     else f"augment tokenizers {list(augments.values())!r}")
            raise ValueError(
                f"tokenizers: expected the anchor tokenizer {anchor!r} and the {other} to "
                f"cover the same {num_bytes} bytes of the text {text[:40]!r}; {who}'s do not "
                f"({e})") from None
        if name is None:
            first = (ids, spans)
        else:
            out[name] = (ids, spans)
    return first, out


def _char_class(ch: str) -> int:
    return 0 if ch.isalpha() else 1 if ch.isdigit() else 2 if ch.isspace() else 3


# (class before, class at) -> the position between them is settled (module docstring).
_SETTLED = {(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3), (3, 1)}


def read_ends(text: str, ends: np.ndarray, *, stable_only: bool = True) -> np.ndarray:
    """For anchor tokens ending at byte `ends` [n] of `text`: the byte up to which each reads
    the augmenting models (the module docstring's held-back tail), a function of the text up to
    its own end only. `stable_only=False` returns `ends`."""
    ends = np.asarray(ends, np.int32)
    if not stable_only:
        return ends
    widths = np.asarray([len(ch.encode("utf-8")) for ch in text], np.int64)
    char_end = np.cumsum(widths)
    char_start = char_end - widths
    classes = [_char_class(ch) for ch in text]
    settled = np.zeros(len(text), np.int64)  # byte position of a settled cut at char i, or 0
    for i in range(1, len(text)):
        if (classes[i - 1], classes[i]) in _SETTLED:
            settled[i] = char_start[i]
    best = np.maximum.accumulate(settled) if len(text) else settled
    # A cut before char i is known once char i is wholly read: char_end[i] <= e.
    known = np.searchsorted(char_end, ends, side="right") - 1
    return np.where(known >= 0, best[np.maximum(known, 0)], 0).astype(np.int32)


def cross_mask(anchor_ends: np.ndarray, augment_ends: np.ndarray,
               anchor_segments: np.ndarray | None = None,
               augment_segments: np.ndarray | None = None) -> np.ndarray:
    """[batch, 1, anchor_len, aug_len] bool: anchor token t reads augmenting token s iff
    end[s] <= end[t], both in the same segment, s not padding (the module docstring's rule; the
    model builds the same mask inside its program)."""
    a_seg = np.ones_like(anchor_ends) if anchor_segments is None else anchor_segments
    s_seg = np.ones_like(augment_ends) if augment_segments is None else augment_segments
    mask = (a_seg[:, :, None] == s_seg[:, None, :]) & (s_seg[:, None, :] != 0)
    mask &= augment_ends[:, None, :] <= anchor_ends[:, :, None]
    return mask[:, None]


# Batches --------------------------------------------------------------------------------------


def _example(text: str, anchor: Any, augments: Mapping[str, Any], length: int,
             augment_length: int, add_eos: bool, stable_only: bool) -> dict[str, Any]:
    """One text as (anchor inputs, targets, weights, input ends) and each augment's
    (ids, ends), cut to fit: the augmenting tokens kept are a prefix, and the anchor keeps only
    the inputs that see the same augmenting tokens as in the whole text."""
    (ids, spans), aug = tokenize_pair(text, anchor, augments)
    ends = spans[:, 1]
    eos = getattr(anchor, "eos_id", None)
    if add_eos and eos is not None:
        ids, ends = np.append(ids, np.int32(eos)), np.append(ends, ends[-1] if len(ends) else 0)
    bos = getattr(anchor, "bos_id", None)
    targets = ids[:length]
    inputs = np.concatenate([[0], targets[:-1]]).astype(np.int32)
    in_ends = read_ends(text, np.concatenate([[0], ends[:len(targets) - 1]]),
                        stable_only=stable_only)
    weights = np.ones(len(targets), np.float32)
    if bos is not None:
        weights[:min(1, len(targets))] *= targets[:1] != bos
    out = {"aug": {}}
    keep = len(targets)
    for name, (a_ids, a_spans) in aug.items():
        a_ends = a_spans[:, 1]
        if len(a_ids) > augment_length:  # the anchor stops before it would miss a dropped one
            limit = a_ends[augment_length]
            keep = min(keep, int(np.searchsorted(in_ends, limit, side="left")))
            a_ids, a_ends = a_ids[:augment_length], a_ends[:augment_length]
        out["aug"][name] = (a_ids, a_ends)
    out.update(inputs=inputs[:keep], targets=targets[:keep], weights=weights[:keep],
               ends=in_ends[:keep])
    return out


def text_examples(texts: Sequence[str], anchor: Any, augments: Mapping[str, Any], *,
                  length: int, augment_length: int | None = None, pack: bool = False,
                  add_eos: bool = True, stable_only: bool = True) -> dict[str, np.ndarray]:
    """Texts -> the feature arrays of a composition across tokenizers (numpy, host).

    Anchor features [rows, length]: `decoder_input_tokens` (targets shifted right after a start
    token 0), `decoder_target_tokens` (the anchor's ids, EOS appended with `add_eos`),
    `decoder_loss_weights` (0 on padding and on a BOS target), `decoder_byte_ends` (the byte
    up to which each input reads the augments: `read_ends`, `stable_only`), and with
    `pack` `decoder_segment_ids` / `decoder_positions`. Per augmenting model `name`
    [rows, augment_length] (default `length`): `augments/{name}/tokens`, `.../positions`,
    `.../segment_ids` (0 on padding; the anchor's segment numbering) and `.../byte_ends`.

    A text longer than a row is cut: the augmenting streams keep their first tokens and the
    anchor keeps the inputs whose readable augmenting tokens all fit. `pack` fills each row
    greedily with whole examples while both streams fit.
    """
    if not texts:
        raise ValueError("texts: expected at least one text, got none")
    for name, value in (("length", length), ("augment_length", augment_length)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    augment_length = augment_length or length
    names = sorted(augments)
    examples = [_example(t, anchor, augments, length, augment_length, add_eos, stable_only)
                for t in texts]
    rows: list[list[dict[str, Any]]] = []
    for ex in examples:
        if not len(ex["inputs"]):
            continue
        row = rows[-1] if rows and pack else None
        if row is not None and (
                sum(len(e["inputs"]) for e in row) + len(ex["inputs"]) <= length and all(
                    sum(len(e["aug"][n][0]) for e in row) + len(ex["aug"][n][0])
                    <= augment_length for n in names)):
            row.append(ex)
        else:
            rows.append([ex])
    if not rows:
        raise ValueError("texts: every text is empty after tokenization")
    n = len(rows)
    out = {k: np.zeros((n, length), dt) for k, dt in (
        ("decoder_input_tokens", np.int32), ("decoder_target_tokens", np.int32),
        ("decoder_loss_weights", np.float32), ("decoder_byte_ends", np.int32),
        ("decoder_segment_ids", np.int32), ("decoder_positions", np.int32))}
    for name in names:
        for f in AUGMENT_FEATURES:
            out[feature_name(name, f)] = np.zeros((n, augment_length), np.int32)
    for r, row in enumerate(rows):
        at = 0
        aug_at = dict.fromkeys(names, 0)
        for seg, ex in enumerate(row, start=1):
            k = len(ex["inputs"])
            sl = slice(at, at + k)
            out["decoder_input_tokens"][r, sl] = ex["inputs"]
            out["decoder_target_tokens"][r, sl] = ex["targets"]
            out["decoder_loss_weights"][r, sl] = ex["weights"]
            out["decoder_byte_ends"][r, sl] = ex["ends"]
            out["decoder_segment_ids"][r, sl] = seg
            out["decoder_positions"][r, sl] = np.arange(k)
            at += k
            for name in names:
                ids, ends = ex["aug"][name]
                m, a = len(ids), aug_at[name]
                sl = slice(a, a + m)
                out[feature_name(name, "tokens")][r, sl] = ids
                out[feature_name(name, "byte_ends")][r, sl] = ends
                out[feature_name(name, "segment_ids")][r, sl] = seg
                out[feature_name(name, "positions")][r, sl] = np.arange(m)
                aug_at[name] = a + m
    if not pack:
        del out["decoder_segment_ids"], out["decoder_positions"]
    return out
