"""What a training step keeps and computes, read from its trace or its compiled program.

Used by `bench/train_step.py` (its `--trace_only` and `--compile_only` modes, and the fields
`frozen_kernel_grad_dots`, `residual_gib`, `largest_residuals` of a measured step) and by
`tests/test_efficiency.py`. Nothing here times anything.
"""

from __future__ import annotations

import itertools
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from calm_jax import lora as lora_lib
from calm_jax import steps as steps_lib
from calm_jax import trainer
from calm_jax.composition import ComposedLM, CompositionConfig
from calm_jax.models import TransformerConfig
from calm_jax.models.transformer import unstack_layers
from calm_jax.optim import OptimizerConfig, make_optimizer, schedule


def _gib(n: float | None) -> float | None:
    return None if n is None else round(n / 2**30, 3)


# Kernel shapes ---------------------------------------------------------------------------------


def _kernel_shapes(tree: Any, stacked) -> set[tuple[int, ...]]:
    """Shapes of the kernels (leaves of ndim >= 2 per layer) of `tree`.

    `stacked(keys)` says whether a leaf at that key path has a leading layer (or connection)
    axis; both the per-layer shape and the stacked one are returned (XLA may compute a
    stacked gradient in one product).
    """
    out = set()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        shape = tuple(leaf.shape)
        if stacked(keys):
            if len(shape) >= 3:
                out.update({shape, shape[1:]})
        elif len(shape) >= 2:
            out.add(shape)
    return out


def kernel_sets(anchor_cfg: TransformerConfig, augment_cfg: TransformerConfig
                ) -> tuple[set[tuple[int, ...]], set[tuple[int, ...]]]:
    """(frozen, trained) kernel shapes of the composed model: anchor and augmenting kernels
    (frozen in the composed step) and composition kernels (trained)."""
    composed = ComposedLM(anchor_cfg, {"augment": augment_cfg})
    abstract = jax.eval_shape(lambda: nn.unbox(composed.init(jax.random.key(0))))
    in_layers = lambda keys: "layers" in keys  # noqa: E731
    frozen = (_kernel_shapes(abstract["anchor"], in_layers)
              | _kernel_shapes(abstract["augments"], in_layers))
    # The per-layer layout's fused kernels ([embed, 3 | 2, ...], `unstack_layers`) too.
    per_layer = jax.eval_shape(lambda t: {"anchor": unstack_layers(t["anchor"]),
                                          "augments": {k: unstack_layers(v) for k, v in
                                                       t["augments"].items()}}, abstract)
    frozen |= _kernel_shapes(per_layer, lambda keys: False)
    trained = _kernel_shapes(abstract["composition"], lambda keys: True)
    return frozen, trained


# Evidence from the compiled HLO -------------------------------------------------------------

_SHAPE = r"(?:pred|s8|s16|s32|s64|u8|u32|f16|bf16|f32|f64)\[([0-9,]*)\]"
# `x = f32[a,b]{..} dot(` on CPU/GPU; cuBLAS calls are `custom-call`s returning a tuple whose
# first element is the product: `x = (bf16[a,b]{..}, s8[..]{..}) custom-call(.., "__cublas$gemm"`.
_DOT = re.compile(r"=\s*\(?" + _SHAPE + r"(?:\{[^}]*\})?[^=]*?\s(dot|custom-call)\((.*)$")


def _forms(shape: tuple[int, ...]) -> set[tuple[int, ...]]:
    """Every merge of adjacent axes of `shape`, sizes of 1 dropped and sorted (a dot may
    compute a [d, heads, head_dim] gradient as [d, heads*head_dim], in either orientation)."""
    out = set()
    for cuts in itertools.product((False, True), repeat=max(len(shape) - 1, 0)):
        dims, cur = [], shape[0]
        for size, cut in zip(shape[1:], cuts):
            if cut:
                dims.append(cur)
                cur = size
            else:
                cur *= size
        dims.append(cur)
        dims = tuple(sorted(d for d in dims if d != 1))
        if len(dims) >= 2:
            out.add(dims)
    return out


