"""Checkpoints (orbax): exported models, and training checkpoints that resume.

Two kinds of directories:

* A **model export** (`save_model` / `load_model`): `config.json` (our `TransformerConfig`) and
  `params/` (an orbax checkpoint of the parameter tree). Pretraining runs write one at the end
  (`<model_dir>/export`), the importers in `calm_jax.convert` write the same format, and the
  trainer loads frozen anchor and augmenting models from it. `fingerprint` identifies its content.
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
import numpy as np
import orbax.checkpoint as ocp

from calm_jax.models.config import TransformerConfig

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def config_to_dict(cfg: TransformerConfig) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    for key in ("dtype", "param_dtype"):
        out[key] = str(np.dtype(cfg.compute_dtype if key == "dtype" else cfg.params_dtype))
    return out


def config_from_dict(data: dict[str, Any]) -> TransformerConfig:
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{CONFIG_FILE}: unknown TransformerConfig fields {unknown}")
    return TransformerConfig(**data)


def save_model(directory: str, cfg: TransformerConfig, params: Any) -> None:
    """Writes `config.json` and `params/` into `directory` (which must not hold params yet)."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config_to_dict(cfg), f, indent=2, sort_keys=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, PARAMS_DIR), params)
    checkpointer.wait_until_finished()


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
    checkpointer = ocp.StandardCheckpointer()
    path = os.path.join(directory, PARAMS_DIR)
    if target is None:
        return cfg, checkpointer.restore(path)
    stored = checkpointer.metadata(path)
    stored = getattr(stored, "item_metadata", stored)
    check_tree_matches(stored, target, f"checkpoint {directory!r}")
    return cfg, checkpointer.restore(path, target)


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


def fingerprint(directory: str) -> str:
    """SHA-256 over the export's files (names and bytes): same weights and config, same print."""
    digest = hashlib.sha256()
    root = os.path.abspath(directory)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """save_every: steps between periodic saves (0: only the final one); keep: checkpoints kept;
    use_async: orbax async saving; restore_from: a training checkpoint directory to start from
    when `model_dir` has none yet (t5x's order: latest in model_dir, else this, else scratch)."""

    save_every: int = 1000
    keep: int = 3
    use_async: bool = True
    restore_from: str | None = None


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

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        due = force or (self.config.save_every and step % self.config.save_every == 0)
        if not due or step in self.manager.all_steps():
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
