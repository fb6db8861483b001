"""Prefill plus cached decoding for plain (`Decoder`) and composed (`ComposedLM`) models.

    result = generate(model, params, [[5, 6, 7], [8, 9]], max_new_tokens=32,
                      sampling=SamplingConfig(temperature=0.8, top_p=0.95), eos_id=1,
                      pad_id=0, rng=jax.random.key(0))
    result.tokens   # [batch, max_new_tokens] int32; pad_id after a row's EOS
    result.lengths  # [batch] int32: tokens generated per row, its EOS included

Padding. Prompts reach `generate` as a list of token lists, or as a RIGHT-padded int array
[batch, prompt_len] (each row's prompt first, then padding, as data pipelines produce it) with
`lengths` [batch]. `pad_prompts` turns them into the LEFT-padded layout used inside: row b's
prompt fills slots start[b] = prompt_len - lengths[b] .. prompt_len - 1 of the cache, so every
row's next token goes to the same slot and a decode step is one static-shape update. Each token
keeps its true position (slot - start[b]) for RoPE or learned positions, and attention never
reads pad slots, so a row's logits do not depend on the other rows' lengths.

Decoding. `prefill` runs the whole (left-padded) prompt once and returns the last prompt token's
logits and the cache (`KVCache` for a `Decoder`, `ComposedCache` for a `ComposedLM`, whose
augmenting models keep their own caches and consume every generated token, the paper's
decoding; with `augment_sees="prompt"` they only see the prompt). `decode_step` appends one
token per row. `generate` runs prefill, then a `lax.while_loop` of decode steps and sampling
inside one jit, stopping early once every row has emitted `eos_id`. The cache holds
prompt_len + max_new_tokens slots, which must not exceed any model's `max_len`.

Layout. `generate` decodes in the per-layer layout by default (`layout="per_layer"`): block
weights split into one array per layer and CALM's composition weights into one per connection
(`unstack_params`), one KV-cache array per layer and one memory array per connection, with the
layer loop unrolled, so a decode step reads each weight and cache slot once; indexing stacked
[layers, ...] or [connections, ...] arrays inside the loop makes XLA copy every layer's (and
connection's) weights and cache slots at every step. Passing `unstack_params(model, params)`
instead of the stacked tree saves the one split per call (and its second copy of the weights).
`layout="stacked"` keeps the scanned loop, whose program does not grow with depth (compile time
for very deep models). `prefill` and `decode_step` follow the layout of the parameters given.

Sampling (`SamplingConfig`): temperature 0 is greedy (argmax); otherwise logits are divided by
the temperature, restricted to the `top_k` largest (0: off) and to the smallest set whose
probability reaches `top_p` (1.0: off), then sampled with `jax.random.categorical`. Step i uses
`jax.random.fold_in(rng, i)`, so a seed reproduces a run exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from flax import struct

from calm_jax.bridge import unstack_connections
from calm_jax.composition import ComposedCache, ComposedLM
from calm_jax.models.attention import KVCache
from calm_jax.models.config import TransformerConfig, is_real
from calm_jax.models.transformer import Decoder, layers_unstacked, unstack_layers
from calm_jax.validation import check_token_array

Array = jax.Array
Model = Decoder | ComposedLM
Cache = KVCache | ComposedCache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen from the logits (see the module docstring).

    Attributes:
      temperature: 0 for greedy decoding, else the softmax temperature (> 0).
      top_k: keep only the k most likely tokens; 0 keeps all.
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p
        (nucleus sampling); 1.0 keeps all.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not is_real(self.temperature) or self.temperature < 0:
            raise ValueError(f"sampling.temperature: expected a float >= 0 (0 is greedy), "
                             f"got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"sampling.top_k: expected an integer >= 0 (0 is off), "
                             f"got {self.top_k!r}")
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p: expected a float in (0, 1] (1 is off), "
                             f"got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@struct.dataclass
class DecodeResult:
    """tokens [batch, max_new_tokens] int32 (pad_id after EOS); lengths [batch] int32, the
    number of generated tokens per row including its EOS; logits [batch, max_new_tokens, vocab]
    float32 (only with `return_logits=True`, else None): the model's logits each token was
    chosen from, before temperature / top-k / top-p, meaningful up to each row's length."""

    tokens: Array
    lengths: Array
    logits: Array | None = None


