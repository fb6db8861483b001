#!/usr/bin/env python3
"""Runs a gin experiment on every worker of a Cloud TPU VM slice (gcloud compute tpus tpu-vm).

    python launch/tpu_pod.py --name calm-v4 --zone us-central2-b --accelerator_type v4-32 -- \\
        --gin_file=experiments/compose_kv.gin --gin.MODEL_DIR="'/mnt/shared/calm'" ...

Steps (each printed instead of run with --dry-run):
  1. reuse the slice if `describe` finds it, else `create` it (--accelerator-type, --version);
  2. pack this checkout, `scp` it to every worker (--worker=all) and `pip install -e .` there
     with the TPU build of jax (--skip_install skips both);
  3. start `python -m calm_jax.train <train args>` on every worker (--worker=all) in the
     background (log in ~/calm_jax_run.log, exit status in ~/calm_jax_run.status);
     `calm_jax.distributed` finds the other workers through the TPU runtime, no flags needed;
  4. stream each worker's log, prefixed `[worker I]`, until its run ends (--log_workers picks
     which; the exit status is the first failing worker's);
  5. with --teardown_after_run, delete the slice afterwards.

`--teardown` alone deletes the slice and does nothing else. The model directory must be
visible to every worker (an NFS / Filestore mount or a gcsfuse-mounted bucket): checkpoints are
written by all workers together and metrics by worker 0.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import procs  # noqa: E402

# generation -> (gcloud accelerator-type prefix, number unit, units per host, default runtime)
# Units: "cores" (TensorCores, 2 per chip on v2-v5p) or "chips" (v5e, v6e). Hosts have 4 chips
# in multi-host slices (v2/v3: 8 cores); single-host v5e/v6e slices go up to 8 chips.
GENERATIONS = {
    "v2": ("v2", "cores", 8, "tpu-ubuntu2204-base"),
    "v3": ("v3", "cores", 8, "tpu-ubuntu2204-base"),
    "v4": ("v4", "cores", 8, "tpu-ubuntu2204-base"),
    "v5p": ("v5p", "cores", 8, "v2-alpha-tpuv5"),
    "v5e": ("v5litepod", "chips", 4, "v2-alpha-tpuv5-lite"),
    "v5litepod": ("v5litepod", "chips", 4, "v2-alpha-tpuv5-lite"),
    "v6e": ("v6e", "chips", 4, "v2-alpha-tpuv6e"),
}
SINGLE_HOST_CHIPS = 8  # v5e / v6e slices up to 8 chips are one host
LOG, STATUS, PID = "calm_jax_run.log", "calm_jax_run.status", "calm_jax_run.pid"
JAX_TPU = "jax[tpu]>=0.10.2,<0.12"


def slice_shape(accelerator_type: str) -> tuple[str, int, str]:
    """'v4-32' -> ('v4-32', 4 hosts, default runtime version); 'v5e-256' -> ('v5litepod-256',
    64, ...). Raises ValueError naming the flag for anything else."""
    m = re.fullmatch(r"(v\d+[a-z]*|v5litepod)-(\d+)", accelerator_type.strip().lower())
    if not m or m.group(1) not in GENERATIONS:
        raise ValueError(f"--accelerator_type: expected <generation>-<size> with generation one "
                         f"of {sorted(GENERATIONS)}, e.g. v4-32 or v5e-256, "
                         f"got {accelerator_type!r}")
    prefix, unit, per_host, version = GENERATIONS[m.group(1)]
    size = int(m.group(2))
    if unit == "chips" and size <= SINGLE_HOST_CHIPS:
        hosts = 1
    elif size % per_host:
        raise ValueError(f"--accelerator_type: expected a {m.group(1)} size that is a multiple "
                         f"of {per_host} {unit} (one host), got {size}")
    else:
        hosts = size // per_host
    return f"{prefix}-{size}", hosts, version


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="TPU VM slice name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default=None)
    parser.add_argument("--accelerator_type", default=None, help="e.g. v4-32, v5e-256, v6e-64")
    parser.add_argument("--version", default=None,
                        help="TPU VM runtime (default: one per generation; see "
                             "`gcloud compute tpus versions list`)")
    parser.add_argument("--spot", action="store_true", help="create a Spot slice")
    parser.add_argument("--workdir", default="calm_jax",
                        help="code directory on the workers, relative to the home directory")
    parser.add_argument("--python", default="python3")
    parser.add_argument("--skip_install", action="store_true",
                        help="the workers already have this code installed")
    parser.add_argument("--log_workers", default="all",
                        help="workers whose logs to stream: 'all' or e.g. '0,3'")
    parser.add_argument("--grace_seconds", type=float, default=150.0,
                        help="after a worker fails, wait this long for the others' logs to end")
    parser.add_argument("--teardown", action="store_true",
                        help="delete the slice and exit (nothing else runs)")
    parser.add_argument("--teardown_after_run", action="store_true",
                        help="delete the slice once the run has ended")
    args = procs.parse_launcher_args(parser, argv)
    if not args.teardown:
        if not args.accelerator_type:
            parser.error("--accelerator_type: expected a slice type such as v4-32, got none")
        if not args.train_args:
            parser.error("expected the training arguments after --, e.g. -- --gin_file=...")
        try:
            args.accelerator, args.hosts, default_version = slice_shape(args.accelerator_type)
        except ValueError as e:
            parser.error(str(e))
        args.version = args.version or default_version
        try:
            args.log_worker_ids = _workers(args.log_workers, args.hosts)
        except ValueError as e:
            parser.error(str(e))
    return args


def _workers(spec: str, hosts: int) -> list[int]:
    if spec == "all":
        return list(range(hosts))
    ids = [int(x) for x in spec.split(",") if x.strip()]
    bad = [i for i in ids if not 0 <= i < hosts]
    if bad or not ids:
        raise ValueError(f"--log_workers: expected 'all' or worker ids in 0..{hosts - 1}, "
                         f"got {spec!r}")
    return ids


def _gcloud(args, verb: str, *rest: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd


def _ssh(args, worker: str, command: str) -> list[str]:
    return _gcloud(args, "ssh", args.name, f"--worker={worker}", f"--command={command}")


def create_or_reuse(args, runner: procs.Runner) -> None:
    describe = _gcloud(args, "describe", args.name, "--format=value(state)")
    create = _gcloud(args, "create", args.name, f"--accelerator-type={args.accelerator}",
                     f"--version={args.version}") + (["--spot"] if args.spot else [])
    if runner.dry_run:
        runner.note("reuse the slice if it exists:")
        runner.run(describe)
        runner.note("else create it:")
        runner.run(create)
        return
    found = subprocess.run(describe, capture_output=True, text=True)
    if found.returncode == 0:
        state = found.stdout.strip()
        runner.note(f"reusing slice {args.name} (state {state})")
        if state != "READY":
            raise SystemExit(f"error: --name: slice {args.name!r} exists but is {state}, "
                             f"expected READY")
        return
    runner.run(create)


def install(args, runner: procs.Runner) -> None:
    archive = os.path.join(tempfile.gettempdir(), f"calm_jax-{args.name}.tar.gz")
    runner.run(["tar", "-czf", archive, "--exclude=.git", "--exclude=__pycache__",
                "--exclude=./runs", "--exclude=./.venv*", "-C", procs.REPO, "."])
    runner.run(_gcloud(args, "scp", archive, f"{args.name}:calm_jax.tar.gz", "--worker=all"))
    workdir = shlex.quote(args.workdir)
    runner.run(_ssh(args, "all", (
        f"mkdir -p {workdir} && tar -xzf calm_jax.tar.gz -C {workdir} && cd {workdir} && "
        f"{args.python} -m pip install -q -e . && "
        f"{args.python} -m pip install -q {shlex.quote(JAX_TPU)}")))


def start(args, runner: procs.Runner) -> None:
    train = shlex.join([args.python, "-m", "calm_jax.train", *args.train_args])
    script = f"cd {shlex.quote(args.workdir)} && {train}; echo $? > ~/{STATUS}"
    runner.run(_ssh(args, "all", (
        f"rm -f {STATUS} && nohup bash -c {shlex.quote(script)} > {LOG} 2>&1 < /dev/null & "
        f"echo $! > {PID}")))


def stream(args, runner: procs.Runner) -> int:
    """One `tail` per worker until its run ends; exits with the run's status."""
    follow = (f"tail -n +1 -F {LOG} --pid=$(cat {PID}) 2>/dev/null; "
              f"exit $(cat {STATUS} 2>/dev/null || echo 1)")
    named = {f"worker {w}": _ssh(args, str(w), follow) for w in args.log_worker_ids}
    return runner.group(named, grace_seconds=args.grace_seconds)


def teardown(args, runner: procs.Runner) -> None:
    runner.run(_gcloud(args, "delete", args.name, "--quiet"))


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    runner = procs.Runner(args.dry_run)
    if args.teardown:
        teardown(args, runner)
        return 0
    runner.note(f"slice {args.name}: {args.accelerator}, {args.hosts} worker(s), runtime "
                f"{args.version}")
    create_or_reuse(args, runner)
    if not args.skip_install:
        install(args, runner)
    start(args, runner)
    rc = stream(args, runner)
    if args.teardown_after_run:
        teardown(args, runner)
    return rc


if __name__ == "__main__":
    sys.exit(main())
