"""GPU programs compiled on a CPU: what XLA's GPU compiler makes of a step, without a GPU.

    python bench/gpu_aot.py train --shape large --remat dots --loss_chunk 512
    python bench/gpu_aot.py train --modes compose --frozen_layout per_layer  # large, dots, 512
    python bench/gpu_aot.py decode --batch 8                   # bench/decode.py's small shape
    python bench/gpu_aot.py train --tiny ; python bench/gpu_aot.py decode --tiny   # seconds

jax compiles for a GPU it does not have from a target description (a "deviceless" topology,
`jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)`): the
real GPU pipeline (fusion, cuDNN attention, buffer assignment, scheduling), with autotuning
off (`--xla_gpu_autotune_level=0`, set here: it needs a device), so the matrix-product kernels
are XLA's defaults where a GPU would pick among measured candidates. Nothing runs and nothing
is timed. It needs jax's CUDA plugin (`pip install "jax[cuda13]==<jax's version>"`, about
4 GB, no driver needed); the targets (`--target`, `TARGETS`) describe an H100 SXM 80 GB, the
issue's GPU, and the H200 the device tool lends, from their public specifications.

`train` (per mode in `--modes`): the trainer's jitted step, exactly as `bench/train_step.py
--compile_only` lowers it (`step_analysis.lowered_step`; `--frozen_layout per_layer`: the
trainer's option of that name), compiled for the target. Fields:

  memory_gib      XLA's `memory_analysis()`: argument, output, temp, alias and total =
                  argument + output + temp - alias, the step's own footprint (on the H200
                  `train_step.py`'s measured `compiled_gib` is the same number)
  kernels         kernel launches per step (`kernel_inventory`: a while loop's body counts
                  its known trip count times), total and by category
  copy_mib        MiB written per step by the "copy" kernels (slices, dynamic slices,
                  transposes and copies: weights indexed out of layer stacks, mostly)
  traffic         bytes the kernels read and write (`traffic`, `kernel_bytes`: from the
                  shapes of their operands and outputs), MiB by category; memory_bound_ms,
                  the kernels other than products and attention at the target's bandwidth
                  (their time if they ran at the peak: a floor, what fewer passes over
                  memory can save); and the `--top` heaviest of them with the jax op that
                  made each (which layer, norm, loss or copy to look at)

`decode` (per model, anchor and composed, and layout in `--layouts`): one compiled
`decoding.decode_step` at `--batch` (the small shape of `bench/decode.py`, 128-token prompts +
128 new tokens of cache). A decode step at small batch is bound by its kernel count and
their dependencies, not by bandwidth (bench/RESULTS.md, 2026-12-04 H200 entry), so:

  kernels         kernel launches per generated token, total and by category
  traffic         as for `train`, per generated token
  critical_path   kernels on the longest chain of data dependencies through the step: what a
                  CUDA graph that runs independent kernels side by side (XLA's concurrent
                  command-buffer scheduling) cannot overlap. For the composed model, the
                  augmenting model's layers depend on nothing of the anchor's below a
                  connection, so its critical path can be far below its kernel count.

Counts are read from the compiled HLO text (`kernel_inventory`, `critical_path`); categories
follow the launching instruction: "gemm" (matrix-product fusions, cuBLAS calls, XLA's
dynamic-slice fusions around them), "attention" and "attention_backward" (cuDNN's fused
attention), "copy", "update" (in-place dynamic-update-slice: cache and stacked-activation
writes), "reduce" (XLA's input fusions: reductions, concatenations), "elementwise" (other
fusions) and "other". Record what this prints in bench/RESULTS.md as compiled, not measured,
with the target, the command and the date.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Public specifications as XLA's GpuTargetConfig (text format). Both are compute capability 9.0
# with 132 SMs; they differ in memory size and bandwidth.
_SM90 = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{
    major: 9
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 10
}}
runtime_version {{
  major: 13
  minor: 0
}}
device_description_str: "{name}"
"""
TARGETS = {
    "h100": _SM90.format(bandwidth=3352320000000, memory=84929347584,
                         name="NVIDIA H100 80GB HBM3"),
    "h200": _SM90.format(bandwidth=4800000000000, memory=150754820096, name="NVIDIA H200"),
}
AOT_FLAGS = "--xla_gpu_autotune_level=0"


