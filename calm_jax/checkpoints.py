"""Checkpoints (orbax): exported models, and training checkpoints that resume.

Two kinds of directories:

* A **model export** (`save_model` / `load_model`): `config.json` (our `TransformerConfig`) and
  `params/` (an orbax checkpoint of the parameter tree). Pretraining runs write one at the end
  (`<model_dir>/export`), the importers in `calm_jax.convert` write the same format, and the
  trainer loads frozen anchor and augmenting models from it. `params_fingerprint` identifies its
  content (the architecture and every parameter's bits), wherever and however it is stored.
  Exports are written whole or not at all (`write_atomically`): into `<directory>.partial`
  first, then renamed into place, so a run killed while exporting leaves no half export behind.
* A **training checkpoint** (`Checkpointer`, an orbax `CheckpointManager` under
  `<model_dir>/checkpoints`): the trained parameters, optimizer state and step, plus JSON metadata
  with the data position, the fingerprints of the frozen models the run was trained against and
  a checksum of the saved state (`state_checksum`), verified when the step is restored. Frozen
  weights are never written there. A step that cannot be read back as it was saved raises
  `DamagedCheckpoint`; `Checkpointer.restore_newest` then falls back to the next older step and
  sets the damaged one aside (`<step>.damaged`) for inspection.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from calm_jax.models.config import RUNTIME_FIELDS, TransformerConfig

log = logging.getLogger("calm_jax")

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
PARTIAL_SUFFIX = ".partial"  # an export being written: `<directory>.partial`
DAMAGED_SUFFIX = ".damaged"  # a damaged training step set aside: `<step>.damaged`
CHECKSUM_KEY = "state_checksum"  # in a training checkpoint's meta


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


def _sync(name: str) -> None:
    """Waits until every process got here (nothing to wait for in a lone process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process (a lone process's own value)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def write_atomically(directory: str, write: Callable[[str], None], *, marker: str) -> None:
    """Runs `write(path)` on every process (orbax saves are collective) into the temporary
    sibling `<directory>.partial`, emptied first (a leftover of a killed attempt), then, once
    every process is done, process 0 moves what was written into `directory`; every process
    returns once it is in place.

    A `directory` that does not exist yet appears whole, in one rename. Into an existing one
    (other files beside an export, e.g. a converted model's tokenizer) the entries move one by
    one, `marker` (the file that marks a finished export) last; `write` must not write an
    entry that is already there, other than `marker`. A run killed at any point leaves either
    no export or the whole export (and perhaps a `.partial`, which the next attempt removes).
    """
    directory = os.path.abspath(directory)
    partial = directory + PARTIAL_SUFFIX
    if jax.process_index() == 0 and os.path.lexists(partial):
        log.info("removing %s, the unfinished export of an earlier attempt", partial)
        shutil.rmtree(partial)
    _sync(f"calm_jax: {partial} empty")
    os.makedirs(partial, exist_ok=True)
    write(partial)
    _sync(f"calm_jax: {partial} written")
    if jax.process_index() == 0:
        if not os.path.exists(directory):
            os.replace(partial, directory)
        else:
            names = sorted(os.listdir(partial), key=lambda name: name == marker)
            for name in names:
                os.replace(os.path.join(partial, name), os.path.join(directory, name))
            os.rmdir(partial)
    _sync(f"calm_jax: {directory} in place")


def export_complete(directory: str, marker: str = CONFIG_FILE) -> bool:
    """Whether `directory` holds a finished export: its `marker` file (config.json of a model
    export, composition.json of a composition export) and its `params/`."""
    return (os.path.isfile(os.path.join(directory, marker))
            and os.path.isdir(os.path.join(directory, PARAMS_DIR)))


def discard_incomplete_export(directory: str, marker: str = CONFIG_FILE) -> None:
    """Removes `directory` if it holds an unfinished export (not `export_complete`), as a run
    stopped by a crash before exports were atomic, or a damaged copy, leaves it; process 0
    removes, every process returns after."""
    directory = os.path.abspath(directory)
    if (jax.process_index() == 0 and os.path.exists(directory)
            and not export_complete(directory, marker)):
        log.warning("%s holds an unfinished export (no %s): removed, writing it again",
                    directory, marker if not os.path.isfile(os.path.join(directory, marker))
                    else PARAMS_DIR + "/")
        shutil.rmtree(directory)
    _sync(f"calm_jax: {directory} checked")


def save_model(directory: str, cfg: TransformerConfig, params: Any) -> None:
    """Writes `config.json` and `params/` into `directory`, which must not hold an export yet
    (one already there is left as it was), all at once (`write_atomically`)."""
    directory = os.path.abspath(directory)
    if os.path.exists(os.path.join(directory, PARAMS_DIR)):
        raise ValueError(f"save_model: {directory} already holds a model export ({PARAMS_DIR}/); "
                         f"expected a new directory")

    def write(path: str) -> None:
        if jax.process_index() == 0:
            with open(os.path.join(path, CONFIG_FILE), "w") as f:
                json.dump(config_to_dict(cfg), f, indent=2, sort_keys=True)
        save_params(os.path.join(path, PARAMS_DIR), params)

    write_atomically(directory, write, marker=CONFIG_FILE)


def check_params_dir(directory: str, what: str) -> str:
    """`directory/params`, or a ValueError saying the export in `directory` is unfinished."""
    path = os.path.join(directory, PARAMS_DIR)
    if not os.path.isdir(path):
        raise ValueError(f"{what}: incomplete export: no {PARAMS_DIR}/ (the run that wrote it "
                         f"stopped while exporting, or it was deleted; rerun that command to "
                         f"write the export again)")
    return path


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


def unfinished_note(directory: str) -> str:
    """' (...)' saying that an unfinished export of `directory` lies beside it, or ''."""
    partial = os.path.abspath(directory) + PARTIAL_SUFFIX
    if not os.path.exists(partial):
        return ""
    return (f" ({partial} holds an unfinished export: the run that wrote it stopped while "
            f"exporting; rerun that command to finish it)")


def load_model_config(directory: str) -> TransformerConfig:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise ValueError(f"checkpoint {directory!r}: no {CONFIG_FILE} (expected a model export "
                         f"written by a pretraining run or `python -m calm_jax.convert`)"
                         f"{unfinished_note(directory)}")
    with open(path) as f:
        return config_from_dict(json.load(f))


def load_model(directory: str, *, target: Any = None) -> tuple[TransformerConfig, Any]:
    """Reads a model export. `target`: optional tree of `jax.ShapeDtypeStruct` (with shardings)
    the parameters must match; a shape mismatch raises ValueError naming the parameter."""
    directory = os.path.abspath(directory)
    cfg = load_model_config(directory)
    path = check_params_dir(directory, f"checkpoint {directory!r}")
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


def _checkable(x: jax.Array) -> jax.Array:
    """`x` as `_bits_checksums` takes it: booleans as bytes, 8-byte elements as pairs of 32-bit
    words; other arrays as they are."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint8)
    if x.dtype.itemsize == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return x


@jax.jit
def _tree_checksums(leaves: list[jax.Array]) -> jax.Array:
    return (jnp.stack([_bits_checksums(_checkable(x)) for x in leaves]) if leaves
            else jnp.zeros((0, 2)))


def _digest(digest, named_leaves: list[tuple[str, Any]]) -> str:
    """Adds every (name, leaf)'s name, shape, dtype and bit checksums to `digest`, in name
    order; returns its hex digest."""
    flat = sorted(named_leaves, key=lambda item: item[0])
    sums = _tree_checksums([leaf for _, leaf in flat])
    # A reduction's result is replicated: every process reads its own copy.
    sums = np.asarray(sums if sums.is_fully_addressable else sums.addressable_data(0))
    for (name, leaf), (weighted, mixed) in zip(flat, sums):
        digest.update(f"{name}|{tuple(leaf.shape)}|{np.dtype(leaf.dtype)}|{int(weighted)}|"
                      f"{int(mixed)};".encode())
    return digest.hexdigest()


def leaf_name(path: tuple[Any, ...]) -> str:
    """A leaf's path as 'a/0/b', whatever containers hold it (a dict key, a sequence index and
    a named tuple's field read alike): a tree restored into other container types keeps it."""
    parts = []
    for key in path:
        value = next((getattr(key, a) for a in ("key", "idx", "name") if hasattr(key, a)), key)
        parts.append(str(value))
    return "/".join(parts)


def state_checksum(tree: Any) -> str:
    """SHA-256 over every leaf of `tree` by `leaf_name`: its shape, dtype and checksums of its
    bits (`_bits_checksums`), the same however the leaves are sharded or held."""
    return _digest(hashlib.sha256(b"calm_jax.state/1;"),
                   [(leaf_name(p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)])


def params_fingerprint(cfg: TransformerConfig, params: Any) -> str:
    """SHA-256 over the architecture (the config without its runtime fields) and, for every
    parameter by path, its shape, dtype and checksums of its bits (`_bits_checksums`).

    Same architecture and weights, same print: wherever and however often they were saved,
    however they are sharded (the checksums are computed where the arrays live, on every
    process of a multi-host run alike), and whatever dtype they compute in.
    """
    arch = {k: v for k, v in config_to_dict(cfg).items() if k not in RUNTIME_FIELDS}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    return _digest(digest, [(jax.tree_util.keystr(p), leaf)
                            for p, leaf in jax.tree_util.tree_leaves_with_path(params)])


def fingerprint(directory: str) -> str:
    """`params_fingerprint` of the model export in `directory` (read on this host)."""
    return params_fingerprint(*load_model(directory))


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """save_every: steps between periodic saves (0: only the final one); keep: checkpoints kept;
    use_async: orbax async saving; restore_from: a training checkpoint directory to start from
    when `model_dir` has none yet (t5x's order: latest in model_dir, else this, else scratch;
    a restore_from that does not exist or holds no checkpoint is an error)."""

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


def saved_steps(directory: str) -> list[int]:
    """The steps saved in a training checkpoint directory (its finished step directories),
    read from the file system alone."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def check_restore_from(config: CheckpointConfig, directory: str) -> None:
    """ValueError unless `config.restore_from` is unset, not needed (the run's own checkpoint
    `directory` holds a step) or a directory that holds training checkpoints."""
    path = config.restore_from
    if path is None or saved_steps(directory):
        return
    expected = ("expected a directory of training checkpoints (the checkpoints/ directory of "
                "an earlier run)")
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint.restore_from: {expected}, got {path!r}, which "
                         f"{'is not a directory' if os.path.exists(path) else 'does not exist'}")
    if not saved_steps(path):
        inner = os.path.join(path, "checkpoints")
        hint = f" (did you mean {inner!r}?)" if saved_steps(inner) else ""
        raise ValueError(f"checkpoint.restore_from: {expected}, got {path!r}, which holds "
                         f"none{hint}")


class DamagedCheckpoint(ValueError):
    """A saved training step that does not read back as it was saved. `step`: that step;
    `path`: the file or directory at fault."""

    def __init__(self, message: str, step: int | None = None, path: str | None = None):
        super().__init__(message)
        self.step, self.path = step, path


class StateMismatch(ValueError):
    """A saved training step, intact, that holds another tree than the one asked for."""


def _one_line(error: BaseException) -> str:
    """An exception as one short line (TensorStore's messages carry a long JSON spec)."""
    text = " ".join(str(error).split())
    text = re.sub(r"\s*\[tensorstore_spec=.*", "", text)
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _file_named(error: BaseException) -> str | None:
    """The last file (not directory) a TensorStore error names as the one it failed to read."""
    files = [f for f in re.findall(r'local file "([^"]+)"', str(error)) if not f.endswith("/")]
    return files[-1] if files else None


def _stored_tree_difference(stored: Any, target: Any) -> str | None:
    """How the stored tree (orbax metadata) differs from `target` by leaf name, shape (and
    None when it does not)."""
    have = {leaf_name(p): tuple(getattr(x, "shape", ()) or ())
            for p, x in jax.tree_util.tree_leaves_with_path(stored)}
    want = {leaf_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(target)}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        parts = ([f"this run's state has {missing[:3]} which the checkpoint lacks"]
                 if missing else [])
        parts += [f"the checkpoint holds {extra[:3]} which this run's state lacks"] if extra else []
        return "; ".join(parts)
    for name in sorted(want):
        if have[name] != want[name]:
            return f"{name} has shape {have[name]} in the checkpoint, {want[name]} in this run"
    return None


class Checkpointer:
    """Training checkpoints: {'state': trained params + optimizer state + step, 'meta': JSON}.

    Every saved step's meta holds `state_checksum` of its state; `restore` verifies it.
    `read_only`: a directory to restore from only (never created, written or pruned).
    """

    def __init__(self, directory: str, config: CheckpointConfig, *, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self.config = config
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep, enable_async_checkpointing=config.use_async,
            create=not read_only, read_only=read_only,
            cleanup_tmp_directories=not read_only)  # a save killed before its commit
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int, *, force: bool = False) -> bool:
        """Whether `save(step, ..., force=force)` would write a checkpoint."""
        due = force or bool(self.config.save_every and step % self.config.save_every == 0)
        return due and step not in self.manager.all_steps()

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Saves `state` and `meta` (JSON) as `step` when due; the meta gets the state's
        checksum (`state_checksum`) beside it."""
        if not self.due(step, force=force):
            return False
        meta = {**meta, CHECKSUM_KEY: state_checksum(state)}
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _damaged(self, step: int, path: str, reason: str) -> DamagedCheckpoint:
        return DamagedCheckpoint(f"checkpoint step {step} in {self.directory} is damaged: "
                                 f"{path}: {reason}", step=step, path=path)

    def _read_meta(self, step: int) -> dict[str, Any]:
        """The meta saved with `step`, checksum included."""
        meta, error = None, None
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
            if not isinstance(meta, dict):
                error = f"expected a JSON object, got {type(meta).__name__}"
        except Exception as e:  # noqa: BLE001 (whatever the reader raises, the step is bad)
            error = _one_line(e)
        if _any_process(error is not None):
            files = [f for f in sorted(glob.glob(os.path.join(self.step_dir(step), "meta", "*")))
                     if not f.endswith("commit_success.txt")]
            path = files[0] if files else os.path.join(self.step_dir(step), "meta")
            raise self._damaged(step, path, error or "unreadable on another process")
        return dict(meta)

    def read_meta(self, step: int) -> dict[str, Any]:
        """The meta saved with `step` (DamagedCheckpoint naming the file if it is unreadable)."""
        meta = self._read_meta(step)
        meta.pop(CHECKSUM_KEY, None)
        return meta

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of `step`, the state restored into `abstract_state`
        (`jax.ShapeDtypeStruct`s with shardings; stored dtypes are cast to theirs).

        Raises StateMismatch when the step holds another tree (other leaves or shapes), and
        DamagedCheckpoint naming the step and the file when it cannot be read or its state's
        checksum is not the one saved with it.
        """
        meta = self._read_meta(step)
        state_dir = os.path.join(self.step_dir(step), "state")
        at_fault, stored, error = os.path.join(state_dir, "_METADATA"), None, None
        manifest = os.path.join(state_dir, "manifest.ocdbt")
        if not os.path.isfile(at_fault):
            error = "missing"
        else:
            try:
                from etils import epath  # orbax's path type

                stored = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
                if stored is None:
                    error = "unreadable"
            except Exception as e:  # noqa: BLE001 (whatever the reader raises, it is damage)
                error = _one_line(e)
                if not os.path.isfile(manifest):  # what the tree metadata is read through
                    at_fault, error = manifest, "missing"
                else:
                    at_fault = _file_named(e) or state_dir
        if _any_process(error is not None):
            raise self._damaged(step, at_fault, error or "unreadable on another process")
        difference = _stored_tree_difference(stored, abstract_state)
        if difference is not None:
            raise StateMismatch(difference)
        # Restored in the stored dtypes, so that the checksum sees the bits as saved.
        dtypes = {leaf_name(p): getattr(x, "dtype", None)
                  for p, x in jax.tree_util.tree_leaves_with_path(stored)}
        as_stored = jax.tree_util.tree_map_with_path(
            lambda p, x: jax.ShapeDtypeStruct(x.shape, dtypes[leaf_name(p)] or x.dtype,
                                              sharding=getattr(x, "sharding", None)),
            abstract_state)
        state = None
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(as_stored)))["state"]
        except Exception as e:  # noqa: BLE001 (the tree matched: a failed read is damage)
            error, at_fault = _one_line(e), _file_named(e) or state_dir
        if _any_process(error is not None):
            raise self._damaged(step, at_fault, error or "unreadable on another process")
        saved = meta.pop(CHECKSUM_KEY, None)
        if saved is not None and state_checksum(state) != saved:
            raise self._damaged(step, state_dir, f"the state's checksum is not the one saved "
                                                 f"with it ({CHECKSUM_KEY} in its meta)")
        leaves, treedef = jax.tree.flatten(state)
        leaves = [x if x.dtype == t.dtype else x.astype(t.dtype)
                  for x, t in zip(leaves, jax.tree.leaves(abstract_state))]
        return jax.tree.unflatten(treedef, leaves), meta

    def restore_newest(self, restore: Callable[[int], tuple[Any, dict[str, Any]]]
                       ) -> tuple[int, Any, dict[str, Any]] | None:
        """`(step, *restore(step))` for the newest step that restores; None without steps.

        A step for which `restore` raises DamagedCheckpoint is reported (one warning naming the
        step and the file) and the next older one tried; once one restores, the damaged newer
        ones are set aside as `<step>.damaged` (unless read_only), kept for inspection and out
        of the manager's sight, so that the resumed run saves those step numbers afresh and
        retention never counts them. Every step damaged: DamagedCheckpoint (never a silent
        start from scratch).
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        damaged: list[DamagedCheckpoint] = []
        for i, step in enumerate(steps):
            try:
                state, meta = restore(step)
            except DamagedCheckpoint as e:
                then = (f"trying step {steps[i + 1]}" if i + 1 < len(steps)
                        else "no older step is left")
                log.warning("%s; %s", e, then)
                damaged.append(e)
                continue
            if not self.read_only:
                self._set_aside([e.step for e in damaged])
            return step, state, meta
        if damaged:
            raise DamagedCheckpoint(
                f"checkpoint: no intact step in {self.directory} ("
                + "; ".join(f"step {e.step}: {e.path}" for e in damaged)
                + "); refusing to start from scratch: put an intact copy back, or move the "
                  "directory away to start over", step=damaged[0].step, path=damaged[0].path)
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Renames each step's directory to `<step>.damaged` (`.damaged-2`, ... when taken)."""
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                aside, n = self.step_dir(step) + DAMAGED_SUFFIX, 1
                while os.path.lexists(aside):
                    n += 1
                    aside = f"{self.step_dir(step)}{DAMAGED_SUFFIX}-{n}"
                os.replace(self.step_dir(step), aside)
                log.warning("checkpoint step %d set aside as %s (kept for inspection); this "
                            "run saves step %d again when it gets there", step, aside, step)
        _sync(f"calm_jax: damaged steps of {self.directory} set aside")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