def dot_output_shapes(hlo_text: str) -> list[tuple[int, ...]]:
    """Output shapes of the matrix products in an HLO module's text (fusion bodies included)."""
    shapes = []
    for line in hlo_text.splitlines():
        m = _DOT.search(line)
        if m is None:
            continue
        if m.group(2) == "custom-call" and not re.search(r"gemm|matmul", m.group(3)):
            continue
        shapes.append(tuple(int(x) for x in m.group(1).split(",") if x))
    return shapes


def frozen_kernel_grad_dots(hlo_text: str, frozen_kernels: set, trained_kernels: set,
                            token_dims: tuple[int, ...]) -> dict[str, Any]:
    """Counts matrix products whose output looks like a frozen kernel's weight gradient.

    A weight gradient contracts the tokens away, so products whose output keeps a token
    dimension (length, batch * length) are activations and are skipped. A frozen kernel shape
    that coincides (in some merged form) with a trained kernel or has a token-sized axis cannot
    be told apart; those forms are listed under `uncheckable` and not counted.
    """
    frozen = set().union(*[_forms(s) for s in frozen_kernels]) if frozen_kernels else set()
    trained = set().union(*[_forms(s) for s in trained_kernels]) if trained_kernels else set()
    uncheckable = {f for f in frozen if f in trained or any(t in f for t in token_dims)}
    checkable = frozen - uncheckable
    hits = []
    for shape in dot_output_shapes(hlo_text):
        if any(t in shape for t in token_dims):
            continue
        key = tuple(sorted(d for d in shape if d != 1))
        if key in checkable:
            hits.append(shape)
    return {"count": len(hits), "examples": sorted(set(hits))[:8],
            "checked_forms": len(checkable), "uncheckable": sorted(uncheckable)}


def saved_residuals(built) -> list[tuple[tuple[int, ...], str, int, str]]:
    """What the loss's forward keeps for its backward: (shape, dtype, bytes, origin) per array.

    `built` is a `train_step.Built` (its `loss`, `state`, `frozen` and `batch` are used).

    Differentiated with respect to the trained parameters only (frozen trees and the batch are
    closed over, as in the step). Closed-over inputs themselves (weights, tokens: "from a
    constant") are listed too; `residual_bytes` leaves them out. Uses jax's
    `saved_residuals` (what `jax.ad_checkpoint.print_saved_residuals` prints); returns [] where
    this jax version lacks it.
    """
    try:
        from jax._src.ad_checkpoint import saved_residuals as _saved
    except ImportError:
        return []

    def loss(params):
        return built.loss(params, built.frozen, built.batch)[0]

    out = []
    try:
        found = _saved(loss, built.state["params"])
    except TypeError:  # a private function: its signature may change between jax versions
        return []
    for aval, origin in found:
        shape = tuple(getattr(aval, "shape", ()))
        dtype = str(getattr(aval, "dtype", "?"))
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize
        where = re.sub(r"\S*/calm_jax/", "", origin)
        out.append((shape, dtype, size, where))
    return out


def residual_bytes(residuals) -> int:
    """Bytes of saved activations (closed-over inputs and literals excluded)."""
    return sum(size for _, _, size, where in residuals
               if not where.startswith(("from a constant", "from a literal")))