def bandwidth(target: str) -> float:
    """The target's memory bandwidth in bytes/s, from its description."""
    return float(re.search(r"memory_bandwidth: (\d+)", TARGETS[target]).group(1))


# Matrix products without autotuning: cuBLAS's default algorithm ("cublas"; the large step's
# products were cuBLAS kernels on the H200, bench/RESULTS.md) or XLA's Triton products with
# their default tiling ("triton"; for some small shapes Triton has no default and compiling
# fails). A GPU picks per product by timing both; the two bracket what it compiles.
GEMM_FLAGS = {"cublas": "--xla_gpu_enable_triton_gemm=false", "triton": ""}


# Reading compiled HLO text -------------------------------------------------------------------

# `  [ROOT ]%name = <shape> opcode(operands), attributes`
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
# Instructions that launch nothing: values, views, control flow (their bodies count instead),
# and the second half of an asynchronous pair.
_NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
              "conditional", "call", "after-all", "partition-id", "replica-id", "opt-barrier",
              "add-dependency", "domain", "fusion-done", "call-start", "call-done",
              "async-done", "copy-done"}
_COPY_OPS = ("copy", "transpose", "slice", "dynamic-slice", "copy-start")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
COMPUTE_BOUND = ("gemm", "attention", "attention_backward")
_ARRAY = re.compile(r"\b(pred|[su](?:8|16|32|64)|f16|bf16|f32|f64)\[([0-9,]*)\]")


class Instr(tuple):
    """(name, shape text, opcode, the rest of the line: operands and attributes)."""

    name = property(lambda self: self[0])
    shape = property(lambda self: self[1])
    op = property(lambda self: self[2])
    rest = property(lambda self: self[3])


def parse_hlo(text: str) -> tuple[dict[str, list[Instr]], str]:
    """({computation name: its instructions in order}, the entry computation's name) of a
    compiled module's text (`compiled.as_text()`)."""
    comps: dict[str, list[Instr]] = {}
    current, entry = None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(2)
            comps[current] = []
            if header.group(1):
                entry = current
            continue
        if line.startswith("}"):
            current = None
        elif current is not None:
            m = _INSTR.match(line)
            if m:
                comps[current].append(Instr(m.groups()))
    if entry is None:
        raise ValueError("hlo text: expected a module with an ENTRY computation, got none")
    return comps, entry


def array_bytes(shape: str) -> int:
    """Bytes of every array in a shape text such as `bf16[8,1024]{1,0}` or a tuple of them."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


def category(instr: Instr) -> str:
    """What a kernel-launching instruction does (see the module docstring)."""
    name, op, rest = instr.name, instr.op, instr.rest
    if op == "custom-call":
        target = re.search(r'custom_call_target="([^"]*)"', rest)
        target = (target.group(1) if target else "").lower()
        if "cudnn" in target or "fmha" in target:
            return "attention_backward" if "backward" in target else "attention"
        return "gemm" if ("cublas" in target or "gemm" in target) else "other"
    if op in ("fusion", "fusion-start"):
        # XLA names a fusion (and its computation) after its root: loop_slice_fusion,
        # fused_dynamic_slice, gemm_fusion_dot; an asynchronous one is a fusion-start.
        label = " ".join([name] + re.findall(r'(?:calls=%|deduplicated_name=")([\w.\-]+)',
                                             rest))
        if "gemm" in label or "__cublas" in rest or "__triton_gemm" in rest:
            return "gemm"
        if '"name":"dynamic_slice_fusion"' in rest:
            # A library call (a cuBLAS product) reading and writing slices of its operands in
            # place: its shape is the whole buffer it writes into, not a copy.
            return "gemm"
        if "dynamic_update_slice" in label:
            return "update"
        if re.search(r"(^|[\s_])(dynamic_slice|slice|transpose|copy)(\b|_)", label):
            return "copy"
        kind = re.search(r"kind=(k\w+)", rest)
        return "reduce" if kind and kind.group(1) == "kInput" else "elementwise"
    if op in _COPY_OPS:
        return "copy"
    if op == "dynamic-update-slice":
        return "update"
    return "reduce" if op in ("reduce", "reduce-window", "sort", "scatter") else "other"


def written_shape(instr: Instr) -> str:
    """The shape an instruction writes: a fusion-start's is the middle of its
    ((operands), output, context) tuple."""
    if instr.op != "fusion-start":
        return instr.shape
    depth = 0
    for i, ch in enumerate(instr.shape):
        depth += ch == "("
        depth -= ch == ")"
        if ch == ")" and depth == 1:  # the end of the operand tuple
            return instr.shape[i + 1:].split(", u32[")[0].split(", s32[")[0]
    return instr.shape


def _trip_count(instr: Instr) -> int:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.rest)
    return int(m.group(1)) if m else 1


def _called(instr: Instr, key: str) -> list[str]:
    m = re.search(key + r"=\{([^}]*)\}", instr.rest) or re.search(key + r"=(%[\w.\-]+)",
                                                                   instr.rest)
    return re.findall(r"%([\w.\-]+)", m.group(1)) if m else []


def launches(comps: dict[str, list[Instr]], name: str, times: int = 1):
    """(computation, instruction, launches) for every kernel-launching instruction reached
    from computation `name` run `times` times: a while loop's body its known trip count times
    (once without one), both branches of a conditional, a call's callee."""
    for instr in comps[name]:
        if instr.op == "while":
            for body in _called(instr, "body"):
                yield from launches(comps, body, times * _trip_count(instr))
        elif instr.op == "conditional":
            for branch in _called(instr, "branch_computations") or (
                    _called(instr, "true_computation") + _called(instr, "false_computation")):
                yield from launches(comps, branch, times)
        elif instr.op in ("call", "call-start"):
            for callee in _called(instr, "to_apply"):
                yield from launches(comps, callee, times)
        elif instr.op not in _NO_KERNEL:
            yield name, instr, times


