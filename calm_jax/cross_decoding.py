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
tokens, padded to a power of two (one compiled program per padded width), in a Python loop of
jitted steps; `calm_jax.decoding.generate` remains the one-jit loop for a shared vocabulary.

Batches: `generate_texts` decodes several prompts together, each exactly as `generate_text`
decodes it alone. Every row has its own batch-1 cache, stacked on a leading axis, and the step
is `jax.vmap`ped over it, so each row rewinds and extends at its own slots (its own prompt
length, re-runs and stop); a step runs every live row's tokens padded to one width. A row too
near the end of its cache for that width starts earlier and runs again tokens it already holds
(same inputs, same states); a finished row runs padding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

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


def default_augment_len(model: ComposedLM, prompt: str, max_new_tokens: int) -> int:
    """Slots of each augmenting cache for `prompt` and `max_new_tokens` anchor tokens: enough for
    16 bytes per new token, capped at the augmenting models' `max_len`."""
    return min(min(c.max_len for c in model.augment_configs.values()),
               len(prompt.encode("utf-8")) + 2 + 16 * max_new_tokens)


def _extend(model: ComposedLM, params: Any, cache: ComposedCache, anchor_index: jax.Array,
            augment_index: Mapping[str, jax.Array], tokens: jax.Array, ends: jax.Array,
            augment_inputs: Mapping[str, AugmentInput]) -> tuple[jax.Array, ComposedCache]:
    cache = model.rewind(cache, anchor_index, augment_index)
    return model.extend_text(params, tokens, ends, cache, augment_inputs, logits="all")


_step = jax.jit(_extend, static_argnames=("model",), donate_argnames=("cache",))


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _step_rows(model: ComposedLM, params: Any, cache: ComposedCache, anchor_index: jax.Array,
               augment_index: Mapping[str, jax.Array], tokens: jax.Array, ends: jax.Array,
               augment_inputs: Mapping[str, AugmentInput]) -> tuple[jax.Array, ComposedCache]:
    """`_step` of R prompts at once: every argument but `params` has a leading axis R (the
    cache: R batch-1 caches; the indices: [R]), so each row rewinds and extends at its own
    slots. Returns logits [R, 1, T, vocab]."""
    return jax.vmap(functools.partial(_extend, model, params))(
        cache, anchor_index, augment_index, tokens, ends, augment_inputs)


@functools.partial(jax.jit, static_argnames=("sampling",))
def _sample_rows(logits: jax.Array, rngs: jax.Array, step: jax.Array,
                 sampling: SamplingConfig) -> jax.Array:
    """logits [R, vocab] -> [R]: row r is `sample_tokens(logits[r:r+1], fold_in(rngs[r], step))`."""
    return jax.vmap(lambda x, key: sample_tokens(x[None], jax.random.fold_in(key, step),
                                                 sampling)[0])(logits, rngs)