# Model-agnostic pieces ------------------------------------------------------------------------


def _configs(model: Model) -> list[tuple[str, TransformerConfig]]:
    if isinstance(model, Decoder):
        return [("model", model.config)]
    if isinstance(model, ComposedLM):
        return [("anchor", model.anchor_config)] + [
            (f"augments[{name!r}]", cfg) for name, cfg in model.augment_configs.items()]
    raise ValueError(f"model: expected a calm_jax Decoder or ComposedLM, "
                     f"got {type(model).__name__}")


def _vocab_size(model: Model) -> int:
    return _configs(model)[0][1].vocab_size


def _plain_params(model: Model, params: Any) -> Any:
    """Unboxed parameters; a Decoder accepts its params tree or {'params': tree}."""
    params = nn.unbox(params)
    if isinstance(model, Decoder) and isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    return params


LAYOUTS = ("per_layer", "stacked")


def decoder_parts(model: Model, params: Any) -> list[tuple[str, TransformerConfig, Any]]:
    """(field, config, plain params tree) of every Decoder in the model: the model itself, or a
    ComposedLM's anchor and augmenting models."""
    params = _plain_params(model, params)
    trees = ([params] if isinstance(model, Decoder) else
             [params["anchor"]] + [params["augments"][name] for name in model.augment_configs])
    return [(field, cfg, tree) for (field, cfg), tree in zip(_configs(model), trees)]


def unstack_params(model: Model, params: Any, fuse: bool = True) -> Any:
    """The model's parameters in the per-layer decoding layout: every Decoder's stacked block
    weights split into per-layer arrays, the projections that share an input fused
    (`calm_jax.models.transformer.unstack_layers`; `fuse=False` leaves them apart), and the
    composition's into per-connection ones (`calm_jax.bridge.unstack_connections`). Pass
    the result to `generate` / `prefill` / `decode_step` in place of the stacked tree (do it
    once: it copies the weights)."""
    params = _plain_params(model, params)
    if isinstance(model, Decoder):
        return unstack_layers(params, fuse)
    return {**params, "anchor": unstack_layers(params["anchor"], fuse),
            "augments": {name: unstack_layers(p, fuse) for name, p in params["augments"].items()},
            "composition": unstack_connections(params["composition"], model.config,
                                               fuse)}


def params_layout(model: Model, params: Any) -> str:
    """"per_layer" or "stacked": the layout of the parameters (every Decoder's and the
    composition's alike)."""
    layouts = {field: "per_layer" if layers_unstacked(tree) else "stacked"
               for field, _, tree in decoder_parts(model, params)}
    if isinstance(model, ComposedLM):
        composition = _plain_params(model, params)["composition"]
        layouts["composition"] = "per_layer" if layers_unstacked(composition) else "stacked"
    if len(set(layouts.values())) > 1:
        raise ValueError(f"params: expected every model's block weights and the composition "
                         f"in one layout (all stacked, or all split by unstack_params), "
                         f"got {layouts}")
    return next(iter(layouts.values()))


def _extend(model: Model, params: Any, tokens: Array, cache: Cache) -> tuple[Array, Cache]:
    """Appends tokens [batch, T] to the cache; logits [batch, vocab] of the last one."""
    if isinstance(model, ComposedLM):
        return model.extend(params, tokens, cache)
    logits, _, cache = model.apply({"params": params}, tokens, cache, method=Decoder.extend)
    return logits, cache


# Prompts ---------------------------------------------------------------------------------------


