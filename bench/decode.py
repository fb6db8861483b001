"""Cached decoding throughput: the anchor alone vs the composed model, printed as JSON.

    python bench/decode.py                # the "small" shape (GPU): batch 1, 8, 64
    python bench/decode.py --tiny         # seconds on CPU (batch 1, 8), to check the script

For each model, layout (`--layouts`, default both: "per_layer", the weights split by
`decoding.unstack_params` once beforehand and one cache array per layer; "stacked", the scanned
layers) and batch size: random prompts of `--prompt_len` tokens, `--new_tokens` greedy
tokens with no early stop (no EOS: a decode loop of known trip count; `--early_stop` gives
eos_id = vocab - 1, and the loop that checks for it). The per-layer layout fuses the
projections that share an input (`--no_fuse`: it does not). `generate_s` is one whole
`calm_jax.decoding.generate` call (prefill + decode loop, one jitted program), `prefill_s` one
`prefill` call on the same prompts; the first call of each (compilation) is excluded and
reported as `compile_s`, every timing is the median of `--repeats` calls ending in
`block_until_ready`.

  new_tokens_per_s     = batch * new_tokens / generate_s
  decode_tokens_per_s  = batch * (new_tokens - 1) / (generate_s - prefill_s)   (decode loop only;
                         null when timing noise makes the difference non-positive)

`profiles` (with `--profile`; per model and layout, at the first batch size): one traced
`generate` call summed by `bench/profile_step.summarize` per generated token: step_ms, the
device's busy and idle time, kernels per token, kernel time by category, the longest kernels.

`step_copies` (per model and layout, from one decode step compiled at the first batch size, not
timed): the dynamic-slice / slice / copy / transpose instructions of the compiled step whose
output is at least as large as the smallest per-layer kernel or cache array, and the MiB they
write (each instruction once: one inside the layer loop's body stands for every layer); for the
composed model, one connection's composition matrix counts as a layer array. These are the
per-layer copies of weights and cache slots that the per-layer layout avoids.

Default shape (the issue's "small" setting): anchor d=1024, 12 layers, 16 heads; augmenting
model d=512, 8 layers, 8 heads (default connections: its layers 4, 8 into anchor layers 6, 12);
vocabulary 32000; RoPE, GLU (SwiGLU) MLP of 4 d, untied output layer; bfloat16 parameters and
compute. Weights are random: throughput does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import flax.linen as nn  # noqa: E402

from calm_jax import decoding  # noqa: E402
from calm_jax.composition import ComposedLM  # noqa: E402
from calm_jax.models import Decoder, TransformerConfig  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="tiny models, short prompts, float32: runs in seconds on CPU")
    p.add_argument("--batches", default=None,
                   help="comma-separated batch sizes (default 1,8,64; 1,8 with --tiny)")
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--anchor_dim", type=int, default=1024)
    p.add_argument("--anchor_layers", type=int, default=12)
    p.add_argument("--anchor_heads", type=int, default=16)
    p.add_argument("--augment_dim", type=int, default=512)
    p.add_argument("--augment_layers", type=int, default=8)
    p.add_argument("--augment_heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16", help="compute and parameter dtype")
    p.add_argument("--attention_impl", default="auto", choices=("auto", "xla", "cudnn"),
                   help="TransformerConfig.attention_impl (auto: cuDNN where it applies, see "
                        "calm_jax.models.attention.choose_attention_impl)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
    p.add_argument("--layouts", default=",".join(decoding.LAYOUTS),
                   help="comma-separated decoding layouts (per_layer, stacked)")
    p.add_argument("--profile", action="store_true",
                   help="also trace one generate call per model and layout at the first batch "
                        "size and report its kernels per generated token (`profiles`)")
    p.add_argument("--no_fuse", dest="fuse", action="store_false",
                   help="per_layer layout without fused projections "
                        "(decoding.unstack_params(..., fuse=False))")
    p.add_argument("--early_stop", action="store_true",
                   help="pass eos_id = vocab - 1 to generate: the decode loop then checks after "
                        "every token whether all rows are done (with random weights a row may "
                        "stop early); default: no eos_id, a loop of known trip count")
    args = p.parse_args(argv)
    if args.tiny:
        args.anchor_dim, args.anchor_layers, args.anchor_heads = 64, 2, 4
        args.augment_dim, args.augment_layers, args.augment_heads = 32, 4, 2
        args.vocab, args.prompt_len, args.new_tokens, args.dtype = 512, 16, 16, "float32"
        args.repeats = max(args.repeats, 5)  # cheap; tiny timings are noisy
        args.batches = args.batches or "1,8"
    args.batches = args.batches or "1,8,64"
    for name in ("prompt_len", "new_tokens", "repeats"):
        if getattr(args, name) <= 0:
            p.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches: expected comma-separated integers, got {args.batches!r}")
    if any(b <= 0 for b in args.batches):
        p.error(f"--batches: expected positive sizes, got {args.batches}")
    args.layouts = args.layouts.split(",")
    bad = [x for x in args.layouts if x not in decoding.LAYOUTS]
    if bad:
        p.error(f"--layouts: expected names among {list(decoding.LAYOUTS)}, got {bad}")
    return args


def model_config(d: int, layers: int, heads: int, args) -> TransformerConfig:
    return TransformerConfig.llama_style(
        vocab_size=args.vocab, embed_dim=d, num_layers=layers, num_heads=heads, mlp_dim=4 * d,
        max_len=max(2048, args.prompt_len + args.new_tokens), dtype=args.dtype,
        param_dtype=args.dtype, attention_impl=args.attention_impl)


def timed(fn, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of `repeats` later calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


_COPY = re.compile(r"=\s*(\w+)\[([\d,]*)\](?:\{[^}]*\})?\s+"
                   r"(dynamic-slice|slice|copy|transpose)\(")


def large_copies(hlo_text: str, min_elements: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(op, dtype, shape) of every copying instruction in compiled HLO text with at least
    `min_elements` output elements."""
    out = []
    for m in _COPY.finditer(hlo_text):
        shape = tuple(int(x) for x in m.group(2).split(",") if x)
        if int(np.prod(shape)) >= min_elements:
            out.append((m.group(3), m.group(1), shape))
    return out


