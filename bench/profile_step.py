"""Where one training step's device time goes: a profiler trace of the step, summed by kernel.

    python bench/profile_step.py --shape large --remat dots --loss_chunk 512   # GPU
    python bench/profile_step.py --tiny                                        # CPU check

Builds the step exactly as `bench/train_step.py` does (`train_step.build`: the trainer's
program, state donated) for each mode in `--modes` (default "compose"), compiles it, runs
`--warmup` steps, then records `--steps` steps under `jax.profiler.trace` and reads the trace
back with `jax.profiler.ProfileData` (no TensorBoard needed). Prints one JSON object per mode:

  step_ms         wall time per traced step (profiling on, so a little above train_step's)
  busy_ms         per step: the union of the device's kernel intervals (time a kernel ran)
  idle_ms         per step: step_ms - busy_ms (launch gaps, host work, synchronisation)
  by_category_ms  per step: kernel time per category (`CATEGORIES`, first match of the
                  kernel's or its HLO op's name; "other" for none)
  top             the `--top` kernels by total time: name (cut to 90 characters), HLO op where
                  the trace names it, calls per step and ms per step
  top_by_category per category, its 6 longest kernels by name, calls and ms per step
  bandwidth       where the trace names each kernel's HLO op (command buffers off, below):
                  the bytes each memory-bound kernel moves (`gpu_aot.kernel_bytes` of that op
                  in the compiled program: not products or attention) against its traced
                  time. `achieved_tb_s`: all of them together, TB/s; `covered_ms`: the kernel
                  time that could be matched to an op; `top`: the longest of them with GiB
                  per step and TB/s. What `bench/gpu_aot.py`'s floor leaves out is how far
                  below the peak each such kernel runs: this measures it.

With XLA's command buffers (CUDA graphs; on by default) a kernel's `hlo_op` is the command
buffer that launched it ("command_buffer_N"); `XLA_FLAGS=--xla_gpu_enable_command_buffer=`
turns them off, so each kernel names its own HLO op (the step then runs without graphs).

On a GPU the events are those of the "/device:GPU:0" plane's stream lines. A CPU has no device
plane: the host's XLA threads stand in (lines named "tf_XLA..."), which checks the script and
nothing else. Kernel names and categories come from the trace; a category is a name match, not
a measurement of what the kernel computes. Nothing here is a test: record what a GPU prints in
bench/RESULTS.md with the device, the command and the date.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
import warnings
from typing import Any, Iterable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import flax.linen as nn  # noqa: E402

from bench import train_step as ts  # noqa: E402
from calm_jax import partitioning as part  # noqa: E402

# (category, substrings of the kernel or HLO op name, lower case), first match wins.
CATEGORIES = (
    ("attention", ("cudnn", "fmha", "flash", "sdpa", "dot_product_attention")),
    ("gemm", ("gemm", "cublas", "cutlass", "nvjet", "xmma", "matmul", "dot")),
    ("copy", ("memcpy", "memset", "copy", "transpose", "dynamic_update_slice",
              "dynamic-update-slice", "dynamic_slice", "dynamic-slice", "concatenate")),
    ("reduce", ("reduce", "reduction")),
    ("elementwise", ("loop_", "fusion", "convert", "multiply", "add", "select", "exp")),
)


def category(*names: str) -> str:
    """The first category whose substrings occur in any of `names` (case-insensitive)."""
    low = " ".join(n.lower() for n in names if n)
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def _stat(event, key: str) -> str | None:
    for name, value in event.stats:
        if name == key:
            return str(value)
    return None


def device_events(planes: Iterable[Any]) -> tuple[str, list[tuple[str, str | None, int, int]]]:
    """(source, [(kernel name, HLO op or None, start ns, duration ns)]) from a trace's planes.

    The GPU's stream lines where there is a "/device:GPU" plane, else the host's XLA threads.
    """
    planes = list(planes)
    gpus = [p for p in planes if p.name.startswith("/device:GPU")]
    if gpus:
        source, lines = gpus[0].name, [ln for ln in gpus[0].lines
                                       if ln.name.lower().startswith("stream")]
        lines = lines or list(gpus[0].lines)  # unnamed streams: every line of the plane
    else:
        hosts = [p for p in planes if p.name == "/host:CPU"]
        source = "/host:CPU (no device plane)"
        lines = [ln for p in hosts for ln in p.lines if ln.name.startswith("tf_XLA")]
    events = []
    for line in lines:
        for ev in line.events:
            events.append((ev.name, _stat(ev, "hlo_op"), int(ev.start_ns), int(ev.duration_ns)))
    return source, events


def busy_ns(events: list[tuple[str, str | None, int, int]]) -> int:
    """Length of the union of the events' [start, start + duration) intervals."""
    total, end = 0, None
    for _, _, start, dur in sorted(events, key=lambda e: e[2]):
        stop = start + dur
        if end is None or start >= end:
            total += dur
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def summarize(events, steps: int, wall_s: float, top: int = 25,
              per_category: int = 6) -> dict[str, Any]:
    """Per-step figures (module docstring) from the traced `events` of `steps` steps."""
    per = {}
    by_cat: dict[str, float] = {}
    for name, op, _, dur in events:
        key = (name, op)
        calls, ns = per.get(key, (0, 0))
        per[key] = (calls + 1, ns + dur)
        cat = category(name, op or "")
        by_cat[cat] = by_cat.get(cat, 0.0) + dur
    step_ms = 1e3 * wall_s / steps
    busy = busy_ns(events) / 1e6 / steps
    ranked = sorted(per.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "step_ms": round(step_ms, 3),
        "busy_ms": round(busy, 3),
        "idle_ms": round(step_ms - busy, 3),
        "kernels_per_step": round(len(events) / steps, 1),
        "by_category_ms": {k: round(v / 1e6 / steps, 3)
                           for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top": [{"name": name[:90], "hlo_op": op, "calls": round(calls / steps, 2),
                 "ms": round(ns / 1e6 / steps, 3), "category": category(name, op or "")}
                for (name, op), (calls, ns) in ranked],
        "top_by_category": top_by_category(events, steps, per_category),
    }


