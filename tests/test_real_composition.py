"""Converted models in compositions: a real pretrained pair on real text, and the trainer."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from calm_jax import trainer
from calm_jax.composition import ComposedLM
from calm_jax.data import DatasetConfig
from calm_jax.models import TransformerConfig
from convert_support import smollm2_path


def test_two_real_pretrained_models_compose_and_start_at_the_anchor(tmp_path):
    pytest.importorskip("gguf", reason="the [convert] extra reads GGUF files")
    pytest.importorskip("tokenizers", reason="the [convert] extra builds SmolLM2's tokenizer")
    from calm_jax.convert import convert, load_converted, load_tokenizer

    out = convert(smollm2_path(), "gguf", str(tmp_path / "smollm2"))
    cfg, params = load_converted(out)
    tokenizer = load_tokenizer(out)
    # The anchor and the augmenting model are both SmolLM2-135M (they must share a vocabulary).
    model = ComposedLM(cfg, {"smol": cfg})
    assert cfg.num_layers == 30  # every 4th of 30 -> 7 connections, anchor layers floor(30k/7)
    assert model.connections == {"smol": ((4, 4), (8, 8), (12, 12), (16, 17), (20, 21),
                                          (24, 25), (28, 30))}
    composed = {"anchor": params, "augments": {"smol": params},
                "composition": nn.unbox(model.init_composition(jax.random.key(0)))}
    ids = jnp.asarray([tokenizer.encode("The capital of France is")])
    logits = jax.jit(model.apply)(composed, ids)
    anchor = jax.jit(model.anchor_logits)(composed, ids)
    np.testing.assert_array_equal(logits, anchor)
    assert tokenizer.decode([int(jnp.argmax(logits[0, -1]))]) == " Paris"

    # As an export, from the command line, with the tokenizer found beside the anchor.
    from calm_jax import checkpoints
    from calm_jax.exports import save_composition

    fingerprint = checkpoints.params_fingerprint(cfg, params)
    save_composition(str(tmp_path / "export"), composed["composition"], model=model,
                     frozen=composed, sources={"anchor": out, "augments": {"smol": out}},
                     fingerprints={"anchor": fingerprint, "augments['smol']": fingerprint})
    # In its own process: the composed 30-layer decoder's programs stay out of this one.
    run = subprocess.run([sys.executable, "-m", "calm_jax.generate", "--model",
                          str(tmp_path / "export"), "--prompt", "The capital of France is",
                          "--max_new_tokens", "1", "--dtype", "float32"],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["completion"] == " Paris"


def test_trainer_composes_converted_models(tmp_path):
    from calm_jax.convert import expected_params, save_converted

    rng = np.random.RandomState(0)
    dirs = {}
    for name, cfg in (("anchor", TransformerConfig.tiny(vocab_size=128)),
                      ("augment", TransformerConfig.tiny(vocab_size=128, embed_dim=32))):
        params = jax.tree.map(lambda s: 0.05 * rng.randn(*s.shape).astype(np.float32),
                              expected_params(cfg))
        dirs[name] = save_converted(str(tmp_path / name), cfg, params)

    def arrays():
        x = np.random.RandomState(1).randint(3, 128, (16, 16)).astype(np.int32)
        return {"decoder_input_tokens": x, "decoder_target_tokens": np.roll(x, -1, 1),
                "decoder_loss_weights": np.ones((16, 16), np.float32)}

    result = trainer.train(
        mode="compose", model_dir=str(tmp_path / "calm"), num_steps=2, log_every=1,
        anchor=trainer.ModelSpec(checkpoint=dirs["anchor"]),
        augments={"aug": trainer.ModelSpec(checkpoint=dirs["augment"])},
        dataset=DatasetConfig(arrays_fn=arrays, batch_size=8, length=16),
        checkpoint=trainer.ckpt.CheckpointConfig(save_every=0, use_async=False))
    assert int(result["state"]["step"]) == 2
    assert set(result["frozen"]["augments"]) == {"aug"}
