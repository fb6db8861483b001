r"""The paper's key-value arithmetic experiment (Table 1 and the Table 5 ablations), end to end.

    python -m calm_jax.experiments.kv_arithmetic --gin_file=experiments/kv_reproduction.gin \
        --gin.RUN_DIR="'runs/kv'"

Stages, each a `calm_jax.trainer.train` run in its own directory under `run_dir` (a finished
stage is skipped when the pipeline is run again):

  mA          pretrain on the key dictionary + KV-Substitution (it knows every key), numbers
              standing for themselves (`numeric_substitution`);
  mB          pretrain on Numeric-Arithmetic (it never sees a key);
  calm        compose mB (anchor) with mA (augment) on KV-Arithmetic over held-in keys only;
  lora        LoRA on mB, rank matched to CALM's parameter count, same data;
  finetune    full fine-tune of mB, same data;
  random_mA   CALM with a randomly initialised mA;
  fusion      the attention-free fusion variant of CALM.

Evaluation (`kv_scoring`) is greedy decoding (`calm_jax.decoding.generate`) and exact match of
the whole answer: mA, mB and CALM on KV-Substitution, Numeric-Arithmetic and KV-Arithmetic over
held-out keys (the three evaluation sets share their expressions); the ablations on
KV-Arithmetic.

Outputs in `run_dir` (`kv_report`): `results.json`, `results.md` (our numbers beside the
paper's) and `results.png` (training curves and accuracy bars).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any, Sequence

import numpy as np

from calm_jax import checkpoints as ckpt
from calm_jax import lora as lora_lib
from calm_jax import trainer
from calm_jax.composition import ComposedLM, CompositionConfig
from calm_jax.data import DatasetConfig
from calm_jax.experiments import kv_report, kv_scoring
from calm_jax.models import Decoder, TransformerConfig
from calm_jax.multi_token import MultiTokenConfig
from calm_jax.optim import OptimizerConfig
from calm_jax.partitioning import PartitioningConfig
from tasks import kv_arithmetic as kv

log = logging.getLogger("calm_jax")

EVAL_SETS = {  # our name -> (dataset, split) in tasks.kv_arithmetic
    "kv_substitution": ("kv_substitution", "validation"),
    "numeric_arithmetic": ("numeric_arithmetic", "validation"),
    "kv_arithmetic": ("kv_arithmetic_heldout", "validation"),
}
ABLATIONS = ("lora", "finetune", "random_mA", "fusion")
SEED_STRIDE = 1000  # the k-th retry of a pretraining stage trains with its seed + k * SEED_STRIDE


@dataclasses.dataclass(frozen=True)
class Stage:
    """Steps, batch and learning rate of one training stage.

    Pretraining stages only: with `min_skill` set, the model's exact match (%) on its own skill
    (`kv_scoring.OWN_SKILL`) is measured right after training, by greedy decoding of the first
    `kv_scoring.SKILL_CHECK_EXAMPLES` training prompts (the evaluation sets are not used to
    choose a model), and a model below it is trained again from scratch with the next seed, up
    to `attempts` trainings in all. The pipeline goes on with the first model that passes, else
    the best one.
    """

    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    multi_token: int = 1  # pretraining stages: tokens predicted per position (multi_token.py)
    min_skill: float | None = None
    attempts: int = 1

    def __post_init__(self):
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"Stage.attempts: expected an integer >= 1, got {self.attempts!r}")
        if self.min_skill is not None and not 0.0 <= self.min_skill <= 100.0:
            raise ValueError(f"Stage.min_skill: expected None or a percentage in [0, 100], "
                             f"got {self.min_skill!r}")
        if self.attempts > 1 and self.min_skill is None:
            raise ValueError(f"Stage.min_skill: expected a percentage when attempts > 1 (what a "
                             f"retry must reach), got None (attempts={self.attempts})")


def _features(parts: Sequence[tuple[str, str, int | None]], length: int, config: str) -> dict:
    """Feature rows of each (dataset, split, count) part, its first `count` (None: all)."""
    arrays = [{k: a[:n] for k, a in kv.numpy_features(d, s, length, config).items()}
              for d, s, n in parts]
    return {k: np.concatenate([a[k] for a in arrays]) for k in arrays[0]}


def _dataset(parts, stage: Stage, length: int, config: str) -> DatasetConfig:
    """The stage's data at the shortest length (a multiple of 8) that holds its longest example.

    `parts` are (dataset, split) or (dataset, split, count) pairs of `tasks.kv_arithmetic`;
    count None (or absent) is the whole split. Training cost on a CPU is proportional to the
    padded length, and the three stages' examples differ a lot in length (numbers only vs
    keys), so each stage gets its own.
    """
    parts = tuple((p[0], p[1], p[2] if len(p) > 2 else None) for p in parts)
    longest = max(kv.max_sequence_length(kv.get_examples(d, s, kv.CONFIGS[config])[:n])
                  for d, s, n in parts)
    if longest > length:
        raise ValueError(f"length: expected at least {longest} (the longest {parts[0][0]} "
                         f"example), got {length}")
    stage_length = min(length, -(-longest // 8) * 8)
    return DatasetConfig(arrays_fn=functools.partial(_features, parts, stage_length, config),
                         batch_size=stage.batch_size, length=stage_length)


def numeric_rows(fraction: float, kv_rows: int) -> int:
    """How many Numeric-Arithmetic rows make `fraction` of a composition set that also holds
    `kv_rows` KV-Arithmetic rows (`run(compose_numeric=...)`)."""
    return round(fraction * kv_rows / (1.0 - fraction))


def _train_stage(name: str, run_dir: str, stage: Stage, **kw) -> dict:
    path = os.path.join(run_dir, name)
    log.info("=== stage %s (%d steps) ===", name, stage.steps)
    t = time.time()
    if stage.multi_token > 1:
        kw["multi_token"] = MultiTokenConfig(depth=stage.multi_token)
    out = trainer.train(model_dir=path, num_steps=stage.steps, log_every=max(stage.steps // 10, 1),
                        optimizer=OptimizerConfig(learning_rate=stage.learning_rate,
                                                  warmup_steps=stage.warmup_steps),
                        checkpoint=ckpt.CheckpointConfig(save_every=0, use_async=False), **kw)
    return {"params": out["params"], "frozen": out["frozen"],
            "seconds": time.time() - t}


def _pretrain(name: str, run_dir: str, stage: Stage, model: TransformerConfig,
              dataset: DatasetConfig, seed: int, kv_config: str, length: int,
              partitioning: PartitioningConfig | None) -> dict:
    """Pretrains `name` in `run_dir/name` (attempt k >= 2 in `run_dir/name_attemptk`, with seed
    + (k - 1) * SEED_STRIDE) until one passes `stage.min_skill`; see `Stage`.

    Returns {'stage': the chosen attempt's directory name, 'params', 'trained': {directory name:
    `_train_stage` result}, 'attempts': [{'stage', 'seed', 'skill'}]}.
    """
    trained, attempts = {}, []
    for k in range(stage.attempts):
        stage_name = name if k == 0 else f"{name}_attempt{k + 1}"
        attempt_seed = seed + k * SEED_STRIDE
        out = _train_stage(stage_name, run_dir, stage, mode="pretrain",
                           anchor=trainer.ModelSpec(config=model), seed=attempt_seed,
                           dataset=dataset, partitioning=partitioning)
        trained[stage_name] = out
        if stage.min_skill is None:
            attempts.append({"stage": stage_name, "seed": attempt_seed, "skill": None})
            break
        skill = kv_scoring.own_skill(name, model, out["params"], kv_config, length)
        attempts.append({"stage": stage_name, "seed": attempt_seed, "skill": skill})
        if skill >= stage.min_skill:
            log.info("%s (seed %d): %.1f%% on %s (training prompts), at least %g%%", stage_name,
                     attempt_seed, skill, kv_scoring.OWN_SKILL[name], stage.min_skill)
            break
        left = stage.attempts - k - 1
        log.warning("%s (seed %d): %.1f%% on %s (training prompts), below %g%%; %s", stage_name,
                    attempt_seed, skill, kv_scoring.OWN_SKILL[name], stage.min_skill,
                    f"training it again with seed {attempt_seed + SEED_STRIDE}" if left
                    else "no attempts left, going on with the best one")
    last = attempts[-1]
    passed = last["skill"] is None or last["skill"] >= stage.min_skill
    chosen = last if passed else max(attempts, key=lambda a: a["skill"])
    return {"stage": chosen["stage"], "params": trained[chosen["stage"]]["params"],
            "trained": trained, "attempts": attempts}


def run(*, run_dir: str, augment_model: TransformerConfig, anchor_model: TransformerConfig,
        kv_config: str = "laptop", length: int = 48,
        connections: Sequence[tuple[int, int]] | None = None,
        rope_theta: float | None = None,
        partitioning: PartitioningConfig | None = None,
        pretrain_augment: Stage = Stage(), pretrain_anchor: Stage = Stage(),
        compose: Stage = Stage(), ablations: Sequence[str] = ABLATIONS,
        compose_numeric: float = 0.0, eval_examples: int = 500, seed: int = 0) -> dict:
    """Runs every stage and writes results.json / results.md / results.png into run_dir.

    `connections` and `rope_theta` configure CALM's cross-attention (`CompositionConfig`; the
    fusion ablation has no positions); `partitioning` is every stage's mesh (default: all
    devices, data parallel).

    `compose_numeric` is the fraction of the composition data (CALM's and every ablation's)
    that is Numeric-Arithmetic, mB's own training examples with their bare answers, so that
    the composition also sees prompts on which it should leave mB alone. 0 (the default) is
    the paper's data, KV-Arithmetic over held-in keys only.
    """
    bad = [a for a in ablations if a not in ABLATIONS]
    if bad:
        raise ValueError(f"ablations: expected a subset of {ABLATIONS}, got {bad}")
    if not 0.0 <= compose_numeric < 1.0:
        raise ValueError(f"compose_numeric: expected a fraction in [0, 1), "
                         f"got {compose_numeric!r}")
    if kv_config not in kv.CONFIGS:
        raise ValueError(f"kv_config: expected one of {sorted(kv.CONFIGS)}, got {kv_config!r}")
    if compose.multi_token != 1:
        raise ValueError(f"compose.multi_token: expected 1 (extra heads are a pretraining loss), "
                         f"got {compose.multi_token}")
    if compose.min_skill is not None or compose.attempts != 1:
        raise ValueError(f"compose: expected min_skill=None and attempts=1 (a pretraining check), "
                         f"got min_skill={compose.min_skill!r}, attempts={compose.attempts!r}")
    for stage_name, stage in (("pretrain_augment", pretrain_augment),
                              ("pretrain_anchor", pretrain_anchor)):
        if not isinstance(stage.multi_token, int) or stage.multi_token < 1:
            raise ValueError(f"{stage_name}.multi_token: expected an integer >= 1, "
                             f"got {stage.multi_token!r}")
    for name, cfg in (("augment_model", augment_model), ("anchor_model", anchor_model)):
        if cfg.vocab_size < kv.BYTE_VOCAB_SIZE:
            raise ValueError(f"{name}.vocab_size: expected at least {kv.BYTE_VOCAB_SIZE} "
                             f"(byte vocabulary), got {cfg.vocab_size}")
    composition = CompositionConfig(connections={"mA": tuple(connections)} if connections else {},
                                    rope_theta=rope_theta)
    fusion = dataclasses.replace(composition, kind="fusion", rope_theta=None)
    # The stages' data (and their lengths) are checked before anything is trained or written.
    ma_ds = _dataset([("kv_dictionary", "train"), ("kv_substitution", "train"),
                      ("numeric_substitution", "train")],
                     pretrain_augment, length, kv_config)
    mb_ds = _dataset([("numeric_arithmetic", "train")], pretrain_anchor, length, kv_config)
    kv_rows = len(kv.get_examples("kv_arithmetic_heldin", "train", kv.CONFIGS[kv_config]))
    num_rows = numeric_rows(compose_numeric, kv_rows)
    available = len(kv.get_examples("numeric_arithmetic", "train", kv.CONFIGS[kv_config]))
    if num_rows > available:
        most = available / (available + kv_rows)
        raise ValueError(f"compose_numeric: expected at most {most:.3f}"
                         f" ({available} Numeric-Arithmetic training examples beside {kv_rows} "
                         f"KV-Arithmetic ones), got {compose_numeric!r}")
    dc = _dataset([("kv_arithmetic_heldin", "train")]
                  + ([("numeric_arithmetic", "train", num_rows)] if num_rows else []),
                  compose, length, kv_config)
    os.makedirs(run_dir, exist_ok=True)
    t0 = time.time()
    results: dict[str, Any] = {"stages": {}, "accuracy": {}, "ablations": {}}

    stages = {}
    pretrained = {
        name: _pretrain(name, run_dir, stage, cfg, ds, stage_seed, kv_config, length, partitioning)
        for name, stage, cfg, ds, stage_seed in (
            ("mA", pretrain_augment, augment_model, ma_ds, seed),
            ("mB", pretrain_anchor, anchor_model, mb_ds, seed + 1))}
    for p in pretrained.values():
        stages.update(p["trained"])
    results["pretraining"] = {name: {"chosen": p["stage"], "attempts": p["attempts"]}
                              for name, p in pretrained.items()}
    ma_spec = trainer.ModelSpec(checkpoint=os.path.join(run_dir, pretrained["mA"]["stage"],
                                                        "export"))
    mb_spec = trainer.ModelSpec(checkpoint=os.path.join(run_dir, pretrained["mB"]["stage"],
                                                        "export"))
    common = dict(anchor=mb_spec, dataset=dc, seed=seed + 2, partitioning=partitioning)
    stages["calm"] = _train_stage("calm", run_dir, compose, mode="compose",
                                  augments={"mA": ma_spec}, composition=composition, **common)
    extra = {
        "lora": dict(mode="lora", augments={"mA": ma_spec}, composition=composition),
        "finetune": dict(mode="finetune"),
        "random_mA": dict(mode="compose", augments={"mA": trainer.ModelSpec(
            config=augment_model)}, composition=composition),
        "fusion": dict(mode="compose", augments={"mA": ma_spec}, composition=fusion),
    }
    for name in ablations:
        stages[name] = _train_stage(name, run_dir, compose, **extra[name], **common)
    results["stages"] = {k: {"seconds": round(v["seconds"], 1)} for k, v in stages.items()}

    # Evaluation ---------------------------------------------------------------------------
    cfg = kv.CONFIGS[kv_config]
    evals = {k: kv.get_examples(d, s, cfg)[:eval_examples] for k, (d, s) in EVAL_SETS.items()}
    max_new = 1 + max(len(kv.encode_text(e["targets"])) for ex in evals.values() for e in ex)
    results["samples"], results["errors"] = {}, {}

    def decode(model, params, examples, eval_set, name):
        """Accuracy of one model on one set; its first generations go into results."""
        predictions = kv_scoring.greedy_decode(model, params, examples, length=length,
                                               max_new=max_new)
        results["samples"].setdefault(name, {})[eval_set] = [
            {"inputs": e["inputs"], "target": e["targets"], "generated": p}
            for e, p in zip(examples[:3], predictions)]
        errors = (kv_scoring.scratchpad_errors(predictions, examples, cfg)
                  if eval_set != "kv_substitution" else None)
        if errors is not None:
            results["errors"].setdefault(name, {})[eval_set] = errors
        return kv_scoring.score(eval_set, predictions, examples, cfg)

    ma_params, mb_params = pretrained["mA"]["params"], pretrained["mB"]["params"]
    calm_model = ComposedLM(anchor_model, {"mA": augment_model}, composition)
    frozen = {"anchor": mb_params, "augments": {"mA": ma_params}}
    models = {
        "mA": (Decoder(augment_model), ma_params),
        "mB": (Decoder(anchor_model), mb_params),
        "CALM": (calm_model, {**frozen, "composition": stages["calm"]["params"]}),
    }
    for name, (model, params) in models.items():
        results["accuracy"][name] = {
            k: decode(model, params, ex, k, name) for k, ex in evals.items()}
        log.info("%s: %s", name, results["accuracy"][name])
    for warning in kv_scoring.pretraining_warnings(results["accuracy"]):
        log.warning(warning)
    fusion_model = ComposedLM(anchor_model, {"mA": augment_model}, fusion)
    for name in ablations:
        p, used = stages[name]["params"], stages[name]["frozen"]
        if name == "lora":
            model, params = Decoder(anchor_model), lora_lib.merge(mb_params, p,
                                                                  lora_lib.LoraConfig())
        elif name == "finetune":
            model, params = Decoder(anchor_model), p
        else:
            model = calm_model if name == "random_mA" else fusion_model
            params = {**used, "composition": p}
        results["ablations"][name] = decode(model, params, evals["kv_arithmetic"],
                                            "kv_arithmetic", name)
        log.info("%s on KV-Arithmetic: %.1f", name, results["ablations"][name])
    results["ablations"]["CALM"] = results["accuracy"]["CALM"]["kv_arithmetic"]
    results["value_probe"] = kv_scoring.value_probe(augment_model, ma_params, kv_config)
    log.info("mA value probe (%% by layer): %s", results["value_probe"])
    results["config"] = {"kv_config": kv_config, "length": length, "eval_examples": eval_examples,
                         "compose_numeric": compose_numeric,
                         "compose_rows": {"kv_arithmetic_heldin": kv_rows,
                                          "numeric_arithmetic": num_rows},
                         "connections": {k: list(v) for k, v in calm_model.connections.items()},
                         "rope_theta": rope_theta,
                         "augment_model": ckpt.config_to_dict(augment_model),
                         "anchor_model": ckpt.config_to_dict(anchor_model),
                         "stages": {n: dataclasses.asdict(s) for n, s in (
                             ("pretrain_augment", pretrain_augment),
                             ("pretrain_anchor", pretrain_anchor), ("compose", compose))}}
    results["seconds"] = round(time.time() - t0, 1)
    kv_report.write_reports(run_dir, results)
    return results


def main(argv: Sequence[str]) -> dict:
    import gin
    from calm_jax.train import parse_gin, split_args

    files, bindings, rest = split_args(argv)
    if rest or not files:
        raise ValueError(f"arguments: expected --gin_file=... and --gin.KEY=VALUE, got {argv}")
    parse_gin(files, bindings)
    # Gin registered this module under its import name, not as __main__.
    from calm_jax.experiments import kv_arithmetic as registered

    return gin.get_configurable(registered.run)()


if __name__ == "__main__":
    from calm_jax.train import run_cli

    run_cli(main)