def kernel_inventory(text: str) -> dict[str, Any]:
    """Kernel launches of one execution of a compiled module: {"total", "by_category":
    {category: count}, "copy_mib": MiB written by "copy" kernels}. A while loop's body counts
    its known trip count times (once without one); both branches of a conditional count."""
    comps, entry = parse_hlo(text)
    counts: collections.Counter = collections.Counter()
    copy_bytes = 0
    for _, instr, times in launches(comps, entry):
        kind = category(instr)
        counts[kind] += times
        if kind == "copy":
            copy_bytes += times * array_bytes(written_shape(instr))
    return {"total": sum(counts.values()), "by_category": dict(counts.most_common()),
            "copy_mib": _mib(copy_bytes)}


# The scratch buffer a cuBLAS or cuDNN call returns last in its output tuple.
_WORKSPACE = re.compile(r"(?<=, )[su]8\[\d*\]")
# What a kernel reads in part: a fused parameter used only by these reads only their outputs.
_PARTIAL_READS = ("slice", "dynamic-slice", "gather")


def _op_name(instr: Instr) -> str:
    m = re.search(r'op_name="([^"]*)"', instr.rest)
    return m.group(1) if m else ""


def kernel_bytes(instr: Instr, scope: dict[str, Instr],
                 comps: dict[str, list[Instr]]) -> tuple[int, int]:
    """(bytes read, bytes written) by one kernel-launching instruction, from the shapes of its
    operands (`scope`: the instructions of its computation by name) and of its output. A fused
    operand that the fusion only slices counts the slices; the buffer an in-place
    dynamic-update-slice writes into counts neither read nor written in full, only the update.
    An estimate of the traffic to memory: caches and a kernel that reads less than a whole
    operand by other means are not seen."""
    operands = _operands(instr.rest)
    sizes = [array_bytes(scope[o].shape) if o in scope else 0 for o in operands]
    written = array_bytes(written_shape(instr))
    if instr.op == "custom-call" or "kind=kCustom" in instr.rest:
        # A library call's byte workspace (a cuBLAS call's, also inside XLA's custom fusions
        # around one) is scratch, not output.
        written -= sum(array_bytes(w) for w in _WORKSPACE.findall(instr.shape))
    callee = _called(instr, "calls")
    if instr.op not in ("fusion", "fusion-start") or not callee or callee[0] not in comps:
        if instr.op in ("slice", "dynamic-slice"):
            return written, written
        if instr.op == "dynamic-update-slice":  # in place: the update (and indices) read
            return sum(sizes[1:]), sum(sizes[1:2])
        return sum(sizes), written
    body = comps[callee[0]]
    params = {}
    for i in body:
        if i.op == "parameter":
            params[int(re.match(r"\s*(\d+)", i.rest).group(1))] = i.name
    users: dict[str, list[Instr]] = collections.defaultdict(list)
    for i in body:
        for o in _operands(i.rest):
            users[o].append(i)
    inner = {i.name: i for i in body}
    read = 0
    for k, full in enumerate(sizes):
        uses = users.get(params.get(k, ""), [])
        if uses and all(u.op in _PARTIAL_READS for u in uses):
            read += min(full, sum(array_bytes(u.shape) for u in uses))
        elif uses and all(u.op == "dynamic-update-slice" and _operands(u.rest)[0] == params[k]
                          for u in uses):
            # The buffer written in place: not read, and of the output it becomes only the
            # update is written (what the update is made of is read through other operands).
            update = sum(array_bytes(inner[o].shape) for u in uses
                         for o in _operands(u.rest)[1:2] if o in inner)
            written = max(written - full + update, 0)
        else:
            read += full
    return read, written


