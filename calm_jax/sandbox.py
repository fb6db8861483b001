"""Run an untrusted Python program in a contained, resource-limited subprocess.

This module is the execution half of functional-correctness evaluation
(HumanEval-style ``pass@k``): a model writes a program, and
:func:`run_program` runs it and reports whether it passed: whether it
exited cleanly or, when a :class:`Check` is given, whether the check
returned normally on what the program defined (a verdict the program
cannot forge by exiting early; see :class:`Check`).

How a program is run
--------------------
The parent (your evaluator) starts a fresh process of the *same* Python
interpreter, ``python -I -B -X utf8 sandbox_launcher.py --calm-jax-sandbox CONFIG``,
in a new session (so it leads its own process group), with stdin from
``/dev/null``, a minimal environment, and its stdout/stderr going to files
outside its working directory. That process is the *supervisor*
(:mod:`calm_jax.sandbox_launcher` run as a script): it makes itself a child
subreaper (``PR_SET_CHILD_SUBREAPER``, so descendants whose parents exit
become its children rather than init's) and forks the *child* that runs the
program; it runs none of the program's code itself. Before the child
executes a single line of the program it puts up the following layers, in
order:

1. Resource limits (always): ``RLIMIT_CPU`` (``cpu_s``), ``RLIMIT_AS``
   (``memory_mb``, address space), ``RLIMIT_FSIZE`` (``file_size_mb``, per
   file, stdout/stderr included), ``RLIMIT_NOFILE``, ``RLIMIT_CORE = 0`` and
   ``RLIMIT_NPROC = 0``. The last stops fork bombs, but only for non-root
   users (Linux does not apply it to root, hence layers 4 and 5), and since
   Linux counts threads as processes it also means a program run by a
   non-root evaluator cannot start threads.
2. When running as root (best effort, skipped silently on failure): a
   private mount namespace with a size-capped ``tmpfs`` over the working
   directory (``disk_mb``), and ``unshare(CLONE_NEWNET)``, a network namespace
   with no usable interface. Then every capability is dropped.
3. Landlock (Linux >= 5.13, best effort): file writes, creations, removals and
   renames are refused by the kernel everywhere except inside the working
   directory (and ``/dev/null``); on newer kernels TCP bind/connect and
   signals to processes outside the sandbox are refused too.
4. seccomp (x86-64 and arm64, best effort): the kernel refuses ``fork``,
   ``vfork``, non-thread ``clone``, ``socket``, ``ptrace``, ``io_uring``,
   ``bpf``, namespace changes and signals aimed at any other process.
5. A Python audit hook (always; :pep:`578`): opening a file for writing,
   removing, renaming, linking, truncating or changing the mode of a path
   outside the working directory raises :class:`PermissionError`, as do every
   ``socket.*`` operation, ``os.fork``/``os.system``/``subprocess``/``exec``,
   signals to other processes and ``ctypes`` library loading (and, when a
   check follows, tracing, profiling and ``gc``'s object walks).

The parent enforces the wall-clock ``timeout_s``: when it expires it asks the
supervisor (``SIGTERM``) to kill the child. Whenever the child ends, the
supervisor kills every process left below it, found through ``/proc`` and
reaped as they come back to it as the subreaper: so programs' children die
with them even if they started their own session (``start_new_session=True``,
``setsid``) or their parent exited. If the supervisor does not exit within a
few seconds the parent kills its process group; once it is gone the parent
also kills anything left in its process group or session and deletes its
temporary directory.

What this guards and what it does not
-------------------------------------
This is a *best-effort* guard for model-written code, not a security boundary
like a container or a VM. What it guards is writes, new processes, the
network and signals, plus time, memory and output size. It does **not**
guard reads: a program can read any file the evaluator's user can read
(``/etc/passwd``, your home directory, the other files of its temporary
directory) and print it into its output.

The kernel layers (2-4) are only as strong as the kernel features the
machine offers: :attr:`ExecutionResult.guards` lists the layers that were
actually in force for each run. Without them (``kernel_guards=False``, or a
kernel without Landlock and seccomp) only the resource limits and the audit
hook stand, and the audit hook is Python-level: a program that sets out to
can bypass it in a few lines (for example by rebinding ``sys.audit`` before
calling :mod:`subprocess`, whose audit event is raised from Python code).
Then, when the evaluator runs as root (so ``RLIMIT_NPROC`` does not apply),
such a program can start processes, write outside its directory, use the
network and signal other processes of the same user. What still holds: the
resource limits of every process it starts, the wall-clock limit, and the
clean-up of its process tree through the supervisor, unless the program
kills the supervisor first (signalling it is refused by seccomp, Landlock's
signal scope and the audit hook; with all three gone nothing stops it, and
then the parent's clean-up reaches only the processes still in the
supervisor's process group or session). Without root there is no private
``tmpfs``, so a program may create many files (each capped at
``file_size_mb``) until its time runs out. Run evaluations of code you
distrust inside a disposable container or VM as well.

Nothing here imports third-party packages; the launcher uses only the
standard library (``ctypes`` for the kernel layers).

Where the code lives
--------------------
* this module: the parent side, i.e. the public API (:func:`run_program`,
  :class:`Check`, :class:`ExecutionResult`, :data:`STATUSES`), waiting with a
  wall-clock limit, checking a check's proof, killing what is left, reading
  the output tails and cleaning up;
* :mod:`calm_jax.sandbox_launcher`: the other side of the process boundary:
  the supervisor, and in the child the resource limits (layer 1), the audit
  hook (layer 5), running the program as ``__main__`` and the check harness;
* :mod:`calm_jax.sandbox_kernel`: the kernel layers 2-4 (private ``tmpfs``,
  network namespace, capabilities, Landlock, seccomp), used by the launcher.

The launcher runs under ``-I`` (isolated mode), so neither its directory nor
``calm_jax`` is on its ``sys.path``: it imports nothing from ``calm_jax`` and
loads ``sandbox_kernel.py`` by file path from its own directory (see
:mod:`calm_jax.sandbox_launcher`). This module imports the launcher
normally, for the constants the two sides share and for the path of the
script to run.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import math
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

from calm_jax import sandbox_launcher
from calm_jax.sandbox_launcher import LAUNCH_FLAG, SETUP_FAILED_EXIT

__all__ = ["Check", "ExecutionResult", "STATUSES", "run_program"]

#: The values :attr:`ExecutionResult.status` can take.
STATUSES = ("passed", "failed", "timeout", "error")

#: The script the child process runs.
_LAUNCHER = os.path.abspath(sandbox_launcher.__file__)

_DEFAULT_TAIL_CHARS = 4096

#: Random bytes in a check's secret (written as hex, so twice as many characters).
_SECRET_BYTES = 32

#: How long the supervisor gets to kill the program's tree after the parent's
#: ``SIGTERM`` before the parent kills its process group itself.
_STOP_GRACE_S = 5.0


@dataclasses.dataclass(frozen=True)
class Check:
    """A test that :func:`run_program` runs after the program, with an unforgeable verdict.

    After the program has run to its end as ``__main__``, the harness in the
    same process executes ``source`` in a namespace of its own (builtins as
    they were before the program started, nothing the program defined),
    binds the program's global ``candidate`` there under the same name, and
    calls ``function(candidate)``. The run passes only if that call returns
    normally. The proof is a fresh random secret per run: the parent hands it
    to the launcher through a pipe that is read and closed before any program
    code runs, and the harness writes it to a file descriptor opened for it
    once the call has returned, then exits at once (the program's ``atexit``
    hooks do not run). ``source`` is compiled, and every function the
    harness calls is bound, before the program starts, and while the
    program and the check run the audit hook refuses ``sys.settrace``,
    ``sys.setprofile``, ``sys._current_frames`` and ``gc``'s object walks.

    What this guarantees: a run passes only if ``function(candidate)``
    returned. Exiting with status 0 in any way (``sys.exit``, ``os._exit``,
    ``atexit`` hooks, ``SystemExit`` raised by the candidate), printing or
    writing anything anywhere (the program's argv, environment and files do
    not hold the secret), defining a global ``check`` or a global that
    shadows a builtin or a helper of ``source``, rebinding names in
    ``builtins`` (``AssertionError``, ``abs``, ...), or rebinding
    ``sys.exit``, ``sys.stderr``, ``os._exit`` or ``traceback`` functions
    does not make a run pass.

    What it does not guarantee: the candidate runs inside the check, in the
    same interpreter, so a program written to attack this harness can still
    fake a pass, for example by returning objects whose ``__eq__`` always
    says yes, by patching attributes of modules the check uses
    (``math.fabs``, ``random.randint``: ``source`` runs after the program,
    with the same ``sys.modules``), or by reading the secret out of the
    harness's frames (``sys._getframe(n).f_back``) or the process's memory
    (and, where Landlock is not in force, from the evaluator's memory
    through ``/proc/PID/mem``, if the system's ptrace policy lets a process
    of the same user read it).
    The proof rules out accidents and cheap tricks, not a determined
    adversary: for that, run the check in a process the candidate never runs
    in. Threads the program started (possible only when the evaluator is
    root) keep running while the check runs.

    Attributes:
      source: Python source that defines ``function`` (e.g. a HumanEval
        problem's prompt followed by its test code). Trusted: it is the
        test, not the code under test.
      candidate: name of the program's global to test (e.g. the problem's
        entry point).
      function: name of the function ``source`` defines, called with the
        candidate.
    """

    source: str
    candidate: str
    function: str = "check"

    def __post_init__(self):
        if not isinstance(self.source, str):
            raise TypeError(f"Check.source must be a str of Python source, got {type(self.source).__name__}")
        for field in ("candidate", "function"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value.isidentifier():
                raise ValueError(f"Check.{field} must be a Python identifier, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one :func:`run_program` call.

    Attributes:
      passed: ``True`` exactly when ``status == "passed"``.
      status: one of :data:`STATUSES`:

        * ``"passed"``: the program exited with status 0 or, with a
          :class:`Check`, the check returned normally (shown by its proof,
          whatever the exit status; nothing of the program runs after it);
        * ``"failed"``: it exited with a non-zero status, e.g. from an
          uncaught exception (a failed ``assert``, a ``MemoryError`` under the
          memory limit, a ``PermissionError`` from a sandbox guard), or, with
          a check, it exited in any way without the check returning;
        * ``"timeout"``: it ran past the wall-clock ``timeout_s`` or the CPU
          limit ``cpu_s`` and was killed;
        * ``"error"``: it could not be started, the sandbox could not be set
          up, or it was killed by a signal other than for time (a crash, a
          seccomp kill, ...). Writing past ``file_size_mb`` is a
          ``"failed"``: Python ignores ``SIGXFSZ`` and raises ``OSError``.
      returncode: the child's exit status; negative for "killed by signal
        -returncode" (as in :mod:`subprocess`); ``None`` if it never started.
      stdout: the last characters (at most ``tail_chars``) of its stdout.
      stderr: the last characters (at most ``tail_chars``) of its stderr.
      guards: the containment layers that were in force, in the order they
        were put up, from ``("subreaper", "rlimits", "private_tmpfs",
        "netns", "no_capabilities", "landlock", "seccomp", "audit_hook")``
        (``"subreaper"``: the supervisor collects orphaned descendants, so
        clean-up reaches all of them). Empty when the launcher did not get
        as far as reporting.
    """

    passed: bool
    status: str
    returncode: int | None
    stdout: str = ""
    stderr: str = ""
    guards: tuple[str, ...] = ()


