"""A trained composition as an export: what a compose run leaves for decoding and evaluation.

`<model_dir>/export/` of a compose run holds

* `composition.json`: the composition config with its connections spelled out, and for the
  anchor and each augmenting model the model export it reads (`calm_jax.checkpoints`) and that
  export's content fingerprint (`checkpoints.params_fingerprint`);
* `params/`: the trained composition parameters (orbax), and nothing of the frozen models;
* `frozen/<name>/`: model exports of frozen models that had no export of their own (the
  randomly initialised augmenting model of the "random mA" ablation), so the export is complete.

`load_composition(directory)` rebuilds the `ComposedLM` and its full parameter tree, and
refuses frozen weights other than those the composition was trained against. The frozen
exports are referenced, not copied: move them and the export no longer loads (it says which).
An export is written whole or not at all (`checkpoints.write_atomically`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax

from calm_jax import checkpoints as ckpt
from calm_jax.composition import ComposedLM, CompositionConfig
from calm_jax.models.transformer import stack_layers

COMPOSITION_FILE = "composition.json"
FORMAT = "calm_jax.composition/1"


def _describe(name: str, source: str | None, cfg, params, fingerprint: str | None,
              directory: str, write_to: str) -> dict[str, str]:
    """{'checkpoint', 'fingerprint'} of one frozen model, saving it under frozen/ of `write_to`
    (where the export at `directory` is being written) if it has no export (a relative
    checkpoint path is relative to the composition export). An export of its own is named by
    its absolute path and, as 'relative', by its path from the composition export, so that a
    run directory moved or copied whole still loads."""
    if source is None:
        params = stack_layers(params)  # a per-layer frozen tree is saved as models are
        relative = os.path.join("frozen", name)
        ckpt.save_model(os.path.join(write_to, relative), cfg, params)
        return {"checkpoint": relative, "fingerprint": ckpt.params_fingerprint(cfg, params)}
    source = os.path.abspath(source)
    return {"checkpoint": source, "relative": os.path.relpath(source, directory),
            "fingerprint": fingerprint}


def save_composition(directory: str, params: Any, *, model: ComposedLM,
                     frozen: Mapping[str, Any], sources: Mapping[str, Any],
                     fingerprints: Mapping[str, str]) -> None:
    """Writes a composition export into `directory` (which must not hold one yet), all at once
    (`checkpoints.write_atomically`: nothing appears in `directory` until the whole export is
    there).

    Args:
      params: the trained composition tree ({augment name: ...}).
      model: the composed model it belongs to.
      frozen: the frozen trees as trained, {'anchor': ..., 'augments': {name: ...}}.
      sources: the model export each was loaded from, {'anchor': path or None,
        'augments': {name: path or None}}; None: randomly initialised (it is saved here).
      fingerprints: the loaded exports' fingerprints, keyed 'anchor' and "augments['name']".
    """
    directory = os.path.abspath(directory)
    if os.path.exists(os.path.join(directory, COMPOSITION_FILE)):
        raise ValueError(f"save_composition: {directory} already holds a composition export "
                         f"({COMPOSITION_FILE}); expected a new directory")
    taken = [name for name in (ckpt.PARAMS_DIR, "frozen")
             if os.path.exists(os.path.join(directory, name))]
    if taken:
        raise ValueError(f"save_composition: {directory} holds an unfinished export ({taken[0]}/ "
                         f"without {COMPOSITION_FILE}); expected a new directory (remove it "
                         f"to write the export again)")

    def write(path: str) -> None:
        spec = {
            "format": FORMAT,
            "anchor": _describe("anchor", sources["anchor"], model.anchor_config,
                                frozen["anchor"], fingerprints.get("anchor"), directory, path),
            "augments": {name: _describe(f"augment_{name}", sources["augments"][name], cfg,
                                         frozen["augments"][name],
                                         fingerprints.get(f"augments[{name!r}]"), directory,
                                         path)
                         for name, cfg in model.augment_configs.items()},
            "composition": {**dataclasses.asdict(model.config),
                            "connections": {n: [list(p) for p in pairs]
                                            for n, pairs in model.connections.items()}},
        }
        ckpt.save_params(os.path.join(path, ckpt.PARAMS_DIR), params)
        if jax.process_index() == 0:
            with open(os.path.join(path, COMPOSITION_FILE), "w") as f:
                json.dump(spec, f, indent=2, sort_keys=True)

    ckpt.write_atomically(directory, write, marker=COMPOSITION_FILE)


def read_spec(directory: str) -> dict[str, Any]:
    """The parsed composition.json of the export in `directory`."""
    path = os.path.join(directory, COMPOSITION_FILE)
    if not os.path.exists(path):
        unfinished = (" (it holds an unfinished export: the run that wrote it stopped while "
                      "exporting; rerun that command to write it again)"
                      if os.path.exists(os.path.join(directory, ckpt.PARAMS_DIR)) else "")
        raise ValueError(f"composition export {directory!r}: no {COMPOSITION_FILE} (expected "
                         f"the export/ directory of a finished compose run){unfinished}"
                         f"{ckpt.unfinished_note(directory)}")
    with open(path) as f:
        spec = json.load(f)
    if spec.get("format") != FORMAT:
        raise ValueError(f"{path}: format: expected {FORMAT!r}, got {spec.get('format')!r}")
    return spec


def frozen_source(directory: str, field: str, entry: Mapping[str, str]) -> str:
    """Where the model export of one frozen model of the composition export in `directory`
    is now (`entry`: its record in composition.json, `field`: 'anchor' or "augments['name']")."""
    # First where it lay relative to the composition export (a run directory moved or copied
    # whole keeps that), then at its absolute path.
    candidates = [os.path.normpath(os.path.join(directory, p))
                  for p in (entry.get("relative"), entry["checkpoint"]) if p is not None]
    found_at = [c for c in candidates if os.path.exists(os.path.join(c, ckpt.CONFIG_FILE))]
    if not found_at:
        raise ValueError(f"{COMPOSITION_FILE}: {field}: the model export it was trained "
                         f"against is not there (moved or deleted?); looked in "
                         f"{' and '.join(dict.fromkeys(candidates))}")
    return found_at[0]


def _load_frozen(directory: str, field: str, entry: Mapping[str, str], runtime):
    source = frozen_source(directory, field, entry)
    cfg, params = ckpt.load_model(source)
    found = ckpt.params_fingerprint(cfg, params)
    if found != entry["fingerprint"]:
        raise ValueError(f"{COMPOSITION_FILE}: {field}: expected the weights the composition "
                         f"was trained against (fingerprint {entry['fingerprint']}) in "
                         f"{source}, found fingerprint {found}")
    return cfg.replace(**runtime) if runtime else cfg, params


def load_composition(directory: str, **runtime) -> tuple[ComposedLM, dict[str, Any]]:
    """(model, params) of a composition export; params is the full tree
    {'anchor', 'augments', 'composition'} that `model.apply` and `calm_jax.decoding` take.

    `runtime`: TransformerConfig runtime fields (`dtype`, `attention_impl`, ...) applied to the
    anchor and every augmenting model, e.g. `dtype="float32"` to decode on a CPU.
    """
    directory = os.path.abspath(directory)
    spec = read_spec(directory)
    anchor_cfg, anchor = _load_frozen(directory, "anchor", spec["anchor"], runtime)
    augment_cfgs, augments = {}, {}
    for name, entry in spec["augments"].items():
        augment_cfgs[name], augments[name] = _load_frozen(directory, f"augments[{name!r}]",
                                                          entry, runtime)
    config = dict(spec["composition"])
    config["connections"] = {n: tuple(tuple(p) for p in pairs)
                             for n, pairs in config["connections"].items()}
    model = ComposedLM(anchor_cfg, augment_cfgs, CompositionConfig(**config))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          nn.unbox(jax.eval_shape(model.init_composition, jax.random.key(0))))
    what = f"composition export {directory!r}"
    composition = ckpt.restore_params(ckpt.check_params_dir(directory, what), target, what)
    return model, {"anchor": anchor, "augments": augments, "composition": composition}
