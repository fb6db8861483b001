"""The key-value experiment's pipeline end to end: plumbing at a smoke-test scale, and a CI-scale
reproduction in which CALM must answer what neither model can."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import FAST_COMPILE_FLAG

from calm_jax.experiments import kv_arithmetic as kvx
from calm_jax.experiments import kv_report
from calm_jax.models import TransformerConfig
from calm_jax.partitioning import PartitioningConfig
from tasks import kv_arithmetic as kv

TINY_STEPS = {"mA": 1500, "mB": 1500, "calm": 800}


def test_pipeline_trains_every_stage_and_writes_its_reports(tmp_path, monkeypatch):
    model = TransformerConfig.tiny(vocab_size=384, embed_dim=32, num_layers=2, num_heads=2,
                                   num_kv_heads=2, mlp_dim=64, max_len=32)
    stage = kvx.Stage(steps=6, batch_size=16, learning_rate=3e-3, warmup_steps=0)
    # mA's check passes at once; six steps cannot teach mB arithmetic, so it trains twice, and
    # they cannot teach a composition KV-Arithmetic over the development keys: CALM and the
    # fusion ablation train twice too.
    results = kvx.run(run_dir=str(tmp_path), augment_model=model, anchor_model=model,
                      kv_config="tiny_scratchpad", length=32, connections=((1, 1), (2, 2)),
                      pretrain_augment=dataclasses.replace(stage, min_skill=0.0, attempts=3),
                      pretrain_anchor=dataclasses.replace(stage, min_skill=90.0, attempts=2),
                      compose=dataclasses.replace(stage, min_skill=90.0, attempts=2),
                      ablations=("fusion",), compose_numeric=0.2, eval_examples=16, seed=5)
    assert set(results["stages"]) == {"mA", "mB", "mB_attempt2", "calm", "calm_attempt2",
                                      "fusion", "fusion_attempt2"}
    pre = results["pretraining"]
    assert [(a["stage"], a["seed"]) for a in pre["mA"]["attempts"]] == [("mA", 5)]
    assert [(a["stage"], a["seed"]) for a in pre["mB"]["attempts"]] == [("mB", 6),
                                                                        ("mB_attempt2", 1006)]
    assert all(a["skill"] < 90.0 for a in pre["mB"]["attempts"])
    best = max(pre["mB"]["attempts"], key=lambda a: a["skill"])
    assert pre["mB"]["chosen"] == best["stage"]  # none passed: the best one is composed
    assert os.path.exists(tmp_path / "mB_attempt2" / "export" / "config.json")
    for name in ("calm", "fusion"):  # composition seed: seed + 2, then + SEED_STRIDE
        checked = results["composition"][name]
        assert [(a["stage"], a["seed"]) for a in checked["attempts"]] == [
            (name, 7), (f"{name}_attempt2", 1007)]
        assert all(0.0 <= a["skill"] < 90.0 for a in checked["attempts"])
        assert checked["chosen"] == max(checked["attempts"], key=lambda a: a["skill"])["stage"]
        assert os.path.exists(tmp_path / f"{name}_attempt2" / "export" / "composition.json")
    for model_name in ("mA", "mB", "CALM"):
        accuracy = results["accuracy"][model_name]
        assert set(accuracy) == set(kv_report.PAPER_TABLE1)
        assert all(0.0 <= v <= 100.0 for v in accuracy.values())
    assert set(results["ablations"]) == {"fusion", "CALM"}
    for stage_name in results["stages"]:
        assert os.path.exists(tmp_path / stage_name / "metrics.jsonl")
    assert os.path.exists(tmp_path / "mA" / "export" / "config.json")
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["accuracy"] == results["accuracy"]
    table = (tmp_path / "results.md").read_text()
    assert "| kv_arithmetic |" in table and "(84.3)" in table  # beside the paper's number
    probe = results["value_probe"]
    assert len(probe["heldin"]) == len(probe["heldout"]) == 3  # embeddings + 2 layers
    assert all(0.0 <= v <= 100.0 for v in probe["heldin"] + probe["heldout"])
    assert "| heldout |" in table
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Six steps teach neither model its own skill, and the report says so.
    assert "**Warning**: mA reached" in table and "**Warning**: mB reached" in table
    assert "| mB | mB_attempt2 | 1006 |" in table
    assert "| calm | calm_attempt2 | 1007 |" in table
    # A fifth of the composition data is Numeric-Arithmetic (mB's own), and the report says so.
    kv_rows = len(kv.get_examples("kv_arithmetic_heldin", "train", kv.TINY_SCRATCHPAD))
    rows = {"kv_arithmetic_heldin": kv_rows, "numeric_arithmetic": round(kv_rows / 4)}
    assert results["config"]["compose_rows"] == rows
    assert (f"{rows['kv_arithmetic_heldin']} KV-Arithmetic examples over held-in keys and "
            f"{rows['numeric_arithmetic']} Numeric-Arithmetic ones") in table
    # Run again in the same directory: every stage is done, nothing trains or decodes again.
    def no_training(**kw):
        raise AssertionError(f"trained again: {kw['model_dir']}")

    monkeypatch.setattr(kvx.trainer, "train", no_training)
    monkeypatch.setattr(kvx.kv_scoring, "greedy_decode", no_training)
    again = kvx.run(run_dir=str(tmp_path), augment_model=model, anchor_model=model,
                    kv_config="tiny_scratchpad", length=32, connections=((1, 1), (2, 2)),
                    pretrain_augment=dataclasses.replace(stage, min_skill=0.0, attempts=3),
                    pretrain_anchor=dataclasses.replace(stage, min_skill=90.0, attempts=2),
                    compose=dataclasses.replace(stage, min_skill=90.0, attempts=2),
                    ablations=("fusion",), compose_numeric=0.2, eval_examples=16, seed=5)
    for key in ("accuracy", "ablations", "pretraining", "composition", "stages",
                "value_probe"):
        assert again[key] == results[key]


def test_bad_experiment_settings_raise_before_training(tmp_path):
    model = TransformerConfig.tiny(vocab_size=384)
    with pytest.raises(ValueError, match="ablations: expected a subset of"):
        kvx.run(run_dir=str(tmp_path), augment_model=model, anchor_model=model,
                ablations=("dropout",))
    with pytest.raises(ValueError, match="anchor_model.vocab_size: expected at least 259"):
        kvx.run(run_dir=str(tmp_path), augment_model=model,
                anchor_model=model.replace(vocab_size=128))
    with pytest.raises(ValueError, match=r"length: expected at least \d+ \(the longest kv_"):
        kvx.run(run_dir=str(tmp_path), augment_model=model, anchor_model=model,
                kv_config="tiny", length=12)
    # The laptop config's evaluation expressions use every held-out key: nothing to check on.
    with pytest.raises(ValueError, match="compose.min_skill: expected None with kv_config "
                                         "'laptop' .it has no development keys"):
        kvx.run(run_dir=str(tmp_path), augment_model=model, anchor_model=model,
                compose=kvx.Stage(min_skill=90.0))
    with pytest.raises(ValueError, match=r"compose_numeric: expected a fraction in \[0, 1\), "
                                         r"got 1.0"):
        kvx.run(run_dir=str(tmp_path), augment_model=model, anchor_model=model,
                compose_numeric=1.0)
    with pytest.raises(ValueError, match=r"compose_numeric_format: expected 'bare' or "
                                         r"'written', got 'numbers'"):
        kvx.run(run_dir=str(tmp_path), augment_model=model, anchor_model=model,
                compose_numeric=0.1, compose_numeric_format="numbers")
    # Laptop config: 100000 numeric examples beside 8000 on keys, at most 92.6% of the data.
    with pytest.raises(ValueError, match=r"compose_numeric: expected at most 0.926 \(100000 "
                                         r"Numeric-Arithmetic training examples beside 8000 "
                                         r"KV-Arithmetic ones\), got 0.95"):
        kvx.run(run_dir=str(tmp_path), augment_model=model, anchor_model=model,
                kv_config="laptop_scratchpad", compose_numeric=0.95)
    assert not os.listdir(tmp_path)
    with pytest.raises(ValueError, match="Stage.min_skill: expected a percentage when attempts"):
        kvx.Stage(attempts=2)
    with pytest.raises(ValueError, match=r"Stage.min_skill: expected None or a percentage in "
                                         r"\[0, 100\], got 150"):
        kvx.Stage(min_skill=150, attempts=2)
    with pytest.raises(ValueError, match="Stage.attempts: expected an integer >= 1, got 0"):
        kvx.Stage(attempts=0)


def test_each_stage_gets_the_shortest_length_that_holds_its_data():
    stage = kvx.Stage(batch_size=8)
    numeric = kvx._dataset([("numeric_arithmetic", "train")], stage, 48, "laptop_2op")
    keys = kvx._dataset([("kv_arithmetic_heldin", "train")], stage, 48, "laptop_2op")
    # "123+045=" + 4 answer digits + EOS = 13 tokens -> 16; keys of up to 6 letters -> 24.
    assert numeric.length == 16 and keys.length == 24
    batch = numeric.arrays_fn()
    assert batch["decoder_target_tokens"].shape[1] == 16
    longest = max(len(kv.encode_text(e["inputs"] + e["targets"])) + 1
                  for e in kv.get_examples("numeric_arithmetic", "train", kv.LAPTOP_2OP))
    assert longest == 13


def test_composition_data_mixes_in_the_first_numeric_examples():
    """`compose_numeric`'s data: every KV-Arithmetic row, then the first n numeric rows."""
    assert kvx.numeric_rows(0.2, 8000) == 2000 and kvx.numeric_rows(0.0, 8000) == 0
    stage = kvx.Stage(batch_size=8)
    mixed = kvx._dataset([("kv_arithmetic_heldin", "train"), ("numeric_arithmetic", "train", 300)],
                         stage, 48, "laptop_2op")
    assert mixed.length == 24  # the keys' length: the numeric rows are shorter
    rows = mixed.arrays_fn()
    keys = kv.numpy_features("kv_arithmetic_heldin", "train", 24, "laptop_2op")
    numeric = kv.numpy_features("numeric_arithmetic", "train", 24, "laptop_2op")
    n_keys = len(keys["decoder_input_tokens"])
    for name, array in rows.items():
        assert len(array) == n_keys + 300
        np.testing.assert_array_equal(array[:n_keys], keys[name])
        np.testing.assert_array_equal(array[n_keys:], numeric[name][:300])


