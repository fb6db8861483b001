"""Checkpoints: config (de)serialisation, model exports (written whole or not at all),
parameter-tree checks, fingerprints and training checkpoints (save cadence, retention, restore,
metadata, checksums, damaged steps)."""

import glob
import json
import os
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from calm_jax import checkpoints as ckpt
from calm_jax.models import TransformerConfig, init_decoder

CFG = TransformerConfig(vocab_size=128, embed_dim=16, num_layers=2, num_heads=2, mlp_dim=32,
                        max_len=16)


def _params(scale=1.0):
    return {"a": {"k": scale * np.arange(6, dtype=np.float32).reshape(2, 3),
                  "b": np.full((3,), 0.5 * scale, np.float32)},
            "e": np.arange(8, dtype=np.int32)}


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _state(step):
    return {"step": np.int32(step),
            "params": {"w": np.full((2, 3), float(step), np.float32)},
            "opt_state": {"mu": np.full((2, 3), -float(step), np.float32)}}


# Config -------------------------------------------------------------------------------------------

def test_config_round_trips_through_json():
    """Every field survives config_to_dict -> JSON -> config_from_dict."""
    cfg = TransformerConfig.gemma_style(
        vocab_size=128, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
        mlp_dim=32, max_len=16, sliding_window=4, global_every=2, attn_logit_softcap=50.0,
        final_logit_softcap=30.0, query_scale=0.25, dtype="bfloat16", param_dtype="float32")
    data = json.loads(json.dumps(ckpt.config_to_dict(cfg)))
    assert ckpt.config_from_dict(data) == cfg


def test_dtype_objects_are_written_as_names():
    """dtype fields given as dtypes are stored as their names and read back as the same dtype."""
    cfg = CFG.replace(dtype=jnp.bfloat16, param_dtype=np.dtype("float16"))
    data = ckpt.config_to_dict(cfg)
    assert (data["dtype"], data["param_dtype"]) == ("bfloat16", "float16")
    back = ckpt.config_from_dict(json.loads(json.dumps(data)))
    assert back.compute_dtype == jnp.bfloat16 and back.params_dtype == jnp.float16
    assert back == CFG.replace(dtype="bfloat16", param_dtype="float16")


def test_unknown_config_field_is_named():
    data = {**ckpt.config_to_dict(CFG), "num_expert": 4, "bogus": 1}
    with pytest.raises(ValueError, match=re.escape(
            "config.json: unknown TransformerConfig fields ['bogus', 'num_expert']")):
        ckpt.config_from_dict(data)


def test_missing_config_fields_are_named():
    data = {k: v for k, v in ckpt.config_to_dict(CFG).items()
            if k not in ("num_heads", "embed_dim", "norm")}  # norm has a default
    with pytest.raises(ValueError, match=re.escape(
            "config.json: missing TransformerConfig fields ['embed_dim', 'num_heads']")):
        ckpt.config_from_dict(data)
    assert ckpt.config_from_dict({**data, "num_heads": 2, "embed_dim": 16}) == CFG


# Model exports ------------------------------------------------------------------------------------

def test_save_then_load_gives_equal_config_and_arrays(tmp_path):
    ckpt.save_model(str(tmp_path / "m"), CFG, _params())
    cfg, params = ckpt.load_model(str(tmp_path / "m"))
    assert cfg == CFG
    _assert_trees_equal(params, _params())
    assert ckpt.load_model_config(str(tmp_path / "m")) == CFG


def test_load_decoder_params_into_a_target_tree(tmp_path):
    """A real decoder's parameters restore into a ShapeDtypeStruct tree of the same config."""
    params = nn.unbox(init_decoder(CFG, jax.random.key(0)))["params"]
    ckpt.save_model(str(tmp_path / "m"), CFG, params)
    target = _abstract(params)
    cfg, restored = ckpt.load_model(str(tmp_path / "m"), target=target)
    assert cfg == CFG
    _assert_trees_equal(restored, params)


def test_load_with_a_sharded_target_places_the_arrays(tmp_path):
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    params = {"w": np.arange(32, dtype=np.float32).reshape(8, 4)}
    ckpt.save_model(str(tmp_path / "m"), CFG, params)
    target = {"w": jax.ShapeDtypeStruct((8, 4), np.float32, sharding=sharding)}
    _, restored = ckpt.load_model(str(tmp_path / "m"), target=target)
    assert restored["w"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(restored["w"]), params["w"])