def run_program(
    program: str,
    timeout_s: float = 10.0,
    memory_mb: int | None = 1024,
    cpu_s: float | None = None,
    *,
    file_size_mb: int = 16,
    disk_mb: int = 64,
    kernel_guards: bool = True,
    tail_chars: int = _DEFAULT_TAIL_CHARS,
    check: Check | None = None,
) -> ExecutionResult:
    """Runs ``program`` (Python source) in the sandbox and reports how it ended.

    The program runs as ``__main__`` in a fresh interpreter whose working
    directory is a new, empty temporary directory (also ``$HOME`` and
    ``$TMPDIR``) that is deleted afterwards. See the module docstring for the
    containment layers and their limits. This function never raises because
    of anything the program does; it is safe to call from several threads.

    Without ``check`` the program passes when it exits with status 0. With
    ``check`` it passes only when, after the program ran to its end, the
    check function returned normally, shown by a proof the program cannot
    produce by exiting, printing or writing (see :class:`Check`).

    Args:
      program: Python source code.
      timeout_s: wall-clock limit in seconds, enforced by the parent.
      memory_mb: address-space limit (``RLIMIT_AS``) in MiB, or ``None`` for
        none.
      cpu_s: CPU-time limit in seconds (``RLIMIT_CPU``, rounded up to whole
        seconds); defaults to ``timeout_s``.
      file_size_mb: largest file the program may write (``RLIMIT_FSIZE``),
        its stdout and stderr included, in MiB.
      disk_mb: size of the private ``tmpfs`` mounted as its working
        directory, in MiB (only when running as root).
      kernel_guards: put up the namespace, capability, Landlock and seccomp
        layers where the machine allows; ``False`` leaves only the resource
        limits and the Python audit hook (useful to test those alone).
      tail_chars: how many trailing characters of stdout/stderr to keep.
      check: a test to run on what the program defined, in the same
        process, after the program; see :class:`Check`.

    Returns:
      An :class:`ExecutionResult`.

    Raises:
      TypeError: if ``program`` is not a ``str``.
      ValueError: if a limit is not a positive number.
    """
    if not isinstance(program, str):
        raise TypeError(f"program must be a str of Python source, got {type(program).__name__}")
    if check is not None and not isinstance(check, Check):
        raise TypeError(f"check must be a calm_jax.sandbox.Check or None, got {type(check).__name__}")
    _check_positive("timeout_s", timeout_s)
    if memory_mb is not None:
        _check_positive("memory_mb", memory_mb)
    if cpu_s is None:
        cpu_s = timeout_s
    _check_positive("cpu_s", cpu_s)
    _check_positive("file_size_mb", file_size_mb)
    _check_positive("disk_mb", disk_mb)
    _check_positive("tail_chars", tail_chars)

    root = tempfile.mkdtemp(prefix="calm-jax-sandbox-")
    try:
        return _run_in(
            root,
            program,
            timeout_s=float(timeout_s),
            config={
                "memory_bytes": None if memory_mb is None else int(memory_mb * 2**20),
                "cpu_s": int(math.ceil(cpu_s)),
                "file_size_bytes": int(file_size_mb * 2**20),
                "disk_bytes": int(disk_mb * 2**20),
                "kernel_guards": bool(kernel_guards),
                "check": None if check is None else dataclasses.asdict(check),
            },
            tail_chars=int(tail_chars),
        )
    finally:
        _remove_tree(root)


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _run_in(root: str, program: str, *, timeout_s: float, config: dict, tail_chars: int) -> ExecutionResult:
    """Runs the launcher with everything it needs laid out under ``root``."""
    workdir = os.path.join(root, "work")
    os.mkdir(workdir, 0o700)
    program_path = os.path.join(root, "program.py")
    stdout_path = os.path.join(root, "stdout")
    stderr_path = os.path.join(root, "stderr")
    report_path = os.path.join(root, "guards.json")
    proof_path = os.path.join(root, "proof")
    with open(program_path, "w", encoding="utf-8") as f:
        f.write(program)
    os.close(os.open(proof_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    config = dict(config, workdir=workdir, program=program_path, report=report_path, proof=proof_path)
    # The secret reaches the sandbox through a pipe that the child running
    # the harness reads and closes before any program code runs: never
    # through argv, the environment or a file the program could read.
    secret = secrets.token_hex(_SECRET_BYTES).encode() if config["check"] is not None else None
    pass_fds: tuple[int, ...] = ()
    if secret is not None:
        read_end, write_end = os.pipe()
        try:
            os.write(write_end, secret)  # Far below the pipe's capacity: never blocks.
        finally:
            os.close(write_end)
        config["secret_fd"] = read_end
        pass_fds = (read_end,)
    env = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }
    argv = [
        sys.executable, "-I", "-B", "-X", "utf8",
        _LAUNCHER, LAUNCH_FLAG, json.dumps(config),
    ]

    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=workdir,
                env=env,
                close_fds=True,
                pass_fds=pass_fds,
                start_new_session=True,
            )
        except OSError as e:
            return ExecutionResult(False, "error", None, "", f"could not start the sandbox: {e}")
        finally:
            for fd in pass_fds:
                os.close(fd)
        returncode, cpu_used, timed_out = _wait(proc, timeout_s)

    if secret is not None and _proof_matches(proof_path, secret):
        status = "passed"  # The check returned; how the process ended afterwards does not matter.
    elif timed_out:
        status = "timeout"
    elif returncode is None:
        status = "error"
    elif returncode == 0:
        status = "passed" if secret is None else "failed"  # With a check, exiting is no proof.
    elif returncode == -signal.SIGXCPU or (returncode == -signal.SIGKILL and cpu_used >= config["cpu_s"]):
        status = "timeout"  # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL at the hard one.
    elif returncode < 0 or returncode == SETUP_FAILED_EXIT:
        status = "error"
    else:
        status = "failed"
    return ExecutionResult(
        passed=status == "passed",
        status=status,
        returncode=returncode,
        stdout=_read_tail(stdout_path, tail_chars),
        stderr=_read_tail(stderr_path, tail_chars),
        guards=_read_guards(report_path),
    )


