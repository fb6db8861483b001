r"""The paper's key-value arithmetic experiment (Table 1 and the Table 5 ablations), end to end.

    python -m calm_jax.experiments.kv_arithmetic --gin_file=experiments/kv_reproduction.gin \
        --gin.RUN_DIR="'runs/kv'"

Stages of a `calm_jax.experiments.pipeline.Pipeline`, each a `calm_jax.trainer.train` run in
its own directory under `run_dir` (a finished stage, recorded in `run_dir/pipeline.json`, is
skipped when the experiment runs again; one killed midway resumes from its checkpoints):

  mA          pretrain on the key dictionary + KV-Substitution (it knows every key), numbers
              standing for themselves (`numeric_substitution`);
  mB          pretrain on Numeric-Arithmetic (it never sees a key);
  calm        compose mB (anchor) with mA (augment) on KV-Arithmetic over held-in keys only,
              checked on KV-Arithmetic over the development keys (`Stage.min_skill`);
  lora        LoRA on mB, rank matched to CALM's parameter count, same data;
  finetune    full fine-tune of mB, same data;
  random_mA   CALM with a randomly initialised mA;
  fusion      the attention-free fusion variant of CALM (checked as CALM is);
  evaluate    every model read back from its stage's export and scored.

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
from typing import Any, Mapping, Sequence

import numpy as np

from calm_jax import checkpoints as ckpt
from calm_jax import trainer
from calm_jax.composition import ComposedLM, CompositionConfig
from calm_jax.data import DatasetConfig
from calm_jax.experiments import kv_report, kv_scoring
from calm_jax.experiments import pipeline as pl
from calm_jax.exports import load_composition
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
# The ablations that compose the trained mA get CALM's check and retries (`Stage.min_skill` of
# `compose`); LoRA, the fine-tune and the random mA cannot read a held-out key's value whatever
# their seed, so a retry would only repeat a score near 0.
CHECKED_ABLATIONS = ("fusion",)
SEED_STRIDE = 1000  # the k-th retry of a pretraining stage trains with its seed + k * SEED_STRIDE


@dataclasses.dataclass(frozen=True)
class Stage:
    """Steps, batch and learning rate of one training stage, and its check.

    With `min_skill` set, a model's exact match (%) is measured right after it trains, by greedy
    decoding of `kv_scoring.SKILL_CHECK_EXAMPLES` prompts that no evaluation set holds, and a
    model below it is trained again from scratch with the next seed, up to `attempts` trainings
    in all. The pipeline goes on with the first model that passes, else the best one.

    * pretraining (mA, mB): the model's own skill (`kv_scoring.OWN_SKILL`) on its training
      prompts;
    * composition (CALM and the fusion ablation, the two that compose the trained mA):
      KV-Arithmetic over the development keys (`kv_scoring.composition_skill`), held-out keys
      that no evaluation expression uses. A composition that fits its held-in keys without
      learning to read mA fails here; its training data cannot show it.
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