@pytest.mark.parametrize("change, message", [
    (lambda t: {**t, "a": {**t["a"], "k": jax.ShapeDtypeStruct((3, 2), np.float32)}},
     r"parameter ['a']['k'] has shape (2, 3), the config expects (3, 2)"),
    (lambda t: {**t, "c": jax.ShapeDtypeStruct((5,), np.float32)},
     r"parameter ['c'] is missing (expected shape (5,))"),
    (lambda t: {"a": t["a"]},
     "unexpected parameters [\"['e']\"] not in the config"),
], ids=["wrong_shape", "missing", "extra"])
def test_target_that_does_not_match_names_the_parameter(tmp_path, change, message):
    directory = str(tmp_path / "m")
    ckpt.save_model(directory, CFG, _params())
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {directory!r}: {message}")):
        ckpt.load_model(directory, target=change(_abstract(_params())))


def test_check_tree_matches_accepts_equal_shapes_and_names_the_first_mismatch():
    ckpt.check_tree_matches(_params(), _abstract(_params()), "x")
    target = {"a": {"b": jax.ShapeDtypeStruct((4,), np.float32),
                    "k": jax.ShapeDtypeStruct((1,), np.float32)},
              "e": jax.ShapeDtypeStruct((8,), np.int32)}
    with pytest.raises(ValueError, match=re.escape(
            "frozen: parameter ['a']['b'] has shape (3,), the config expects (4,)")):
        ckpt.check_tree_matches(_params(), target, "frozen")


def test_directory_without_config_gives_the_clear_error(tmp_path):
    (tmp_path / "params").mkdir()
    for load in (ckpt.load_model_config, ckpt.load_model):
        with pytest.raises(ValueError, match=re.escape(
                f"checkpoint {str(tmp_path)!r}: no config.json (expected a model export")):
            load(str(tmp_path))


def test_save_model_refuses_a_directory_that_holds_an_export_and_keeps_it(tmp_path):
    """Saving over an existing export fails and leaves that export (config and weights) as it
    was."""
    directory = str(tmp_path / "m")
    ckpt.save_model(directory, CFG, _params())
    with pytest.raises(ValueError, match="already"):
        ckpt.save_model(directory, CFG.replace(embed_dim=32), _params(2.0))
    cfg, params = ckpt.load_model(directory)
    assert cfg == CFG
    _assert_trees_equal(params, _params())


# Fingerprints -------------------------------------------------------------------------------------

def test_fingerprint_depends_on_content_not_location(tmp_path):
    ckpt.save_model(str(tmp_path / "m"), CFG, _params())
    shutil.copytree(tmp_path / "m", tmp_path / "elsewhere" / "copy")
    first = ckpt.fingerprint(str(tmp_path / "m"))
    assert first == ckpt.fingerprint(str(tmp_path / "m"))
    assert first == ckpt.fingerprint(str(tmp_path / "elsewhere" / "copy"))
    assert re.fullmatch(r"[0-9a-f]{64}", first)


def test_fingerprint_is_equal_for_two_exports_of_the_same_weights(tmp_path):
    ckpt.save_model(str(tmp_path / "one"), CFG, _params())
    ckpt.save_model(str(tmp_path / "two"), CFG, _params())
    assert ckpt.fingerprint(str(tmp_path / "one")) == ckpt.fingerprint(str(tmp_path / "two"))


def test_fingerprint_changes_with_one_weight_or_the_config(tmp_path):
    changed = _params()
    changed["a"]["k"][1, 2] += 1.0
    ckpt.save_model(str(tmp_path / "base"), CFG, _params())
    ckpt.save_model(str(tmp_path / "weight"), CFG, changed)
    shutil.copytree(tmp_path / "base", tmp_path / "config")
    with open(tmp_path / "config" / "config.json", "w") as f:
        json.dump(ckpt.config_to_dict(CFG.replace(max_len=32)), f, indent=2, sort_keys=True)
    prints = {name: ckpt.fingerprint(str(tmp_path / name)) for name in ("base", "weight", "config")}
    assert len(set(prints.values())) == 3