def _tiny_reproduction(run_dir: str) -> dict:
    model = TransformerConfig(vocab_size=384, embed_dim=48, num_layers=4, num_heads=4,
                              mlp_dim=144, max_len=32, norm="rmsnorm", activation="silu",
                              gated_mlp=True, position="rope")
    stage = lambda steps: kvx.Stage(steps=steps, batch_size=32, learning_rate=3e-3)  # noqa: E731
    return kvx.run(run_dir=run_dir, augment_model=model, anchor_model=model,
                   kv_config="tiny_scratchpad", length=32, connections=((2, 3), (4, 4)),
                   rope_theta=10000.0, pretrain_augment=stage(TINY_STEPS["mA"]),
                   pretrain_anchor=stage(TINY_STEPS["mB"]), compose=stage(TINY_STEPS["calm"]),
                   ablations=(), eval_examples=60, partitioning=PartitioningConfig(num_devices=1))


# The reproduction trains for minutes: it runs in a process of its own with XLA's default CPU
# optimisation level, not the fast-compiling level 0 of the rest of the suite (conftest.py).
DEFAULT_LEVEL_ENV = {**os.environ, "XLA_FLAGS": " ".join(
    f for f in os.environ.get("XLA_FLAGS", "").split() if f != FAST_COMPILE_FLAG)}