def abstract_setup(mode: str, anchor_cfg: TransformerConfig, augment_cfg: TransformerConfig, *,
                   mesh, rules, loss_chunk: int | None = None,
                   frozen_layout: str = "stacked"):
    """(the trainer's `Setup` for `mode`, its frozen trees as ShapeDtypeStructs with their
    shardings): the setup runs under `jax.eval_shape`, so no weight is created or placed.
    `frozen_layout`: the trainer's (compose only). Per-layer trees have no sharding of their
    own (XLA propagates the stacks' when they are placed); on a one-device mesh they are given
    that device, so that a step lowered from them targets the mesh's devices."""
    holder = {}

    def setup():
        holder["s"] = s = trainer.setup(
            "compose" if mode == "compose" else "pretrain",
            anchor=trainer.ModelSpec(config=anchor_cfg),
            augments={"augment": trainer.ModelSpec(config=augment_cfg)}
            if mode == "compose" else {},
            composition=CompositionConfig(), lora=lora_lib.LoraConfig(), mesh=mesh,
            rules=rules, rng=jax.random.key(0), loss_chunk=loss_chunk,
            frozen_layout=frozen_layout)
        return s.frozen

    frozen = jax.eval_shape(setup)
    if mesh.size == 1:
        device = jax.sharding.SingleDeviceSharding(mesh.devices.flat[0])
        frozen = jax.tree.map(lambda x: x if x.sharding is not None else
                              jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), frozen)
    s = holder.pop("s")
    s.frozen = frozen
    return s, frozen


def abstract_batch(batch: int, length: int, sharding=None) -> dict[str, jax.ShapeDtypeStruct]:
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=sharding)
    return {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens,
            "decoder_loss_weights": jax.ShapeDtypeStruct((batch, length), jnp.float32,
                                                         sharding=sharding)}


def lowered_step(mode: str, anchor_cfg: TransformerConfig, augment_cfg: TransformerConfig,
                 *, batch: int, length: int, mesh, rules, loss_chunk: int | None = None,
                 frozen_layout: str = "stacked"):
    """The trainer's jitted training step for `mode`, lowered from shapes alone (no weights
    are created; `abstract_setup`, `abstract_batch`) under `mesh` and `rules`."""
    s, _ = abstract_setup(mode, anchor_cfg, augment_cfg, mesh=mesh, rules=rules,
                          loss_chunk=loss_chunk, frozen_layout=frozen_layout)
    opt_cfg = OptimizerConfig()
    prog = steps_lib.build_program(s, make_optimizer(opt_cfg, 1000), schedule(opt_cfg, 1000),
                                   opt_cfg.grad_accum_steps, mesh, rules)
    data = abstract_batch(batch, length, prog.batch_sharding)
    return prog.train_step.lower(prog.abstract_state, s.frozen, data)