@dataclasses.dataclass
class _Row:
    """One prompt's decoding state on the host: the text so far, the anchor's ids and their
    byte ends, each augment's (ids, byte ends) in its cache, and what has been generated."""

    text: bytes
    anchor_ids: list[int]
    ends: list[int]
    cached: dict[str, tuple[np.ndarray, np.ndarray]]
    augment_len: int
    rng: jax.Array
    forced: list[int] | None
    done: int = 0  # anchor tokens in the cache
    rerun: int = 0
    finished: bool = False
    generated: list[int] = dataclasses.field(default_factory=list)
    seen: list[np.ndarray] = dataclasses.field(default_factory=list)

    def plan(self, anchor_tokenizer: Any, augment_tokenizers: Mapping[str, Any],
             stable_only: bool) -> tuple[dict[str, int], int, np.ndarray]:
        """Re-tokenizes the readable text with every augmenting tokenizer (each model's tokens
        now in `cached`) and returns ({name: tokens kept in its cache}, the first anchor token
        to run, every anchor token's read end)."""
        readable = readable_prefix(self.text)
        changed_end, kept = NO_END, {}
        for name, tokenizer in sorted(augment_tokenizers.items()):
            try:
                new_ids, new_spans = alignment.tokenize(tokenizer, readable)
            except ValueError as e:
                raise ValueError(f"tokenizers: expected the anchor tokenizer "
                                 f"{anchor_tokenizer!r} and augments[{name!r}] tokenizer "
                                 f"{tokenizer!r} to cover the same bytes of the generated "
                                 f"text ({e})") from None
            new_ends = new_spans[:, 1]
            old_ids, old_ends = self.cached[name]
            n = min(len(old_ids), len(new_ids))
            same = (old_ids[:n] == new_ids[:n]) & (old_ends[:n] == new_ends[:n])
            k = n if same.all() else int(np.argmin(same))
            tail = np.concatenate([old_ends[k:], new_ends[k:]])
            if tail.size:
                changed_end = min(changed_end, int(tail.min()))
            self.rerun += len(old_ids) - k
            self.cached[name] = (new_ids, new_ends)
            kept[name] = k
            if len(new_ids) > self.augment_len:
                raise ValueError(f"augment_len: expected room for augments[{name!r}]'s "
                                 f"{len(new_ids)} tokens of the text, got {self.augment_len}")
        # The anchor tokens that read a changed augmenting token run again.
        reads = alignment.read_ends(readable, self.ends, stable_only=stable_only)
        start = min(int(np.searchsorted(reads[:self.done], changed_end, "left")), self.done)
        return kept, start, reads

    def result(self, anchor_tokenizer: Any, eos_id: int | None,
               return_logits: bool) -> TextDecodeResult:
        generated = self.generated
        if generated and eos_id is not None and generated[-1] == eos_id:
            generated = generated[:-1]
        out = b"".join(anchor_tokenizer.token_bytes(generated))
        return TextDecodeResult(text=out.decode("utf-8", errors="replace"),
                                tokens=list(self.generated),
                                logits=np.stack(self.seen) if return_logits else None,
                                rerun=self.rerun)


