"""Cached decoding of a composition across tokenizers: text in, text out.

    result = generate_text(model, params, "The capital of France is", max_new_tokens=16,
                           anchor_tokenizer=smollm2_tok, augment_tokenizers={"g": gemma_tok})
    result.text     # the generated continuation
    result.tokens   # the anchor's generated ids

Every anchor token's bytes are appended to the text, and every augmenting model reads the text
through its own tokenizer. A tokenizer may re-segment the end of a text when more text arrives
("Par" + "is" becomes "Paris"), so after each new anchor token the driver re-tokenizes the
augment's whole text on the host and compares it with the tokens in the augment's cache: the
common prefix stays cached, the rest is re-run (the changed tail). The anchor tokens that read a
re-segmented augmenting token (whose byte end is at or after the earliest changed token's end)
are re-run too, from the anchor's own cache. So at every step the cache holds exactly what the
full forward (`ComposedLM.apply` with `calm_jax.alignment`'s inputs) computes on the text so far,
and each step's logits are the full forward's logits at the text's last anchor token.

The augmenting tokenizers read the longest prefix of the text that is valid UTF-8: a byte-level
anchor token that ends inside a character is held back until the character is complete.

Cost: the host re-tokenizes each augment's whole text every step (linear in the text; the
tokenizers are fast compared with a decode step); the device runs each step's new and re-run
tokens, padded to a power of two (one compiled program per padded width). One prompt at a time,
in a Python loop of jitted steps; `calm_jax.decoding.generate` remains the one-jit loop for a
shared vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import alignment
from calm_jax.alignment import AugmentInput
from calm_jax.composition import NO_END, ComposedCache, ComposedLM
from calm_jax.decoding import SamplingConfig, params_layout, sample_tokens, unstack_params


@dataclasses.dataclass
class TextDecodeResult:
    """text: the generated continuation (its bytes decoded, invalid UTF-8 replaced); tokens: the
    anchor's generated ids (EOS included); logits [len(tokens), vocab] float32 of each choice
    (with `return_logits`, else None); rerun: augmenting tokens re-run because their tokenizer
    re-segmented the text's tail (summed over models and steps)."""

    text: str
    tokens: list[int]
    logits: np.ndarray | None
    rerun: int


