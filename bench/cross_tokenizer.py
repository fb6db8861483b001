"""A composed training step across tokenizers vs the same step over one shared token stream.

    python bench/cross_tokenizer.py                 # CPU-sized models, JSON on stdout
    python bench/cross_tokenizer.py --embed 1024 --layers 12 --length 1024 --batch 8   # GPU

Both steps are the trainer's compose objective at the same shapes (batch x length anchor
tokens, as many augmenting tokens): the loss's gradient with respect to the composition only,
then an Adam update, jitted with the state donated. "shared" calls `ComposedLM.apply(tokens)`
(the causal cross mask is implicit); "cross" passes each augment's own tokens, positions,
segment ids and the byte ends of both sides (`calm_jax.alignment`): the [batch, 1, length,
length] mask is built inside the program from the two end arrays. Each is compiled once, run
`--warmup` times, then timed over `--steps` steps, in `--rounds` alternating rounds (the
median step of each round, the median over rounds reported). `host_ms_per_batch`
is what `alignment.text_examples` costs on the host for one batch of byte-tokenized texts
(the input pipeline's work, off the device's critical path).

Prints one JSON object: device, backend, jax, shapes, shared_step_ms, cross_step_ms,
cross_over_shared (the issue's target: at most 1.1), host_ms_per_batch.

    python bench/cross_tokenizer.py --decode        # cached decoding across tokenizers

`--decode` measures decoding instead: `--batch` prompts of other lengths (bytes for the anchor,
a BPE trained here on the prompts' words for the augment), each continued by `--new_tokens`
bytes of further words (forced, so that the augment's tokenizer re-segments the tail as in
real text, where a random model's bytes would not), decoded one prompt at a time
(`cross_decoding.generate_text`) and all together (`generate_texts`), each compiled by a first
run, then timed in `--rounds` alternating rounds (median). Prints one JSON object: device,
backend, jax, shapes, one_at_a_time_rows_per_s, batched_rows_per_s, batched_over_one,
argmax_equal (the two choose the same tokens from their logits and re-run the same),
max_abs_logit_diff, rerun (augmenting tokens re-run, all rows).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn

from calm_jax import alignment
from calm_jax.composition import ComposedLM, CompositionConfig
from calm_jax.losses import cross_entropy
from calm_jax.models import TransformerConfig
from calm_jax.tokenizers import ByteTokenizer


def _timed(step, state, batch, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        state = step(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state = step(state, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--embed", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decode", action="store_true", help="time cached decoding instead")
    p.add_argument("--new_tokens", type=int, default=16, help="--decode: tokens per prompt")
    a = p.parse_args(argv)
    if a.decode:
        return decode_main(a)

    cfg = TransformerConfig.tiny(vocab_size=a.vocab, embed_dim=a.embed, num_layers=a.layers,
                                 num_heads=a.heads, mlp_dim=4 * a.embed, max_len=a.length)
    shared = ComposedLM(cfg, {"aug": cfg}, CompositionConfig(rope_theta=10_000.0))
    cross = ComposedLM(cfg, {"aug": cfg}, CompositionConfig(rope_theta=10_000.0,
                                                            shared_vocabulary=False))
    params = nn.unbox(shared.init(jax.random.key(0)))
    frozen = {k: params[k] for k in ("anchor", "augments")}
    rng = np.random.default_rng(0)
    b, n = a.batch, a.length
    tokens = rng.integers(3, a.vocab, (b, n)).astype(np.int32)
    ends = np.cumsum(rng.integers(1, 6, (b, n)), axis=1).astype(np.int32)
    aug_ends = np.cumsum(rng.integers(1, 6, (b, n)), axis=1).astype(np.int32)
    batch = {"decoder_input_tokens": tokens, "decoder_target_tokens": np.roll(tokens, -1, 1),
             "decoder_loss_weights": np.ones((b, n), np.float32), "decoder_byte_ends": ends,
             "augments/aug/tokens": rng.integers(3, a.vocab, (b, n)).astype(np.int32),
             "augments/aug/byte_ends": aug_ends,
             "augments/aug/positions": np.broadcast_to(np.arange(n, dtype=np.int32), (b, n)),
             "augments/aug/segment_ids": np.ones((b, n), np.int32)}
    batch = jax.tree.map(jnp.asarray, batch)
    opt = optax.adam(1e-3)

    def make_step(model, kwargs_fn):
        def step(state, batch):
            comp, opt_state = state

            def loss(c):
                logits = model.apply({**frozen, "composition": c}, batch["decoder_input_tokens"],
                                     **kwargs_fn(batch))
                return cross_entropy(logits, batch["decoder_target_tokens"],
                                     batch["decoder_loss_weights"])["loss"]

            grads = jax.grad(loss)(comp)
            updates, opt_state = opt.update(grads, opt_state, comp)
            return optax.apply_updates(comp, updates), opt_state

        return jax.jit(step, donate_argnums=0)

    def fresh():
        comp = jax.tree.map(jnp.copy, params["composition"])
        return comp, opt.init(comp)

    steps = {"shared": make_step(shared, lambda batch: {}),
             "cross": make_step(cross, lambda batch: alignment.cross_kwargs(batch, ["aug"]))}
    times = {k: [] for k in steps}
    for _ in range(a.rounds):  # alternating, so both see the same machine load
        for k, step in steps.items():
            times[k].append(_timed(step, fresh(), batch, a.warmup, a.steps))
    shared_ms, cross_ms = (statistics.median(times[k]) for k in ("shared", "cross"))

    words = "the cat sat on a mat and then ran far away from big red dogs".split()
    texts = [" ".join(rng.choice(words, n // 5)) for _ in range(b)]
    tok = ByteTokenizer()
    t0 = time.perf_counter()
    for _ in range(5):
        alignment.text_examples(texts, tok, {"aug": tok}, length=n)
    host_ms = 1e3 * (time.perf_counter() - t0) / 5

    rec = {"bench": "cross_tokenizer", "device": str(jax.devices()[0].device_kind),
           "backend": jax.default_backend(), "jax": jax.__version__,
           "embed": a.embed, "layers": a.layers, "batch": b, "length": n,
           "augment_length": n, "steps": a.steps, "rounds": a.rounds, "shared_step_ms": round(shared_ms, 3),
           "cross_step_ms": round(cross_ms, 3),
           "cross_over_shared": round(cross_ms / shared_ms, 4),
           "host_ms_per_batch": round(host_ms, 3)}
    print(json.dumps(rec), flush=True)
    return rec


def _bpe(texts, vocab_size: int):
    """A byte-level BPE trained on `texts` (the [convert] extra's `tokenizers`)."""
    import os
    import tempfile

    import tokenizers as hf

    from calm_jax.tokenizers import Tokenizer

    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    tok.train_from_iterator(texts, hf.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[], show_progress=False,
        initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet()))
    directory = tempfile.mkdtemp(prefix="bench-bpe-")
    tok.save(os.path.join(directory, "tokenizer.json"))
    return Tokenizer.load(directory)