def _wait(proc: subprocess.Popen, timeout_s: float) -> tuple[int | None, float, bool]:
    """Waits for ``proc`` with a wall-clock limit; cleans up its process tree.

    Returns ``(returncode, cpu_seconds_used, timed_out)``, with ``returncode``
    ``None`` if the child was reaped by someone else. ``os.wait4`` is
    used instead of ``Popen.wait`` to learn the CPU time of the supervisor
    and everything it reaped (the program among them).
    """
    pid = proc.pid
    expired = threading.Event()
    backstop = threading.Timer(_STOP_GRACE_S, _kill_group, (pid,))
    backstop.daemon = True

    def expire() -> None:
        expired.set()
        _stop(pid)
        backstop.start()

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    status, usage = None, None
    reaped = False
    try:
        while not reaped:
            try:
                _, status, usage = os.wait4(pid, 0)
                reaped = True
            except InterruptedError:
                continue
            except ChildProcessError:  # Reaped by someone else: outcome unknown.
                break
    finally:
        timer.cancel()
        backstop.cancel()  # Also keeps it from firing if expire() starts it only now.
        if not reaped:  # Interrupted (e.g. KeyboardInterrupt) or lost: stop, then reap.
            _stop(pid)
            _reap_within(pid, _STOP_GRACE_S)
        # The supervisor has killed the program's whole tree. If it could not
        # (it was itself killed), whatever stayed in its process group or
        # session dies here.
        _kill_group(pid)
        _kill_session(pid)
    if status is None:
        proc.returncode = -signal.SIGKILL
        return None, 0.0, expired.is_set()
    returncode = os.waitstatus_to_exitcode(status)
    proc.returncode = returncode  # Keeps Popen from waiting on it again.
    cpu_used = usage.ru_utime + usage.ru_stime
    return returncode, cpu_used, expired.is_set()