def launch_bytes(text: str):
    """(instruction, launches, bytes one launch reads and writes) for every kernel-launching
    instruction of a compiled module (`launches`, `kernel_bytes`)."""
    comps, entry = parse_hlo(text)
    scopes = {name: {i.name: i for i in instrs} for name, instrs in comps.items()}
    for name, instr, times in launches(comps, entry):
        yield instr, times, sum(kernel_bytes(instr, scopes[name], comps))


def traffic(text: str, bandwidth: float, top: int = 15) -> dict[str, Any]:
    """Estimated memory traffic of one execution of a compiled module (`kernel_bytes` per
    launch, loops times their trip count): {"mib_by_category", "memory_bound_ms": the
    non-product, non-attention kernels' traffic at `bandwidth` bytes/s (a lower bound on their
    time: no kernel reaches the peak), "top": the `top` heaviest of those kernels with their
    launches, MiB per execution and jax op name}. Products and attention are bound by their
    arithmetic at these shapes and are left out of the time."""
    by_category: collections.Counter = collections.Counter()
    per_kernel: dict[str, list] = {}
    for instr, times, moved in launch_bytes(text):
        kind = category(instr)
        by_category[kind] += times * moved
        row = per_kernel.setdefault(instr.name, [instr.name, kind, 0, 0, _op_name(instr)])
        row[2] += times
        row[3] += times * moved
    bound = sum(v for k, v in by_category.items() if k not in COMPUTE_BOUND)
    heavy = sorted((k for k in per_kernel.values() if k[1] not in COMPUTE_BOUND),
                   key=lambda k: -k[3])[:top]
    return {"mib_by_category": {k: _mib(v) for k, v in by_category.most_common()},
            "memory_bound_ms": round(bound / bandwidth * 1e3, 3),
            "top": [{"kernel": k[0], "category": k[1], "launches": k[2], "mib": _mib(k[3]),
                     "op_name": k[4]} for k in heavy]}


def _mib(n: int) -> float:
    return round(n / 2**20, 1)


def _operands(rest: str) -> list[str]:
    """Names in an instruction's operand list (up to its closing parenthesis)."""
    depth, end = 1, len(rest)
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            end = i
            break
    return re.findall(r"%([\w.\-]+)", rest[:end])


def critical_path(text: str) -> int:
    """Kernels on the longest chain of data dependencies through the entry computation: each
    launching instruction weighs one kernel, a while loop its body's kernels times its trip
    count (a call or conditional: its kernels), everything else nothing."""
    comps, entry = parse_hlo(text)
    memo: dict[str, int] = {}

    def weight(instr: Instr) -> int:
        if instr.op == "while":
            body = _called(instr, "body")
            return _trip_count(instr) * sum(_kernels(b) for b in body)
        if instr.op in ("call", "call-start", "conditional"):
            callees = _called(instr, "to_apply") or _called(instr, "branch_computations")
            return max((_kernels(c) for c in callees), default=0)
        return 0 if instr.op in _NO_KERNEL else 1

    def _kernels(name: str) -> int:
        if name not in memo:
            memo[name] = sum(weight(i) for i in comps[name])
        return memo[name]

    longest: dict[str, int] = {}
    for instr in comps[entry]:  # in program order: operands come first
        before = max((longest.get(o, 0) for o in _operands(instr.rest)), default=0)
        longest[instr.name] = before + weight(instr)
    return max(longest.values(), default=0)


# Compiling for a GPU target -------------------------------------------------------------------