def layer_array_elements(model, params, batch: int, cache_len: int) -> int:
    """The fewest elements of any one layer's block kernel or KV-cache array in the model, or
    of one connection's composition matrix (stacked `params`)."""
    sizes = []
    for _, cfg, tree in decoding.decoder_parts(model, params):
        sizes += [int(np.prod(x.shape[1:])) for path, x in
                  jax.tree_util.tree_leaves_with_path(tree["layers"])
                  if getattr(path[-1], "key", None) == "kernel"]  # not norm scales or biases
        sizes.append(batch * cache_len * cfg.kv_heads * cfg.dims_per_head)
    if isinstance(model, ComposedLM):  # [connections, ...] matrices, not norm scales or biases
        sizes += [int(np.prod(x.shape[1:])) for x in
                  jax.tree_util.tree_leaves(nn.unbox(params["composition"])) if x.ndim >= 3]
    return min(sizes)


_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "s32": "int32"}


def lowered_decode_step(model, run, batch: int, args, sharding=None):
    """One `decoding.decode_step` of `model` with parameters `run` (arrays or shapes), lowered
    for `batch` rows and a cache of `args.prompt_len + args.new_tokens` slots made by
    `prefill` (its shapes only). With `sharding`, parameters, cache and tokens are given it
    (shapes for a device this process does not have: `bench/gpu_aot.py`)."""
    cache_len = args.prompt_len + args.new_tokens
    prompts = jax.ShapeDtypeStruct((batch, args.prompt_len), jax.numpy.int32)
    lengths = jax.ShapeDtypeStruct((batch,), jax.numpy.int32)
    _, cache = jax.eval_shape(
        lambda p, t, n: decoding.prefill(model, p, t, n, cache_len=cache_len), run, prompts,
        lengths)
    tokens = jax.ShapeDtypeStruct((batch,), jax.numpy.int32, sharding=sharding)
    if sharding is not None:
        run, cache = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), (run, cache))
    return decoding.decode_step.lower(model, run, cache, tokens)


def step_copies(model, stacked, run, batch: int, args) -> dict:
    """The large copies in one compiled decode step of `run` (the parameters in the layout
    measured; `stacked`, the same in the stacked layout, gives the layer arrays' sizes)."""
    cache_len = args.prompt_len + args.new_tokens
    hlo = lowered_decode_step(model, run, batch, args).compile().as_text()
    copies = large_copies(hlo, layer_array_elements(model, stacked, batch, cache_len))
    nbytes = sum(np.prod(s) * jax.numpy.dtype(_DTYPES.get(d, d)).itemsize for _, d, s in copies)
    return {"count": len(copies), "mib": round(float(nbytes) / 2**20, 3),
            "largest": [f"{op} {d}{list(s)}" for op, d, s in sorted(
                copies, key=lambda c: -int(np.prod(c[2])))[:4]]}


def eos_id(args) -> int | None:
    """The eos_id `generate` gets: vocab - 1 with `--early_stop`, else none."""
    return args.vocab - 1 if args.early_stop else None