def test_fingerprint_is_the_same_on_the_host_sharded_and_at_any_runtime_setting():
    params = nn.unbox(init_decoder(CFG, jax.random.key(0)))["params"]
    host = jax.tree.map(np.asarray, params)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    kernel = NamedSharding(mesh, PartitionSpec(None, "a", "b"))
    sharded = jax.tree.map(lambda x: jax.device_put(x, kernel) if x.ndim == 3 and
                           x.shape[1] % 2 == 0 and x.shape[2] % 4 == 0 else x, params)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded))
    first = ckpt.params_fingerprint(CFG, host)
    assert ckpt.params_fingerprint(CFG, sharded) == first
    assert ckpt.params_fingerprint(CFG.replace(dtype="bfloat16", remat_policy="full"),
                                   host) == first
    assert ckpt.params_fingerprint(CFG.replace(max_len=32), host) != first


def test_fingerprint_sees_one_changed_bit_and_two_swapped_elements():
    params = _params()
    first = ckpt.params_fingerprint(CFG, params)
    flipped = jax.tree.map(np.copy, params)
    flipped["a"]["k"].view(np.uint32)[1, 1] ^= 1  # the lowest mantissa bit of one weight
    swapped = jax.tree.map(np.copy, params)
    swapped["e"][[2, 5]] = swapped["e"][[5, 2]]
    renamed = {"a": params["a"], "f": params["e"]}
    prints = {ckpt.params_fingerprint(CFG, t) for t in (flipped, swapped, renamed)}
    assert first not in prints and len(prints) == 3


def test_fingerprint_checksums_keep_no_copy_of_a_weight():
    """The checksums read each weight once, in one fused reduction: no array-sized buffer (a
    frozen 8B model's largest leaf is 1.9e9 elements)."""
    weight = jax.ShapeDtypeStruct((16, 512, 512), jnp.bfloat16)
    compiled = ckpt._tree_checksums.lower([weight]).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 16 * 512 * 512 * 2 / 64


# Training checkpoints -----------------------------------------------------------------------------

def test_save_respects_save_every_and_force(tmp_path):
    manager = ckpt.Checkpointer(str(tmp_path), ckpt.CheckpointConfig(save_every=2, keep=10,
                                                                      use_async=False))
    assert manager.latest_step() is None
    assert [manager.save(s, _state(s), {"s": s}) for s in range(1, 6)] == [
        False, True, False, True, False]
    assert manager.manager.all_steps() == [2, 4] and manager.latest_step() == 4
    assert manager.save(5, _state(5), {"s": 5}, force=True)
    assert manager.latest_step() == 5
    manager.close()


def test_save_every_zero_saves_only_when_forced(tmp_path):
    manager = ckpt.Checkpointer(str(tmp_path), ckpt.CheckpointConfig(save_every=0,
                                                                      use_async=False))
    assert not manager.save(0, _state(0), {}) and not manager.save(1000, _state(1000), {})
    assert manager.latest_step() is None
    assert manager.save(7, _state(7), {}, force=True) and manager.latest_step() == 7
    manager.close()


def test_the_same_step_is_not_saved_twice(tmp_path):
    manager = ckpt.Checkpointer(str(tmp_path), ckpt.CheckpointConfig(save_every=1,
                                                                      use_async=False))
    assert manager.save(3, _state(3), {"v": "first"})
    assert not manager.save(3, _state(99), {"v": "second"}, force=True)
    state, meta = manager.restore(3, _abstract(_state(3)))
    assert meta == {"v": "first"}
    _assert_trees_equal(state, _state(3))
    manager.close()


def test_keep_retains_only_the_newest_steps(tmp_path):
    manager = ckpt.Checkpointer(str(tmp_path), ckpt.CheckpointConfig(save_every=1, keep=2,
                                                                      use_async=False))
    for step in range(1, 6):
        assert manager.save(step, _state(step), {"step": step})
    assert manager.manager.all_steps() == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["4", "5"]
    manager.close()