def decode_main(a) -> dict:
    from calm_jax.cross_decoding import generate_text, generate_texts

    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and then ran far away from big red dogs".split()
    augment_tok = _bpe([" ".join(rng.choice(words, 12)) for _ in range(300)], 320)
    anchor_tok = ByteTokenizer()
    prompts = [" ".join(rng.choice(words, int(k))) for k in rng.integers(1, 8, a.batch)]
    forced = [anchor_tok.encode(" " + " ".join(rng.choice(words, a.new_tokens)))[:a.new_tokens]
              for _ in prompts]
    max_len = max(len(p.encode()) for p in prompts) + a.new_tokens + 1
    cfg = TransformerConfig.tiny(vocab_size=max(a.vocab, anchor_tok.vocab_size),
                                 embed_dim=a.embed, num_layers=a.layers, num_heads=a.heads,
                                 mlp_dim=4 * a.embed, max_len=max_len)
    aug = cfg.replace(vocab_size=augment_tok.vocab_size,
                      max_len=max(512, max_len * 2 + 16 * a.new_tokens))
    model = ComposedLM(cfg, {"aug": aug}, CompositionConfig(rope_theta=10_000.0,
                                                            shared_vocabulary=False))
    params = nn.unbox(model.init(jax.random.key(0)))
    params["composition"] = jax.tree.map(  # init has W_o = 0: make the augment count
        lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape),
        params["composition"])
    kw = dict(anchor_tokenizer=anchor_tok, augment_tokenizers={"aug": augment_tok},
              max_new_tokens=a.new_tokens, return_logits=True)

    def one_at_a_time():
        return [generate_text(model, params, p, forced=f, **kw) for p, f in zip(prompts, forced)]

    def batched():
        return generate_texts(model, params, prompts, forced=forced, **kw)

    runs = {"one_at_a_time": one_at_a_time, "batched": batched}
    outputs = {k: fn() for k, fn in runs.items()}  # compiles every width both use
    times = {k: [] for k in runs}
    for _ in range(a.rounds):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    per_s = {k: len(prompts) / statistics.median(v) for k, v in times.items()}
    rec = {"bench": "cross_tokenizer_decode", "device": str(jax.devices()[0].device_kind),
           "backend": jax.default_backend(), "jax": jax.__version__, "embed": a.embed,
           "layers": a.layers, "rows": len(prompts), "new_tokens": a.new_tokens,
           "prompt_bytes": [len(p.encode()) for p in prompts], "rounds": a.rounds,
           "one_at_a_time_rows_per_s": round(per_s["one_at_a_time"], 3),
           "batched_rows_per_s": round(per_s["batched"], 3),
           "batched_over_one": round(per_s["batched"] / per_s["one_at_a_time"], 3),
           "argmax_equal": all(
               np.array_equal(x.logits.argmax(-1), y.logits.argmax(-1)) and x.rerun == y.rerun
               for x, y in zip(outputs["one_at_a_time"], outputs["batched"])),
           "max_abs_logit_diff": float(max(np.abs(x.logits - y.logits).max() for x, y in zip(
               outputs["one_at_a_time"], outputs["batched"]))),
           "rerun": sum(r.rerun for r in outputs["batched"])}
    print(json.dumps(rec), flush=True)
    return rec


if __name__ == "__main__":
    main()
