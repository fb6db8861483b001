"""Trainer: the four modes, resume, frozen checkpoints, sharding, accumulation, bad input."""

import os
import shutil
import signal

import jax
import numpy as np
import optax
import pytest

from calm_jax import checkpoints as ckpt
from calm_jax import lora as lora_lib
from calm_jax import objectives, trainer
from calm_jax.composition import ComposedLM
from calm_jax.data import DatasetConfig, NumpySource
from calm_jax.exports import load_composition, read_spec
from calm_jax.models import Decoder, TransformerConfig
from calm_jax.optim import OptimizerConfig
from calm_jax.partitioning import PartitioningConfig

LENGTH = 24


def _arrays(seed=0, rows=64):
    """Prompt 'a b c =' -> target 'c b a' style sequences: learnable, loss on targets only."""
    rng = np.random.default_rng(seed)
    x = rng.integers(10, 60, (rows, 4))
    seq = np.concatenate([x, np.full((rows, 1), 5), x[:, ::-1], np.full((rows, 1), 1)], axis=1)
    n = seq.shape[1]
    tokens = np.zeros((rows, LENGTH), np.int32)
    tokens[:, :n] = seq
    inputs = np.zeros_like(tokens)
    inputs[:, 1:] = tokens[:, :-1]
    weights = np.zeros((rows, LENGTH), np.float32)
    weights[:, 5:n] = 1.0
    seg = np.zeros_like(tokens)
    seg[:, :n] = 1
    return {"decoder_input_tokens": inputs, "decoder_target_tokens": tokens,
            "decoder_loss_weights": weights, "decoder_segment_ids": seg,
            "prompt_mask": np.arange(LENGTH)[None, :].repeat(rows, 0) < 6}


DATA = DatasetConfig(arrays_fn=_arrays, batch_size=8, length=LENGTH)
CFG = TransformerConfig.tiny(vocab_size=128, embed_dim=32, num_layers=4, num_heads=4,
                             num_kv_heads=2, mlp_dim=64, max_len=32)
