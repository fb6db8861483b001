"""Run an untrusted Python program in a contained, resource-limited subprocess.

This module is the execution half of functional-correctness evaluation
(HumanEval-style ``pass@k``): a model writes a program, and
:func:`run_program` runs it and reports whether it exited cleanly.

How a program is run
--------------------
The parent (your evaluator) starts a fresh process of the *same* Python
interpreter, ``python -I -B -X utf8 sandbox.py --calm-jax-sandbox CONFIG``,
in a new session (so it leads its own process group), with stdin from
``/dev/null``, a minimal environment, and its stdout/stderr going to files
outside its working directory. That child process is the *launcher*: this very
file run as a script. Before it executes a single line of the program it
puts up the following layers, in order:

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
   signals to other processes and ``ctypes`` library loading.

The parent enforces the wall-clock ``timeout_s`` itself: when it expires it
kills the child's whole process group (``os.killpg``). Whatever happens, once
the child is gone the parent kills anything still left in its process group
or session and deletes its temporary directory.

What this is not
----------------
This is a *best-effort* guard for model-written code, not a security boundary
like a container or a VM. The Python-level layer (5) can be bypassed by code
that sets out to (for example through ``ctypes.memmove`` or interpreter
bugs), and the kernel layers (2-4) are only as strong as the kernel features
the machine offers: :attr:`ExecutionResult.guards` lists the layers that were
actually in force for each run. Without root there is no private ``tmpfs``,
so a program may create many files (each capped at ``file_size_mb``) until
its time runs out. Run evaluations of code you distrust inside a
disposable container or VM as well.

Nothing here imports third-party packages; the launcher uses only the
standard library (``ctypes`` for the kernel layers).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

__all__ = ["ExecutionResult", "STATUSES", "run_program"]

#: The values :attr:`ExecutionResult.status` can take.
STATUSES = ("passed", "failed", "timeout", "error")

#: argv marker that makes this file run as the launcher (see ``__main__``).
LAUNCH_FLAG = "--calm-jax-sandbox"

#: Exit status of a launcher that could not put its mandatory guards up.
SETUP_FAILED_EXIT = 119

_DEFAULT_TAIL_CHARS = 4096
_MAX_OPEN_FILES = 128


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one :func:`run_program` call.

    Attributes:
      passed: ``True`` exactly when ``status == "passed"``.
      status: one of :data:`STATUSES`:

        * ``"passed"``: the program exited with status 0;
        * ``"failed"``: it exited with a non-zero status, e.g. from an
          uncaught exception (a failed ``assert``, a ``MemoryError`` under the
          memory limit, a ``PermissionError`` from a sandbox guard);
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
        were put up, from ``("rlimits", "private_tmpfs", "netns",
        "no_capabilities", "landlock", "seccomp", "audit_hook")``. Empty when
        the launcher did not get as far as reporting.
    """

    passed: bool
    status: str
    returncode: int | None
    stdout: str = ""
    stderr: str = ""
    guards: tuple[str, ...] = ()