def _train(directory: str, stage: Stage, **kw) -> dict:
    """One `trainer.train` run in `directory`; {'export': its export directory}."""
    if stage.multi_token > 1:
        kw["multi_token"] = MultiTokenConfig(depth=stage.multi_token)
    trainer.train(model_dir=directory, num_steps=stage.steps,
                  log_every=max(stage.steps // 10, 1),
                  optimizer=OptimizerConfig(learning_rate=stage.learning_rate,
                                            warmup_steps=stage.warmup_steps),
                  checkpoint=ckpt.CheckpointConfig(save_every=0, use_async=False), **kw)
    return {"export": os.path.join(directory, "export")}


def _pretrain_stage(name: str, stage: Stage, model: TransformerConfig, dataset: DatasetConfig,
                    seed: int, kv_config: str, length: int,
                    partitioning: PartitioningConfig | None) -> pl.Stage:
    """Pretraining of mA or mB, checked on its own skill when `stage.min_skill` is set."""
    def fn(run: pl.StageRun) -> dict:
        out = _train(run.directory, stage, mode="pretrain",
                     anchor=trainer.ModelSpec(config=model), seed=seed + run.seed_offset,
                     dataset=dataset, partitioning=partitioning)
        return {**out, "seed": seed + run.seed_offset}

    def measure(run: pl.StageRun, result: dict) -> float:
        _, params = ckpt.load_model(result["export"])
        return kv_scoring.own_skill(name, model, params, kv_config, length)

    check = None if stage.min_skill is None else pl.SkillCheck(
        measure, stage.min_skill, stage.attempts, SEED_STRIDE)
    return pl.Stage(name, "pretrain", fn, cost=stage.steps, check=check)


def _evaluate(run_dir: str, done: dict[str, pl.StageResult], *, kv_config: str, length: int,
              eval_examples: int, ablations: Sequence[str]) -> dict:
    """Greedy decoding and exact match of every model, read back from the stages' exports:
    mA, mB and CALM on the three sets, the ablations on KV-Arithmetic over held-out keys."""
    cfg = kv.CONFIGS[kv_config]
    evals = {k: kv.get_examples(d, s, cfg)[:eval_examples] for k, (d, s) in EVAL_SETS.items()}
    max_new = 1 + max(len(kv.encode_text(e["targets"])) for ex in evals.values() for e in ex)
    out: dict[str, Any] = {"accuracy": {}, "ablations": {}, "samples": {}, "errors": {}}

    def decode(model, params, examples, eval_set, name):
        """Accuracy of one model on one set; its first generations go into the results."""
        predictions = kv_scoring.greedy_decode(model, params, examples, length=length,
                                               max_new=max_new)
        out["samples"].setdefault(name, {})[eval_set] = [
            {"inputs": e["inputs"], "target": e["targets"], "generated": p}
            for e, p in zip(examples[:3], predictions)]
        errors = (kv_scoring.scratchpad_errors(predictions, examples, cfg)
                  if eval_set != "kv_substitution" else None)
        if errors is not None:  # None: answers without a scratchpad
            out["errors"].setdefault(name, {})[eval_set] = errors
        return kv_scoring.score(eval_set, predictions, examples, cfg)

    def export(stage: str) -> str:
        return done[stage].result["export"]

    ma_cfg, ma_params = ckpt.load_model(export("mA"))
    models = {"mA": (Decoder(ma_cfg), ma_params)}
    mb_cfg, mb_params = ckpt.load_model(export("mB"))
    models["mB"] = (Decoder(mb_cfg), mb_params)
    models["CALM"] = load_composition(export("calm"))
    for name, (model, params) in models.items():
        out["accuracy"][name] = {k: decode(model, params, ex, k, name)
                                 for k, ex in evals.items()}
        log.info("%s: %s", name, out["accuracy"][name])
    for warning in kv_scoring.pretraining_warnings(out["accuracy"]):
        log.warning(warning)
    for name in ablations:
        if name in ("lora", "finetune"):  # a model export (LoRA merged into mB's weights)
            cfg_, params = ckpt.load_model(export(name))
            model = Decoder(cfg_)
        else:
            model, params = load_composition(export(name))
        out["ablations"][name] = decode(model, params, evals["kv_arithmetic"],
                                        "kv_arithmetic", name)
        log.info("%s on KV-Arithmetic: %.1f", name, out["ablations"][name])
    out["ablations"]["CALM"] = out["accuracy"]["CALM"]["kv_arithmetic"]
    out["value_probe"] = kv_scoring.value_probe(ma_cfg, ma_params, kv_config)
    log.info("mA value probe (%% by layer): %s", out["value_probe"])
    return out


def run(*, run_dir: str, augment_model: TransformerConfig, anchor_model: TransformerConfig,
        kv_config: str = "laptop", length: int = 48,
        connections: Sequence[tuple[int, int]] | None = None,
        rope_theta: float | None = None,
        partitioning: PartitioningConfig | None = None,
        pretrain_augment: Stage = Stage(), pretrain_anchor: Stage = Stage(),
        compose: Stage = Stage(), ablations: Sequence[str] = ABLATIONS,
        compose_numeric: float = 0.0, compose_numeric_format: str = "bare",
        eval_examples: int = 500, seed: int = 0) -> dict:
    """Runs every stage (`calm_jax.experiments.pipeline`: a finished stage is skipped when the
    experiment runs again in the same `run_dir`) and writes results.json / results.md /
    results.png into run_dir.

    `connections` and `rope_theta` configure CALM's cross-attention (`CompositionConfig`; the
    fusion ablation has no positions); `partitioning` is every stage's mesh (default: all
    devices, data parallel).

    `compose_numeric` is the fraction of the composition data (CALM's and every ablation's)
    that is Numeric-Arithmetic, mB's own training examples with their bare answers, so that
    the composition also sees prompts on which it should leave mB alone. 0 (the default) is
    the paper's data, KV-Arithmetic over held-in keys only. `compose_numeric_format` is how
    those examples are written: "bare", mB's own training examples (context words, the bare
    answer: `ehaca-071=463-229=` -> `4320`), or "written", the numeric expression written as
    KV-Arithmetic's target is (`463-229=` -> `463-229=4320` with a scratchpad config), so
    that the composed model writes every expression the same way.
    """
    bad = [a for a in ablations if a not in ABLATIONS]
    if bad:
        raise ValueError(f"ablations: expected a subset of {ABLATIONS}, got {bad}")
    if not 0.0 <= compose_numeric < 1.0:
        raise ValueError(f"compose_numeric: expected a fraction in [0, 1), "
                         f"got {compose_numeric!r}")
    numeric_dataset = {"bare": "numeric_arithmetic",
                       "written": "numeric_arithmetic_written"}.get(compose_numeric_format)
    if numeric_dataset is None:
        raise ValueError(f"compose_numeric_format: expected 'bare' or 'written', "
                         f"got {compose_numeric_format!r}")
    if kv_config not in kv.CONFIGS:
        raise ValueError(f"kv_config: expected one of {sorted(kv.CONFIGS)}, got {kv_config!r}")
    if compose.multi_token != 1:
        raise ValueError(f"compose.multi_token: expected 1 (extra heads are a pretraining loss), "
                         f"got {compose.multi_token}")
    if compose.min_skill is not None and not kv.dev_keys(kv.CONFIGS[kv_config]):
        raise ValueError(f"compose.min_skill: expected None with kv_config {kv_config!r} (it "
                         f"has no development keys to check a composition on: every held-out "
                         f"key is in an evaluation expression), got {compose.min_skill!r}")
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
    available = len(kv.get_examples(numeric_dataset, "train", kv.CONFIGS[kv_config]))
    if num_rows > available:
        most = available / (available + kv_rows)
        raise ValueError(f"compose_numeric: expected at most {most:.3f}"
                         f" ({available} Numeric-Arithmetic training examples beside {kv_rows} "
                         f"KV-Arithmetic ones), got {compose_numeric!r}")
    dc = _dataset([("kv_arithmetic_heldin", "train")]
                  + ([(numeric_dataset, "train", num_rows)] if num_rows else []),
                  compose, length, kv_config)

    def spec(done: Mapping[str, pl.StageResult], name: str) -> trainer.ModelSpec:
        return trainer.ModelSpec(checkpoint=done[name].result["export"])

    def composed(mode: str, augment: str | None, comp: CompositionConfig | None):
        """A composition-data stage on mB (and mA, or a random mA when `augment` is None)."""
        def fn(run: pl.StageRun) -> dict:
            kw = {}
            if mode != "finetune":
                kw = {"augments": {"mA": spec(run.results, "mA") if augment else
                                   trainer.ModelSpec(config=augment_model)},
                      "composition": comp}
            return _train(run.directory, compose, mode=mode, anchor=spec(run.results, "mB"),
                          dataset=dc, seed=seed + 2 + run.seed_offset,
                          partitioning=partitioning, **kw)
        return fn

    def composition_skill(run: pl.StageRun, result: dict) -> float:
        return kv_scoring.composition_skill(*load_composition(result["export"]), kv_config,
                                            length)

    compose_check = None if compose.min_skill is None else pl.SkillCheck(
        composition_skill, compose.min_skill, compose.attempts, SEED_STRIDE)

    variants = {"lora": ("lora", "mA", composition), "finetune": ("finetune", None, None),
                "random_mA": ("compose", None, composition),
                "fusion": ("compose", "mA", fusion)}
    eval_cost = 0.1 * (pretrain_augment.steps + pretrain_anchor.steps)  # for the ETA only
    stages = [
        _pretrain_stage("mA", pretrain_augment, augment_model, ma_ds, seed, kv_config, length,
                        partitioning),
        _pretrain_stage("mB", pretrain_anchor, anchor_model, mb_ds, seed + 1, kv_config, length,
                        partitioning),
        pl.Stage("calm", "compose", composed("compose", "mA", composition), cost=compose.steps,
                 check=compose_check),
        *[pl.Stage(name, "baselines", composed(*variants[name]), cost=compose.steps,
                   check=compose_check if name in CHECKED_ABLATIONS else None)
          for name in ablations],
        pl.Stage("evaluate", "evaluate", lambda r: _evaluate(
            run_dir, dict(r.results), kv_config=kv_config, length=length,
            eval_examples=eval_examples, ablations=ablations), cost=eval_cost),
    ]
    t0 = time.time()
    done = pl.Pipeline(run_dir, stages).run()
    results: dict[str, Any] = dict(done["evaluate"].result)
    results["stages"] = {a["directory"]: {"seconds": a["seconds"]}
                         for name, r in done.items() if name != "evaluate"
                         for a in r.attempts}
    results["pretraining"] = {
        name: {"chosen": done[name].chosen,
               "attempts": [{"stage": a["directory"],
                             "seed": (seed if name == "mA" else seed + 1) + a["seed_offset"],
                             "skill": a["score"]} for a in done[name].attempts]}
        for name in ("mA", "mB")}
    results["composition"] = {
        name: {"chosen": done[name].chosen,
               "attempts": [{"stage": a["directory"], "seed": seed + 2 + a["seed_offset"],
                             "skill": a["score"]} for a in done[name].attempts]}
        for name in ("calm", *ablations)}
    results["config"] = {"kv_config": kv_config, "length": length, "eval_examples": eval_examples,
                         "compose_numeric": compose_numeric,
                         "compose_numeric_format": compose_numeric_format,
                         "compose_rows": {"kv_arithmetic_heldin": kv_rows,
                                          numeric_dataset: num_rows},
                         "connections": {k: [list(p) for p in v] for k, v in ComposedLM(
                             anchor_model, {"mA": augment_model},
                             composition).connections.items()},
                         "rope_theta": rope_theta,
                         "augment_model": ckpt.config_to_dict(augment_model),
                         "anchor_model": ckpt.config_to_dict(anchor_model),
                         "stages": {n: dataclasses.asdict(s) for n, s in (
                             ("pretrain_augment", pretrain_augment),
                             ("pretrain_anchor", pretrain_anchor), ("compose", compose))}}
    results["seconds"] = round(sum(r.seconds for r in done.values()), 1)
    results["this_run_seconds"] = round(time.time() - t0, 1)
    kv_report.write_reports(run_dir, results)
    return results


def main(argv: Sequence[str]) -> dict:
    """Parses the command line as `calm_jax.train` does (gin files and bindings, one-line
    errors; `--help` prints the usage) and runs the configured `run()`."""
    import gin

    from calm_jax import train

    if train.wants_help(argv):
        print(__doc__)
        return {}
    train.parse_gin_args(train.parse_args(argv))
    # Gin registered this module under its import name, not as __main__.
    from calm_jax.experiments import kv_arithmetic as registered

    return gin.get_configurable(registered.run)()


if __name__ == "__main__":
    from calm_jax.train import run_cli

    run_cli(main)
