"""Checkpoints (orbax): exported models, and training checkpoints that resume.

Two kinds of directories:

* A **model export** (`save_model` / `load_model`): `config.json` (our `TransformerConfig`) and
  `params/` (an orbax checkpoint of the parameter tree). Pretraining runs write one at the end
  (`<model_dir>/export`), the importers in `calm_jax.convert` write the same format, and the
  trainer loads frozen anchor and augmenting models from it. `params_fingerprint` identifies its
  content (the architecture and every parameter's bits), wherever and however it is stored.
* A **training checkpoint** (`Checkpointer`, an orbax `CheckpointManager` under
  `<model_dir>/checkpoints`): the trained parameters, optimizer state and step, plus JSON metadata
  with the data position and the fingerprints of the frozen models the run was trained against.
  Frozen weights are never written there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from calm_jax.models.config import RUNTIME_FIELDS, TransformerConfig

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def config_to_dict(cfg: TransformerConfig) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    for key in ("dtype", "param_dtype"):
        out[key] = str(np.dtype(cfg.compute_dtype if key == "dtype" else cfg.params_dtype))
    return out


def config_from_dict(data: dict[str, Any]) -> TransformerConfig:
    fields = {f.name: f for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{CONFIG_FILE}: unknown TransformerConfig fields {unknown}")
    missing = sorted(name for name, f in fields.items() if name not in data
                     and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ValueError(f"{CONFIG_FILE}: missing TransformerConfig fields {missing}")
    return TransformerConfig(**data)


def save_model(directory: str, cfg: TransformerConfig, params: Any) -> None:
    """Writes `config.json` and `params/` into `directory`, which must not hold an export yet
    (one already there is left as it was)."""
    directory = os.path.abspath(directory)
    if os.path.exists(os.path.join(directory, PARAMS_DIR)):
        raise ValueError(f"save_model: {directory} already holds a model export ({PARAMS_DIR}/); "
                         f"expected a new directory")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config_to_dict(cfg), f, indent=2, sort_keys=True)
    save_params(os.path.join(directory, PARAMS_DIR), params)


def save_params(path: str, params: Any) -> None:
    """Writes a parameter tree to `path` (an orbax checkpoint) and waits for it."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, params)
    checkpointer.wait_until_finished()


def restore_params(path: str, target: Any, what: str) -> Any:
    """Restores the tree at `path` into `target` (`jax.ShapeDtypeStruct`s, with shardings),
    first checking that every parameter is there with its shape (ValueError naming it)."""
    checkpointer = ocp.StandardCheckpointer()
    stored = checkpointer.metadata(path)
    check_tree_matches(getattr(stored, "item_metadata", stored), target, what)
    return checkpointer.restore(path, target)


def load_model_config(directory: str) -> TransformerConfig:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise ValueError(f"checkpoint {directory!r}: no {CONFIG_FILE} (expected a model export "
                         f"written by a pretraining run or `python -m calm_jax.convert`)")
    with open(path) as f:
        return config_from_dict(json.load(f))


def load_model(directory: str, *, target: Any = None) -> tuple[TransformerConfig, Any]:
    """Reads a model export. `target`: optional tree of `jax.ShapeDtypeStruct` (with shardings)
    the parameters must match; a shape mismatch raises ValueError naming the parameter."""
    directory = os.path.abspath(directory)
    cfg = load_model_config(directory)
    path = os.path.join(directory, PARAMS_DIR)
    if target is None:
        return cfg, ocp.StandardCheckpointer().restore(path)
    return cfg, restore_params(path, target, f"checkpoint {directory!r}")


def check_tree_matches(stored: Any, target: Any, what: str) -> None:
    """ValueError naming the first parameter whose presence or shape differs."""
    flat_stored = {jax.tree_util.keystr(p): v
                   for p, v in jax.tree_util.tree_leaves_with_path(stored)}
    flat_target = {jax.tree_util.keystr(p): v
                   for p, v in jax.tree_util.tree_leaves_with_path(target)}
    for name in sorted(flat_target):
        if name not in flat_stored:
            raise ValueError(f"{what}: parameter {name} is missing (expected shape "
                             f"{tuple(flat_target[name].shape)})")
        got, want = tuple(flat_stored[name].shape), tuple(flat_target[name].shape)
        if got != want:
            raise ValueError(f"{what}: parameter {name} has shape {got}, the config "
                             f"expects {want}")
    extra = sorted(set(flat_stored) - set(flat_target))
    if extra:
        raise ValueError(f"{what}: unexpected parameters {extra[:5]} not in the config")