# ---------------------------------------------------------------------------
# Parent side.
# ---------------------------------------------------------------------------


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
) -> ExecutionResult:
    """Runs ``program`` (Python source) in the sandbox and reports how it ended.

    The program runs as ``__main__`` in a fresh interpreter whose working
    directory is a new, empty temporary directory (also ``$HOME`` and
    ``$TMPDIR``) that is deleted afterwards. See the module docstring for the
    containment layers and their limits. This function never raises because
    of anything the program does; it is safe to call from several threads.

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

    Returns:
      An :class:`ExecutionResult`.

    Raises:
      TypeError: if ``program`` is not a ``str``.
      ValueError: if a limit is not a positive number.
    """
    if not isinstance(program, str):
        raise TypeError(f"program must be a str of Python source, got {type(program).__name__}")
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
    with open(program_path, "w", encoding="utf-8") as f:
        f.write(program)
    config = dict(config, workdir=workdir, program=program_path, report=report_path)
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
        os.path.abspath(__file__), LAUNCH_FLAG, json.dumps(config),
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
                start_new_session=True,
            )
        except OSError as e:
            return ExecutionResult(False, "error", None, "", f"could not start the sandbox: {e}")
        returncode, cpu_used, timed_out = _wait(proc, timeout_s)

    if timed_out:
        status = "timeout"
    elif returncode is None:
        status = "error"
    elif returncode == 0:
        status = "passed"
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
    used instead of ``Popen.wait`` to learn the child's own CPU time.
    """
    pid = proc.pid
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        _kill_group(pid)

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
        if not reaped:  # Interrupted (e.g. KeyboardInterrupt) or lost: kill, then reap.
            _kill_group(pid)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        # Anything the program left behind (it should not have been able to
        # fork, but belt and braces) dies with its process group/session.
        _kill_group(pid)
        _kill_session(pid)
    if status is None:
        proc.returncode = -signal.SIGKILL
        return None, 0.0, expired.is_set()
    returncode = os.waitstatus_to_exitcode(status)
    proc.returncode = returncode  # Keeps Popen from waiting on it again.
    cpu_used = usage.ru_utime + usage.ru_stime
    return returncode, cpu_used, expired.is_set()


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


# ---------------------------------------------------------------------------
# Child side: the launcher. Runs only in the sandboxed process.
# ---------------------------------------------------------------------------

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _launch(config: dict) -> None:
    """Puts up the guards, then runs the program as ``__main__``; never returns."""
    guards: list[str] = []
    try:
        with open(config["program"], encoding="utf-8") as f:
            source = f.read()
        report = open(config["report"], "w", encoding="utf-8")
        _apply_rlimits(config)
        guards.append("rlimits")
        if config["kernel_guards"]:
            guards += _apply_kernel_guards(config)
        os.chdir(config["workdir"])
        _install_audit_hook(config["workdir"])
        guards.append("audit_hook")
        json.dump(guards, report)
        report.close()
    except BaseException as e:  # noqa: BLE001 - report any setup failure.
        sys.stderr.write(f"calm_jax.sandbox: setup failed: {type(e).__name__}: {e}\n")
        sys.stderr.flush()
        os._exit(SETUP_FAILED_EXIT)
    _run_as_main(source, os.path.join(config["workdir"], "program.py"))


def _run_as_main(source: str, filename: str) -> None:
    """Executes ``source`` like ``python program.py`` would, then exits."""
    import linecache
    import traceback
    import types

    module = types.ModuleType("__main__")
    module.__file__ = filename
    module.__builtins__ = __builtins__
    sys.modules["__main__"] = module
    sys.argv = [filename]
    # Lets tracebacks show the program's lines without reading the file.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    try:
        code = compile(source, filename, "exec")
        exec(code, module.__dict__)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - mirror the interpreter.
        # Print the traceback without this launcher's own frame.
        tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
        traceback.print_exception(type(e), e, tb)
        sys.stderr.flush()
        raise SystemExit(1) from None
    raise SystemExit(0)


def _apply_rlimits(config: dict) -> None:
    import resource

    def limit(which: int, value: int) -> None:
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))

    cpu = config["cpu_s"]
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    if cpu_hard == resource.RLIM_INFINITY or cpu_hard > cpu:
        # Soft limit sends SIGXCPU, the hard one a second later SIGKILL.
        hard = cpu + 1 if cpu_hard == resource.RLIM_INFINITY else min(cpu + 1, cpu_hard)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, hard))
    if config["memory_bytes"] is not None:
        limit(resource.RLIMIT_AS, config["memory_bytes"])
    limit(resource.RLIMIT_FSIZE, config["file_size_bytes"])
    limit(resource.RLIMIT_NOFILE, _MAX_OPEN_FILES)
    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_NPROC, 0)


def _apply_kernel_guards(config: dict) -> list[str]:
    """Best-effort kernel layers; returns the names of those that took."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    applied = []
    if os.geteuid() == 0:
        if _private_tmpfs(libc, config["workdir"], config["disk_bytes"]):
            applied.append("private_tmpfs")
        if libc.unshare(_CLONE_NEWNET) == 0:
            applied.append("netns")
        if _drop_capabilities(libc):
            applied.append("no_capabilities")
    # Both Landlock and seccomp need no_new_privs (also keeps exec from
    # granting privileges back).
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
        if _landlock(libc, config["workdir"]):
            applied.append("landlock")
        if _seccomp(libc):
            applied.append("seccomp")
    return applied


_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_CLONE_THREAD = 0x00010000
_MS_NOSUID, _MS_NODEV, _MS_REC, _MS_PRIVATE = 2, 4, 1 << 14, 1 << 18
_PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _PR_CAP_AMBIENT = 24, 38, 22, 47


def _private_tmpfs(libc, workdir: str, size_bytes: int) -> bool:
    """Mounts a size-capped tmpfs over ``workdir`` in a private mount namespace."""
    import ctypes

    if libc.unshare(_CLONE_NEWNS) != 0:
        return False
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    # Without this the new mount could propagate back to the host.
    if libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        return False
    options = f"size={size_bytes},mode=0700".encode()
    if libc.mount(b"tmpfs", os.fsencode(workdir), b"tmpfs", _MS_NOSUID | _MS_NODEV, options) != 0:
        return False
    os.chdir(workdir)  # The old cwd is the directory under the mount.
    return True