AUG_CFG = CFG.replace(embed_dim=16, num_heads=2, num_kv_heads=2)
FAST = dict(log_every=1, checkpoint=ckpt.CheckpointConfig(save_every=0, use_async=False),
            optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=0))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Pretrains a tiny anchor and augmenting model once (exports under <dir>/export)."""
    root = tmp_path_factory.mktemp("pretrain")
    out = {}
    for name, cfg, seed in (("anchor", CFG, 0), ("augment", AUG_CFG, 0),
                            ("other_augment", AUG_CFG, 1)):
        result = trainer.train(mode="pretrain", model_dir=str(root / name), num_steps=4,
                               anchor=trainer.ModelSpec(config=cfg), dataset=DATA, seed=seed,
                               **FAST)
        assert result["history"][-1][1]["loss"] < result["history"][0][1]["loss"]
        out[name] = str(root / name / "export")
    return out


def _compose(model_dir, exports, **kw):
    args = dict(mode="compose", model_dir=str(model_dir), num_steps=4,
                anchor=trainer.ModelSpec(checkpoint=exports["anchor"]),
                augments={"kv": trainer.ModelSpec(checkpoint=exports["augment"])},
                dataset=DATA, **FAST)
    args.update(kw)
    return trainer.train(**args)


def test_pretrain_exports_a_loadable_model(exports):
    cfg, params = ckpt.load_model(exports["anchor"])
    assert cfg == CFG and params["layers"]["attn"]["query"]["kernel"].shape[0] == 4


def _file_stats(directory):
    """{relative path: (mtime_ns, size)} of every file below `directory`."""
    stats = {}
    for d, _, names in os.walk(directory):
        for f in names:
            st = os.stat(os.path.join(d, f))
            stats[os.path.relpath(os.path.join(d, f), directory)] = (st.st_mtime_ns, st.st_size)
    return stats


def test_compose_trains_only_the_composition_and_leaves_frozen_exports_unchanged(tmp_path,
                                                                                  exports):
    before = {k: ckpt.fingerprint(v) for k, v in exports.items()}
    files = {k: _file_stats(v) for k, v in exports.items()}
    result = _compose(tmp_path / "calm", exports)
    state = result["state"]
    assert set(state["params"]) == {"kv"}  # the trained tree is the composition alone
    assert all(np.isfinite(m["loss"]) for _, m in result["history"])
    assert np.any(np.asarray(state["params"]["kv"]["out"]))  # W_o left zero: it trained
    assert {k: ckpt.fingerprint(v) for k, v in exports.items()} == before
    assert {k: _file_stats(v) for k, v in exports.items()} == files  # not even rewritten
    # Optimizer state exists only for trained parameters.
    n_trained = sum(x.size for x in jax.tree.leaves(state["params"]))
    n_opt = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
    assert n_opt <= 2 * n_trained + 8
    # The run's export is the trained composition, reading the frozen exports where they are.
    model, params = load_composition(str(tmp_path / "calm" / "export"))
    assert read_spec(str(tmp_path / "calm" / "export"))["anchor"]["checkpoint"] == (
        exports["anchor"])
    tokens = jax.numpy.asarray(_arrays()["decoder_input_tokens"][:4])
    trained = {**result["frozen"], "composition": state["params"]}
    np.testing.assert_allclose(model.apply(params, tokens),
                               ComposedLM(CFG, {"kv": AUG_CFG}).apply(trained, tokens),
                               rtol=1e-5, atol=1e-5)


def test_finetune_and_lora_modes(tmp_path, exports):
    ft = trainer.train(mode="finetune", model_dir=str(tmp_path / "ft"), num_steps=3,
                       anchor=trainer.ModelSpec(checkpoint=exports["anchor"]), dataset=DATA,
                       **FAST)
    cfg, anchor = ckpt.load_model(exports["anchor"])
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), anchor, ft["state"]["params"])
    assert all(jax.tree.leaves(moved))

    lora = trainer.train(mode="lora", model_dir=str(tmp_path / "lora"), num_steps=3,
                         anchor=trainer.ModelSpec(checkpoint=exports["anchor"]),
                         augments={"kv": trainer.ModelSpec(checkpoint=exports["augment"])},
                         dataset=DATA, **FAST)
    n_lora = sum(x.size for x in jax.tree.leaves(lora["state"]["params"]))
    # The LoRA run exports the anchor with the adapters merged in: a plain model export.
    merged_cfg, merged = ckpt.load_model(str(tmp_path / "lora" / "export"))
    tokens = jax.numpy.asarray(_arrays()["decoder_input_tokens"][:4])
    adapted = lora_lib.merge(lora["frozen"]["anchor"], lora["state"]["params"],
                             lora_lib.LoraConfig())
    np.testing.assert_allclose(Decoder(merged_cfg).apply({"params": merged}, tokens)[0],
                               Decoder(CFG).apply({"params": adapted}, tokens)[0],
                               rtol=1e-5, atol=1e-5)
    budget = ComposedLM(CFG, {"kv": AUG_CFG}).num_composition_params()
    per_rank = 4 * 2 * (32 + 32)  # query and value: layers x (in + out) per unit of rank
    assert abs(n_lora - budget) <= per_rank / 2


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, exports):
    full = _compose(tmp_path / "full", exports, num_steps=6)
    first = _compose(tmp_path / "split", exports, num_steps=6, stop_after=3)
    assert first["stopped_early"] and int(first["state"]["step"]) == 3
    resumed = _compose(tmp_path / "split", exports, num_steps=6)
    assert int(resumed["state"]["step"]) == 6
    for a, b in zip(jax.tree.leaves(full["state"]["params"]),
                    jax.tree.leaves(resumed["state"]["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_refuses_to_resume_against_other_frozen_weights(tmp_path, exports):
    _compose(tmp_path / "calm", exports, num_steps=2)
    other = {**exports, "augment": exports["other_augment"]}  # same shapes, other weights
    with pytest.raises(ValueError, match=r"augments\['kv'\]: the checkpoint in .* was trained "
                                         r"against frozen weights .* refusing to resume"):
        _compose(tmp_path / "calm", other, num_steps=4)
    # The same weights exported again (other files, other orbax metadata) are the same model.
    ckpt.save_model(str(tmp_path / "again"), *ckpt.load_model(exports["augment"]))
    resumed = _compose(tmp_path / "calm", {**exports, "augment": str(tmp_path / "again")},
                       num_steps=4)
    assert int(resumed["state"]["step"]) == 4 and resumed["history"][0][0] == 3


def test_sharded_2x2x2_equals_one_device(tmp_path, exports):
    assert jax.device_count() == 8
    one = _compose(tmp_path / "one", exports,
                   partitioning=PartitioningConfig(mesh_shape=(1, 1, 1), num_devices=1))
    many = _compose(tmp_path / "many", exports,
                    partitioning=PartitioningConfig(mesh_shape=(2, 2, 2)))
    np.testing.assert_allclose([m["loss"] for _, m in one["history"]],
                               [m["loss"] for _, m in many["history"]], rtol=1e-4)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, exports):
    two = PartitioningConfig(mesh_shape=(2, 1, 1), num_devices=2)
    big = _compose(tmp_path / "big", exports, num_steps=2, partitioning=two)
    acc = _compose(tmp_path / "acc", exports, num_steps=2, partitioning=two,
                   optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=0,
                                             grad_accum_steps=2))
    for a, b in zip(jax.tree.leaves(big["state"]["params"]),
                    jax.tree.leaves(acc["state"]["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_sigterm_sets_the_preemption_flag():
    from calm_jax.distributed import Preemption

    with Preemption() as preemption:
        assert not preemption.requested
        signal.raise_signal(signal.SIGTERM)
        assert preemption.requested


def _nan_weight_at(batches):
    """DATA with a NaN loss weight in one row of each of these global batches (first epoch)."""
    rows = [NumpySource(_arrays(), DATA.batch_size, DATA.seed).global_rows(b)[0]
            for b in batches]

    def arrays():
        a = _arrays()
        a["decoder_loss_weights"][rows, 6] = np.nan
        return a
    return DatasetConfig(arrays_fn=arrays, batch_size=DATA.batch_size, length=LENGTH)


def test_a_non_finite_loss_stops_the_run_before_that_state_is_saved(tmp_path, exports):
    model_dir = tmp_path / "calm"
    every_2 = ckpt.CheckpointConfig(save_every=2, use_async=True)
    # Step 3 trains on the NaN; step 4, a save step (nothing is logged before step 100), sees it.
    with pytest.raises(FloatingPointError, match=(
            r"^step 4: the training loss is nan and grad_norm is nan; stopped without saving "
            r"this state \(the latest checkpoint kept is step 2 in .*checkpoints\)\. Lower "
            r"optimizer.learning_rate, .* set optimizer.skip_nonfinite=N")):
        _compose(model_dir, exports, num_steps=6, dataset=_nan_weight_at([2]), log_every=100,
                 checkpoint=every_2)
    assert ckpt.Checkpointer(str(model_dir / "checkpoints"), every_2).manager.all_steps() == [2]
    for copy in ("copy", "copy_2"):
        shutil.copytree(model_dir, tmp_path / copy)
    resumed = _compose(model_dir, exports, num_steps=6, checkpoint=every_2)
    assert [s for s, _ in resumed["history"]] == [3, 4, 5, 6]
    assert all(np.isfinite(m["loss"]) for _, m in resumed["history"])
    # The run the error message suggests: resume from the step-2 checkpoint (saved without
    # skipping) with skip_nonfinite on. On clean data it trains as the resumed run did (the
    # moments carried over); over the same NaN batch, step 3's update is skipped.
    skip = OptimizerConfig(learning_rate=3e-3, warmup_steps=0, skip_nonfinite=1)
    clean = _compose(tmp_path / "copy_2", exports, num_steps=6, optimizer=skip,
                     checkpoint=every_2)
    assert [m["skipped_updates"] for _, m in clean["history"]] == [0, 0, 0, 0]
    for a, b in zip(jax.tree.leaves(clean["state"]["params"]),
                    jax.tree.leaves(resumed["state"]["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    skipped = _compose(tmp_path / "copy", exports, num_steps=6, dataset=_nan_weight_at([2]),
                       optimizer=skip, checkpoint=every_2)
    history = dict(skipped["history"])
    assert [history[s]["skipped_updates"] for s in range(3, 7)] == [1, 1, 1, 1]
    assert np.isnan(history[3]["loss"]) and np.isfinite(history[6]["loss"])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(skipped["state"]["params"]))


def test_skip_nonfinite_skips_those_updates_and_trains_on(tmp_path, exports):
    skip = OptimizerConfig(learning_rate=3e-3, warmup_steps=0, skip_nonfinite=2)
    result = _compose(tmp_path / "calm", exports, num_steps=5, dataset=_nan_weight_at([1, 2]),
                      optimizer=skip)
    history = dict(result["history"])
    assert [(history[s]["skipped_updates"], history[s]["nonfinite_streak"])
            for s in range(1, 6)] == [(0, 0), (1, 1), (2, 2), (2, 0), (2, 0)]
    assert np.isnan(history[2]["loss"]) and np.isfinite(history[5]["loss"])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(result["state"]["params"]))
    assert os.path.isdir(tmp_path / "calm" / "checkpoints" / "5")
    # Resumed with skipping off, the run goes on from the same moments: it trains as a run
    # that kept skipping on would (no update of steps 6-7 is skipped, so they are equal).
    shutil.copytree(tmp_path / "calm", tmp_path / "copy")
    off = _compose(tmp_path / "calm", exports, num_steps=7)
    on = _compose(tmp_path / "copy", exports, num_steps=7, optimizer=skip)
    assert [s for s, _ in off["history"]] == [6, 7]
    assert "skipped_updates" not in off["history"][0][1]
    assert not isinstance(off["state"]["opt_state"], optax.ApplyIfFiniteState)
    assert [m["skipped_updates"] for _, m in on["history"]] == [2, 2]
    for a, b in zip(jax.tree.leaves(off["state"]["params"]),
                    jax.tree.leaves(on["state"]["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_resumes_with_clipping_turned_off_or_on_and_another_learning_rate(tmp_path, exports):
    """Clipping wraps the optimizer (optax.chain), so turning it off or on changes the state's
    layout; the moments carry over. A clip norm too large to bind is the reference: it keeps
    the layout a checkpoint with clipping has, and trains as no clipping would."""
    _compose(tmp_path / "a", exports, num_steps=2)  # FAST: clip_norm 1.0
    shutil.copytree(tmp_path / "a", tmp_path / "b")

    def resume(name, clip_norm, num_steps):
        opt = OptimizerConfig(learning_rate=1e-3, warmup_steps=0, clip_norm=clip_norm)
        return _compose(tmp_path / name, exports, num_steps=num_steps, optimizer=opt)

    for steps, off in ((4, None), (6, 1e9)):  # a: off, then on again; b: on throughout
        a, b = resume("a", off, steps), resume("b", 1e9, steps)
        assert [s for s, _ in a["history"]] == [steps - 1, steps]
        clipping = isinstance(a["state"]["opt_state"][0], optax.EmptyState)
        assert clipping == (off is not None)
        for x, y in zip(jax.tree.leaves(a["state"]), jax.tree.leaves(b["state"])):
            np.testing.assert_allclose(x, y, rtol=1e-6)


def test_the_command_line_ends_a_diverged_run_with_status_3(monkeypatch, capsys):
    from calm_jax import train as train_cli

    def diverges(argv):
        assert argv == ["--gin_file=x.gin"]
        raise FloatingPointError("step 4: the training loss is nan")

    monkeypatch.setattr("sys.argv", ["calm_jax.train", "--gin_file=x.gin"])
    with pytest.raises(SystemExit) as exit_:
        train_cli.run_cli(diverges)
    assert exit_.value.code == 3
    assert capsys.readouterr().err == "error: step 4: the training loss is nan\n"


def test_skip_nonfinite_stops_after_more_than_that_many_in_a_row(tmp_path, exports):
    skip = OptimizerConfig(learning_rate=3e-3, warmup_steps=0, skip_nonfinite=2)
    with pytest.raises(FloatingPointError, match=(
            r"^step 3: 3 updates in a row had non-finite gradients, more than "
            r"optimizer.skip_nonfinite=2, so the last one was applied; stopped without saving "
            r"this state \(no checkpoint was saved\)")):
        _compose(tmp_path / "calm", exports, num_steps=5, dataset=_nan_weight_at([0, 1, 2]),
                 optimizer=skip)
    assert not os.listdir(tmp_path / "calm" / "checkpoints")


# Bad input: clear errors before anything is compiled ----------------------------------------


def test_batch_not_divisible_by_data_parallel_size(tmp_path, exports):
    data = DatasetConfig(arrays_fn=_arrays, batch_size=12, length=LENGTH)
    with pytest.raises(ValueError, match="dataset.batch_size: expected a multiple of the "
                                         "data-parallel size 8 x grad_accum_steps 1, got 12"):
        _compose(tmp_path / "x", exports, dataset=data)


def test_checkpoint_that_does_not_fit_the_config(tmp_path, exports):
    with pytest.raises(ValueError, match="anchor.config.embed_dim: expected the checkpoint's "
                                         "value 32"):
        _compose(tmp_path / "x", exports,
                 anchor=trainer.ModelSpec(config=CFG.replace(embed_dim=64),
                                          checkpoint=exports["anchor"]))
    target = jax.eval_shape(lambda: objectives._abstract_decoder(CFG.replace(mlp_dim=96)))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          trainer.nn.unbox(target))
    with pytest.raises(ValueError, match=r"parameter \['layers'\]\['mlp'\]\['down'\]\['kernel'\] "
                                         r"has shape \(4, 64, 32\), the config expects "
                                         r"\(4, 96, 32\)"):
        ckpt.load_model(exports["anchor"], target=target)


def test_gin_unknown_binding_and_missing_required(tmp_path):
    from calm_jax import train as train_cli

    base = ["--gin_file=experiments/compose_kv.gin"]
    with pytest.raises(ValueError, match="set to `%gin.REQUIRED` but not subsequently"):
        train_cli.run(base + [f"--gin.MODEL_DIR='{tmp_path}'"])
    with pytest.raises(ValueError, match="doesn't have a parameter named 'bogus'"):
        train_cli.run(base + [f"--gin.MODEL_DIR='{tmp_path}'", "--gin.ANCHOR_CHECKPOINT='a'",
                              "--gin.AUGMENT_CHECKPOINT='b'", "--gin.trainer.train.bogus=1"])
    assert not os.listdir(tmp_path)  # nothing was started


def test_gin_pretrain_runs_from_the_command_line(tmp_path):
    from calm_jax import train as train_cli

    result = train_cli.run(["--gin_file=experiments/pretrain_numeric.gin",
                            f"--gin.MODEL_DIR='{tmp_path}'", "--gin.NUM_STEPS=2",
                            "--gin.trainer.train.log_every=1", "--gin.BATCH_SIZE=8"])
    assert int(result["state"]["step"]) == 2
    assert os.path.exists(tmp_path / "export" / "config.json")
    assert os.path.exists(tmp_path / "config.gin")


def test_gin_includes_resolve_with_a_runs_folder_in_the_working_directory(tmp_path, monkeypatch):
    """A `runs/` (or `models/`, `experiments/`) folder where the user works must not shadow the
    gin includes of the same name."""
    import gin

    from calm_jax import train as train_cli

    for name in ("runs", "models", "experiments"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    train_cli.parse_gin(["experiments/pretrain_kv.gin"], ["MODEL_DIR = '/tmp/x'"])
    assert gin.query_parameter("%MODE") == "pretrain"


GIN_REQUIRED = ["MODEL_DIR = '/tmp/x'", "ANCHOR_CHECKPOINT = 'a'", "AUGMENT_CHECKPOINT = 'b'"]


def test_gin_includes_log_no_errors_and_a_missing_file_still_fails(caplog):
    """gin's resource reader logs 'Path not found' for each include before the search paths
    find it; parse_gin shows none of those, and still fails on an include that exists nowhere."""
    import logging

    from calm_jax import train as train_cli

    with caplog.at_level(logging.INFO):
        train_cli.parse_gin(["experiments/compose_kv.gin"], GIN_REQUIRED)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "gin-config opened resource file" not in caplog.text  # found on the search path
    with pytest.raises(IOError, match="no_such_file.gin"):
        train_cli.parse_gin(["experiments/compose_kv.gin"],
                            GIN_REQUIRED + ["include 'no_such_file.gin'"])


@pytest.mark.parametrize("files, bindings, mesh_shape, composition", [
    ([], [], (-1, 1, 1), {}),
    (["partitioning/data_parallel.gin"], [], (-1, 1, 1), {}),
    (["partitioning/fsdp.gin"], [], (1, -1, 1), {}),
    (["partitioning/fsdp_tensor.gin"], [], (1, -1, 2), {}),
    (["partitioning/fsdp_tensor.gin"], ["TENSOR_PARALLEL = 4"], (1, -1, 4), {}),
    (["composition/fusion.gin"], [], (-1, 1, 1), {"kind": "fusion"}),
    (["composition/encoder.gin"], [], (-1, 1, 1), {"augment_sees": "prompt"}),
    (["composition/rope.gin", "composition/encoder.gin"], [], (-1, 1, 1),
     {"rope_theta": 10000.0, "augment_sees": "prompt"}),
])
def test_gin_partitioning_and_composition_files(files, bindings, mesh_shape, composition):
    """The files under gin/partitioning and gin/composition, added after an experiment, set what
    their comments say and leave the rest of the experiment's composition as it was."""
    import gin

    from calm_jax import composition as composition_lib
    from calm_jax import partitioning
    from calm_jax import train as train_cli

    train_cli.parse_gin(["experiments/compose_kv.gin", *files], GIN_REQUIRED + bindings)
    assert gin.get_configurable(partitioning.PartitioningConfig)().mesh_shape == mesh_shape
    expected = composition_lib.CompositionConfig(**composition)  # compose_kv: the paper's CALM
    assert gin.get_configurable(composition_lib.CompositionConfig)() == expected
    assert gin.query_parameter("calm_jax.trainer.train.composition").selector == (
        "composition.CompositionConfig")


