#!/usr/bin/env python3
"""Runs one training job as P processes on this machine: multi-host without the hosts.

    python launch/local_multiprocess.py --num_processes 2 --devices_per_process 2 -- \\
        --gin_file=experiments/compose_kv.gin --gin.MODEL_DIR="'/tmp/calm'" ...

Every process runs `python -m calm_jax.train <train args> --coordinator_address=localhost:PORT
--num_processes=P --process_id=I`, exactly as on P hosts. On CPU (the default) each process gets
`--devices_per_process` fake devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`) and
the processes talk through gloo; with `--platform gpu` each process gets its own
`--devices_per_process` GPUs (`--local_device_ids`).

Output lines are prefixed `[process_I]`; `--log_dir` also keeps one log per process. If a
process fails, the others are stopped by JAX's heartbeat (`--heartbeat_timeout_seconds`) or,
after `--grace_seconds`, by this launcher; the exit status is the failed process's. Run the
same command again to resume from the job's last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import procs  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, default=1,
                        help="fake CPU devices (or GPUs with --platform gpu) per process")
    parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--port", type=int, default=None,
                        help="coordinator port (default: a free one)")
    parser.add_argument("--heartbeat_timeout_seconds", type=int, default=20,
                        help="a process silent this long counts as dead and stops the job")
    parser.add_argument("--grace_seconds", type=float, default=None,
                        help="after a failure, wait this long before terminating the rest "
                             "(default: heartbeat timeout + 15 s)")
    parser.add_argument("--log_dir", default=None, help="also write <log_dir>/process_I.log")
    parser.add_argument("--python", default=sys.executable)
    args = procs.parse_launcher_args(parser, argv)
    if args.num_processes < 1:
        parser.error(f"--num_processes: expected a positive integer, got {args.num_processes}")
    if args.devices_per_process < 1:
        parser.error(f"--devices_per_process: expected a positive integer, "
                     f"got {args.devices_per_process}")
    if not args.train_args:
        parser.error("expected the training arguments after --, e.g. -- --gin_file=...")
    return args


def commands(args, port: int) -> tuple[dict[str, list[str]], dict[str, dict[str, str]]]:
    """{'process_I': argv} and {'process_I': extra environment} for every process."""
    named, envs = {}, {}
    base_env = {"PYTHONPATH": os.pathsep.join(
        [procs.REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    if args.platform == "cpu":
        xla = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                     os.environ.get("XLA_FLAGS", "")).split()
        base_env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(
            xla + [f"--xla_force_host_platform_device_count={args.devices_per_process}"]))
    for i in range(args.num_processes):
        cmd = [args.python, "-m", "calm_jax.train", *args.train_args,
               f"--coordinator_address=localhost:{port}",
               f"--num_processes={args.num_processes}", f"--process_id={i}",
               f"--heartbeat_timeout_seconds={args.heartbeat_timeout_seconds}"]
        if args.platform == "gpu":
            first = i * args.devices_per_process
            ids = ",".join(str(first + k) for k in range(args.devices_per_process))
            cmd.append(f"--local_device_ids={ids}")
        named[f"process_{i}"] = cmd
        envs[f"process_{i}"] = dict(base_env)
    return named, envs


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    port = args.port or procs.free_port()
    named, envs = commands(args, port)
    runner = procs.Runner(args.dry_run)
    runner.note(f"{args.num_processes} processes x {args.devices_per_process} "
                f"{args.platform} device(s), coordinator localhost:{port}")
    grace = (args.grace_seconds if args.grace_seconds is not None
             else args.heartbeat_timeout_seconds + 15)
    return runner.group(named, env=envs, grace_seconds=grace, log_dir=args.log_dir)


if __name__ == "__main__":
    sys.exit(main())
