"""Composition exports: save, load into the same model, and refuse other frozen weights."""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import checkpoints as ckpt
from calm_jax import decoding, generate
from calm_jax.composition import ComposedLM, CompositionConfig
from calm_jax.exports import COMPOSITION_FILE, load_composition, read_spec, save_composition
from calm_jax.models import TransformerConfig

ANCHOR = TransformerConfig.tiny(vocab_size=64, embed_dim=32, num_layers=4, num_heads=4,
                                num_kv_heads=2, mlp_dim=64, max_len=32)
AUGMENT = ANCHOR.replace(embed_dim=16, num_heads=2, num_kv_heads=2)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 12)), jnp.int32)


def _model(**composition):
    return ComposedLM(ANCHOR, {"kv": AUGMENT}, CompositionConfig(**composition))


def _trained_params(model, seed=0):
    """Random everything, with a non-zero output projection (as after training)."""
    params = nn.unbox(model.init(jax.random.key(seed)))
    params["composition"] = jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(seed + 1), x.shape, x.dtype),
        params["composition"])
    return params


def _fingerprints(params):
    return {"anchor": ckpt.params_fingerprint(ANCHOR, params["anchor"]),
            "augments['kv']": ckpt.params_fingerprint(AUGMENT, params["augments"]["kv"])}


def _save(tmp_path, model, params, *, augment_exported=True):
    ckpt.save_model(str(tmp_path / "anchor"), ANCHOR, params["anchor"])
    sources = {"anchor": str(tmp_path / "anchor"), "augments": {"kv": None}}
    if augment_exported:
        ckpt.save_model(str(tmp_path / "augment"), AUGMENT, params["augments"]["kv"])
        sources["augments"]["kv"] = str(tmp_path / "augment")
    fingerprints = _fingerprints(params)
    if not augment_exported:
        del fingerprints["augments['kv']"]
    frozen = {"anchor": params["anchor"], "augments": params["augments"]}
    export = str(tmp_path / "export")
    save_composition(export, params["composition"], model=model, frozen=frozen,
                     sources=sources, fingerprints=fingerprints)
    return export


@pytest.mark.parametrize("augment_exported", [True, False])
def test_a_loaded_export_is_the_same_composed_model(tmp_path, augment_exported):
    model = _model(connections={"kv": ((2, 2), (4, 4))}, rope_theta=100.0)
    params = _trained_params(model)
    export = _save(tmp_path, model, params, augment_exported=augment_exported)
    loaded_model, loaded = load_composition(export)
    assert loaded_model.connections == {"kv": ((2, 2), (4, 4))}
    assert loaded_model.config == model.config
    assert loaded_model.anchor_config == ANCHOR and loaded_model.augment_configs == {"kv": AUGMENT}
    np.testing.assert_array_equal(loaded_model.apply(loaded, TOKENS), model.apply(params, TOKENS))
    spec = read_spec(export)
    # An augment without an export of its own is saved inside, referenced relatively.
    expected = str(tmp_path / "augment") if augment_exported else os.path.join("frozen",
                                                                                "augment_kv")
    assert spec["augments"]["kv"]["checkpoint"] == expected
    assert spec["anchor"]["relative"] == os.path.join("..", "anchor")
    assert spec["augments"]["kv"]["fingerprint"] == _fingerprints(params)["augments['kv']"]
    assert os.path.isdir(os.path.join(export, "frozen")) == (not augment_exported)


def test_default_connections_are_written_out_and_decoding_runs(tmp_path):
    model = _model()
    params = _trained_params(model)
    export = _save(tmp_path, model, params)
    spec = read_spec(export)
    assert spec["composition"]["connections"] == {
        "kv": [list(p) for p in model.connections["kv"]]}
    loaded_model, loaded = load_composition(export, dtype="float32")
    out = decoding.generate(loaded_model, loaded, TOKENS[:, :6], max_new_tokens=4)
    want = decoding.generate(model, params, TOKENS[:, :6], max_new_tokens=4)
    np.testing.assert_array_equal(out.tokens, want.tokens)


def test_other_frozen_weights_are_refused_by_name(tmp_path):
    model = _model()
    params = _trained_params(model)
    export = _save(tmp_path, model, params)
    other = nn.unbox(model.init(jax.random.key(7)))["augments"]["kv"]
    shutil.rmtree(tmp_path / "augment")
    ckpt.save_model(str(tmp_path / "augment"), AUGMENT, other)
    with pytest.raises(ValueError, match=(
            r"^composition.json: augments\['kv'\]: expected the weights the composition was "
            r"trained against \(fingerprint [0-9a-f]{64}\) in .*augment, found fingerprint "
            r"[0-9a-f]{64}$")):
        load_composition(export)


def test_a_moved_frozen_export_is_named(tmp_path):
    model = _model()
    export = _save(tmp_path, model, _trained_params(model))
    shutil.move(tmp_path / "anchor", tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=r"^composition.json: anchor: the model export it was "
                                         r"trained against is not there \(moved or deleted\?\); "
                                         r"looked in \S+/anchor$"):
        load_composition(export)