def test_gin_fsdp_tensor_and_fusion_files_train_on_their_mesh(tmp_path, exports):
    import gin

    from calm_jax import composition as composition_lib
    from calm_jax import partitioning
    from calm_jax import train as train_cli

    train_cli.parse_gin(["experiments/compose_kv.gin", "partitioning/fsdp_tensor.gin",
                         "composition/fusion.gin"], GIN_REQUIRED)
    result = _compose(tmp_path / "fusion", exports, num_steps=2,
                      partitioning=gin.get_configurable(partitioning.PartitioningConfig)(),
                      composition=gin.get_configurable(composition_lib.CompositionConfig)())
    params = result["state"]["params"]["kv"]
    assert {"gate", "value", "out"} <= set(params) and "query" not in params  # fusion
    specs = {name: leaf.sharding.spec for name, leaf in params.items()}
    for leaf in params.values():
        assert dict(leaf.sharding.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert any("tensor" in jax.tree.leaves(tuple(spec)) for spec in specs.values()), specs
    assert all(np.isfinite(m["loss"]) for _, m in result["history"])


def test_multi_token_pretraining_trains_extra_heads_and_exports_the_plain_decoder(tmp_path):
    from calm_jax import multi_token

    out = trainer.train(mode="pretrain", model_dir=str(tmp_path / "mtp"), num_steps=3,
                        anchor=trainer.ModelSpec(config=CFG), dataset=DATA,
                        multi_token=multi_token.MultiTokenConfig(depth=3), **FAST)
    trained = out["state"]["params"]
    assert set(trained) == {"decoder", "multi_token"}
    assert trained["multi_token"]["kernel"].shape == (2, CFG.embed_dim, CFG.vocab_size)
    cfg, exported = ckpt.load_model(str(tmp_path / "mtp" / "export"))
    assert cfg == CFG
    same = jax.tree.map(np.array_equal, exported, jax.device_get(trained["decoder"]))
    assert all(jax.tree.leaves(same))
    assert jax.tree.structure(out["params"]) == jax.tree.structure(exported)


def test_multi_token_loss_reads_the_tokens_further_ahead():
    from calm_jax import multi_token

    targets = np.array([[7, 8, 9, 1, 0], [4, 5, 1, 6, 1]])
    weights = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], np.float32)
    segments = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 2, 2]])
    vocab = 10
    # Head 0 predicts the target one position further on, perfectly where it may.
    logits = np.full((1, 2, 5, vocab), -30.0, np.float32)
    for b in range(2):
        for t in range(4):
            logits[0, b, t, targets[b, t + 1]] = 30.0
    total, count = multi_token.ahead_loss(logits, targets, weights, segments)
    assert count == 9 and float(total) < 1e-6
    # A wrong guess across the segment boundary (row 1: position 2 -> 3) is not counted ...
    logits[0, 1, 2] = np.roll(logits[0, 1, 2], 1)
    assert float(multi_token.ahead_loss(logits, targets, weights, segments)[0]) < 1e-6
    # ... one inside a segment is.
    logits[0, 0, 1] = np.roll(logits[0, 0, 1], 1)
    assert float(multi_token.ahead_loss(logits, targets, weights, segments)[0]) > 1.0


