#!/usr/bin/env python3
"""Runs one training job over several GPU hosts reachable by ssh (no scheduler).

    python launch/gpu_ssh.py --hosts gpu1,gpu2 --workdir /shared/calm_jax -- \\
        --gin_file=experiments/compose_kv.gin --gin.MODEL_DIR="'/shared/runs/calm'" ...

Host I (in the order given) runs process I with `python -m calm_jax.train <train args>
--coordinator_address=<first host>:<port> --num_processes=<hosts> --process_id=I`; with
`--processes_per_host K` it runs K processes, process I*K+k seeing only GPU k. `--sync` first
copies this checkout to every host (rsync) and installs it (`pip install -e .`). Output lines
are prefixed with the host and process; if one process fails, the others are stopped by JAX's
heartbeat or, after `--grace_seconds`, by closing their ssh sessions (`ssh -tt`, so the remote
processes get SIGHUP). `--dry-run` prints every command.
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
    parser.add_argument("--hosts", required=True, help="comma-separated ssh hosts; the first "
                        "runs process 0 and the coordinator")
    parser.add_argument("--coordinator", default=None,
                        help="address the others reach host 0 at (default: the first host)")
    parser.add_argument("--port", type=int, default=29500)
    parser.add_argument("--processes_per_host", type=int, default=1)
    parser.add_argument("--workdir", default="calm_jax",
                        help="the code's directory on the hosts (relative: to the home dir)")
    parser.add_argument("--python", default="python3", help="interpreter on the hosts")
    parser.add_argument("--ssh", default="ssh", help="ssh program")
    parser.add_argument("--ssh_option", action="append", default=[],
                        help="extra ssh option, e.g. 'Port=2222' (repeatable)")
    parser.add_argument("--sync", action="store_true",
                        help="rsync this checkout to every host and pip install it first")
    parser.add_argument("--heartbeat_timeout_seconds", type=int, default=None)
    parser.add_argument("--grace_seconds", type=float, default=150.0)
    parser.add_argument("--log_dir", default=None, help="also keep one local log per process")
    args = procs.parse_launcher_args(parser, argv)
    args.host_list = [h.strip() for h in args.hosts.split(",") if h.strip()]
    if not args.host_list:
        parser.error(f"--hosts: expected comma-separated host names, got {args.hosts!r}")
    if len(set(args.host_list)) != len(args.host_list):
        parser.error(f"--hosts: expected distinct hosts, got {args.hosts!r} (use "
                     f"--processes_per_host for several processes on one host)")
    if args.processes_per_host < 1:
        parser.error(f"--processes_per_host: expected a positive integer, "
                     f"got {args.processes_per_host}")
    if not 0 < args.port < 65536:
        parser.error(f"--port: expected 1..65535, got {args.port}")
    if not args.train_args:
        parser.error("expected the training arguments after --, e.g. -- --gin_file=...")
    return args


def _ssh(args, host: str, command: str, *, tty: bool = False) -> list[str]:
    cmd = [args.ssh, "-o", "BatchMode=yes"]
    for option in args.ssh_option:
        cmd += ["-o", option]
    return cmd + (["-tt"] if tty else []) + [host, command]


def sync_commands(args) -> list[list[str]]:
    out = []
    for host in args.host_list:
        out.append(["rsync", "-az", "--delete", "--exclude=.git", "--exclude=__pycache__",
                    "--exclude=/runs", "--exclude=/.venv*", procs.REPO + "/",
                    f"{host}:{args.workdir}/"])
        out.append(_ssh(args, host, f"cd {shlex.quote(args.workdir)} && "
                                    f"{args.python} -m pip install -q -e ."))
    return out


def train_commands(args) -> dict[str, list[str]]:
    """{'<host> process I': ssh argv} for every process."""
    per_host = args.processes_per_host
    n = len(args.host_list) * per_host
    coordinator = f"{args.coordinator or args.host_list[0]}:{args.port}"
    named = {}
    for h, host in enumerate(args.host_list):
        for k in range(per_host):
            i = h * per_host + k
            cmd = [args.python, "-m", "calm_jax.train", *args.train_args,
                   f"--coordinator_address={coordinator}", f"--num_processes={n}",
                   f"--process_id={i}"]
            if per_host > 1:
                cmd.append(f"--local_device_ids={k}")
            if args.heartbeat_timeout_seconds is not None:
                cmd.append(f"--heartbeat_timeout_seconds={args.heartbeat_timeout_seconds}")
            remote = f"cd {shlex.quote(args.workdir)} && exec {shlex.join(cmd)}"
            named[f"{host} process {i}"] = _ssh(args, host, remote, tty=True)
    return named


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    runner = procs.Runner(args.dry_run)
    if args.sync:
        for cmd in sync_commands(args):
            runner.run(cmd)
    named = train_commands(args)
    runner.note(f"{len(named)} processes on {len(args.host_list)} host(s), coordinator "
                f"{args.coordinator or args.host_list[0]}:{args.port}")
    return runner.group(named, grace_seconds=args.grace_seconds, log_dir=args.log_dir)


if __name__ == "__main__":
    sys.exit(main())
