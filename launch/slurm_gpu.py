#!/usr/bin/env python3
"""Writes a SLURM batch script for a multi-node GPU run and submits it with sbatch.

    python launch/slurm_gpu.py --nodes 2 --gpus_per_node 8 --partition gpu -- \\
        --gin_file=experiments/compose_kv.gin --gin.MODEL_DIR="'/shared/calm'" ...

The script starts one process per node (`--per node`, the default: each process drives all
GPUs of its node) or one per GPU (`--per gpu`: process I sees GPU `$SLURM_LOCALID` only) with
`srun`. Process 0 runs on the first host of `$SLURM_JOB_NODELIST`, which is the coordinator
(`--coordinator_address=<first host>:<port>`); every task passes `--process_id=$SLURM_PROCID`
and the total `--num_processes`. `srun --kill-on-bad-exit=1` ends every task as soon as one
fails. `--dry-run` prints the script and the sbatch command; `--output` writes the script
(default `calm_jax_<job_name>.sbatch`) before submitting it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import procs  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus_per_node", type=int, default=8)
    parser.add_argument("--per", choices=("node", "gpu"), default="node",
                        help="one process per node (all its GPUs) or one per GPU")
    parser.add_argument("--job_name", default="calm_jax")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--time", default="04:00:00", help="wall-clock limit, HH:MM:SS")
    parser.add_argument("--cpus_per_task", type=int, default=None)
    parser.add_argument("--port", type=int, default=29500, help="coordinator port on node 0")
    parser.add_argument("--heartbeat_timeout_seconds", type=int, default=None,
                        help="a process silent this long counts as dead (JAX default: 100)")
    parser.add_argument("--workdir", default=procs.REPO,
                        help="the code's directory on the cluster's shared filesystem")
    parser.add_argument("--python", default="python",
                        help="interpreter on the nodes (e.g. /shared/venv/bin/python)")
    parser.add_argument("--setup", action="append", default=[],
                        help="shell line run before srun, e.g. 'module load cuda/12.4' "
                             "(repeatable)")
    parser.add_argument("--output", default=None, help="where to write the batch script")
    args = procs.parse_launcher_args(parser, argv, dry_run_help="print the script and the sbatch command instead")
    for name in ("nodes", "gpus_per_node"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    if not 0 < args.port < 65536:
        parser.error(f"--port: expected 1..65535, got {args.port}")
    if not args.train_args:
        parser.error("expected the training arguments after --, e.g. -- --gin_file=...")
    return args


def num_processes(args) -> int:
    return args.nodes * (args.gpus_per_node if args.per == "gpu" else 1)


def render(args) -> str:
    """The batch script's text."""
    tasks_per_node = args.gpus_per_node if args.per == "gpu" else 1
    n = num_processes(args)
    directives = [f"--job-name={args.job_name}", f"--nodes={args.nodes}",
                  f"--ntasks-per-node={tasks_per_node}", f"--gpus-per-node={args.gpus_per_node}",
                  f"--time={args.time}", "--output=%x-%j.out"]
    for name in ("partition", "account", "cpus_per_task"):
        if getattr(args, name) is not None:
            directives.append(f"--{name.replace('_', '-')}={getattr(args, name)}")
    # Each task's own values are expanded by the task's shell, hence the single quotes below.
    train = shlex.join([args.python, "-m", "calm_jax.train", *args.train_args,
                        f"--num_processes={n}"])
    train += ' --coordinator_address="$COORDINATOR" --process_id="$SLURM_PROCID"'
    if args.per == "gpu":
        train += ' --local_device_ids="$SLURM_LOCALID"'
    if args.heartbeat_timeout_seconds is not None:
        train += f" --heartbeat_timeout_seconds={args.heartbeat_timeout_seconds}"
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives),
             f"# {n} JAX processes (one per {args.per}); process 0, on the first node, is "
             f"the coordinator.",
             "set -euo pipefail", f"cd {shlex.quote(args.workdir)}", *args.setup,
             'COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):'
             f'{args.port}"',
             "export COORDINATOR",
             'echo "coordinator $COORDINATOR, $SLURM_NTASKS tasks on $SLURM_JOB_NODELIST"',
             "srun --kill-on-bad-exit=1 --label bash -c " + shlex.quote(f"exec {train}"), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    runner = procs.Runner(args.dry_run)
    script = render(args)
    path = args.output or f"calm_jax_{args.job_name}.sbatch"
    if args.dry_run:
        runner.note(f"batch script ({path}):")
        print(script, flush=True)
    else:
        with open(path, "w") as f:
            f.write(script)
        runner.note(f"wrote {path}")
    runner.run(["sbatch", path])
    return 0


if __name__ == "__main__":
    sys.exit(main())
