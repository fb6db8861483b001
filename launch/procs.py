"""Running commands for the launchers: print them (--dry-run) or run them, and watch a group.

The launchers in this folder build argument lists and hand them to `Runner`, which either
prints each one as a copy-pasteable shell line or runs it. `ProcessGroup` runs the processes of
one multi-process job side by side, prefixes every line of their output with the process's
name, and fails fast: once a process exits with an error, the others get `grace_seconds` to
notice on their own (JAX's coordination service stops them after its heartbeat timeout), then
SIGTERM, then SIGKILL. No jax import here: the launchers run on any laptop.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shell_line(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """A command as one shell line, with `VAR=value` assignments in front."""
    assignments = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    return " ".join(assignments + [shlex.join(cmd)])


def parse_launcher_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                        dry_run_help: str = "print the commands instead of running them"
                        ) -> argparse.Namespace:
    """Adds the options every launcher shares (`--dry-run`, and `-- <calm_jax.train args>` as
    `train_args`, without the `--`), then parses `argv`."""
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help=dry_run_help)
    parser.add_argument("train_args", nargs=argparse.REMAINDER,
                        help="-- then the arguments of python -m calm_jax.train")
    args = parser.parse_args(argv)
    if args.train_args[:1] == ["--"]:
        args.train_args = args.train_args[1:]
    return args


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class Runner:
    """Runs commands one after another, or prints them with --dry-run."""

    def __init__(self, dry_run: bool, out=None):
        self.dry_run = dry_run
        self.out = out or sys.stdout

    def note(self, text: str) -> None:
        print(f"# {text}", file=self.out, flush=True)

    def run(self, cmd: Sequence[str], *, check: bool = True, env: Mapping[str, str] | None = None,
            cwd: str | None = None) -> int:
        print(("" if self.dry_run else "+ ") + shell_line(cmd, env), file=self.out, flush=True)
        if self.dry_run:
            return 0
        rc = subprocess.call(list(cmd), env={**os.environ, **(env or {})}, cwd=cwd)
        if check and rc:
            raise SystemExit(f"error: command failed with exit status {rc}: {shlex.join(cmd)}")
        return rc

    def group(self, named: Mapping[str, Sequence[str]], *, env: Mapping[str, Mapping[str, str]]
              | None = None, grace_seconds: float = 30.0, log_dir: str | None = None,
              cwd: str | None = None) -> int:
        """Runs the named commands together (see `ProcessGroup`); prints them with --dry-run."""
        env = env or {}
        if self.dry_run:
            for name, cmd in named.items():
                print(shell_line(cmd, env.get(name)) + " &", file=self.out, flush=True)
            print("wait", file=self.out, flush=True)
            return 0
        group = ProcessGroup(grace_seconds=grace_seconds, log_dir=log_dir, out=self.out)
        for name, cmd in named.items():
            group.start(name, cmd, env=env.get(name), cwd=cwd)
        return group.wait()


class ProcessGroup:
    """Processes of one job: prefixed output, fail-fast shutdown, children never left behind."""

    def __init__(self, *, grace_seconds: float = 30.0, log_dir: str | None = None, out=None):
        self.grace_seconds = grace_seconds
        self.log_dir = log_dir
        self.out = out or sys.stdout
        self.procs: dict[str, subprocess.Popen] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        # (name, exit status) in the order the processes end: one reaper thread per process
        # waits on it, so two processes that die within one poll interval keep their order.
        self._exits: queue.Queue = queue.Queue()
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)

    def start(self, name: str, cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: str | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(list(cmd), env={**os.environ, **(env or {})}, cwd=cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        self.procs[name] = proc
        self._say(f"[launcher] {name}: pid {proc.pid}: {shell_line(cmd, env)}")
        log = None
        if self.log_dir:
            log = open(os.path.join(self.log_dir, re.sub(r"[^\w.-]+", "_", name) + ".log"), "wb")
        thread = threading.Thread(target=self._pump, args=(name, proc, log), daemon=True)
        thread.start()
        self._threads.append(thread)
        threading.Thread(target=lambda: self._exits.put((name, proc.wait())), daemon=True).start()
        return proc

    def _say(self, line: str) -> None:
        with self._lock:
            self.out.write(line + "\n")
            self.out.flush()

    def _pump(self, name: str, proc: subprocess.Popen, log) -> None:
        for raw in iter(proc.stdout.readline, b""):
            if log is not None:
                log.write(raw)
                log.flush()
            self._say(f"[{name}] " + raw.decode(errors="replace").rstrip("\r\n").replace("\r", ""))
        if log is not None:
            log.close()

    def wait(self) -> int:
        """Waits for all; returns 0, or the exit status of the first process that failed."""
        previous = {}
        stop = threading.Event()

        def on_signal(signum, frame):
            self._say(f"[launcher] signal {signum}: stopping every process")
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, on_signal)
            except ValueError:  # not the main thread
                pass
        first_failure: tuple[str, int] | None = None
        deadline = None
        ended: set[str] = set()
        try:
            while True:
                try:
                    name, status = self._exits.get(timeout=0.1)
                except queue.Empty:
                    name = None
                if name is not None:
                    ended.add(name)
                    running = sorted(set(self.procs) - ended)
                    if status != 0:
                        # Every failure is reported; the job's status is that of the first.
                        if first_failure is None:
                            first_failure = (name, status)
                            deadline = time.monotonic() + self.grace_seconds
                            self._say(f"[launcher] {name} failed with exit status {status}; "
                                      f"waiting up to {self.grace_seconds:.0f} s for the other "
                                      f"{len(running)} to stop")
                        else:
                            self._say(f"[launcher] {name} failed with exit status {status}")
                    continue  # drain every exit already recorded before deciding anything
                running = sorted(set(self.procs) - ended)
                if not running:
                    break
                if stop.is_set() or (deadline is not None and time.monotonic() > deadline):
                    if not stop.is_set():
                        self._say(f"[launcher] still running after {self.grace_seconds:.0f} s: "
                                  f"{running}; terminating them")
                    # A stop request: SIGTERM is a preemption notice, give time to checkpoint.
                    self.terminate(timeout=self.grace_seconds if stop.is_set() else 10.0)
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.terminate()
            for thread in self._threads:
                thread.join(timeout=5)
        if stop.is_set() and first_failure is None:
            return 130
        if first_failure is not None:
            self._say(f"[launcher] job failed: {first_failure[0]} exited with status "
                      f"{first_failure[1]}")
            return first_failure[1] if first_failure[1] > 0 else 128 - first_failure[1]
        return 0

    def terminate(self, timeout: float = 10.0) -> None:
        """SIGTERM to every live process, SIGKILL to those still alive after `timeout`."""
        live = [p for p in self.procs.values() if p.poll() is None]
        for proc in live:
            proc.terminate()
        end = time.monotonic() + timeout
        for proc in live:
            try:
                proc.wait(timeout=max(end - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