def _drop_capabilities(libc) -> bool:
    """Empties the bounding, ambient, effective, permitted and inheritable sets."""
    import ctypes

    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    for cap in range(64):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == 22:  # EINVAL: no such cap.
            break
    libc.prctl(_PR_CAP_AMBIENT, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    numbers = _syscall_numbers()
    if numbers is None:
        return False
    header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (Data * 2)()
    return _syscall(libc, numbers["capset"], ctypes.addressof(header), ctypes.addressof(data)) == 0


def _syscall(libc, number: int, *args: int) -> int:
    import ctypes

    return libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args))


# Landlock constants (linux/landlock.h).
_LL_FS_WRITE_FILE = 1 << 1
_LL_FS_WRITE_RIGHTS = sum(1 << b for b in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write, remove, make_*
_LL_FS_REFER, _LL_FS_TRUNCATE = 1 << 13, 1 << 14
_LL_NET_TCP = 1 | 2  # bind, connect
_LL_SCOPE_ALL = 1 | 2  # abstract unix sockets, signals
_LL_RULE_PATH_BENEATH = 1
_NR_LANDLOCK_CREATE, _NR_LANDLOCK_ADD_RULE, _NR_LANDLOCK_RESTRICT = 444, 445, 446  # Same on every arch.


def _landlock(libc, workdir: str) -> bool:
    """Lets the kernel refuse writes outside ``workdir`` (and more on newer ABIs)."""
    import ctypes

    abi = _syscall(libc, _NR_LANDLOCK_CREATE, 0, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return False

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    handled = _LL_FS_WRITE_RIGHTS
    if abi >= 2:
        handled |= _LL_FS_REFER
    if abi >= 3:
        handled |= _LL_FS_TRUNCATE
    attr = RulesetAttr(handled, _LL_NET_TCP if abi >= 4 else 0, _LL_SCOPE_ALL if abi >= 6 else 0)
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    ruleset = _syscall(libc, _NR_LANDLOCK_CREATE, ctypes.addressof(attr), size, 0)
    if ruleset < 0:
        return False
    try:
        rules = [(workdir, handled), ("/dev/null", handled & (_LL_FS_WRITE_FILE | _LL_FS_TRUNCATE))]
        for path, allowed in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = PathBeneath(allowed, fd)
                if _syscall(libc, _NR_LANDLOCK_ADD_RULE, ruleset, _LL_RULE_PATH_BENEATH, ctypes.addressof(rule), 0):
                    return False
            finally:
                os.close(fd)
        return _syscall(libc, _NR_LANDLOCK_RESTRICT, ruleset, 0) == 0
    finally:
        os.close(ruleset)


def _syscall_numbers() -> dict[str, int] | None:
    """Syscall numbers of the running architecture, or ``None`` if unknown."""
    machine = os.uname().machine
    if machine == "x86_64":
        return dict(
            arch=0xC000003E, fork=57, vfork=58, clone=56, clone3=435, socket=41, kill=62, tkill=200,
            tgkill=234, rt_sigqueueinfo=129, rt_tgsigqueueinfo=297, pidfd_send_signal=424, ptrace=101,
            process_vm_readv=310, process_vm_writev=311, io_uring_setup=425, unshare=272, setns=308,
            bpf=321, perf_event_open=298, userfaultfd=323, capset=126,
        )
    if machine in ("aarch64", "arm64"):
        return dict(
            arch=0xC00000B7, clone=220, clone3=435, socket=198, kill=129, tkill=130, tgkill=131,
            rt_sigqueueinfo=138, rt_tgsigqueueinfo=240, pidfd_send_signal=424, ptrace=117,
            process_vm_readv=270, process_vm_writev=271, io_uring_setup=425, unshare=97, setns=268,
            bpf=280, perf_event_open=241, userfaultfd=282, capset=91,
        )
    return None


def _seccomp(libc) -> bool:
    """Installs a seccomp-BPF filter against new processes, sockets and foreign signals."""
    import ctypes
    import errno

    nr = _syscall_numbers()
    if nr is None:
        return False
    # BPF opcodes and seccomp return values.
    ld_abs, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    deny = 0x00050000 | errno.EPERM
    nosys = 0x00050000 | errno.ENOSYS
    off_nr, off_arch, off_arg0 = 0, 4, 16  # struct seccomp_data; low half of args[0].
    me = os.getpid()

    prog = [
        (ld_abs, 0, 0, off_arch),
        (jeq, 1, 0, nr["arch"]),
        (ret, 0, 0, kill),  # Foreign ABI (e.g. int 0x80 on x86-64).
        (ld_abs, 0, 0, off_nr),
    ]
    if nr["arch"] == 0xC000003E:
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, nosys)]  # x32 ABI.
    prog += [(jeq, 0, 1, nr["clone3"]), (ret, 0, 0, nosys)]  # libc falls back to clone.
    for name in ("fork", "vfork", "socket", "tkill", "pidfd_send_signal", "ptrace", "process_vm_readv",
                 "process_vm_writev", "io_uring_setup", "unshare", "setns", "bpf", "perf_event_open",
                 "userfaultfd"):
        if name in nr:
            prog += [(jeq, 0, 1, nr[name]), (ret, 0, 0, deny)]
    # clone: threads only.
    prog += [(jeq, 0, 4, nr["clone"]), (ld_abs, 0, 0, off_arg0), (jset, 0, 1, _CLONE_THREAD),
             (ret, 0, 0, allow), (ret, 0, 0, deny)]
    # Signals: only to this very process (its first argument is the pid/tgid).
    for name in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        prog += [(jeq, 0, 4, nr[name]), (ld_abs, 0, 0, off_arg0), (jeq, 0, 1, me),
                 (ret, 0, 0, allow), (ret, 0, 0, deny)]
    prog.append((ret, 0, 0, allow))

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(prog))(*(SockFilter(*insn) for insn in prog))
    fprog = SockFprog(len(prog), filters)
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    return libc.prctl(_PR_SET_SECCOMP, 2, ctypes.addressof(fprog), 0, 0) == 0  # SECCOMP_MODE_FILTER


