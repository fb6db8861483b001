"""Importers of real pretrained checkpoints into calm_jax `Decoder` parameter trees.

    cfg, params = from_hf("path/to/hf_model_dir")      # config.json + safetensors / .bin
    cfg, params = from_gguf("path/to/model.gguf")      # llama.cpp file, dequantised
    convert(source, "gguf", out_dir)                   # = python -m calm_jax.convert ...
    cfg, params = load_converted(out_dir)              # a model export, checked
    tokenizer = load_tokenizer(out_dir)                # calm_jax.tokenizers.Tokenizer

Returned params are float32 numpy arrays laid out exactly like
`nn.unbox(init_decoder(cfg, key))['params']` (see `calm_jax.convert.common`). torch,
transformers, gguf and the tokenizer libraries are imported only inside the functions that
need them, so importing this package costs nothing beyond calm_jax itself.

Errors (unknown architecture, missing tensor, shape mismatch, unsupported quantisation, a
config feature the Decoder cannot express) are `ValueError`s naming the tensor or field.
"""

from __future__ import annotations

import os
from typing import Any

from calm_jax.convert.checkpoint import (load_config, load_converted, load_tokenizer,
                                         save_converted)
from calm_jax.convert.common import check_params, expected_params
from calm_jax.convert.gguf_models import from_gguf
from calm_jax.convert.hf import from_hf

FORMATS = ("hf", "gguf")

__all__ = ["FORMATS", "check_params", "convert", "expected_params", "from_gguf", "from_hf",
           "load_config", "load_converted", "load_source", "load_tokenizer", "save_converted"]


def load_source(source: str, fmt: str) -> tuple[Any, Any, Any]:
    """(cfg, params, tokenizer or None) of a Hugging Face directory or a GGUF file."""
    from calm_jax.tokenizers import Tokenizer

    if fmt == "hf":
        if not os.path.isdir(source):
            raise ValueError(f"--source: expected a Hugging Face model directory, got {source!r}")
        cfg, params = from_hf(source)
        has_tok = any(os.path.exists(os.path.join(source, name))
                      for name in ("tokenizer.json", "tokenizer.model"))
        return cfg, params, Tokenizer.from_hf_dir(source) if has_tok else None
    if fmt == "gguf":
        if not os.path.isfile(source):
            raise ValueError(f"--source: expected a .gguf file, got {source!r}")
        cfg, params = from_gguf(source)
        return cfg, params, Tokenizer.from_gguf(source)
    raise ValueError(f"--format: expected one of {FORMATS}, got {fmt!r}")


def convert(source: str, fmt: str, out: str, *, overwrite: bool = False) -> str:
    """Converts `source` and writes it to `out` (see `calm_jax.convert.checkpoint`)."""
    cfg, params, tokenizer = load_source(source, fmt)
    return save_converted(out, cfg, params, tokenizer=tokenizer, overwrite=overwrite,
                          info={"source": os.path.abspath(source), "format": fmt})