def test_tiny_reproduction_composes_what_neither_model_can(tmp_path):
    """The whole pipeline at CI scale (tasks.kv_arithmetic.TINY_SCRATCHPAD: 96 keys, 19 of them
    held in, two-digit values): CALM answers KV-Arithmetic over held-out keys, which mB cannot
    (it never saw a key) and mA cannot (it substitutes but does no arithmetic)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_kv_experiment as t; "
            "t._tiny_reproduction(sys.argv[2])")
    proc = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__), str(tmp_path)],
                          env=DEFAULT_LEVEL_ENV, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    acc = results["accuracy"]
    assert acc["mA"]["kv_substitution"] >= 50.0  # mA learned the keys ...
    assert acc["mB"]["numeric_arithmetic"] >= 50.0  # ... mB the arithmetic ...
    assert acc["mB"]["kv_arithmetic"] == 0.0 and acc["mA"]["kv_arithmetic"] == 0.0
    assert acc["CALM"]["kv_arithmetic"] >= 10.0  # ... and CALM both, on keys it never saw
    errors = results["errors"]["CALM"]  # every arithmetic answer has one kind
    for key in ("numeric_arithmetic", "kv_arithmetic"):
        assert errors[key]["correct"] == pytest.approx(acc["CALM"][key])
        assert sum(errors[key].values()) == pytest.approx(100.0)
    assert "| CALM | kv_arithmetic |" in (tmp_path / "results.md").read_text()