def readable_prefix(data: bytes) -> str:
    """The longest prefix of `data` that is valid UTF-8, decoded."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        return data[:e.start].decode("utf-8")


def anchor_ends(tokenizer: Any, prompt_spans: np.ndarray, generated: list[int]) -> np.ndarray:
    """Byte ends of the prompt's tokens (their spans) followed by the generated ids' (each
    adds its `token_bytes`)."""
    ends = list(np.asarray(prompt_spans).reshape(-1, 2)[:, 1])
    end = ends[-1] if ends else 0
    for piece in tokenizer.token_bytes(generated):
        end += len(piece)
        ends.append(end)
    return np.asarray(ends, np.int32)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _step(model: ComposedLM, params: Any, cache: ComposedCache, anchor_index: jax.Array,
          augment_index: Mapping[str, jax.Array], tokens: jax.Array, ends: jax.Array,
          augment_inputs: Mapping[str, AugmentInput]) -> tuple[jax.Array, ComposedCache]:
    cache = model.rewind(cache, anchor_index, augment_index)
    return model.extend_text(params, tokens, ends, cache, augment_inputs, logits="all")


def generate_text(model: ComposedLM, params: Any, prompt: str, *, anchor_tokenizer: Any,
                  augment_tokenizers: Mapping[str, Any], max_new_tokens: int,
                  sampling: SamplingConfig = SamplingConfig(), eos_id: int | None = None,
                  rng: jax.Array | None = None, return_logits: bool = False,
                  augment_len: int | None = None, forced: list[int] | None = None,
                  stable_only: bool = True) -> TextDecodeResult:
    """Continues `prompt` with the composed model, each model reading the text through its own
    tokenizer (see the module docstring).

    Args:
      model, params: a `ComposedLM` (any `shared_vocabulary`) and its parameters.
      prompt: the text; the anchor tokenizer encodes it (with its BOS, if it adds one).
      anchor_tokenizer, augment_tokenizers: the anchor's tokenizer and {name: tokenizer} for
        every augmenting model (objects with `encode_with_offsets` and `token_bytes`).
      max_new_tokens: anchor tokens to generate (> 0).
      sampling, rng: as in `calm_jax.decoding.generate` (rng needed unless greedy).
      eos_id: stop after this anchor id (default: the anchor tokenizer's `eos_id`).
      augment_len: slots of each augmenting cache (default: enough for 16 bytes per new token,
        capped at the augmenting model's `max_len`); running out raises ValueError.
      forced: anchor ids to append instead of sampling, at most max_new_tokens (scoring a
        given continuation through the cache: `logits` are then the model's scores of it).
      stable_only: each anchor token reads the augments up to `calm_jax.alignment.read_ends`
        (as `text_examples` does by default); False: up to its own byte end.
    """
    names = sorted(model.augment_configs)
    if not isinstance(augment_tokenizers, Mapping) or sorted(augment_tokenizers) != names:
        got = (sorted(augment_tokenizers) if isinstance(augment_tokenizers, Mapping)
               else type(augment_tokenizers).__name__)
        raise ValueError(f"augment_tokenizers: expected a tokenizer for every augmenting model "
                         f"{names}, got {got}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or (
            max_new_tokens <= 0):
        raise ValueError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
    if not isinstance(prompt, str):
        raise ValueError(f"prompt: expected a str, got {type(prompt).__name__}")
    if rng is None:
        if not sampling.greedy:
            raise ValueError("rng: expected a jax.random.key when sampling.temperature > 0, "
                             "got None")
        rng = jax.random.key(0)
    eos_id = getattr(anchor_tokenizer, "eos_id", None) if eos_id is None else eos_id
    (ids, spans), _ = alignment.tokenize_pair(prompt, anchor_tokenizer, augment_tokenizers)
    if not len(ids):
        raise ValueError("prompt: expected text the anchor tokenizer gives tokens for, got "
                         f"{prompt!r}")
    if params_layout(model, params) == "stacked":
        params = unstack_params(model, params)
    cache_len = len(ids) + max_new_tokens
    if cache_len > model.anchor_config.max_len:
        raise ValueError(f"max_new_tokens: expected at most anchor.max_len - prompt tokens = "
                         f"{model.anchor_config.max_len - len(ids)}, got {max_new_tokens}")
    if augment_len is None:
        augment_len = min(min(c.max_len for c in model.augment_configs.values()),
                          len(prompt.encode("utf-8")) + 2 + 16 * max_new_tokens)
    cache = model.init_cache(1, cache_len, per_layer=True, augment_len=augment_len)

    anchor_ids = [int(i) for i in ids]
    ends = list(int(e) for e in spans[:, 1])
    text = prompt.encode("utf-8")
    cached = {name: (np.zeros(0, np.int32), np.zeros(0, np.int32)) for name in names}
    done, rerun, generated, seen = 0, 0, [], []
    for step in range(max_new_tokens):
        readable = readable_prefix(text)
        changed_end, inputs, augment_index = NO_END, {}, {}
        for name in names:
            try:
                new_ids, new_spans = alignment.tokenize(augment_tokenizers[name], readable)
            except ValueError as e:
                raise ValueError(f"tokenizers: expected the anchor tokenizer "
                                 f"{anchor_tokenizer!r} and augments[{name!r}] tokenizer "
                                 f"{augment_tokenizers[name]!r} to cover the same bytes of the "
                                 f"generated text ({e})") from None
            new_ends = new_spans[:, 1]
            old_ids, old_ends = cached[name]
            n = min(len(old_ids), len(new_ids))
            same = (old_ids[:n] == new_ids[:n]) & (old_ends[:n] == new_ends[:n])
            k = n if same.all() else int(np.argmin(same))
            tail = np.concatenate([old_ends[k:], new_ends[k:]])
            if tail.size:
                changed_end = min(changed_end, int(tail.min()))
            rerun += len(old_ids) - k
            cached[name] = (new_ids, new_ends)
            augment_index[name] = jnp.int32(k)
            if len(new_ids) > augment_len:
                raise ValueError(f"augment_len: expected room for augments[{name!r}]'s "
                                 f"{len(new_ids)} tokens of the text, got {augment_len}")
            if len(new_ids) > k:
                s = min(_pow2(len(new_ids) - k), augment_len - k)
                tok = np.zeros((1, s), np.int32)
                end = np.full((1, s), NO_END, np.int32)
                tok[0, :len(new_ids) - k], end[0, :len(new_ids) - k] = new_ids[k:], new_ends[k:]
                inputs[name] = AugmentInput(tokens=jnp.asarray(tok), byte_ends=jnp.asarray(end))
        # The anchor tokens that read a changed augmenting token run again.
        reads = alignment.read_ends(readable, ends, stable_only=stable_only)
        start = min(int(np.searchsorted(reads[:done], changed_end, "left")), done)
        t = len(anchor_ids) - start
        width = min(_pow2(t), cache_len - start)
        tok = np.zeros((1, width), np.int32)
        end = np.zeros((1, width), np.int32)
        tok[0, :t], end[0, :t] = anchor_ids[start:], reads[start:]
        logits, cache = _step(model, params, cache, jnp.int32(start), augment_index,
                              jnp.asarray(tok), jnp.asarray(end), inputs)
        logits = logits[:, t - 1]
        done = len(anchor_ids)
        if forced is not None:
            if step >= len(forced):
                break
            new = int(forced[step])
        else:
            new = int(sample_tokens(logits, jax.random.fold_in(rng, step), sampling)[0])
        generated.append(new)
        if return_logits:
            seen.append(np.asarray(logits[0], np.float32))
        if eos_id is not None and new == eos_id:
            break
        anchor_ids.append(new)
        text += anchor_tokenizer.token_bytes([new])[0]
        ends.append(len(text))
    out = b"".join(anchor_tokenizer.token_bytes(
        generated[:-1] if eos_id is not None and generated[-1] == eos_id else generated))
    return TextDecodeResult(text=out.decode("utf-8", errors="replace"), tokens=generated,
                            logits=np.stack(seen) if return_logits else None, rerun=rerun)
