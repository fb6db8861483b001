"""One training step: CALM composition vs full fine-tune of the anchor, printed as JSON.

    python bench/train_step.py --shape small            # GPU: composed and fine-tune steps
    python bench/train_step.py --shape large --remat full --loss_chunk 512
    python bench/train_step.py --tiny                   # under a minute on CPU: checks the script
    python bench/train_step.py --shape xl --remat full --trace_only   # CPU: activation GiB only
    python bench/train_step.py --shape xl --modes compose --compile_only  # XLA memory analysis

`--attention_impl` (default "auto": cuDNN where it applies on a GPU), `--remat` and
`--loss_chunk` are the trainer's settings of the same names (TransformerConfig.attention_impl,
.remat_policy, trainer.train(loss_chunk=...)). Analysis helpers live in `bench/step_analysis.py`.

For each mode (`--modes`, default "compose,finetune", run in that order in one process) the
script builds the step the way `calm_jax.trainer.train` does (`trainer.setup` for the forward
and the frozen trees, `calm_jax.steps.build_program`, adamw from `calm_jax.optim`, state
sharded and DONATED), compiles it once (`.lower().compile()`, timed as `compile_s`), runs `--warmup` steps,
then times `--steps` steps ending in `block_until_ready`, and prints one JSON object:

  device, backend, jax, shape, mode, dtype, attention_impl, remat, batch, length,
  tokens_per_s, step_ms, compile_s,
  peak_gib       device.memory_stats()['peak_bytes_in_use'] after the timed steps (null where
                 the backend has no memory stats, e.g. CPU). It is the PROCESS peak so far: it
                 includes placing the frozen weights (fp32 init, then cast, as the trainer
                 does; `placement_peak_gib` is the peak before the first step) and, for the
                 second mode, everything the first mode did.
  compiled_gib   arguments + outputs + temporaries - aliased, from `compiled.memory_analysis()`:
                 the step's own footprint, independent of what ran before.
  ideal_mfu      flops_per_token * tokens / (step time * 989e12) with N without the input
                 embedding: compose 2 N_augment + 4 N_anchor (the issue's formula; the
                 6 N_composition the trainer adds is in `trainer_flops_per_token`), finetune
                 6 N_anchor. 989e12 is the H100 SXM dense bf16 peak, whatever the device.
  flops_per_token / trainer_flops_per_token / expected_flops_per_token: the issue's ideal
                 count, the trainer's (adds 6 N_composition), and `expected_flops_per_token`:
                 what the step must compute (the anchor's backward only runs above its first
                 connected layer, the augmenting output layer never runs).
  hlo_flops      XLA's cost analysis of the lowered (unoptimised) step with every layer scan
                 fully unrolled (XLA counts a while-loop body once, so the rolled step's own
                 figure is far too low); `hlo_over_{ideal,expected}_flops` show what the counts
                 leave out (attention scores, loss, optimizer, elementwise work) and what the
                 step must not contain (frozen weight gradients). cuDNN attention is a custom
                 call and counts 0 there. `--no_hlo_flops` skips it (it re-places the weights).
                 `hlo_flops_from`: "lowered", or "compiled" where the backend's lowered module
                 reports no cost (the GPU's: the unrolled step is then compiled for it).
  frozen_kernel_grad_dots  dot ops in the compiled step whose output has the shape of a frozen
                 kernel (a weight gradient); 0 expected for compose; `frozen_kernel_grad_shapes`
                 lists the output shapes it counted. Its positive control is
                 the finetune step, where the same kernels are trained. Kernels with a
                 token-sized axis (e.g. mlp 8192 = batch x length in "large") cannot be told
                 from activations and are not counted; the tiny shape avoids all ambiguity.
  residual_gib, largest_residuals: activations the forward saves for the backward
                 (`saved_residuals`, traced, before XLA's buffer assignment).
  state_donated  whether the state passed to the step was consumed (buffer donation).
  skipped / error  instead of timings, when a mode cannot fit or fails (e.g. out of memory).

`--trace_only` prints only `residual_gib` per mode from a trace (`traced_residuals`): nothing
is placed or compiled, so it runs for any shape on a CPU. `--flops_only` prints XLA's flop
count of the step lowered from shapes with its layer scans unrolled (`lowered_flops`;
`hlo_flops`, `hlo_flops_per_token`), also for any shape on a CPU.

Shapes (bf16 compute, batch 8, length 1024, vocabulary 32000, RoPE, pre-norm RMSNorm, SwiGLU MLP
of width 4 d, 64-dim heads, untied output layer; default CALM connections: every 4th
augmenting layer, paired with evenly spaced anchor layers; composition cross-attention with the
anchor's head count and head_dim = anchor d / heads):

  shape  model    d     layers  heads x dim (KV)  mlp     N (no input embedding)
  small  anchor   1024  12      16 x 64           4096      234,120,192
         augment   512   8       8 x 64           2048       49,947,136
         composition: augment 4 -> anchor 6, 8 -> 12       9,442,304
  large  anchor   2048  24      16 x 64           8192    1,474,922,496  (attention width d/2)
         augment  1024  24      16 x 64           4096      435,471,360
         composition: augment 4k -> anchor 4k, k=1..6     113,276,928
  xl     anchor   4096  32      32 x 128 (8)     14336    7,110,660,096  (Llama-3-8B-like)
         augment  2048  16      32 x 64  (8)      8192    1,038,682,112  (Llama-3.2-1B-like)
         composition: augment 4k -> anchor 8k, k=1..4     302,030,848
  xl keeps the bench's vocabulary (32000) and untied output layers (the real models: 128256,
  and tied embeddings for 3.2-1B), rope_theta 5e5, and Llama 3's mlp of 3.5 d, not 4 d. Its
  fine-tune step (fp32 adamw: >= 16 bytes per parameter, 116 GB) does not fit one 80 GB GPU
  and is reported as skipped when the device reports its memory limit.
  tiny   a few-hundred-thousand-parameter pair for CPU; its dims are chosen so that no frozen
         kernel shape coincides with a composition or activation shape (see `hlo_evidence`).

Parameter-count convention. N = `TransformerConfig.num_params(include_embedding=False)`: every
block's q/k/v/out kernels (d x heads x head_dim, ...), the GLU's three kernels (gate and up
d x 4d, down 4d x d, i.e. 12 d^2 per block), two RMSNorm scales per block, the final norm, and
the untied output layer d x vocab (counted once: it is not the input embedding). No biases. The
issue's numbers (small 234,230,784 / 49,984,000; large 1,475,364,864 / 435,692,544) are each
exactly 9 d per layer larger than these, which is what biases on the GLU (gate 4d + up 4d +
down d) would add: the issue counted MLP biases, which Llama-style models do not have and this
config cannot express (`use_bias` would add attention biases too). `ISSUE_PARAMS` below records
this, and `check_issue_params` asserts it. The large anchor's numbers also confirm its 16 heads
are 64-dim (attention width 1024 = d / 2), not d / heads = 128.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import flax.linen as nn  # noqa: E402

from calm_jax import lora as lora_lib  # noqa: E402
from calm_jax import partitioning as part  # noqa: E402
from calm_jax import steps as steps_lib  # noqa: E402
from calm_jax import trainer  # noqa: E402
from calm_jax.composition import ComposedLM, CompositionConfig  # noqa: E402
from calm_jax.models import TransformerConfig  # noqa: E402
from calm_jax.models.config import REMAT_POLICY_NAMES  # noqa: E402
from calm_jax.optim import OptimizerConfig, make_optimizer, schedule  # noqa: E402
from bench.step_analysis import (  # noqa: E402
    _flops, _gib, compiled_memory, frozen_kernel_grad_dots, kernel_sets, largest_residuals,
    lowered_flops, residual_bytes, saved_residuals, traced_residuals, unrolled_flops)
from bench.step_analysis import dot_output_shapes  # noqa: E402,F401 (tests use it from here)

H100_PEAK_FLOPS = 989e12  # dense bf16, SXM; the issue's denominator for "ideal MFU"
MODES = ("compose", "finetune")
FROZEN_LAYOUTS = trainer.FROZEN_LAYOUTS

# name -> (anchor fields, augment fields, vocab, batch, length)
SHAPES: dict[str, tuple[dict, dict, int, int, int]] = {
    # Odd sizes on purpose: no frozen kernel shape equals a composition kernel or a token
    # dimension, so `frozen_kernel_grad_dots` can classify every frozen kernel; the augmenting
    # model has 8 layers, so there are two connections (augment 4 -> anchor 2, 8 -> 4) and the
    # backward pass runs through frozen anchor blocks (3 and 4).
    "tiny": (dict(embed_dim=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=14,
                  mlp_dim=512),
             dict(embed_dim=48, num_layers=8, num_heads=3, head_dim=16, mlp_dim=96),
             512, 2, 40),
    "small": (dict(embed_dim=1024, num_layers=12, num_heads=16, head_dim=64, mlp_dim=4096),
              dict(embed_dim=512, num_layers=8, num_heads=8, head_dim=64, mlp_dim=2048),
              32000, 8, 1024),
    "large": (dict(embed_dim=2048, num_layers=24, num_heads=16, head_dim=64, mlp_dim=8192),
              dict(embed_dim=1024, num_layers=24, num_heads=16, head_dim=64, mlp_dim=4096),
              32000, 8, 1024),
    "xl": (dict(embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                mlp_dim=14336, rope_theta=500_000.0),
           dict(embed_dim=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                mlp_dim=8192, rope_theta=500_000.0),
           32000, 8, 1024),
}

# The issue's parameter counts (anchor, augment) and the per-layer surplus they carry: 9 d per
# layer, the biases of a GLU of width 4 d (module docstring).
ISSUE_PARAMS = {"small": (234_230_784, 49_984_000), "large": (1_475_364_864, 435_692_544)}


def model_configs(shape: str, *, dtype: str = "bfloat16", attention_impl: str = "auto",
                  remat: str = "none", unroll: bool = False
                  ) -> tuple[TransformerConfig, TransformerConfig]:
    """(anchor, augment) configs of `shape`; parameters fp32 (trained ones stay fp32, frozen
    ones are cast to `dtype` when placed), compute in `dtype`. `unroll` fully unrolls the
    layer scans (for XLA's cost analysis)."""
    if shape not in SHAPES:
        raise ValueError(f"shape: expected one of {sorted(SHAPES)}, got {shape!r}")
    anchor, augment, vocab, _, length = SHAPES[shape]
    out = []
    for fields in (anchor, augment):
        cfg = TransformerConfig.llama_style(
            vocab_size=vocab, max_len=max(length, 2048), dtype=dtype, param_dtype="float32",
            attention_impl=attention_impl, remat_policy=remat, **fields)
        if unroll:
            cfg = cfg.replace(scan_unroll=cfg.num_layers)
        out.append(cfg)
    return out[0], out[1]


def _block_params(cfg: TransformerConfig) -> int:
    return cfg.replace(num_layers=2).num_params() - cfg.replace(num_layers=1).num_params()


def expected_flops_per_token(mode: str, anchor_cfg: TransformerConfig,
                             augment_cfg: TransformerConfig) -> float:
    """Matrix-product FLOPs per token that the step needs (attention scores excluded).

    finetune: 6 N_anchor. compose: each augmenting model forward to its deepest connected
    layer (its output layer is never run): 2 x blocks; the anchor forward: 2 N_anchor; the
    anchor backward for activation gradients only, from the loss down to the FIRST connected
    anchor layer (nothing below it depends on trained parameters): 2 x (blocks above it +
    output layer); the composition: 6 N_composition. This is below the issue's
    2 N_augment + 4 N_anchor whenever the first connection is above layer 0.
    """
    n_anchor = anchor_cfg.num_params(include_embedding=False)
    if mode == "finetune":
        return 6.0 * n_anchor
    composed = ComposedLM(anchor_cfg, {"augment": augment_cfg})
    pairs = composed.connections["augment"]
    deepest = max(a for a, _ in pairs)
    first = min(b for _, b in pairs)
    head = 0 if anchor_cfg.tie_embeddings else anchor_cfg.embed_dim * anchor_cfg.vocab_size
    backward = _block_params(anchor_cfg) * (anchor_cfg.num_layers - first) + head
    return (2.0 * _block_params(augment_cfg) * deepest + 2.0 * n_anchor + 2.0 * backward
            + 6.0 * composed.num_composition_params())


def check_issue_params(shape: str) -> dict[str, int]:
    """Our N (no input embedding) per model, checked against the issue's count minus 9 d L."""
    anchor, augment = model_configs(shape)
    ours = {"anchor": anchor.num_params(include_embedding=False),
            "augment": augment.num_params(include_embedding=False)}
    if shape in ISSUE_PARAMS:
        for (name, cfg), issue in zip((("anchor", anchor), ("augment", augment)),
                                      ISSUE_PARAMS[shape]):
            surplus = 9 * cfg.embed_dim * cfg.num_layers
            if ours[name] + surplus != issue:
                raise AssertionError(f"{shape} {name}: N={ours[name]:,} + 9 d L={surplus:,} "
                                     f"!= the issue's {issue:,}")
    return ours


# Building the step as the trainer does ------------------------------------------------------


class Built:
    """One mode's jitted step and its inputs.

    Attributes:
      step: `jax.jit(make_train_step(...))`, state donated; (state, frozen, batch) -> (state, m).
      state, frozen, batch: its arguments (placed).
      flops_per_token: the issue's ideal count (compose 2 N_aug + 4 N_anchor, finetune 6 N).
      trainer_flops_per_token: the trainer's count (compose adds 6 N_composition).
      n: {'anchor', 'augment', 'composition'} parameter counts (no input embedding).
      forward: the trainer's forward (params, frozen, batch) -> logits.
      loss: the trainer's loss (params, frozen, batch) -> (loss sum, metric sums).
      expected_flops_per_token: `expected_flops_per_token` (what the step must compute).
      tokens: tokens per step (batch x length).
    """

    def __init__(self, **kw):
        self.__dict__.update(kw)


def build(mode: str, anchor_cfg: TransformerConfig, augment_cfg: TransformerConfig, *,
          batch: int, length: int, mesh, rules, seed: int = 0,
          optimizer: OptimizerConfig | None = None, loss_chunk: int | None = None,
          frozen_layout: str = "stacked") -> Built:
    """The trainer's step for `mode` ("compose", or "finetune": all anchor parameters trained).

    "finetune" uses the trainer's "pretrain" setup: the same step as its "finetune" mode (every
    anchor parameter trained, no frozen trees), started from random weights instead of an
    export, which the step's cost does not depend on. Must run under `mesh` and the logical
    axis rules (`with mesh, nn.logical_axis_rules(rules)`), as in `trainer.train`.

    `frozen_layout="per_layer"` (compose only) is the trainer's option of that name: the
    frozen models in the decoding layout (`transformer.unstack_layers`: one array per layer,
    projections that share an input fused), whose layers run unrolled.
    """
    if frozen_layout not in FROZEN_LAYOUTS:
        raise ValueError(f"frozen_layout: expected one of {FROZEN_LAYOUTS}, got {frozen_layout!r}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    optimizer = optimizer or OptimizerConfig()
    total_steps = 1000
    rng_setup, rng_init, rng_data = jax.random.split(jax.random.key(seed), 3)
    augments = {"augment": trainer.ModelSpec(config=augment_cfg)} if mode == "compose" else {}
    s = trainer.setup("compose" if mode == "compose" else "pretrain",
                       anchor=trainer.ModelSpec(config=anchor_cfg), augments=augments,
                       composition=CompositionConfig(), lora=lora_lib.LoraConfig(), mesh=mesh,
                       rules=rules, rng=rng_setup, loss_chunk=loss_chunk,
                       frozen_layout=frozen_layout if mode == "compose" else "stacked")
    opt = make_optimizer(optimizer, total_steps)
    lr_schedule = schedule(optimizer, total_steps)

    # Exactly what trainer.train runs: the same shardings, fresh state and jitted step.
    prog = steps_lib.build_program(s, opt, lr_schedule, optimizer.grad_accum_steps, mesh,
                                   rules)
    state, step, batch_sharding = prog.init_state(rng_init), prog.train_step, prog.batch_sharding

    tokens = np.asarray(jax.random.randint(rng_data, (batch, length + 1), 3,
                                           anchor_cfg.vocab_size), np.int32)
    arrays = {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
              "decoder_loss_weights": np.ones((batch, length), np.float32)}
    placed = {k: jax.device_put(v, batch_sharding) for k, v in arrays.items()}

    n_anchor = anchor_cfg.num_params(include_embedding=False)
    n_aug = augment_cfg.num_params(include_embedding=False)
    if mode == "compose":
        n_comp = ComposedLM(anchor_cfg, {"augment": augment_cfg}).num_composition_params()
        ideal = 2.0 * n_aug + 4.0 * n_anchor
        n = {"anchor": n_anchor, "augment": n_aug, "composition": n_comp}
    else:
        ideal = 6.0 * n_anchor
        n = {"anchor": n_anchor}
    return Built(mode=mode, step=step, state=state, frozen=s.frozen, batch=placed,
                 forward=s.forward, loss=s.loss(), flops_per_token=ideal,
                 trainer_flops_per_token=s.flops_per_token,
                 expected_flops_per_token=expected_flops_per_token(mode, anchor_cfg,
                                                                   augment_cfg),
                 n=n, tokens=batch * length)


def hlo_evidence(shape: str = "tiny", *, dtype: str = "bfloat16", mesh=None,
                 rules=part.DEFAULT_RULES, compile_unrolled: bool = True) -> dict[str, Any]:
    """Compose vs finetune step of `shape` with every layer scan unrolled: what XLA computes.

    Per mode: `hlo_flops` (XLA cost analysis), the issue's `ideal_flops`, the trainer's
    `trainer_flops` and `expected_flops` (`expected_flops_per_token`), all for one step;
    `frozen_kernel_grad_dots` (`frozen_kernel_grad_dots`, the same frozen/trained
    classification in both modes, so "finetune", where the anchor's kernels ARE trained, is
    the detector's positive control); the optimizer state's leaf shapes against the trained
    parameters'; the saved residuals (`saved_residuals`); and, after two real steps,
    `state_donated` and `compilations` (entries in the jitted step's cache: 1 = one compile).

    With `compile_unrolled` (fine for tiny shapes) the flops come from the compiled
    (optimised) module; otherwise from the lowered, unoptimised one (no compile; slightly
    higher, dead products not yet removed) and the dot count is skipped.
    """
    mesh = mesh or part.make_mesh(part.PartitioningConfig(num_devices=1))
    anchor_cfg, augment_cfg = model_configs(shape, dtype=dtype, unroll=True)
    _, _, _, batch, length = SHAPES[shape]
    frozen_kernels, trained_kernels = kernel_sets(anchor_cfg, augment_cfg)
    out: dict[str, Any] = {"shape": shape, "tokens": batch * length,
                           "connections": ComposedLM(anchor_cfg, {"augment": augment_cfg})
                           .connections["augment"]}
    with part.mesh_context(mesh), nn.logical_axis_rules(list(rules)):
        for mode in MODES:
            b = build(mode, anchor_cfg, augment_cfg, batch=batch, length=length, mesh=mesh,
                      rules=rules)
            lowered = b.step.lower(b.state, b.frozen, b.batch)
            rec: dict[str, Any] = {"n": b.n,
                                   "ideal_flops": b.flops_per_token * b.tokens,
                                   "trainer_flops": b.trainer_flops_per_token * b.tokens,
                                   "expected_flops": b.expected_flops_per_token * b.tokens}
            if compile_unrolled:
                compiled = lowered.compile()
                rec["hlo_flops"] = _flops(compiled.cost_analysis())
                rec["frozen_kernel_grad_dots"] = frozen_kernel_grad_dots(
                    compiled.as_text(), frozen_kernels, trained_kernels,
                    (length, batch * length))
                # Two real steps through the jitted function (it reuses this compilation):
                # the state must be donated and the second step must not recompile.
                probe = jax.tree.leaves(b.state["params"])[0]
                state, _ = b.step(b.state, b.frozen, b.batch)
                rec["state_donated"] = bool(probe.is_deleted())
                state, metrics = b.step(state, b.frozen, b.batch)
                rec["loss"] = float(metrics["loss"])
                rec["compilations"] = b.step._cache_size()
                b.state = state
            else:
                rec["hlo_flops"] = _flops(lowered.cost_analysis())
            for key in ("ideal", "trainer", "expected"):
                rec[f"hlo_over_{key}"] = rec["hlo_flops"] / rec[f"{key}_flops"]
            params = jax.tree.leaves(b.state["params"])
            opt_leaves = [x for x in jax.tree.leaves(b.state["opt_state"]) if x.ndim > 0]
            rec["trained_params"] = int(sum(x.size for x in params))
            rec["opt_state_elements"] = int(sum(x.size for x in opt_leaves))
            rec["opt_state_shapes"] = sorted({x.shape for x in opt_leaves})
            rec["trained_shapes"] = sorted({x.shape for x in params})
            rec["residuals"] = saved_residuals(b)
            rec["residual_bytes"] = residual_bytes(rec["residuals"])
            out[mode] = rec
            del b, lowered
    out["compose_over_finetune_flops"] = (out["compose"]["hlo_flops"]
                                          / out["finetune"]["hlo_flops"])
    return out


# Measuring ----------------------------------------------------------------------------------


def _peak_bytes(device) -> tuple[int | None, int | None]:
    try:
        stats = device.memory_stats()
    except Exception:  # backends without memory stats
        stats = None
    if not stats:
        return None, None
    return stats.get("peak_bytes_in_use"), stats.get("bytes_limit")


def measure(mode: str, args, mesh, rules) -> dict[str, Any]:
    anchor_cfg, augment_cfg = model_configs(args.shape, dtype=args.dtype,
                                            attention_impl=args.attention_impl,
                                            remat=args.remat, unroll=args.unroll_layers)
    device = jax.devices()[0]
    rec: dict[str, Any] = {
        "bench": "train_step", "device": device.device_kind, "backend": jax.default_backend(),
        "jax": jax.__version__, "shape": args.shape, "mode": mode, "dtype": args.dtype,
        "attention_impl": args.attention_impl, "remat": args.remat,
        "unroll_layers": args.unroll_layers, "frozen_layout": args.frozen_layout,
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "loss_chunk": args.loss_chunk, "batch": args.batch,
        "length": args.length, "vocab": anchor_cfg.vocab_size,
    }
    _, limit = _peak_bytes(device)
    if mode == "finetune" and limit is not None:
        # fp32 params + grads + two adam moments; activations come on top.
        need = 16 * anchor_cfg.num_params()
        if need > limit:
            rec["skipped"] = (f"full fine-tune needs >= 16 bytes x {anchor_cfg.num_params():,} "
                              f"parameters = {_gib(need)} GiB of state, device limit "
                              f"{_gib(limit)} GiB")
            return rec
    with part.mesh_context(mesh), nn.logical_axis_rules(list(rules)):
        b = build(mode, anchor_cfg, augment_cfg, batch=args.batch, length=args.length,
                  mesh=mesh, rules=rules, seed=args.seed, loss_chunk=args.loss_chunk,
                  frozen_layout=args.frozen_layout)
        rec["n"] = b.n
        rec["placement_peak_gib"] = _gib(_peak_bytes(device)[0])
        residuals = saved_residuals(b)  # traced only; before the state is donated
        if residuals:
            rec["residual_gib"] = _gib(residual_bytes(residuals))
            rec["largest_residuals"] = largest_residuals(residuals)
        start = time.perf_counter()
        compiled = b.step.lower(b.state, b.frozen, b.batch).compile()
        rec["compile_s"] = round(time.perf_counter() - start, 2)
        try:
            mem = compiled.memory_analysis()
            rec["compiled_gib"] = _gib(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                       + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
            rec["temp_gib"] = _gib(mem.temp_size_in_bytes)
        except Exception:  # not every backend reports it
            rec["compiled_gib"] = None
        # Same classification in both modes: finetune (anchor trained) is the positive control.
        frozen_kernels, trained_kernels = kernel_sets(anchor_cfg, augment_cfg)
        grads = frozen_kernel_grad_dots(compiled.as_text(), frozen_kernels, trained_kernels,
                                        token_dims(args.batch, args.length, args.loss_chunk))
        rec["frozen_kernel_grad_dots"] = grads["count"]
        rec["frozen_kernel_grad_shapes"] = [list(shape) for shape in grads["examples"]]

        state = b.state
        probe = jax.tree.leaves(state["params"])[0]
        for _ in range(args.warmup):
            state, metrics = compiled(state, b.frozen, b.batch)
        jax.block_until_ready((state, metrics))
        rec["state_donated"] = bool(probe.is_deleted())
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = compiled(state, b.frozen, b.batch)
        jax.block_until_ready((state, metrics))
        seconds = (time.perf_counter() - start) / args.steps
        rec["loss"] = round(float(metrics["loss"]), 4)
        rec["step_ms"] = round(1e3 * seconds, 3)
        rec["tokens_per_s"] = round(b.tokens / seconds, 1)
        rec["peak_gib"] = _gib(_peak_bytes(device)[0])
        rec["flops_per_token"] = b.flops_per_token
        rec["trainer_flops_per_token"] = b.trainer_flops_per_token
        rec["expected_flops_per_token"] = b.expected_flops_per_token
        mfu = b.flops_per_token * b.tokens / (seconds * H100_PEAK_FLOPS)
        rec["ideal_mfu"] = float(f"{mfu:.4g}")
        del state, metrics, compiled, b
        if args.hlo_flops:
            unrolled = model_configs(args.shape, dtype=args.dtype,
                                     attention_impl=args.attention_impl, remat=args.remat,
                                     unroll=True)
            b = build(mode, *unrolled, batch=args.batch, length=args.length, mesh=mesh,
                      rules=rules, seed=args.seed, loss_chunk=args.loss_chunk)
            rec["hlo_flops"], rec["hlo_flops_from"] = unrolled_flops(
                b.step.lower(b.state, b.frozen, b.batch))
            if rec["hlo_flops"] is not None:
                for key, per_token in (("ideal", b.flops_per_token),
                                       ("expected", b.expected_flops_per_token)):
                    rec[f"hlo_over_{key}_flops"] = round(
                        rec["hlo_flops"] / (per_token * b.tokens), 3)
            del b
    return rec


def token_dims(batch: int, length: int, loss_chunk: int | None) -> tuple[int, ...]:
    """Sizes of a step's token axes: a product whose output has one is an activation (for
    `frozen_kernel_grad_dots`). The chunked loss's logits are [batch x chunk, vocab]: in "xl"
    (d = 4096 = 8 x 512) they have the output layer's own shape."""
    dims = {length, batch * length}
    if loss_chunk is not None:
        chunk = min(loss_chunk, length)
        dims |= {chunk, batch * chunk}
    return tuple(sorted(dims))


def analyse(mode: str, args, mesh, rules) -> dict[str, Any]:
    """`--compile_only` (`compiled_memory`), `--trace_only` (`traced_residuals`) or
    `--flops_only` (`lowered_flops`, layer scans unrolled) for `mode`: nothing is placed, so
    any shape runs on a CPU."""
    anchor_cfg, augment_cfg = model_configs(args.shape, dtype=args.dtype,
                                            attention_impl=args.attention_impl,
                                            remat=args.remat, unroll=args.flops_only)
    kind, analysis = next((k, fn) for k, fn in (("compile_only", compiled_memory),
                                                ("trace_only", traced_residuals),
                                                ("flops_only", lowered_flops))
                          if getattr(args, k))
    with part.mesh_context(mesh), nn.logical_axis_rules(list(rules)):
        return {"bench": "train_step", kind: True, "device": jax.devices()[0].device_kind,
                "jax": jax.__version__, "shape": args.shape, "mode": mode, "dtype": args.dtype,
                "attention_impl": args.attention_impl, "remat": args.remat,
                "loss_chunk": args.loss_chunk, "batch": args.batch, "length": args.length,
                **analysis(mode, anchor_cfg, augment_cfg, batch=args.batch,
                           length=args.length, mesh=mesh, rules=rules,
                           loss_chunk=args.loss_chunk)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--tiny", action="store_true", help="same as --shape tiny")
    p.add_argument("--modes", default=",".join(MODES),
                   help="comma-separated, in order: compose, finetune")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument("--attention_impl", default="auto", choices=("auto", "xla", "cudnn"),
                   help="auto: cuDNN's fused attention where it applies on a GPU, else XLA")
    p.add_argument("--loss_chunk", type=int, default=None,
                   help="positions per output-layer chunk in the loss (trainer.train's "
                        "loss_chunk); default: all logits at once")
    p.add_argument("--remat", default="none", choices=REMAT_POLICY_NAMES,
                   help="TransformerConfig.remat_policy of every model")
    p.add_argument("--unroll_layers", action="store_true",
                   help="unroll every layer scan of the timed step (TransformerConfig."
                        "scan_unroll = num_layers): no stacked weights indexed in a loop, no "
                        "stacked activations; longer compilation")
    p.add_argument("--frozen_layout", default="stacked", choices=FROZEN_LAYOUTS,
                   help="per_layer: the composed step reads the frozen models in the decoding "
                        "layout (one array per layer, fused projections; layers unrolled)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (frozen weights too)")
    p.add_argument("--batch", type=int, default=None, help="default: the shape's (8)")
    p.add_argument("--length", type=int, default=None, help="default: the shape's (1024)")
    p.add_argument("--num_devices", type=int, default=1, help="devices of the data mesh")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_hlo_flops", dest="hlo_flops", action="store_false",
                   help="skip XLA's cost analysis of the unrolled step (lowering only)")
    p.add_argument("--trace_only", action="store_true",
                   help="only trace: saved-activation GiB per mode (`traced_residuals`); "
                        "nothing is placed or compiled, so any shape runs on a CPU")
    p.add_argument("--compile_only", action="store_true",
                   help="only compile the step from shapes (`compiled_memory`): XLA's memory "
                        "analysis per mode; no weights are created, so any shape compiles on "
                        "a CPU")
    p.add_argument("--flops_only", action="store_true",
                   help="only lower the step from shapes, layer scans unrolled "
                        "(`lowered_flops`): XLA's flop count per mode; no weights are "
                        "created, so any shape runs on a CPU")
    args = p.parse_args(argv)
    if args.tiny:
        args.shape = "tiny"
    _, _, _, batch, length = SHAPES[args.shape]
    args.batch = args.batch or batch
    args.length = args.length or length
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        p.error(f"--modes: expected a comma-separated subset of {MODES}, got {args.modes}")
    only = [f"--{k}" for k in ("trace_only", "compile_only", "flops_only") if getattr(args, k)]
    if len(only) > 1:
        p.error(f"--trace_only, --compile_only, --flops_only: expected at most one, got "
                f"{', '.join(only)}")
    if args.loss_chunk is not None and args.loss_chunk <= 0:
        p.error(f"--loss_chunk: expected a positive integer, got {args.loss_chunk}")
    for name in ("steps", "batch", "length", "num_devices"):
        if getattr(args, name) <= 0:
            p.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    if args.warmup < 1:
        p.error(f"--warmup: expected at least 1 (the donation check needs one step), "
                f"got {args.warmup}")
    return args


def main(argv=None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    # `with mesh:` (partitioning.mesh_context) is deprecated in favour of jax.set_mesh.
    warnings.filterwarnings("ignore", message=".*context manager has been deprecated.*")
    check_issue_params(args.shape)
    mesh = part.make_mesh(part.PartitioningConfig(num_devices=args.num_devices))
    rules = part.DEFAULT_RULES
    results = []
    for mode in args.modes:
        try:
            if args.compile_only or args.trace_only or args.flops_only:
                rec = analyse(mode, args, mesh, rules)
            else:
                rec = measure(mode, args, mesh, rules)
        except Exception as e:  # e.g. out of memory: report it and go on
            rec = {"bench": "train_step", "device": jax.devices()[0].device_kind,
                   "jax": jax.__version__, "shape": args.shape, "mode": mode,
                   "attention_impl": args.attention_impl, "remat": args.remat,
                   "loss_chunk": args.loss_chunk, "error": f"{type(e).__name__}: {str(e)[:800]}"}
        print(json.dumps(rec), flush=True)
        results.append(rec)
    return results


if __name__ == "__main__":
    main()