def test_keep_zero_is_refused(tmp_path):
    """keep=0 would delete every checkpoint right after writing it (orbax max_to_keep=0)."""
    with pytest.raises(ValueError, match="keep"):
        ckpt.Checkpointer(str(tmp_path), ckpt.CheckpointConfig(keep=0, use_async=False))


def test_restore_and_read_meta_return_what_was_saved(tmp_path):
    meta = {"data_position": 24, "mode": "compose",
            "frozen": {"anchor": "ab" * 32, "augments['kv']": "cd" * 32}}
    manager = ckpt.Checkpointer(str(tmp_path), ckpt.CheckpointConfig(save_every=1,
                                                                      use_async=False))
    manager.save(1, _state(1), {"data_position": 8})
    manager.save(2, _state(2), meta)
    state, got = manager.restore(2, _abstract(_state(2)))
    assert got == meta and manager.read_meta(2) == meta
    assert manager.read_meta(1) == {"data_position": 8}
    _assert_trees_equal(state, _state(2))
    manager.close()


def test_a_new_checkpointer_on_the_same_directory_sees_the_saved_steps(tmp_path):
    config = ckpt.CheckpointConfig(save_every=1, keep=3, use_async=False)
    first = ckpt.Checkpointer(str(tmp_path), config)
    for step in (1, 2):
        first.save(step, _state(step), {"data_position": 8 * step})
    first.close()
    second = ckpt.Checkpointer(str(tmp_path), config)
    assert second.latest_step() == 2 and second.read_meta(2) == {"data_position": 16}
    _assert_trees_equal(second.restore(1, _abstract(_state(1)))[0], _state(1))
    second.close()


def test_async_save_is_restorable_after_wait(tmp_path):
    manager = ckpt.Checkpointer(str(tmp_path), ckpt.CheckpointConfig(save_every=1,
                                                                      use_async=True))
    assert manager.save(1, _state(1), {"data_position": 8})
    assert not manager.save(1, _state(1), {"data_position": 8})
    manager.wait()
    assert manager.latest_step() == 1
    state, meta = manager.restore(1, _abstract(_state(1)))
    assert meta == {"data_position": 8}
    _assert_trees_equal(state, _state(1))
    manager.close()


# Atomic exports -----------------------------------------------------------------------------------

class _Killed(BaseException):
    """Stands for a kill at a chosen point (not an Exception: nothing may catch it)."""


def test_an_export_stopped_while_writing_leaves_none_and_the_next_attempt_completes(
        tmp_path, monkeypatch):
    directory = str(tmp_path / "m")
    save_params = ckpt.save_params

    def save_then_stop(path, params):
        save_params(path, params)
        raise _Killed

    monkeypatch.setattr(ckpt, "save_params", save_then_stop)
    with pytest.raises(_Killed):
        ckpt.save_model(directory, CFG, _params())
    assert not (tmp_path / "m").exists()  # nothing half-written where the export belongs
    assert sorted(p.name for p in (tmp_path / "m.partial").iterdir()) == ["config.json",
                                                                         "params"]
    with pytest.raises(ValueError, match=re.escape(
            f"checkpoint {directory!r}: no config.json (expected a model export written by a "
            f"pretraining run or `python -m calm_jax.convert`) ({directory}.partial holds an "
            f"unfinished export: the run that wrote it stopped while exporting; rerun that "
            f"command to finish it)")):
        ckpt.load_model(directory)
    monkeypatch.setattr(ckpt, "save_params", save_params)
    ckpt.save_model(directory, CFG, _params(2.0))  # the leftover is removed first
    assert not (tmp_path / "m.partial").exists()
    cfg, params = ckpt.load_model(directory)
    assert cfg == CFG
    _assert_trees_equal(params, _params(2.0))


def test_an_export_without_params_says_it_is_incomplete(tmp_path):
    directory = str(tmp_path / "m")
    ckpt.save_model(directory, CFG, _params())
    assert ckpt.export_complete(directory)
    shutil.rmtree(tmp_path / "m" / "params")
    assert not ckpt.export_complete(directory)
    with pytest.raises(ValueError, match=re.escape(
            f"checkpoint {directory!r}: incomplete export: no params/ (the run that wrote it "
            f"stopped while exporting, or it was deleted; rerun that command")):
        ckpt.load_model(directory)
    ckpt.discard_incomplete_export(directory)
    assert not (tmp_path / "m").exists()