def pad_prompts(prompts: Any, lengths: Any = None, *, pad_id: int = 0,
                vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (left-padded tokens [batch, prompt_len] int32, lengths [batch] int32).

    `prompts` is a list of token lists (lengths inferred), or a right-padded array
    [batch, prompt_len] with `lengths` [batch] (None: every row is full). Host-side (numpy);
    raises ValueError on empty prompts, bad lengths or out-of-vocabulary tokens.
    """
    if lengths is None and isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("prompts: expected at least one prompt, got an empty list")
        if any(np.ndim(p) != 1 for p in prompts):
            raise ValueError(f"prompts: expected a list of token lists, got elements of "
                             f"ndim {sorted(set(np.ndim(p) for p in prompts))}")
        rows = [np.asarray(p) for p in prompts]
        if any(r.size and not np.issubdtype(r.dtype, np.integer) for r in rows):
            raise ValueError(f"prompts: expected integer token ids, got "
                             f"{sorted(set(str(r.dtype) for r in rows))}")
        rows = [r.astype(np.int64) for r in rows]
        lengths = np.array([len(r) for r in rows], np.int64)
        width = max(int(lengths.max()), 1)
        right = np.full((len(rows), width), pad_id, np.int64)
        for i, r in enumerate(rows):
            right[i, :len(r)] = r
    else:
        right = np.asarray(prompts)
        if right.ndim != 2 or not np.issubdtype(right.dtype, np.integer):
            raise ValueError(f"prompts: expected a list of token lists or an integer array "
                             f"[batch, prompt_len], got {right.dtype} array of shape "
                             f"{right.shape}")
        if right.shape[0] == 0:
            raise ValueError("prompts: expected at least one prompt, got batch size 0")
        width = right.shape[1]
        if lengths is None:
            lengths = np.full((right.shape[0],), width, np.int64)
        lengths = np.asarray(lengths)
        if lengths.shape != (right.shape[0],) or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"lengths: expected an integer array of shape ({right.shape[0]},) "
                             f"(one per prompt), got {lengths.dtype} array of shape "
                             f"{lengths.shape}")
    bad = np.flatnonzero((lengths < 1) | (lengths > width))
    if bad.size:
        raise ValueError(f"lengths: expected every prompt length in [1, prompt_len={width}], "
                         f"got {lengths[bad].tolist()} for rows {bad.tolist()}")
    batch = right.shape[0]
    cols = np.arange(width)
    real = cols[None, :] < lengths[:, None]
    if vocab_size is not None:
        tokens = right[real]
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise ValueError(f"prompts: expected token ids in [0, {vocab_size}), got ids in "
                             f"[{tokens.min()}, {tokens.max()}]")
    start = width - lengths
    left = np.full((batch, width), pad_id, np.int64)
    src = (cols[None, :] - start[:, None]) % width  # slot s holds prompt token s - start
    left = np.where(cols[None, :] >= start[:, None], np.take_along_axis(right, src, 1), left)
    return left.astype(np.int32), lengths.astype(np.int32)


# Prefill and decode steps -------------------------------------------------------------------


def _max_len(model: Model) -> tuple[str, int]:
    """The smallest `max_len` among the model's configs, and the field it comes from."""
    field, cfg = min(_configs(model), key=lambda fc: fc[1].max_len)
    return f"{field}.max_len", cfg.max_len


def _check_cache_len(model: Model, prompt_len: int, cache_len: int) -> None:
    field, max_len = _max_len(model)
    if not prompt_len <= cache_len <= max_len:
        raise ValueError(f"cache_len: expected prompt_len={prompt_len} <= cache_len <= "
                         f"{field}={max_len}, got {cache_len}")


def _check_lengths(model: Model, prompt_len: int, max_new_tokens: int) -> None:
    field, max_len = _max_len(model)
    if prompt_len > max_len:
        raise ValueError(f"prompts: expected prompt_len <= {field}={max_len}, "
                         f"got prompt_len={prompt_len}")
    if prompt_len + max_new_tokens > max_len:
        raise ValueError(f"max_new_tokens: expected at most {field} - prompt_len = "
                         f"{max_len} - {prompt_len} = {max_len - prompt_len} (the cache holds "
                         f"the prompt and the new tokens), got {max_new_tokens}")


@functools.partial(jax.jit, static_argnames=("model", "cache_len"))
def prefill(model: Model, params: Any, tokens: Array, lengths: Array, *,
            cache_len: int) -> tuple[Array, Cache]:
    """Runs left-padded prompts tokens [batch, prompt_len] (see `pad_prompts`) with lengths
    [batch] through the model; returns (logits [batch, vocab] float32 of each row's last prompt
    token, cache of `cache_len` slots with `index == prompt_len`). The cache is per-layer when
    the parameters are (`unstack_params`), else stacked."""
    batch, prompt_len = check_token_array(tokens, "tokens")
    if tuple(jnp.shape(lengths)) != (batch,):
        raise ValueError(f"lengths: expected shape ({batch},) (one per prompt), got "
                         f"{tuple(jnp.shape(lengths))}")
    _check_cache_len(model, prompt_len, cache_len)
    params = _plain_params(model, params)
    per_layer = params_layout(model, params) == "per_layer"
    start = prompt_len - jnp.asarray(lengths, jnp.int32)
    if isinstance(model, ComposedLM):
        cache = model.init_cache(batch, cache_len, start, prompt_len=prompt_len,
                                 per_layer=per_layer)
        logits, cache = model.extend(params, tokens, cache)
        return logits, model.end_prompt(cache)
    cache = KVCache.zeros(model.config, batch, cache_len, start, per_layer=per_layer)
    return _extend(model, params, tokens, cache)


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def decode_step(model: Model, params: Any, cache: Cache, tokens: Array) -> tuple[Array, Cache]:
    """Appends one token per row, tokens [batch] int32; returns (logits [batch, vocab] of that
    token, cache). The cache is donated: use the returned one. It must have a free slot
    (`index < cache_len`); writes past the end are clamped by XLA, not detected."""
    shape, dtype = tuple(jnp.shape(tokens)), jnp.result_type(tokens)
    if len(shape) != 1 or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"tokens: expected integer token ids [batch] (one per row), got "
                         f"{dtype} array of shape {shape}")
    return _extend(model, _plain_params(model, params), tokens[:, None].astype(jnp.int32), cache)