def test_multi_token_outside_pretraining_is_refused(tmp_path, exports):
    from calm_jax import multi_token

    with pytest.raises(ValueError, match=r"multi_token.depth: expected 1 in mode='compose'"):
        _compose(tmp_path / "c", exports, multi_token=multi_token.MultiTokenConfig(depth=2))
    with pytest.raises(ValueError, match=r"multi_token.depth: expected an integer >= 1, got 0"):
        multi_token.MultiTokenConfig(depth=0)
    assert not os.path.exists(tmp_path / "c")


@pytest.mark.parametrize("mode,depth,mesh_shape", [
    ("pretrain", 1, None), ("pretrain", 3, None), ("compose", 1, None), ("finetune", 1, None),
    ("lora", 1, None), ("pretrain", 1, (2, 2, 2)), ("compose", 1, (2, 2, 2))])
def test_loss_chunk_gives_the_same_loss_and_gradients(exports, mode, depth, mesh_shape):
    """The output layer applied 5 positions at a time (24 = 4 x 5 + 4: the last chunk is
    padded) gives the loss, metrics and gradients of the whole-logits loss, on one device and
    on a (data, fsdp, tensor) = (2, 2, 2) mesh (the output layer's vocabulary sharded)."""
    import flax.linen as nn
    from calm_jax import lora as lora_lib
    from calm_jax import multi_token
    from calm_jax import partitioning as part
    from calm_jax.composition import CompositionConfig

    partitioning = (PartitioningConfig(num_devices=1) if mesh_shape is None
                    else PartitioningConfig(mesh_shape=mesh_shape))
    mesh = part.make_mesh(partitioning)
    anchor = (trainer.ModelSpec(config=CFG) if mode == "pretrain"
              else trainer.ModelSpec(checkpoint=exports["anchor"]))
    augments = ({"kv": trainer.ModelSpec(checkpoint=exports["augment"])}
                if mode in ("compose", "lora") else {})
    batch = {k: jax.numpy.asarray(v[:8]) for k, v in _arrays(seed=3).items()}
    results = []
    with part.mesh_context(mesh), nn.logical_axis_rules(list(partitioning.logical_axis_rules)):
        for chunk in (None, 5):
            s = trainer.setup(mode, anchor=anchor, augments=augments,
                               composition=CompositionConfig(), lora=lora_lib.LoraConfig(),
                               mesh=mesh, rules=partitioning.logical_axis_rules,
                               rng=jax.random.key(0),
                               multi_token=multi_token.MultiTokenConfig(depth=depth),
                               loss_chunk=chunk)
            params = s.init_params(jax.random.key(1))
            if mode == "compose":  # the zero-initialised output projection: no gradient path
                params = jax.tree.map(lambda x: x + 0.01, params)
            (loss, metrics), grads = jax.jit(jax.value_and_grad(s.loss(), has_aux=True))(
                params, s.frozen, batch)
            results.append((loss, metrics, grads))
    (loss, metrics, grads), (loss_c, metrics_c, grads_c) = results
    np.testing.assert_allclose(loss_c, loss, rtol=1e-5)
    for key in ("loss_sum", "weight_sum", "correct_sum"):
        np.testing.assert_allclose(metrics_c[key], metrics[key], rtol=1e-5)
    assert float(metrics["weight_sum"]) > 0
    flat, flat_c = jax.tree.leaves(grads), jax.tree.leaves(grads_c)
    assert len(flat) == len(flat_c) and any(np.any(g) for g in flat)
    for g, g_c in zip(flat, flat_c):
        np.testing.assert_allclose(g_c, g, rtol=1e-3, atol=1e-4 * float(np.abs(g).max()))


