"""Checks of the arrays a model reads: token ids, positions, segment ids, masks, batches.

Out-of-range token ids do not fail inside a jitted forward: an id >= vocab_size gives NaN
logits at every position of its row (attention mixes the NaN embedding into earlier rows'
softmax sums), a negative id wraps around to the end of the vocabulary, and a position past a
learned position table's `max_len` gives NaN everywhere. So ids are checked where they are
concrete, and shapes where they are static:

* `check_tokens`, `check_batch`: host-side checks of concrete (numpy or jax) arrays, run before
  a batch or a prompt reaches a jitted program (the trainer's data path, decoding's prompts,
  evaluation). They read the values, so they never run on tracers.
* `check_token_array`, `check_like`: shape and dtype checks that work on tracers too; the
  models call them when they are traced (`Decoder`, `ComposedLM`), so they cost nothing at run
  time.
* `checked_apply` and `checkify_tokens`: an opt-in checked mode for jitted code
  (`jax.experimental.checkify`): the value checks run on the device inside the program and a
  failure raises a ValueError on the host.

`model_limits(model)` gives the `vocab_size` and `max_len` to check against: the vocabulary of
the model (a `ComposedLM`'s models share it) and the smallest `max_len` among its models with
learned positions (None when no model has them: RoPE has no length limit).

Every error names the argument (or batch feature), the expected value and the given one.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

TOKEN_FEATURES = ("decoder_input_tokens", "decoder_target_tokens")


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of an array, a tracer or a nested list, without reading traced values."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return tuple(x.shape), np.dtype(x.dtype)
    a = np.asarray(x)
    return a.shape, a.dtype


def _is_integer(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.integer) and dtype != np.bool_


def check_token_array(tokens: Any, name: str = "tokens") -> tuple[int, int]:
    """Checks that `tokens` is an integer (not bool) array of rank 2 [batch, length] and returns
    its shape. Reads only shape and dtype, so tracers are fine. Raises ValueError naming `name`."""
    shape, dtype = _shape_dtype(tokens)
    if len(shape) != 2:
        raise ValueError(f"{name}: expected an integer array [batch, length] (rank 2), got "
                         f"rank {len(shape)}, shape {shape}")
    if not _is_integer(dtype):
        raise ValueError(f"{name}: expected integer token ids [batch, length], got dtype "
                         f"{dtype}")
    return shape  # type: ignore[return-value]


def check_like(value: Any, shape: tuple[int, ...], name: str, *, kind: str = "integer",
               like: str = "tokens") -> None:
    """Checks an array that goes with the tokens (positions, segment ids, masks, weights): its
    `shape` must equal the tokens' and its dtype be of `kind` ("integer": not bool; "bool":
    bool or integer; "number": any non-bool numeric). None passes. Tracers are fine."""
    if value is None:
        return
    got, dtype = _shape_dtype(value)
    if got != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} like {like}, got {got}")
    ok = {"integer": _is_integer(dtype),
          "bool": dtype == np.bool_ or _is_integer(dtype),
          "number": dtype != np.bool_ and (np.issubdtype(dtype, np.integer)
                                           or np.issubdtype(dtype, np.floating))}[kind]
    if not ok:
        raise ValueError(f"{name}: expected {kind} values, got dtype {dtype}")


def _range_error(name: str, what: str, lo: int, hi: int, values: np.ndarray,
                 bad: np.ndarray) -> ValueError:
    where = np.argwhere(bad)
    first = tuple(int(i) for i in where[0])
    return ValueError(f"{name}: expected {what} in [{lo}, {hi}), got {values[bad].min()} .. "
                      f"{values[bad].max()} at {len(where)} place(s), the first at index "
                      f"{first}")


def check_tokens(tokens: Any, *, vocab_size: int, max_len: int | None = None,
                 name: str = "tokens", valid: Any = None) -> np.ndarray:
    """Host-side check of concrete token ids [batch, length]; returns them as a numpy array.

    Checks: integer dtype (not bool or float), rank 2, every id in [0, vocab_size) (only where
    `valid` [batch, length] is True, when given: e.g. a prompt's padding), and length <=
    `max_len` when given (a learned position table's size; see `model_limits`). Raises
    ValueError naming `name`, the expected and the given value. Reads the values: call it on
    concrete arrays, never inside `jax.jit`.
    """
    shape = check_token_array(tokens, name)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or (
            vocab_size <= 0):
        raise ValueError(f"vocab_size: expected a positive integer, got {vocab_size!r}")
    try:
        array = np.asarray(tokens)
    except jax.errors.TracerArrayConversionError as e:
        raise ValueError(f"{name}: check_tokens reads concrete values; inside jit use "
                         f"checked_apply or checkify_tokens") from e
    if max_len is not None and shape[1] > max_len:
        raise ValueError(f"{name}: expected length <= max_len={max_len} (the learned position "
                         f"table's size), got length {shape[1]}")
    if valid is not None:
        check_like(valid, shape, f"{name} valid mask", kind="bool", like=name)
    elif array.size == 0 or (array.min() >= 0 and array.max() < vocab_size):
        return array
    bad = (array < 0) | (array >= vocab_size)
    if valid is not None:
        bad &= np.asarray(valid).astype(bool)
    if bad.any():
        raise _range_error(name, "token ids", 0, vocab_size, array, bad)
    return array


def check_positions(positions: Any, shape: tuple[int, ...], *, max_len: int | None = None,
                    name: str = "positions") -> None:
    """Host-side check of concrete positions: integer, of the tokens' `shape`, >= 0 and below
    `max_len` when given (learned positions). None passes."""
    if positions is None:
        return
    check_like(positions, shape, name)
    array = np.asarray(positions)
    hi = np.iinfo(np.int32).max if max_len is None else max_len
    if array.size == 0 or (array.min() >= 0 and array.max() < hi):
        return
    bad = (array < 0) | (array >= hi)
    if bad.any():
        raise _range_error(name, "positions", 0, hi, array, bad)


def check_batch(batch: Mapping[str, Any], *, vocab_size: int, max_len: int | None = None,
                name: str = "batch") -> Mapping[str, Any]:
    """Host-side check of one training or evaluation batch (t5x's decoder features, see
    `calm_jax.data`); returns the batch unchanged.

    `decoder_input_tokens` and `decoder_target_tokens` go through `check_tokens`; every other
    feature must have their shape: `decoder_segment_ids` and `decoder_positions` integers (the
    positions >= 0, and < `max_len` when given), `decoder_loss_weights` numbers, `prompt_mask`
    bool or integer. With explicit positions the length may exceed `max_len` (packed segments
    restart their positions); without, it may not.
    """
    if "decoder_input_tokens" not in batch:
        raise ValueError(f"{name}: expected a 'decoder_input_tokens' feature, got features "
                         f"{sorted(batch)}")
    has_positions = batch.get("decoder_positions") is not None
    tokens = check_tokens(batch["decoder_input_tokens"], vocab_size=vocab_size,
                          max_len=None if has_positions else max_len,
                          name=f"{name}['decoder_input_tokens']")
    shape = tokens.shape
    if batch.get("decoder_target_tokens") is not None:
        check_like(batch["decoder_target_tokens"], shape,
                   f"{name}['decoder_target_tokens']", like="decoder_input_tokens")
        check_tokens(batch["decoder_target_tokens"], vocab_size=vocab_size,
                     name=f"{name}['decoder_target_tokens']")
    check_positions(batch.get("decoder_positions"), shape, max_len=max_len,
                    name=f"{name}['decoder_positions']")
    for feature, kind in (("decoder_segment_ids", "integer"),
                          ("decoder_loss_weights", "number"), ("prompt_mask", "bool")):
        check_like(batch.get(feature), shape, f"{name}[{feature!r}]", kind=kind,
                   like="decoder_input_tokens")
    return batch


def model_limits(*models: Any) -> dict[str, int | None]:
    """{'vocab_size', 'max_len'} to check the token stream of one or more models against
    (`check_tokens(tokens, **model_limits(model))`): each a `TransformerConfig`, a `Decoder`
    or a `ComposedLM`. `vocab_size` is the first model's (a `ComposedLM`'s anchor's);
    `max_len` the smallest among the models with learned positions that read that stream
    (those of the first model's vocabulary size: an augmenting model with its own tokenizer
    reads its own tokens), None when none has learned positions (RoPE has no length limit)."""
    from calm_jax.models.config import TransformerConfig

    configs = []
    for model in models:
        if isinstance(model, TransformerConfig):
            configs.append(model)
        elif hasattr(model, "anchor_config") and hasattr(model, "augment_configs"):
            configs += [model.anchor_config, *model.augment_configs.values()]
        elif isinstance(getattr(model, "config", None), TransformerConfig):
            configs.append(model.config)
        else:
            raise ValueError(f"model: expected a TransformerConfig, Decoder or ComposedLM, got "
                             f"{type(model).__name__}")
    if not configs:
        raise ValueError("model_limits: expected at least one model, got none")
    vocab = configs[0].vocab_size
    learned = [c.max_len for c in configs if c.position == "learned" and c.vocab_size == vocab]
    return {"vocab_size": vocab, "max_len": min(learned) if learned else None}


# Checked mode (checkify) ---------------------------------------------------------------------


def checkify_tokens(tokens: jax.Array, *, vocab_size: int, max_len: int | None = None,
                    positions: jax.Array | None = None, name: str = "tokens") -> None:
    """Value checks of `tokens` (and `positions`) as `checkify.check`s, for code run under
    `jax.experimental.checkify.checkify` (outside it they fail to trace): ids in
    [0, vocab_size) and positions in [0, max_len). Shape checks run at trace time."""
    from jax.experimental import checkify

    shape = check_token_array(tokens, name)
    tokens = jnp.asarray(tokens)
    bad = (tokens < 0) | (tokens >= vocab_size)
    checkify.check(~jnp.any(bad), f"{name}: expected token ids in [0, {vocab_size}), got "
                   "ids in [{low}, {high}]", low=jnp.min(tokens), high=jnp.max(tokens))
    if max_len is not None and positions is None and shape[1] > max_len:
        raise ValueError(f"{name}: expected length <= max_len={max_len} (the learned position "
                         f"table's size), got length {shape[1]}")
    if positions is not None:
        check_like(positions, shape, "positions")
        positions = jnp.asarray(positions)
        hi = np.iinfo(np.int32).max if max_len is None else max_len
        checkify.check(jnp.all((positions >= 0) & (positions < hi)),
                       f"positions: expected positions in [0, {hi}), got positions in "
                       "[{low}, {high}]", low=jnp.min(positions), high=jnp.max(positions))


def checked_apply(model: Any, params: Any, tokens: Any, **kwargs: Any) -> jax.Array:
    """The model's logits [batch, length, vocab], with its inputs' values checked inside the
    jitted program (`checkify_tokens`): a token id outside [0, vocab_size) or a position outside
    a learned table raises ValueError instead of giving NaN or wrapped-around logits.

    `model` is a `Decoder` (params: its tree or {'params': tree}) or a `ComposedLM`; `kwargs`
    are its `apply`'s (`positions`, `segment_ids`, and `prompt_mask` for a ComposedLM). One
    program per model and input shapes, cached like any jitted function; the unchecked `apply`
    is unchanged and pays nothing for this mode.
    """
    err, logits = _checked_apply(model, params, tokens, **kwargs)
    message = err.get()
    if message is not None:
        raise ValueError(re.sub(r" \(`?check`? failed.*\)\s*$", "", message, flags=re.DOTALL))
    return logits


@functools.partial(jax.jit, static_argnames=("model",))
def _checked_apply(model: Any, params: Any, tokens: Any, **kwargs: Any):
    from jax.experimental import checkify

    def run(params, tokens, kwargs):
        limits = model_limits(model)
        checkify_tokens(tokens, positions=kwargs.get("positions"), **limits)
        if hasattr(model, "anchor_config"):
            return model.apply(params, tokens, **kwargs)
        import flax.linen as nn

        tree = nn.unbox(params)
        if isinstance(tree, Mapping) and set(tree) == {"params"}:
            tree = tree["params"]
        return model.apply({"params": tree}, tokens, **kwargs)[0]

    return checkify.checkify(run)(params, tokens, kwargs)