def compiled_memory(mode: str, anchor_cfg: TransformerConfig, augment_cfg: TransformerConfig,
                    *, batch: int, length: int, mesh, rules,
                    loss_chunk: int | None = None) -> dict[str, Any]:
    """The jitted training step compiled for this backend from shapes alone (no weights are
    created): XLA's `memory_analysis()` of the whole step in GiB: `argument_gib` (state,
    frozen weights, batch), `output_gib`, `temp_gib` (activations and scratch during the
    step), `alias_gib` (donated state reused for the output) and `total_gib` = argument +
    output + temp - alias, the step's footprint. Compiled on a CPU it is the CPU backend's
    buffer assignment: an estimate for a GPU, whose fusions and attention kernels differ."""
    lowered = lowered_step(mode, anchor_cfg, augment_cfg, batch=batch, length=length,
                           mesh=mesh, rules=rules, loss_chunk=loss_chunk)
    start = time.perf_counter()
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    out = {"compile_s": round(time.perf_counter() - start, 2)}
    for key in ("argument", "output", "temp", "alias"):
        out[f"{key}_gib"] = _gib(getattr(mem, f"{key}_size_in_bytes"))
    out["total_gib"] = _gib(mem.argument_size_in_bytes + mem.output_size_in_bytes
                            + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    return out


def unrolled_flops(lowered) -> tuple[float | None, str | None]:
    """(XLA's flop count of a lowered step, where it came from): the lowered, unoptimised
    module's cost analysis ("lowered") where the backend gives one (CPU), else the compiled
    module's ("compiled"; the GPU backend's lowered analysis is None); (None, None) if
    neither reports flops."""
    flops = _flops(lowered.cost_analysis())
    if flops is not None:
        return flops, "lowered"
    flops = _flops(lowered.compile().cost_analysis())
    return (flops, "compiled") if flops is not None else (None, None)


def lowered_flops(mode: str, anchor_cfg: TransformerConfig, augment_cfg: TransformerConfig,
                  *, batch: int, length: int, mesh, rules,
                  loss_chunk: int | None = None) -> dict[str, Any]:
    """XLA's flop count of `mode`'s whole training step, lowered from shapes alone (no weights
    are created): `hlo_flops` per step and per token, and `hlo_flops_from` (`unrolled_flops`).
    Give configs with unrolled layer scans (`train_step.model_configs(..., unroll=True)`):
    the analysis counts a loop body once."""
    flops, source = unrolled_flops(lowered_step(mode, anchor_cfg, augment_cfg, batch=batch,
                                                length=length, mesh=mesh, rules=rules,
                                                loss_chunk=loss_chunk))
    return {"hlo_flops": flops, "hlo_flops_per_token": None if flops is None else
            round(flops / (batch * length)), "hlo_flops_from": source}


def traced_residuals(mode: str, anchor_cfg: TransformerConfig,
                     augment_cfg: TransformerConfig, *, batch: int, length: int, mesh,
                     rules, top: int = 5, loss_chunk: int | None = None) -> dict[str, Any]:
    """Saved-activation bytes of `mode`'s loss from a trace alone: nothing placed or compiled.

    The trainer's setup runs under `jax.eval_shape` (its weight placement is traced, not
    executed), and the loss's vjp is traced with abstract parameters, frozen trees and batch;
    the residuals are the vjp's saved values that are not inputs. It is what the program
    asks to keep between forward and backward, before XLA's buffer assignment (which may
    fuse some away), so it estimates activation memory; it does not measure it.
    """
    s, frozen = abstract_setup(mode, anchor_cfg, augment_cfg, mesh=mesh, rules=rules,
                               loss_chunk=loss_chunk)
    params = nn.unbox(s.abstract_params)
    data = abstract_batch(batch, length)

    def vjp(params, frozen, data):
        loss = s.loss()
        return jax.vjp(lambda p: loss(p, frozen, data)[0], params)

    closed, out_shape = jax.make_jaxpr(vjp, return_shape=True)(params, frozen, data)
    num_res = len(jax.tree.leaves(out_shape[1]))
    inputs = set(closed.jaxpr.invars)
    total, shapes = 0, []
    for v in closed.jaxpr.outvars[len(closed.jaxpr.outvars) - num_res:]:
        if not hasattr(v, "aval") or hasattr(v, "val") or v in inputs:
            continue  # literals and inputs (weights, tokens) are not activations
        size = int(np.prod(v.aval.shape, dtype=np.int64)) * np.dtype(v.aval.dtype).itemsize
        total += size
        shapes.append((size, f"{v.aval.dtype}[{','.join(map(str, v.aval.shape))}]"))
    shapes.sort(reverse=True)
    return {"residual_gib": _gib(total),
            "largest": [f"{name} ({size / 2**30:.3f} GiB)" for size, name in shapes[:top]]}


def largest_residuals(residuals, top: int = 6) -> list[str]:
    """The biggest saved activations, identical ones grouped: "3 x bf16[..] (GiB) origin"."""
    groups: dict[tuple, list[int]] = {}
    for shape, dtype, size, where in residuals:
        if where.startswith(("from a constant", "from a literal")):
            continue
        key = (dtype, shape, where[:70])
        groups.setdefault(key, []).append(size)
    ranked = sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:top]
    return [f"{len(sizes)} x {dtype}[{','.join(map(str, shape))}] "
            f"({sum(sizes) / 2**30:.3f} GiB) {where}"
            for (dtype, shape, where), sizes in ranked]


def _flops(cost: Any) -> float | None:
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    return None if cost is None else float(cost.get("flops", 0.0))