def test_bad_loss_chunk_is_refused_before_anything_runs(tmp_path):
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match=rf"loss_chunk: expected None or a positive integer "
                                             rf".*got {bad!r}"):
            trainer.train(mode="pretrain", model_dir=str(tmp_path / "p"), num_steps=2,
                          anchor=trainer.ModelSpec(config=CFG), dataset=DATA, loss_chunk=bad,
                          **FAST)
    assert not os.path.exists(tmp_path / "p")


def test_model_spec_runtime_fields_override_a_stored_model(exports):
    spec = trainer.ModelSpec(checkpoint=exports["anchor"], remat_policy="full",
                             attention_impl="xla", dtype="bfloat16")
    cfg = spec.resolve("anchor")
    assert (cfg.remat_policy, cfg.attention_impl, cfg.dtype) == ("full", "xla", "bfloat16")
    # Everything else is the stored architecture.
    assert cfg.replace(remat_policy=CFG.remat_policy, attention_impl=CFG.attention_impl,
                       dtype=CFG.dtype) == CFG
    assert trainer.ModelSpec(checkpoint=exports["anchor"]).resolve("anchor") == CFG
    with pytest.raises(ValueError, match=r"anchor\.remat_policy: expected one of .*got 'some'"):
        trainer.ModelSpec(checkpoint=exports["anchor"], remat_policy="some").resolve("anchor")