def cuda_plugin_installed() -> bool:
    """Whether jax's CUDA plugin (what compiles for a GPU) is importable; no GPU is needed."""
    import importlib.util

    try:
        return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (13, 12))
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


def topology(target: str):
    """The deviceless topology of one `target` GPU. Call before anything initialises a jax
    backend: jax runs on the CPU here (`jax_platforms="cpu"`), the GPU exists only as the
    compilation target."""
    if target not in TARGETS:
        raise ValueError(f"--target: expected one of {sorted(TARGETS)}, got {target!r}")
    import jax
    from jax.experimental import topologies

    if not cuda_plugin_installed():
        raise RuntimeError(
            "gpu_aot: expected jax's CUDA plugin (pip install \"jax[cuda13]=="
            f"{jax.__version__}\"; no GPU or driver needed), got none installed")
    jax.config.update("jax_platforms", "cpu")
    return topologies.get_topology_desc(platform="cuda", target_config=TARGETS[target],
                                        topology="1x1x1")


def _gib(n: int) -> float:
    return round(n / 2**30, 3)


def memory_gib(compiled) -> dict[str, float]:
    mem = compiled.memory_analysis()
    out = {k: _gib(getattr(mem, f"{k}_size_in_bytes"))
           for k in ("argument", "output", "temp", "alias")}
    out["total"] = _gib(mem.argument_size_in_bytes + mem.output_size_in_bytes
                        + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    return out


def compile_train(mode: str, args, device) -> dict[str, Any]:
    """The trainer's step for `mode` compiled for the target `device` (a topology device)."""
    import jax
    import flax.linen as nn

    from bench import step_analysis as sa
    from bench import train_step as ts
    from calm_jax import partitioning as part

    anchor, augment = ts.model_configs(args.shape, remat=args.remat,
                                       attention_impl=args.attention_impl)
    _, _, _, batch, length = ts.SHAPES[args.shape]
    mesh = part.make_mesh(part.PartitioningConfig(num_devices=1), devices=[device])
    rules = part.DEFAULT_RULES
    per_layer = args.frozen_layout == "per_layer" and mode == "compose"
    with part.mesh_context(mesh), nn.logical_axis_rules(list(rules)):
        lowered = sa.lowered_step(mode, anchor, augment, batch=batch, length=length, mesh=mesh,
                                  rules=rules, loss_chunk=args.loss_chunk,
                                  frozen_layout="per_layer" if per_layer else "stacked")
        start = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
    text = compiled.as_text()
    inventory = kernel_inventory(text)
    return {"bench": "gpu_aot", "kind": "train", "target": args.target, "gemm": args.gemm,
            "jax": jax.__version__,
            "shape": args.shape, "mode": mode, "remat": args.remat,
            "loss_chunk": args.loss_chunk, "attention_impl": args.attention_impl,
            "frozen_layout": "per_layer" if per_layer else "stacked",
            "compile_s": round(compile_s, 1), "memory_gib": memory_gib(compiled),
            "kernels": {"total": inventory["total"], **inventory["by_category"]},
            "copy_mib": inventory["copy_mib"],
            "traffic": traffic(text, bandwidth(args.target), top=args.top)}


def compile_decode(args, device) -> list[dict[str, Any]]:
    """One decode step of the anchor alone and of the composed model, per layout, compiled
    for the target `device`."""
    import jax
    import flax.linen as nn

    from bench import decode as bd
    from calm_jax import decoding
    from calm_jax.composition import ComposedLM
    from calm_jax.models import Decoder

    dargs = bd.parse_args(["--tiny"] if args.tiny else [])
    anchor = bd.model_config(dargs.anchor_dim, dargs.anchor_layers, dargs.anchor_heads, dargs)
    augment = bd.model_config(dargs.augment_dim, dargs.augment_layers, dargs.augment_heads,
                              dargs)
    composed = ComposedLM(anchor, {"augment": augment})
    params = jax.eval_shape(lambda: nn.unbox(composed.init(jax.random.key(0))))
    sharding = jax.sharding.SingleDeviceSharding(device)
    cache_len = dargs.prompt_len + dargs.new_tokens
    out = []
    for name, (model, stacked) in {"anchor": (Decoder(anchor), params["anchor"]),
                                   "composed": (composed, params)}.items():
        for layout in args.layouts:
            run = (jax.eval_shape(lambda p, m=model: decoding.unstack_params(m, p,
                                                                             fuse=args.fuse),
                                  stacked)
                   if layout == "per_layer" else stacked)
            lowered = bd.lowered_decode_step(model, run, args.batch, dargs, sharding)
            start = time.perf_counter()
            compiled = lowered.compile()
            compile_s = time.perf_counter() - start
            text = compiled.as_text()
            inventory = kernel_inventory(text)
            out.append({"bench": "gpu_aot", "kind": "decode", "target": args.target,
                        "gemm": args.gemm,
                        "jax": jax.__version__, "model": name, "layout": layout,
                        "batch": args.batch, "cache_len": cache_len, "dtype": dargs.dtype,
                        "fused_projections": args.fuse if layout == "per_layer" else None,
                        "compile_s": round(compile_s, 1),
                        "kernels": {"total": inventory["total"], **inventory["by_category"]},
                        "critical_path": critical_path(text),
                        "copy_mib": inventory["copy_mib"],
                        "traffic": traffic(text, bandwidth(args.target), top=args.top)})
    return out


def parse_args(argv=None) -> argparse.Namespace:
    from bench import train_step as ts

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=("train", "decode"))
    p.add_argument("--target", default="h100", help=f"one of {sorted(TARGETS)}")
    p.add_argument("--gemm", default="cublas", choices=sorted(GEMM_FLAGS),
                   help="matrix-product kernels without autotuning (see GEMM_FLAGS)")
    p.add_argument("--tiny", action="store_true", help="tiny models (seconds)")
    p.add_argument("--shape", default="large", choices=sorted(ts.SHAPES), help="train only")
    p.add_argument("--modes", default=",".join(ts.MODES), help="train only")
    p.add_argument("--remat", default="dots", choices=ts.REMAT_POLICY_NAMES, help="train only")
    p.add_argument("--loss_chunk", type=int, default=512, help="train only (0: unchunked)")
    p.add_argument("--attention_impl", default="auto", choices=("auto", "xla", "cudnn"),
                   help="auto: as on a GPU (`attention.compiling_for`)")
    p.add_argument("--frozen_layout", default="stacked", choices=ts.FROZEN_LAYOUTS,
                   help="train only, composed step: as train_step.py's")
    p.add_argument("--top", type=int, default=10,
                   help="the heaviest memory-bound kernels listed under traffic.top")
    p.add_argument("--batch", type=int, default=8, help="decode only")
    p.add_argument("--layouts", default="per_layer,stacked", help="decode only")
    p.add_argument("--no_fuse", dest="fuse", action="store_false",
                   help="decode only: the per-layer layout without fused projections")
    args = p.parse_args(argv)
    if args.target not in TARGETS:
        p.error(f"--target: expected one of {sorted(TARGETS)}, got {args.target!r}")
    if args.tiny:
        args.shape = "tiny"
    args.loss_chunk = args.loss_chunk or None
    if args.loss_chunk is not None and args.loss_chunk < 0:
        p.error(f"--loss_chunk: expected a positive integer or 0, got {args.loss_chunk}")
    if args.top < 0:
        p.error(f"--top: expected a non-negative integer, got {args.top}")
    if args.batch <= 0:
        p.error(f"--batch: expected a positive integer, got {args.batch}")
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.modes if m not in ts.MODES]
    if bad or not args.modes:
        p.error(f"--modes: expected a comma-separated subset of {ts.MODES}, got {args.modes}")
    args.layouts = [x for x in args.layouts.split(",") if x]
    bad = [x for x in args.layouts if x not in ("per_layer", "stacked")]
    if bad or not args.layouts:
        p.error(f"--layouts: expected per_layer and/or stacked, got {args.layouts}")
    return args


def main(argv=None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    # Autotuning needs a device; the flags must be set before jax's backends start.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_autotune_level" not in flags:
        flags = f"{flags} {AOT_FLAGS}"
    os.environ["XLA_FLAGS"] = f"{flags} {GEMM_FLAGS[args.gemm]}".strip()
    device = topology(args.target).devices[0]
    from calm_jax.models.attention import compiling_for

    with compiling_for("gpu"):  # attention_impl="auto" resolves as on the target
        if args.kind == "decode":
            results = compile_decode(args, device)
        else:
            results = [compile_train(mode, args, device) for mode in args.modes]
    for rec in results:
        print(json.dumps(rec), flush=True)
    return results


if __name__ == "__main__":
    main()