def top_by_category(events, steps: int, n: int) -> dict[str, list[dict[str, Any]]]:
    """Per category, its `n` longest kernels by name (every HLO op of a name together): what
    the copies and elementwise fusions are, which the overall top list may not reach."""
    per: dict[str, dict[str, list[float]]] = {}
    for name, op, _, dur in events:
        entry = per.setdefault(category(name, op or ""), {}).setdefault(name, [0, 0])
        entry[0] += 1
        entry[1] += dur
    return {cat: [{"name": name[:90], "calls": round(calls / steps, 2),
                   "ms": round(ns / 1e6 / steps, 3)}
                  for name, (calls, ns) in sorted(names.items(), key=lambda kv: -kv[1][1])[:n]]
            for cat, names in per.items()}


def op_bytes(hlo_text: str) -> dict[str, tuple[int, bool]]:
    """{HLO instruction name: (bytes one launch reads and writes, memory-bound)} for every
    kernel-launching instruction of a compiled module (`gpu_aot.launch_bytes`; memory-bound:
    neither a product nor attention, `gpu_aot.category`)."""
    from bench import gpu_aot

    return {instr.name: (moved, gpu_aot.category(instr) not in gpu_aot.COMPUTE_BOUND)
            for instr, _, moved in gpu_aot.launch_bytes(hlo_text)}


def bandwidth(events, steps: int, moved: dict[str, tuple[int, bool]],
              top: int = 15) -> dict[str, Any] | None:
    """Achieved bandwidth of the memory-bound kernels whose HLO op the trace names and
    `moved` (`op_bytes`) knows; None where no event names one (command buffers on)."""
    per: dict[str, list[float]] = {}
    for _, op, _, dur in events:
        if op in moved and moved[op][1]:
            entry = per.setdefault(op, [0, 0])
            entry[0] += 1
            entry[1] += dur
    if not per:
        return None
    total_b = sum(calls * moved[op][0] for op, (calls, _) in per.items())
    total_ns = sum(ns for _, ns in per.values())
    ranked = sorted(per.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "achieved_tb_s": round(total_b / total_ns / 1e3, 3) if total_ns else None,
        "covered_ms": round(total_ns / 1e6 / steps, 3),
        "gib": round(total_b / 2**30 / steps, 3),
        "top": [{"hlo_op": op, "calls": round(calls / steps, 2), "ms": round(ns / 1e6 / steps, 3),
                 "gib": round(calls * moved[op][0] / 2**30 / steps, 3),
                 "tb_s": round(calls * moved[op][0] / ns / 1e3, 3) if ns else None}
                for op, (calls, ns) in ranked],
    }