def test_an_export_into_a_directory_with_other_files_keeps_them(tmp_path):
    """A converted model's files beside its export (tokenizer/, conversion.json) stay; the old
    config.json is replaced, last."""
    (tmp_path / "m" / "tokenizer").mkdir(parents=True)
    (tmp_path / "m" / "conversion.json").write_text("{}")
    (tmp_path / "m" / "config.json").write_text("{}")
    ckpt.save_model(str(tmp_path / "m"), CFG, _params())
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json", "conversion.json", "params", "tokenizer"]
    assert ckpt.load_model_config(str(tmp_path / "m")) == CFG
    assert not (tmp_path / "m.partial").exists()


# Checksums and damaged steps ----------------------------------------------------------------------

def _random_state(step):
    rng = np.random.default_rng(step)
    return {"step": np.int32(step),
            "params": {"w": rng.normal(size=(64, 32)).astype(np.float32)},
            "opt_state": ({"count": np.int32(step), "ok": np.bool_(True)},
                          {"mu": rng.normal(size=(64, 32)).astype(np.float32)})}


def _two_steps(directory, states=_random_state):
    manager = ckpt.Checkpointer(str(directory), ckpt.CheckpointConfig(save_every=1, keep=5,
                                                                      use_async=False))
    for step in (1, 2):
        manager.save(step, states(step), {"data_position": 8 * step})
    return manager


def test_state_checksum_sees_one_bit_and_not_sharding_or_containers():
    state = _random_state(3)
    first = ckpt.state_checksum(state)
    flipped = jax.tree.map(np.copy, state)
    flipped["params"]["w"].view(np.uint32)[5, 7] ^= 1
    assert ckpt.state_checksum(flipped) != first
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = {**state, "params": {"w": jax.device_put(
        state["params"]["w"], NamedSharding(mesh, PartitionSpec("data")))}}
    assert ckpt.state_checksum(sharded) == first
    as_lists = {**state, "opt_state": [state["opt_state"][0], state["opt_state"][1]]}
    assert ckpt.state_checksum(as_lists) == first


def _truncate_data(step_dir):
    path = max((f for f in glob.glob(f"{step_dir}/state/ocdbt.process_*/d/*")),
               key=os.path.getsize)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return f"{step_dir}/state"


def _replace_state(step_dir):
    """Another intact state of the same tree in the step's place: only the checksum tells."""
    other = os.path.join(os.path.dirname(os.path.dirname(step_dir)), "other")
    manager = _two_steps(other, states=lambda s: _random_state(s + 10))
    manager.close()
    shutil.rmtree(f"{step_dir}/state")
    shutil.copytree(os.path.join(other, "2", "state"), f"{step_dir}/state")
    return f"{step_dir}/state"


def _delete(name):
    def damage(step_dir):
        os.remove(f"{step_dir}/{name}")
        return f"{step_dir}/{name}"
    return damage


def _empty_meta(step_dir):
    open(f"{step_dir}/meta/metadata", "w").close()
    return f"{step_dir}/meta/metadata"


@pytest.mark.parametrize("damage, reason", [
    (_truncate_data, r"ValueError: OUT_OF_RANGE: Error reading .* is not valid for value of "
                     r"size \d+$"),
    (_replace_state, r"the state's checksum is not the one saved with it "
                              r"\(state_checksum in its meta\)$"),
    (_delete("state/_METADATA"), r"missing$"),
    (_delete("state/manifest.ocdbt"), r"missing$"),
    (_empty_meta, r"JSONDecodeError: Expecting value: line 1 column 1 \(char 0\)$"),
], ids=["truncated_data", "other_state", "no_METADATA", "no_manifest", "empty_meta"])
def test_a_damaged_step_is_named_with_its_file_and_the_older_one_restores(tmp_path, damage,
                                                                          reason, caplog):
    directory = tmp_path / "ck"
    manager = _two_steps(directory)
    at_fault = damage(str(directory / "2"))
    with pytest.raises(ckpt.DamagedCheckpoint, match=(
            re.escape(f"checkpoint step 2 in {directory} is damaged: {at_fault}: ") + reason)):
        manager.restore(2, _abstract(_random_state(2)))

    with caplog.at_level("WARNING", logger="calm_jax"):
        step, state, meta = manager.restore_newest(
            lambda s: manager.restore(s, _abstract(_random_state(s))))
    assert (step, meta) == (1, {"data_position": 8})
    _assert_trees_equal(state, _random_state(1))
    (message,) = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert message.startswith(f"checkpoint step 2 in {directory} is damaged: {at_fault}: ")
    assert message.endswith("; trying step 1") and "\n" not in message
    # Kept for inspection, out of the manager's sight: step 2 is saved afresh.
    assert (directory / "2.damaged").is_dir() and manager.manager.all_steps() == [1]
    assert manager.save(2, _random_state(2), {"data_position": 16})
    _assert_trees_equal(manager.restore(2, _abstract(_random_state(2)))[0], _random_state(2))
    manager.close()


