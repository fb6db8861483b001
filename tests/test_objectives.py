"""Trainer objectives: one class per mode, settings checked up front, a new mode is one class."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from calm_jax import checkpoints as ckpt
from calm_jax import trainer
from calm_jax.models import Decoder
from test_trainer import CFG, DATA, FAST


def test_every_mode_is_a_registered_objective_that_says_what_it_trains():
    assert set(trainer.MODES) == {"pretrain", "finetune", "lora", "compose"}
    assert trainer.OBJECTIVES["compose"] is trainer.ComposeObjective
    assert trainer.ComposeObjective.reads_frozen == ("anchor", "augments")
    assert trainer.PretrainObjective.reads_frozen == ()
    assert trainer.LoraObjective.describe().startswith("lora: trains low-rank adapters")
    assert "reads frozen: anchor, augments" in trainer.ComposeObjective.describe()


def test_bad_settings_are_refused_when_the_objective_is_made(tmp_path):
    spec = trainer.ModelSpec(config=CFG)
    stored = trainer.ModelSpec(checkpoint=str(tmp_path / "nowhere"))
    cases = [
        (dict(mode="distill", anchor=spec), r"mode: expected one of \('pretrain', "),
        (dict(mode="pretrain", anchor=stored), "anchor.checkpoint: expected None in mode='pretrain'"),
        (dict(mode="finetune", anchor=spec), "anchor.checkpoint: expected a model export"),
        (dict(mode="compose", anchor=spec), "augments: expected at least one augmenting model"),
        (dict(mode="finetune", anchor=stored, augments={"g": spec}),
         r"augments: expected none in mode='finetune', got \['g'\]"),
        (dict(mode="lora", anchor=spec, loss_chunk=0), "loss_chunk: expected None or a positive"),
        (dict(mode="lora", anchor=spec, frozen_layout="per_layer"),
         "frozen_layout: expected 'stacked' in mode='lora'"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            trainer.make_objective(**kw)


class FrozenEmbeddingPretrain(trainer.PretrainObjective):
    """A new mode in one class: pretraining with the token embedding frozen at its random
    initialisation (trained: everything else; frozen: the embedding, never updated)."""

    mode = "pretrain_frozen_embedding"
    trains = "every parameter but the token embedding"
    reads_frozen = ("embedding",)

    def _build(self, mesh, rules, rng):
        cfg = self.anchor.resolve("anchor")
        model = Decoder(cfg)
        full = nn.unbox(model.init(rng, np.zeros((1, 8), np.int32))["params"])
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        embedder = jax.device_put(full["embedder"], replicated)  # frozen trees are placed
        rest = lambda tree: {k: v for k, v in tree.items() if k != "embedder"}  # noqa: E731
        base = super()._build(mesh, rules, rng)

        def forward(params, frozen, batch):
            return base.forward({**params, "embedder": frozen["embedder"]}, {}, batch)

        return trainer.Setup(
            forward, rest(base.abstract_params), lambda k: rest(full), {"embedder": embedder},
            {}, base.flops_per_token,
            lambda directory, params: ckpt.save_model(directory, cfg,
                                                      {**params, "embedder": embedder}))


def test_a_new_mode_is_one_registered_class(tmp_path, monkeypatch):
    monkeypatch.setitem(trainer.OBJECTIVES, FrozenEmbeddingPretrain.mode, FrozenEmbeddingPretrain)
    out = trainer.train(mode="pretrain_frozen_embedding", model_dir=str(tmp_path), num_steps=3,
                        anchor=trainer.ModelSpec(config=CFG), dataset=DATA, **FAST)
    assert "embedder" not in out["state"]["params"]  # not trained, not in the optimizer state
    assert out["history"][-1][1]["loss"] < out["history"][0][1]["loss"]
    _, exported = ckpt.load_model(str(tmp_path / "export"))
    np.testing.assert_array_equal(exported["embedder"]["embedding"],
                                  out["frozen"]["embedder"]["embedding"])
    np.testing.assert_array_equal(exported["layers"]["mlp"]["up"]["kernel"],
                                  out["state"]["params"]["layers"]["mlp"]["up"]["kernel"])