def _install_audit_hook(workdir: str) -> None:
    """Python-level guard: refuses writes outside ``workdir``, sockets, new processes."""
    root = os.path.realpath(workdir)
    me = os.getpid()
    realpath, join, dirname, basename, isabs = (
        os.path.realpath, os.path.join, os.path.dirname, os.path.basename, os.path.isabs)
    fsdecode, fspath, readlink, getcwd = os.fsdecode, os.fspath, os.readlink, os.getcwd
    allowed_files = frozenset({"/dev/null"})

    def resolve(path, dir_fd, follow: bool) -> str:
        if isinstance(path, int):
            return readlink(f"/proc/self/fd/{path}")
        path = fsdecode(fspath(path))
        if not isabs(path):
            base = getcwd() if dir_fd is None or dir_fd < 0 else readlink(f"/proc/self/fd/{dir_fd}")
            path = join(base, path)
        name = basename(path)
        if follow or name in ("", ".", ".."):
            return realpath(path)
        return join(realpath(dirname(path)), name)  # The last component itself, not its target.

    def check(event: str, path, dir_fd=None, follow: bool = True) -> None:
        try:
            target = resolve(path, dir_fd, follow)
        except (OSError, TypeError, ValueError):
            target = None
        if target is None or not (target == root or target.startswith(root + "/") or target in allowed_files):
            raise PermissionError(f"sandbox: {event} outside the working directory is not allowed: {path!r}")

    # event -> ((argument index, dir_fd argument index or None, follow symlinks), ...)
    path_events = {
        "os.remove": ((0, 1, False),),
        "os.rmdir": ((0, 1, False),),
        "os.mkdir": ((0, 2, False),),
        "os.rename": ((0, 2, False), (1, 3, False)),
        "os.link": ((0, 2, False), (1, 3, False)),
        "os.symlink": ((1, 2, False),),
        "os.truncate": ((0, None, True),),
        "os.chmod": ((0, 2, True),),
        "os.chown": ((0, 3, True),),
        "os.utime": ((0, 3, True),),
        "os.chflags": ((0, None, True),),
        "os.lchflags": ((0, None, False),),
        "os.setxattr": ((0, None, True),),
        "os.removexattr": ((0, None, True),),
    }
    denied_events = frozenset({
        "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.killpg",
        "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle",
    })

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writes = (flags & _WRITE_FLAGS) if isinstance(flags, int) else any(c in (mode or "") for c in "wax+")
            if writes and not isinstance(path, int):
                check("opening for writing", path)
        elif event in path_events:
            for index, fd_index, follow in path_events[event]:
                dir_fd = args[fd_index] if fd_index is not None and fd_index < len(args) else None
                check(event, args[index], dir_fd, follow)
        elif event in denied_events or event.startswith("socket."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif event == "os.kill" and args[0] != me:
            raise PermissionError("sandbox: signalling other processes is not allowed")

    sys.addaudithook(hook)


def _main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] != LAUNCH_FLAG:
        sys.stderr.write("this module is run by calm_jax.sandbox.run_program, not by hand\n")
        raise SystemExit(2)
    _launch(json.loads(argv[1]))


if __name__ == "__main__":
    _main(sys.argv[1:])