def test_a_run_directory_moved_whole_still_loads(tmp_path):
    model = _model()
    params = _trained_params(model)
    _save(tmp_path / "run", model, params)
    # The composition export moved alone finds its frozen exports where they were.
    shutil.move(tmp_path / "run" / "export", tmp_path / "export_alone")
    loaded_model, loaded = load_composition(str(tmp_path / "export_alone"))
    np.testing.assert_array_equal(loaded_model.apply(loaded, TOKENS), model.apply(params, TOKENS))
    shutil.move(tmp_path / "export_alone", tmp_path / "run" / "export")
    shutil.move(tmp_path / "run", tmp_path / "moved")  # anchor/, augment/ and export/ together
    loaded_model, loaded = load_composition(str(tmp_path / "moved" / "export"))
    np.testing.assert_array_equal(loaded_model.apply(loaded, TOKENS), model.apply(params, TOKENS))
    # The generate CLI looks for a converted tokenizer beside the anchor where it is now.
    assert generate.load_model(str(tmp_path / "moved" / "export"))[2] == str(
        tmp_path / "moved" / "anchor")


def test_not_an_export_wrong_format_and_saving_twice(tmp_path):
    with pytest.raises(ValueError, match=r"composition export .*: no composition.json "
                                         r"\(expected the export/ directory of a finished "
                                         r"compose run\)"):
        load_composition(str(tmp_path))
    model = _model()
    params = _trained_params(model)
    export = _save(tmp_path, model, params)
    with pytest.raises(ValueError, match="already holds a composition export"):
        save_composition(export, params["composition"], model=model,
                         frozen={"anchor": params["anchor"], "augments": params["augments"]},
                         sources={"anchor": None, "augments": {"kv": None}}, fingerprints={})
    path = os.path.join(export, COMPOSITION_FILE)
    spec = json.load(open(path))
    json.dump({**spec, "format": "calm_jax.composition/0"}, open(path, "w"))
    with pytest.raises(ValueError, match=r"format: expected 'calm_jax.composition/1', "
                                         r"got 'calm_jax.composition/0'"):
        load_composition(export)


def test_composition_params_that_do_not_fit_the_config_are_named(tmp_path):
    model = _model(connections={"kv": ((2, 2), (4, 4))})
    export = _save(tmp_path, model, _trained_params(model))
    path = os.path.join(export, COMPOSITION_FILE)
    spec = json.load(open(path))
    spec["composition"]["connections"] = {"kv": [[4, 4]]}  # one connection, two were saved
    json.dump(spec, open(path, "w"))
    with pytest.raises(ValueError, match=r"composition export .*: parameter \['kv'\]\[.* has "
                                         r"shape \(2, .*\), the config expects \(1, "):
        load_composition(export)


class _Killed(BaseException):
    """Stands for a kill at a chosen point (not an Exception: nothing may catch it)."""


def test_an_export_stopped_before_composition_json_leaves_none_and_can_be_written_again(
        tmp_path, monkeypatch):
    """Stopped after params/ was written (before composition.json): no half export where the
    export belongs, and writing it again works (it used to fail: params/ already exists)."""
    model = _model()
    params = _trained_params(model)
    save_params = ckpt.save_params

    def save_then_stop(path, tree):
        save_params(path, tree)
        if path == str(tmp_path / "export.partial" / "params"):  # the composition's own
            raise _Killed

    monkeypatch.setattr(ckpt, "save_params", save_then_stop)
    with pytest.raises(_Killed):
        _save(tmp_path, model, params, augment_exported=False)
    assert not (tmp_path / "export").exists()
    with pytest.raises(ValueError, match=r"no composition.json .*export.partial holds an "
                                         r"unfinished export"):
        load_composition(str(tmp_path / "export"))
    monkeypatch.setattr(ckpt, "save_params", save_params)
    shutil.rmtree(tmp_path / "anchor")  # _save writes the anchor's export again
    export = _save(tmp_path, model, params, augment_exported=False)
    assert read_spec(export)["augments"]["kv"]["checkpoint"] == os.path.join("frozen",
                                                                             "augment_kv")
    assert not (tmp_path / "export.partial").exists()
    loaded_model, loaded = load_composition(export)
    np.testing.assert_array_equal(loaded_model.apply(loaded, TOKENS), model.apply(params, TOKENS))


def test_an_unfinished_composition_export_is_named(tmp_path):
    model = _model()
    params = _trained_params(model)
    export = _save(tmp_path, model, params)
    os.remove(os.path.join(export, COMPOSITION_FILE))
    with pytest.raises(ValueError, match=r"no composition.json .* \(it holds an unfinished "
                                         r"export: the run that wrote it stopped while "
                                         r"exporting; rerun that command"):
        load_composition(export)
    with pytest.raises(ValueError, match=r"holds an unfinished export \(params/ without "
                                         r"composition.json\)"):
        save_composition(export, params["composition"], model=model,
                         frozen={"anchor": params["anchor"], "augments": params["augments"]},
                         sources={"anchor": None, "augments": {"kv": None}}, fingerprints={})
    assert not ckpt.export_complete(export, COMPOSITION_FILE)
    ckpt.discard_incomplete_export(export, COMPOSITION_FILE)
    assert not os.path.exists(export)