def generate_texts(model: ComposedLM, params: Any, prompts: Sequence[str], *,
                   anchor_tokenizer: Any, augment_tokenizers: Mapping[str, Any],
                   max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                   eos_id: int | None = None, rngs: Sequence[jax.Array] | None = None,
                   return_logits: bool = False, augment_len: int | None = None,
                   forced: Sequence[Sequence[int]] | None = None, stable_only: bool = True,
                   cache_len: int | None = None) -> list[TextDecodeResult]:
    """`generate_text` of several prompts decoded together, each row exactly as on its own:
    row r has its own cache slots, re-runs and key (`rngs[r]`, sampled at step s with
    `fold_in(rngs[r], s)`), and its own EOS; one device step per new token serves every row.

    `rngs`, `forced`: one per prompt (None: greedy only, no forcing). `augment_len`: as in
    `generate_text`, for every row (default: each row's own `default_augment_len`; the caches
    hold the largest). `cache_len`: anchor slots per row (default: the longest prompt's tokens
    + max_new_tokens; at most anchor.max_len). Fixing `cache_len` and `augment_len` lets
    batches of other prompts reuse the compiled steps.
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"prompts: expected a non-empty sequence of str, got {prompts!r}")
    return _decode(model, params, list(prompts), anchor_tokenizer=anchor_tokenizer,
                   augment_tokenizers=augment_tokenizers, max_new_tokens=max_new_tokens,
                   sampling=sampling, eos_id=eos_id, rngs=rngs, return_logits=return_logits,
                   augment_len=augment_len, forced=forced, stable_only=stable_only,
                   cache_len=cache_len, single=False)


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
      augment_len: slots of each augmenting cache (default: `default_augment_len`); running
        out raises ValueError.
      forced: anchor ids to append instead of sampling, at most max_new_tokens (scoring a
        given continuation through the cache: `logits` are then the model's scores of it).
      stable_only: each anchor token reads the augments up to `calm_jax.alignment.read_ends`
        (as `text_examples` does by default); False: up to its own byte end.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt: expected a str, got {type(prompt).__name__}")
    return _decode(model, params, [prompt], anchor_tokenizer=anchor_tokenizer,
                   augment_tokenizers=augment_tokenizers, max_new_tokens=max_new_tokens,
                   sampling=sampling, eos_id=eos_id, rngs=None if rng is None else [rng],
                   return_logits=return_logits, augment_len=augment_len,
                   forced=None if forced is None else [forced], stable_only=stable_only,
                   cache_len=None, single=True)[0]


def _decode(model: ComposedLM, params: Any, prompts: list[str], *, anchor_tokenizer: Any,
            augment_tokenizers: Mapping[str, Any], max_new_tokens: int,
            sampling: SamplingConfig, eos_id: int | None, rngs: Sequence[jax.Array] | None,
            return_logits: bool, augment_len: int | None,
            forced: Sequence[Sequence[int]] | None, stable_only: bool, cache_len: int | None,
            single: bool) -> list[TextDecodeResult]:
    """The decoding loop of `generate_text` (`single`: errors say "prompt") and
    `generate_texts`: one prompt runs `_step` on a batch-1 cache, R > 1 prompts run
    `_step_rows` on R batch-1 caches stacked."""
    names = sorted(model.augment_configs)
    if not isinstance(augment_tokenizers, Mapping) or sorted(augment_tokenizers) != names:
        got = (sorted(augment_tokenizers) if isinstance(augment_tokenizers, Mapping)
               else type(augment_tokenizers).__name__)
        raise ValueError(f"augment_tokenizers: expected a tokenizer for every augmenting model "
                         f"{names}, got {got}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or (
            max_new_tokens <= 0):
        raise ValueError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
    field = (lambda i: "prompt") if single else (lambda i: f"prompts[{i}]")  # noqa: E731
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"{field(i)}: expected a str, got {type(prompt).__name__}")
    count = len(prompts)
    if rngs is None:
        if not sampling.greedy:
            raise ValueError(f"{'rng' if single else 'rngs'}: expected a jax.random.key "
                             f"{'' if single else 'per prompt '}when sampling.temperature > 0, "
                             f"got None")
        rngs = [jax.random.key(0)] * count
    elif len(rngs) != count:
        raise ValueError(f"rngs: expected one key per prompt ({count}), got {len(rngs)}")
    if forced is not None and len(forced) != count:
        raise ValueError(f"forced: expected one list of ids per prompt ({count}), got "
                         f"{len(forced)}")
    eos_id = getattr(anchor_tokenizer, "eos_id", None) if eos_id is None else eos_id
    max_len = model.anchor_config.max_len
    rows = []
    for i, prompt in enumerate(prompts):
        (ids, spans), _ = alignment.tokenize_pair(prompt, anchor_tokenizer, augment_tokenizers)
        if not len(ids):
            raise ValueError(f"{field(i)}: expected text the anchor tokenizer gives tokens for, "
                             f"got {prompt!r}")
        if len(ids) + max_new_tokens > max_len:
            raise ValueError(f"max_new_tokens: expected at most anchor.max_len - prompt tokens "
                             f"= {max_len - len(ids)}{'' if single else f' ({field(i)})'}, "
                             f"got {max_new_tokens}")
        rows.append(_Row(
            text=prompt.encode("utf-8"), anchor_ids=[int(t) for t in ids],
            ends=[int(e) for e in spans[:, 1]],
            cached={name: (np.zeros(0, np.int32), np.zeros(0, np.int32)) for name in names},
            augment_len=(default_augment_len(model, prompt, max_new_tokens)
                         if augment_len is None else augment_len),
            rng=rngs[i], forced=None if forced is None else [int(t) for t in forced[i]]))
    needed = max(len(r.anchor_ids) for r in rows) + max_new_tokens
    if cache_len is None:
        cache_len = needed
    elif not isinstance(cache_len, int) or not needed <= cache_len <= max_len:
        raise ValueError(f"cache_len: expected an integer in [the longest prompt's tokens + "
                         f"max_new_tokens = {needed}, anchor.max_len = {max_len}], got "
                         f"{cache_len!r}")
    aug_slots = max(r.augment_len for r in rows)
    if params_layout(model, params) == "stacked":
        params = unstack_params(model, params)
    cache = model.init_cache(1, cache_len, per_layer=True, augment_len=aug_slots)
    batched = count > 1
    if batched:
        cache = jax.tree.map(lambda x: jnp.repeat(x[None], count, axis=0), cache)
        keys = jnp.stack(rngs)

    for step in range(max_new_tokens):
        live = [b for b, r in enumerate(rows) if not r.finished]
        if not live:
            break
        plans = {b: rows[b].plan(anchor_tokenizer, augment_tokenizers, stable_only)
                 for b in live}
        # Every row's tokens after its kept prefix, in one width per model. A row too near
        # the end of its cache for that width starts earlier: it runs again tokens it holds
        # (the same inputs give the same states). A finished row runs padding at slot 0.
        inputs, augment_index = {}, {}
        for name in names:
            index = np.zeros(count, np.int32)
            new = {b: len(rows[b].cached[name][0]) - plans[b][0][name] for b in live}
            width = max([min(_pow2(n), aug_slots - plans[b][0][name])
                         for b, n in new.items() if n], default=0)
            tok = np.zeros((count, width), np.int32)
            end = np.full((count, width), NO_END, np.int32)
            for b in live:
                k = min(plans[b][0][name], aug_slots - width)
                ids, ends = rows[b].cached[name]
                tok[b, :len(ids) - k], end[b, :len(ids) - k] = ids[k:], ends[k:]
                index[b] = k
            augment_index[name] = index
            if width:
                inputs[name] = AugmentInput(tokens=tok, byte_ends=end)
        width = max(min(_pow2(len(rows[b].anchor_ids) - plans[b][1]), cache_len - plans[b][1])
                    for b in live)
        anchor_index = np.zeros(count, np.int32)
        last = np.zeros(count, np.int32)  # each row's last real token in the step's width
        tok = np.zeros((count, width), np.int32)
        end = np.zeros((count, width), np.int32)
        for b in live:
            start = min(plans[b][1], cache_len - width)
            ids = rows[b].anchor_ids[start:]
            tok[b, :len(ids)], end[b, :len(ids)] = ids, plans[b][2][start:]
            anchor_index[b], last[b] = start, len(ids) - 1
        if not batched:
            logits, cache = _step(
                model, params, cache, jnp.int32(anchor_index[0]),
                {name: jnp.int32(i[0]) for name, i in augment_index.items()},
                jnp.asarray(tok), jnp.asarray(end),
                {name: AugmentInput(tokens=jnp.asarray(x.tokens),
                                    byte_ends=jnp.asarray(x.byte_ends))
                 for name, x in inputs.items()})
            logits = logits[:, int(last[0])]
        else:
            logits, cache = _step_rows(
                model, params, cache, jnp.asarray(anchor_index),
                {name: jnp.asarray(i) for name, i in augment_index.items()},
                jnp.asarray(tok[:, None]), jnp.asarray(end[:, None]),
                {name: AugmentInput(tokens=jnp.asarray(x.tokens[:, None]),
                                    byte_ends=jnp.asarray(x.byte_ends[:, None]))
                 for name, x in inputs.items()})
            logits = logits[jnp.arange(count), 0, jnp.asarray(last)]
        if forced is None:
            if not batched:
                chosen = sample_tokens(logits, jax.random.fold_in(rows[0].rng, step), sampling)
            else:
                chosen = _sample_rows(logits, keys, jnp.int32(step), sampling)
            chosen = np.asarray(chosen)
        seen = np.asarray(logits, np.float32) if return_logits else None
        for b in live:
            row = rows[b]
            row.done = len(row.anchor_ids)
            if row.forced is not None:
                if step >= len(row.forced):
                    row.finished = True
                    continue
                new = row.forced[step]
            else:
                new = int(chosen[b])
            row.generated.append(new)
            if return_logits:
                row.seen.append(seen[b])
            if eos_id is not None and new == eos_id:
                row.finished = True
                continue
            row.anchor_ids.append(new)
            row.text += anchor_tokenizer.token_bytes([new])[0]
            row.ends.append(len(row.text))
    return [r.result(anchor_tokenizer, eos_id, return_logits) for r in rows]