def test_every_step_damaged_raises_and_sets_nothing_aside(tmp_path):
    manager = _two_steps(tmp_path)
    for step in (1, 2):
        _empty_meta(str(tmp_path / str(step)))
    with pytest.raises(ckpt.DamagedCheckpoint, match=re.escape(
            f"checkpoint: no intact step in {tmp_path} (step 2: {tmp_path}/2/meta/metadata; "
            f"step 1: {tmp_path}/1/meta/metadata); refusing to start from scratch")):
        manager.restore_newest(lambda s: manager.restore(s, _abstract(_random_state(s))))
    assert manager.manager.all_steps() == [1, 2]
    manager.close()


def test_another_tree_is_a_mismatch_not_damage(tmp_path):
    manager = _two_steps(tmp_path)
    target = _abstract(_random_state(2))
    target["params"]["extra"] = jax.ShapeDtypeStruct((3,), np.float32)
    with pytest.raises(ckpt.StateMismatch, match=re.escape(
            "this run's state has ['params/extra'] which the checkpoint lacks")):
        manager.restore(2, target)
    target = _abstract(_random_state(2))
    target["params"]["w"] = jax.ShapeDtypeStruct((32, 64), np.float32)
    with pytest.raises(ckpt.StateMismatch, match=re.escape(
            "params/w has shape (64, 32) in the checkpoint, (32, 64) in this run")):
        manager.restore(2, target)
    manager.close()


def test_restore_into_other_dtypes_verifies_the_stored_bits_then_casts(tmp_path):
    manager = _two_steps(tmp_path)
    target = _abstract(_random_state(2))
    target["params"]["w"] = jax.ShapeDtypeStruct((64, 32), jnp.bfloat16)
    state, _ = manager.restore(2, target)
    assert state["params"]["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]),
                                  _random_state(2)["params"]["w"].astype(jnp.bfloat16))
    manager.close()


def test_restore_from_is_checked_only_when_the_run_has_no_checkpoint(tmp_path):
    own = str(tmp_path / "run" / "checkpoints")
    config = ckpt.CheckpointConfig(restore_from=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=re.escape(
            f"checkpoint.restore_from: expected a directory of training checkpoints (the "
            f"checkpoints/ directory of an earlier run), got '{tmp_path}/nowhere', which does "
            f"not exist")):
        ckpt.check_restore_from(config, own)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="'.*empty', which holds none$"):
        ckpt.check_restore_from(ckpt.CheckpointConfig(restore_from=str(tmp_path / "empty")), own)
    os.makedirs(os.path.join(own, "4"))  # resuming its own checkpoint: restore_from unused
    ckpt.check_restore_from(config, own)
    ckpt.check_restore_from(ckpt.CheckpointConfig(), str(tmp_path / "other"))
    assert not (tmp_path / "nowhere").exists()


def test_a_read_only_checkpointer_creates_nothing(tmp_path):
    _two_steps(tmp_path / "a").close()
    reader = ckpt.Checkpointer(str(tmp_path / "a"), ckpt.CheckpointConfig(keep=1),
                               read_only=True)
    assert reader.latest_step() == 2
    _assert_trees_equal(reader.restore(1, _abstract(_random_state(1)))[0], _random_state(1))
    reader.close()
    assert ckpt.saved_steps(str(tmp_path / "a")) == [1, 2]