# Sampling -------------------------------------------------------------------------------------


def sample_tokens(logits: Array, rng: Array, sampling: SamplingConfig) -> Array:
    """logits [batch, vocab] -> tokens [batch] int32 (see `SamplingConfig`)."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k and sampling.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, sampling.top_k)[0][:, -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if sampling.top_p < 1.0:
        ordered = jnp.sort(x, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        keep = before < sampling.top_p             # a prefix, never empty
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < threshold, -jnp.inf, x)
    return jax.random.categorical(rng, x, axis=-1).astype(jnp.int32)


# Generation -----------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling",
                                             "return_logits", "layout", "early_stop"))
def _generate(model: Model, params: Any, tokens: Array, lengths: Array, rng: Array,
              eos_id: Array, pad_id: Array, *, max_new_tokens: int, sampling: SamplingConfig,
              return_logits: bool, layout: str, early_stop: bool = True) -> DecodeResult:
    """`generate` on left-padded prompts; eos_id (-1: none) and pad_id are traced scalars, so
    changing them does not recompile. Without `early_stop` (no eos_id) the decode loop runs
    exactly max_new_tokens - 1 steps: its trip count is known to XLA, whose GPU runtime then
    runs the body that many times without copying the loop condition to the host and waiting
    for it after every token."""
    if layout == "per_layer" and params_layout(model, params) == "stacked":
        params = unstack_params(model, params)  # once, outside the decode loop
    batch, prompt_len = tokens.shape
    logits, cache = prefill(model, params, tokens, lengths,
                            cache_len=prompt_len + max_new_tokens)
    first = sample_tokens(logits, jax.random.fold_in(rng, 0), sampling)
    done = first == eos_id
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    count = jnp.ones((batch,), jnp.int32)
    seen = None
    if return_logits:
        seen = jnp.zeros((batch, max_new_tokens, logits.shape[-1]), jnp.float32)
        seen = seen.at[:, 0].set(logits)

    def cond(carry):
        step, _, done, *_ = carry
        if not early_stop:  # a known trip count: XLA's GPU loop then never reads it back
            return step < max_new_tokens
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, last, done, out, count, seen, cache = carry
        logits, cache = _extend(model, params, last[:, None], cache)
        new = sample_tokens(logits, jax.random.fold_in(rng, step), sampling)
        new = jnp.where(done, pad_id, new)
        zero = jnp.int32(0)
        out = jax.lax.dynamic_update_slice(out, new[:, None], (zero, step))
        if seen is not None:
            seen = jax.lax.dynamic_update_slice(seen, logits[:, None], (zero, step, zero))
        count = count + (~done).astype(jnp.int32)
        return step + 1, new, done | (new == eos_id), out, count, seen, cache

    carry = (jnp.int32(1), first, done, out, count, seen, cache)
    _, _, _, out, count, seen, _ = jax.lax.while_loop(cond, body, carry)
    return DecodeResult(tokens=out, lengths=count, logits=seen)


def _check_token_id(name: str, value: Any, vocab: int, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not (
            0 <= value < vocab):
        expected = f"None or an integer in [0, {vocab})" if allow_none else (
            f"an integer in [0, {vocab})")
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def generate(model: Model, params: Any, prompts: Any, *, max_new_tokens: int,
             lengths: Any = None, sampling: SamplingConfig = SamplingConfig(),
             eos_id: int | None = None, pad_id: int = 0, rng: Array | None = None,
             return_logits: bool = False, layout: str = "per_layer") -> DecodeResult:
    """Generates `max_new_tokens` tokens per prompt with a KV cache, in one jitted loop.

    Args:
      model: a `Decoder` or a `ComposedLM`.
      params: its parameters (boxed or not; a Decoder's tree or {'params': tree}).
      prompts: a list of token lists, or a right-padded int array [batch, prompt_len] with
        `lengths` (see the module docstring).
      max_new_tokens: tokens to generate per row (> 0).
      sampling: greedy by default.
      eos_id: a row stops after emitting it (None: never stop early).
      pad_id: fills prompts' padding and every row's output after its EOS.
      rng: a `jax.random.key`; required unless sampling is greedy.
      return_logits: also return every step's logits [batch, max_new_tokens, vocab].
      layout: "per_layer" (default; split stacked weights once per call unless `params` already
        come from `unstack_params`) or "stacked" (scanned layers; needs stacked `params`). See
        the module docstring.

    Returns:
      DecodeResult(tokens [batch, max_new_tokens], lengths [batch], logits or None).
    """
    vocab = _vocab_size(model)
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or (
            max_new_tokens <= 0):
        raise ValueError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
    if not isinstance(sampling, SamplingConfig):
        raise ValueError(f"sampling: expected a SamplingConfig, got {type(sampling).__name__}")
    if sampling.top_k > vocab:
        raise ValueError(f"sampling.top_k: expected at most vocab_size={vocab}, "
                         f"got {sampling.top_k}")
    _check_token_id("eos_id", eos_id, vocab, allow_none=True)
    _check_token_id("pad_id", pad_id, vocab, allow_none=False)
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    params = _plain_params(model, params)  # outside the jit: one program for either form
    if layout == "stacked" and params_layout(model, params) == "per_layer":
        raise ValueError("layout: expected 'per_layer' for parameters split by unstack_params, "
                         "got 'stacked'")
    if rng is None:
        if not sampling.greedy:
            raise ValueError("rng: expected a jax.random.key when sampling.temperature > 0, "
                             "got None")
        rng = jax.random.key(0)
    tokens, lengths = pad_prompts(prompts, lengths, pad_id=pad_id, vocab_size=vocab)
    _check_lengths(model, tokens.shape[1], int(max_new_tokens))
    return _generate(model, params, jnp.asarray(tokens), jnp.asarray(lengths), rng,
                     jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id),
                     max_new_tokens=int(max_new_tokens), sampling=sampling,
                     return_logits=bool(return_logits), layout=layout,
                     early_stop=eos_id is not None)