def _stop(pid: int) -> None:
    """Asks the supervisor ``pid`` to kill the program and everything below it."""
    try:
        os.kill(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


def _reap_within(pid: int, patience_s: float) -> None:
    """Reaps ``pid``, waiting at most ``patience_s`` before killing its process group."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        if time.monotonic() > deadline:
            _kill_group(pid)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            return
        time.sleep(0.01)


def _proof_matches(path: str, secret: bytes) -> bool:
    """Whether the regular file at ``path`` holds exactly ``secret``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        content = os.read(fd, len(secret) + 1)
    except OSError:
        return False
    finally:
        os.close(fd)
    return hmac.compare_digest(content, secret)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_session(sid: int, patience_s: float = 2.0) -> None:
    """Kills the live processes of session ``sid`` (found through ``/proc``).

    Repeats until none is left (a killed process can take a moment to exit,
    and one may have forked just before being killed), for at most
    ``patience_s`` seconds. Costs one ``/proc`` scan when there are none.
    """
    if not os.path.isdir("/proc"):
        return
    me = os.getpid()
    deadline = time.monotonic() + patience_s
    while True:
        found = False
        try:
            entries = os.listdir("/proc")
        except OSError:
            return
        for name in entries:
            if not name.isdigit() or int(name) == me:
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            # Fields after the parenthesised command: state ppid pgrp session ...
            fields = stat[stat.rfind(b")") + 2:].split()
            if len(fields) >= 4 and fields[0] != b"Z" and int(fields[3]) == sid:
                found = True
                try:
                    os.kill(int(name), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if not found or time.monotonic() > deadline:
            return
        time.sleep(0.01)


def _read_tail(path: str, chars: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * chars))  # UTF-8 uses at most 4 bytes a char.
            data = f.read()
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")[-chars:]


def _read_guards(path: str) -> tuple[str, ...]:
    try:
        with open(path, encoding="utf-8") as f:
            guards = json.load(f)
    except (OSError, ValueError):
        return ()
    if not isinstance(guards, list):
        return ()
    return tuple(str(g) for g in guards)


def _remove_tree(path: str) -> None:
    """Deletes ``path`` even if the program made parts of it read-only.

    Never raises: a tree that cannot be removed is left behind rather than
    failing the evaluation. Runs only once the program is dead, so nothing
    changes under it.
    """
    try:
        os.chmod(path, 0o700)
        for dirpath, dirnames, _ in os.walk(path):
            for name in dirnames:  # Before os.walk descends into them.
                child = os.path.join(dirpath, name)
                if not os.path.islink(child):
                    os.chmod(child, 0o700)
        shutil.rmtree(path)
    except (OSError, RecursionError):
        pass
    if os.path.lexists(path):  # E.g. nesting deeper than Python's recursion limit.
        for command in (["chmod", "-R", "u+rwx", "--", path], ["rm", "-rf", "--", path]):
            try:
                subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=60, check=False)
            except (OSError, subprocess.SubprocessError):
                pass