def traced_events(fn) -> tuple[float, str, list[tuple[str, str | None, int, int]]]:
    """Runs `fn()` (to `block_until_ready` of what it returns) under `jax.profiler.trace`:
    (its wall seconds, `device_events` of the trace read back with `ProfileData`)."""
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            wall = time.perf_counter() - start
        files = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        if not files:
            raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {logdir}")
        source, events = device_events(ProfileData.from_file(files[0]).planes)
    return wall, source, events


def profile(mode: str, args, mesh, rules) -> dict[str, Any]:
    anchor_cfg, augment_cfg = ts.model_configs(args.shape, dtype=args.dtype,
                                               attention_impl=args.attention_impl,
                                               remat=args.remat)
    rec: dict[str, Any] = {"bench": "profile_step", "device": jax.devices()[0].device_kind,
                           "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS"),
                           "shape": args.shape, "mode": mode,
                           "attention_impl": args.attention_impl, "remat": args.remat,
                           "loss_chunk": args.loss_chunk, "batch": args.batch,
                           "length": args.length}
    with part.mesh_context(mesh), nn.logical_axis_rules(list(rules)):
        b = ts.build(mode, anchor_cfg, augment_cfg, batch=args.batch, length=args.length,
                     mesh=mesh, rules=rules, loss_chunk=args.loss_chunk)
        compiled = b.step.lower(b.state, b.frozen, b.batch).compile()
        state = b.state
        for _ in range(args.warmup):
            state, metrics = compiled(state, b.frozen, b.batch)
        jax.block_until_ready((state, metrics))
        def steps():
            nonlocal state, metrics
            for _ in range(args.steps):
                state, metrics = compiled(state, b.frozen, b.batch)
            return state, metrics

        wall, source, events = traced_events(steps)
    rec["source"] = source
    rec["tokens_per_s"] = round(b.tokens * args.steps / wall, 1)
    rec.update(summarize(events, args.steps, wall, args.top))
    rec["bandwidth"] = bandwidth(events, args.steps, op_bytes(compiled.as_text()))
    return rec


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="small", choices=sorted(ts.SHAPES))
    p.add_argument("--tiny", action="store_true", help="same as --shape tiny")
    p.add_argument("--modes", default="compose",
                   help="comma-separated, in order: compose, finetune")
    p.add_argument("--steps", type=int, default=3, help="traced steps")
    p.add_argument("--warmup", type=int, default=2, help="untraced steps after compilation")
    p.add_argument("--top", type=int, default=25, help="kernels listed")
    p.add_argument("--attention_impl", default="auto", choices=("auto", "xla", "cudnn"))
    p.add_argument("--loss_chunk", type=int, default=None)
    p.add_argument("--remat", default="none", choices=ts.REMAT_POLICY_NAMES)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    if args.tiny:
        args.shape = "tiny"
    _, _, _, args.batch, args.length = ts.SHAPES[args.shape]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in ts.MODES]
    if bad or not args.modes:
        p.error(f"--modes: expected a comma-separated subset of {ts.MODES}, got {args.modes}")
    for name in ("steps", "warmup", "top"):
        if getattr(args, name) <= 0:
            p.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    if args.loss_chunk is not None and args.loss_chunk <= 0:
        p.error(f"--loss_chunk: expected a positive integer, got {args.loss_chunk}")
    return args


def main(argv=None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*context manager has been deprecated.*")
    warnings.filterwarnings("ignore", message=".*has no __module__ attribute.*")
    mesh = part.make_mesh(part.PartitioningConfig(num_devices=1))
    out = []
    for mode in args.modes:
        try:
            rec = profile(mode, args, mesh, part.DEFAULT_RULES)
        except Exception as e:  # report and go on to the next mode
            rec = {"bench": "profile_step", "shape": args.shape, "mode": mode,
                   "error": f"{type(e).__name__}: {str(e)[:800]}"}
        print(json.dumps(rec), flush=True)
        out.append(rec)
    return out


if __name__ == "__main__":
    main()