def prompts_and_generate(model, params, batch: int, args, layout: str):
    """(prompts, lengths, a call of `generate` on them): random prompts seeded by `batch`."""
    rng = np.random.default_rng(batch)
    prompts = rng.integers(3, args.vocab, (batch, args.prompt_len), dtype=np.int32)
    lengths = np.full((batch,), args.prompt_len, np.int32)

    def run_generate():
        return decoding.generate(model, params, prompts, lengths=lengths,
                                 max_new_tokens=args.new_tokens, layout=layout,
                                 eos_id=eos_id(args))

    return prompts, lengths, run_generate


def measure(name: str, model, params, batch: int, args, layout: str) -> dict:
    """Timings of one model in one layout (`params` already in that layout)."""
    prompts, lengths, run_generate = prompts_and_generate(model, params, batch, args, layout)
    n = args.new_tokens

    def run_prefill():
        return decoding.prefill(model, params, prompts, lengths,
                                cache_len=args.prompt_len + n)

    compile_s, generate_s = timed(run_generate, args.repeats)
    _, prefill_s = timed(run_prefill, args.repeats)
    decode_s = generate_s - prefill_s  # not positive when timer noise exceeds the decode time
    return {
        "model": name, "layout": layout, "batch": batch, "prompt_len": args.prompt_len,
        "new_tokens": n,
        "compile_s": round(compile_s, 3), "generate_s": round(generate_s, 5),
        "prefill_s": round(prefill_s, 5),
        "new_tokens_per_s": round(batch * n / generate_s, 1),
        "decode_tokens_per_s": (round(batch * (n - 1) / decode_s, 1)
                                if n > 1 and decode_s > 0 else None),
    }


def profile_generate(model, params, batch: int, args, layout: str) -> dict:
    """Kernel time of one traced `generate` call (after a compiling one), per generated token:
    `bench/profile_step.summarize` with steps = new tokens (prefill included, spread over
    them). On a CPU the host's XLA threads stand in for a device, as there."""
    from bench.profile_step import summarize, traced_events

    _, _, run = prompts_and_generate(model, params, batch, args, layout)
    jax.block_until_ready(run())  # compiles
    wall, source, events = traced_events(run)
    out = summarize(events, args.new_tokens, wall, top=10, per_category=4)
    return {"batch": batch, "source": source, "per_token": out}


def main(argv=None) -> dict:
    args = parse_args(argv)
    anchor_cfg = model_config(args.anchor_dim, args.anchor_layers, args.anchor_heads, args)
    augment_cfg = model_config(args.augment_dim, args.augment_layers, args.augment_heads, args)
    composed = ComposedLM(anchor_cfg, {"augment": augment_cfg})
    params = jax.jit(lambda key: nn.unbox(composed.init(key)))(jax.random.key(0))
    models = {"anchor": (Decoder(anchor_cfg), params["anchor"]), "composed": (composed, params)}
    results, copies, profiles = [], {}, {}
    for layout in args.layouts:
        for name, (model, stacked) in models.items():
            run = (decoding.unstack_params(model, stacked, fuse=args.fuse)
                   if layout == "per_layer" else stacked)
            copies.setdefault(name, {})[layout] = step_copies(model, stacked, run,
                                                              args.batches[0], args)
            for batch in args.batches:
                results.append(measure(name, model, run, batch, args, layout))
            if args.profile:
                profiles.setdefault(name, {})[layout] = profile_generate(
                    model, run, args.batches[0], args, layout)
            del run
    report = {
        "bench": "decode",
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "dtype": args.dtype,
        "attention_impl": args.attention_impl,
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "fused_projections": args.fuse,
        "eos_id": eos_id(args),
        "anchor": {"embed_dim": anchor_cfg.embed_dim, "num_layers": anchor_cfg.num_layers,
                   "num_heads": anchor_cfg.num_heads, "mlp_dim": anchor_cfg.mlp_dim,
                   "params": anchor_cfg.num_params()},
        "augment": {"embed_dim": augment_cfg.embed_dim, "num_layers": augment_cfg.num_layers,
                    "num_heads": augment_cfg.num_heads, "mlp_dim": augment_cfg.mlp_dim,
                    "params": augment_cfg.num_params()},
        "vocab_size": args.vocab,
        "connections": {k: [f"augment {a} -> anchor {b}" for a, b in v]
                        for k, v in composed.connections.items()},
        "composition_params": composed.num_composition_params(),
        "step_copies": copies,
        "results": results,
    }
    if args.profile:
        report["profiles"] = profiles
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
