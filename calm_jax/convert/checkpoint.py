"""Converted models on disk: orbax params + our config + the model's tokenizer.

Layout of an output directory:

    DIR/config.json          dataclasses.asdict(TransformerConfig)
    DIR/params/              orbax StandardCheckpointer checkpoint of the float32 param tree
    DIR/tokenizer/           calm_jax.tokenizers.Tokenizer.save() (when the source has one)
    DIR/conversion.json      source path and format, parameter count, fingerprint

A converted model is a `calm_jax.checkpoints` model export plus the tokenizer and
conversion.json: the trainer loads frozen anchor / augmenting models from it with
`calm_jax.checkpoints.load_model` (a `ModelSpec.checkpoint` names DIR), and `load_converted(DIR)`
is the same load with a check of the tree against the config. The fingerprint
(`calm_jax.checkpoints.params_fingerprint`: the architecture and every parameter's bits) is the
one a composition checkpoint records for the frozen weights it was trained against.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np

from calm_jax import checkpoints as ckpt
from calm_jax.checkpoints import (CONFIG_FILE, PARAMS_DIR, config_from_dict, config_to_dict,
                                  params_fingerprint)
from calm_jax.models.config import TransformerConfig
from calm_jax.convert import common

__all__ = ["CONFIG_FILE", "PARAMS_DIR", "config_from_dict", "config_to_dict", "load_config",
           "load_converted", "load_tokenizer", "params_fingerprint", "save_converted"]

TOKENIZER_DIR = "tokenizer"
INFO_FILE = "conversion.json"


def save_converted(directory: str, cfg: TransformerConfig, params: Any, *,
                   tokenizer: Any = None, info: dict[str, Any] | None = None,
                   overwrite: bool = False) -> str:
    """Writes a converted model (a `calm_jax.checkpoints` model export plus the tokenizer and
    conversion.json); returns the absolute directory."""
    directory = os.path.abspath(directory)
    common.check_params(cfg, params, origin="save_converted")
    params_dir = os.path.join(directory, PARAMS_DIR)
    if os.path.exists(params_dir):
        if not overwrite:
            raise ValueError(f"--out: {directory} already holds a converted model "
                             f"(pass overwrite=True / --overwrite to replace it)")
        shutil.rmtree(params_dir)
    ckpt.save_model(directory, cfg, params)
    if tokenizer is not None:
        tokenizer.save(os.path.join(directory, TOKENIZER_DIR))
    meta = dict(info or {})
    meta.update(num_params=int(sum(np.size(x) for x in common.flatten(params).values())),
                fingerprint=params_fingerprint(cfg, params))
    with open(os.path.join(directory, INFO_FILE), "w") as fh:
        json.dump(meta, fh, indent=2)
    return directory


def load_config(directory: str) -> TransformerConfig:
    return ckpt.load_model_config(directory)


def load_converted(directory: str, *, target: Any = None) -> tuple[TransformerConfig, Any]:
    """(config, params) of a converted model.

    Args:
      directory: output directory of `python -m calm_jax.convert` / `save_converted`.
      target: optional pytree of `jax.ShapeDtypeStruct` (with shardings) to restore into, e.g.
        the frozen model's sharded abstract params; by default the Decoder's float32 tree on the
        default device.
    """
    import jax

    directory = os.path.abspath(directory)
    cfg = load_config(directory)
    if target is None:
        target = common.expected_params(cfg)
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, np.float32), target)
    if not os.path.isdir(os.path.join(directory, PARAMS_DIR)):
        raise ValueError(f"{directory}: no {PARAMS_DIR}/ checkpoint")
    cfg, params = ckpt.load_model(directory, target=target)
    common.check_params(cfg, params, origin=directory)
    return cfg, params


def load_tokenizer(directory: str):
    """The tokenizer saved beside a converted model (ValueError if there is none)."""
    from calm_jax.tokenizers import Tokenizer

    path = os.path.join(directory, TOKENIZER_DIR)
    if not os.path.isdir(path):
        raise ValueError(f"{directory}: no {TOKENIZER_DIR}/ (the source had no tokenizer)")
    return Tokenizer.load(path)