def test_per_layer_frozen_layout_trains_alike_and_exports_stacked(tmp_path, exports):
    # The frozen models held one array per layer (fused projections, layers unrolled), on a
    # (2, 2, 2) mesh, against the stacked layout on one device: the same losses and trained
    # composition. The randomly initialised augmenting model is saved with the export in the
    # stacked layout a Decoder loads, and the export is the model that was trained.
    from calm_jax.models.transformer import LayerList

    kw = dict(augments={"kv": trainer.ModelSpec(config=AUG_CFG)})
    stacked = _compose(tmp_path / "stacked", exports,
                       partitioning=PartitioningConfig(mesh_shape=(1, 1, 1), num_devices=1), **kw)
    per_layer = _compose(tmp_path / "per_layer", exports, frozen_layout="per_layer",
                         partitioning=PartitioningConfig(mesh_shape=(2, 2, 2)), **kw)
    np.testing.assert_allclose([m["loss"] for _, m in per_layer["history"]],
                               [m["loss"] for _, m in stacked["history"]], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(per_layer["state"]["params"]),
                    jax.tree.leaves(stacked["state"]["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    layers = per_layer["frozen"]["anchor"]["layers"]
    assert isinstance(layers["mlp"]["gate_up"]["kernel"], LayerList)
    assert len(layers["mlp"]["gate_up"]["kernel"].arrays) == CFG.num_layers
    directory = str(tmp_path / "per_layer" / "export")
    cfg, saved = ckpt.load_model(os.path.join(directory, "frozen", "augment_kv"))
    assert cfg == AUG_CFG
    assert saved["layers"]["attn"]["query"]["kernel"].shape[0] == AUG_CFG.num_layers
    model, params = load_composition(directory)
    tokens = jax.numpy.asarray(_arrays()["decoder_input_tokens"][:4])
    trained = {**per_layer["frozen"], "composition": per_layer["state"]["params"]}
    np.testing.assert_allclose(model.apply(params, tokens),
                               ComposedLM(CFG, {"kv": AUG_CFG}).apply(trained, tokens),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode, layout, message", [
    ("compose", "rows", "frozen_layout: expected one of ('stacked', 'per_layer'), got 'rows'"),
    ("pretrain", "per_layer", "frozen_layout: expected 'stacked' in mode='pretrain'"),
    ("lora", "per_layer", "frozen_layout: expected 'stacked' in mode='lora'"),
])
def test_bad_frozen_layout_is_refused_before_anything_runs(tmp_path, exports, mode, layout,
                                                            message):
    anchor = (trainer.ModelSpec(config=CFG) if mode == "pretrain"
              else trainer.ModelSpec(checkpoint=exports["anchor"]))
    augments = ({} if mode == "pretrain"
                else {"kv": trainer.ModelSpec(checkpoint=exports["augment"])})
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        trainer.train(mode=mode, model_dir=str(tmp_path / "r"), num_steps=2, anchor=anchor,
                      augments=augments, dataset=DATA, frozen_layout=layout, **FAST)
    assert not os.path.exists(tmp_path / "r")