_GOLDEN = np.uint32(0x9E3779B9)


def _bits_checksums(x: jax.Array) -> jax.Array:
    """Two 32-bit checksums of an array's bits, [2] uint32, independent of its sharding.

    Integer sums wrap modulo 2**32, so they are exact in any order: every shard sums its own
    elements and the totals agree wherever the array lives. The first weighs each element by
    an odd function of its flat index (any change of one element changes it); the second sums
    a mixing hash of each (bits, index) pair, which catches what the first can miss (two
    elements swapped, say). A checksum against accidents, not against forgery.
    """
    widths = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
    if x.dtype.itemsize not in widths:
        raise ValueError(f"params_fingerprint: expected parameters of 1, 2 or 4 bytes, got "
                         f"{x.dtype} {x.shape}")
    width = widths[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    for axis in range(x.ndim):
        stride = int(np.prod(x.shape[axis + 1:])) % 2**32  # of the row-major flat index
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * np.uint32(stride)
    weighted = bits * (index * np.uint32(2) + np.uint32(1))
    h = bits ^ (index * _GOLDEN)
    h = (h ^ (h >> 16)) * np.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * np.uint32(0xC2B2AE35)
    mixed = h ^ (h >> 16)
    # One reduction of both sums: XLA fuses the element-wise work into it, where two sums of a
    # shared input would keep a uint32 copy of the whole array (twice a bf16 weight's size).
    zero = np.uint32(0)
    sums = jax.lax.reduce((weighted, mixed), (zero, zero),
                          lambda a, b: (a[0] + b[0], a[1] + b[1]), tuple(range(x.ndim)))
    return jnp.stack(sums)


@jax.jit
def _tree_checksums(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([_bits_checksums(x) for x in leaves]) if leaves else jnp.zeros((0, 2))


def params_fingerprint(cfg: TransformerConfig, params: Any) -> str:
    """SHA-256 over the architecture (the config without its runtime fields) and, for every
    parameter by path, its shape, dtype and checksums of its bits (`_bits_checksums`).

    Same architecture and weights, same print: wherever and however often they were saved,
    however they are sharded (the checksums are computed where the arrays live, on every
    process of a multi-host run alike), and whatever dtype they compute in.
    """
    arch = {k: v for k, v in config_to_dict(cfg).items() if k not in RUNTIME_FIELDS}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    flat = sorted(((jax.tree_util.keystr(p), leaf)
                   for p, leaf in jax.tree_util.tree_leaves_with_path(params)),
                  key=lambda item: item[0])
    sums = _tree_checksums([leaf for _, leaf in flat])
    # A reduction's result is replicated: every process reads its own copy.
    sums = np.asarray(sums if sums.is_fully_addressable else sums.addressable_data(0))
    for (name, leaf), (weighted, mixed) in zip(flat, sums):
        digest.update(f"{name}|{tuple(leaf.shape)}|{np.dtype(leaf.dtype)}|{int(weighted)}|"
                      f"{int(mixed)};".encode())
    return digest.hexdigest()


def fingerprint(directory: str) -> str:
    """`params_fingerprint` of the model export in `directory` (read on this host)."""
    return params_fingerprint(*load_model(directory))


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """save_every: steps between periodic saves (0: only the final one); keep: checkpoints kept;
    use_async: orbax async saving; restore_from: a training checkpoint directory to start from
    when `model_dir` has none yet (t5x's order: latest in model_dir, else this, else scratch)."""

    save_every: int = 1000
    keep: int = 3
    use_async: bool = True
    restore_from: str | None = None

    def __post_init__(self):
        if not isinstance(self.save_every, int) or self.save_every < 0:
            raise ValueError(f"checkpoint.save_every: expected steps >= 0 (0: only the final "
                             f"checkpoint), got {self.save_every!r}")
        if not isinstance(self.keep, int) or self.keep < 1:
            raise ValueError(f"checkpoint.keep: expected at least 1 checkpoint kept, "
                             f"got {self.keep!r}")


class Checkpointer:
    """Training checkpoints: {'state': trained params + optimizer state + step, 'meta': JSON}."""

    def __init__(self, directory: str, config: CheckpointConfig):
        self.directory = os.path.abspath(directory)
        self.config = config
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep, enable_async_checkpointing=config.use_async, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int, *, force: bool = False) -> bool:
        """Whether `save(step, ..., force=force)` would write a checkpoint."""
        due = force or bool(self.config.save_every and step % self.config.save_every == 0)
        return due and step not in self.manager.all_steps()

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        if not self.due(step, force=force):
            return False
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def read_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
