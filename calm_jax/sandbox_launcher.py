"""The child side of :mod:`calm_jax.sandbox`: the script the sandboxed process runs.

:func:`calm_jax.sandbox.run_program` starts this file as a script,
``python -I -B -X utf8 sandbox_launcher.py --calm-jax-sandbox CONFIG``. The
process it starts, the *supervisor*, makes itself a child subreaper
(``PR_SET_CHILD_SUBREAPER``) and forks once. The forked child puts up the
containment layers described in :mod:`calm_jax.sandbox` (resource limits,
the kernel layers, the audit hook) and runs the program as ``__main__``,
followed by the check when there is one (:func:`_prepare_check`). The
supervisor runs no program code: it waits for the child, and once the child
is gone (or on ``SIGTERM`` from the parent) it kills every process left
below it, which as a subreaper includes descendants that started their own
session or whose parents exited, then exits the way the child did.

Because the child runs in isolated mode (``-I``), neither this file's
directory nor ``calm_jax`` is on its ``sys.path``. So this module imports
only the standard library, never ``calm_jax``, and loads the kernel layers,
``sandbox_kernel.py`` next to this file, by file path (:func:`_load_kernel`),
without adding anything to ``sys.path`` that the program could see. The
parent imports this module normally, for :data:`LAUNCH_FLAG` and
:data:`SETUP_FAILED_EXIT` and for the path of this file.
"""

from __future__ import annotations

import json
import os
import signal
import sys

#: argv marker that makes this file run as the launcher (see ``__main__``).
LAUNCH_FLAG = "--calm-jax-sandbox"

#: Exit status of a launcher that could not put its mandatory guards up.
SETUP_FAILED_EXIT = 119

_MAX_OPEN_FILES = 128
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_PR_SET_CHILD_SUBREAPER = 36
_CLEANUP_PATIENCE_S = 5.0


def _launch(config: dict) -> None:
    """Forks the contained child and supervises it; never returns.

    Only the child reads the check's secret (the supervisor closes its copy
    of the pipe unread), so no process but the one running the harness
    holds it.
    """
    try:
        proof_fd = os.open(config["proof"], os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        subreaper = _become_subreaper()
        child = os.fork()
    except BaseException as e:  # noqa: BLE001 - report any setup failure.
        sys.stderr.write(f"calm_jax.sandbox: setup failed: {type(e).__name__}: {e}\n")
        sys.stderr.flush()
        os._exit(SETUP_FAILED_EXIT)
    if child == 0:
        _contain_and_run(config, proof_fd, ["subreaper"] if subreaper else [])
    os.close(proof_fd)
    if config.get("secret_fd") is not None:
        os.close(config["secret_fd"])
    _supervise(child)


def _read_secret(fd: int) -> bytes:
    """Reads the parent's secret from the pipe ``fd`` to its end and closes it."""
    chunks = []
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    secret = b"".join(chunks)
    if len(secret) < 16:
        raise ValueError(f"the check secret must have at least 16 bytes, got {len(secret)}")
    return secret


def _become_subreaper() -> bool:
    """Makes orphaned descendants of this process its children, not init's (Linux >= 3.4)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _supervise(child: int) -> None:
    """Waits for ``child``, kills whatever is left below this process, exits as ``child`` did.

    ``SIGTERM`` (sent by the parent when the wall-clock limit expires) kills
    ``child``. Runs none of the program's code.
    """

    def stop(signum, frame) -> None:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:
            status = None
            break
    _kill_descendants(os.getpid())
    if status is None:
        os._exit(SETUP_FAILED_EXIT)
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if signum not in (signal.SIGKILL, signal.SIGSTOP):  # Those two have no handler to reset.
            signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)  # A signal whose default action is not to terminate.
    os._exit(os.waitstatus_to_exitcode(status))


def _kill_descendants(root: int, patience_s: float = _CLEANUP_PATIENCE_S) -> None:
    """SIGKILLs every live descendant of ``root`` (found through ``/proc``) and reaps ``root``'s children.

    ``root`` is a subreaper, so a descendant whose parent exits becomes its
    child instead of leaving the tree; killing the tree level by level and
    scanning again until nothing is left therefore reaches every
    descendant, whatever session or process group it moved to. Gives up
    after ``patience_s`` seconds.
    """
    import time

    deadline = time.monotonic() + patience_s
    while True:
        alive = _descendants(root)
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        children_left = False
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                children_left = True
                break
        if (not alive and not children_left) or time.monotonic() > deadline:
            return
        time.sleep(0.005)


def _descendants(root: int) -> list[int]:
    """Pids of the live (non-zombie) descendants of ``root``."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the parenthesised command: state ppid ...
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) >= 2 and fields[0] != b"Z":
            children.setdefault(int(fields[1]), []).append(int(name))
    found, stack = [], [root]
    while stack:
        for pid in children.get(stack.pop(), ()):
            found.append(pid)
            stack.append(pid)
    return found


def _contain_and_run(config: dict, proof_fd: int, guards: list[str]) -> None:
    """In the forked child: puts up the guards, runs the program (and the check); never returns."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        secret = None if config.get("check") is None else _read_secret(config["secret_fd"])
        with open(config["program"], encoding="utf-8") as f:
            source = f.read()
        report = open(config["report"], "w", encoding="utf-8")
        _apply_rlimits(config)
        guards.append("rlimits")
        if config["kernel_guards"]:
            guards += _load_kernel().apply_kernel_guards(config)
        os.chdir(config["workdir"])
        check = config.get("check")
        run_check = None if check is None else _prepare_check(check, secret, proof_fd)
        _install_audit_hook(config["workdir"], refuse_introspection=check is not None)
        guards.append("audit_hook")
        json.dump(guards, report)
        report.close()
    except BaseException as e:  # noqa: BLE001 - report any setup failure.
        sys.stderr.write(f"calm_jax.sandbox: setup failed: {type(e).__name__}: {e}\n")
        sys.stderr.flush()
        os._exit(SETUP_FAILED_EXIT)
    _run_as_main(source, os.path.join(config["workdir"], "program.py"), run_check)


def _run_as_main(source: str, filename: str, run_check) -> None:
    """Executes ``source`` like ``python program.py`` would, then ``run_check``, then exits."""
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
    if run_check is not None:
        run_check(module.__dict__)  # Never returns.
    raise SystemExit(0)


def _prepare_check(check: dict, secret: bytes, proof_fd: int):
    """Compiles the check and captures everything it uses, before any program code runs.

    Returns ``run_check(namespace)``: it executes ``check["source"]`` in a
    fresh namespace whose builtins are a copy taken now, binds the program's
    ``check["candidate"]`` (from ``namespace``) under its own name there,
    calls ``check["function"]`` on it and, only if that call returns
    normally, writes ``secret`` to ``proof_fd`` and exits with status 0.
    Anything else (the candidate is missing, the check raises, the process
    exits or is killed before the call returns) exits without writing.
    Every function and class it uses is bound here, so a program that
    rebinds ``os._exit``, ``builtins.AssertionError``, ``sys.stderr`` or
    ``traceback`` cannot change what it does.
    """
    import builtins
    import linecache
    import traceback

    filename = "<check>"
    code = compile(check["source"], filename, "exec")
    linecache.cache[filename] = (len(check["source"]), None, check["source"].splitlines(True), filename)
    candidate_name, function_name = check["candidate"], check["function"]
    builtins_copy = dict(builtins.__dict__)
    copy_dict, callable_, base_exception = dict, callable, BaseException
    write, exit_, exec_ = os.write, os._exit, exec
    print_exception = traceback.print_exception
    stdout, stderr = sys.stdout, sys.stderr
    flush_stdout, flush_stderr, write_stderr = stdout.flush, stderr.flush, stderr.write

    def fail(message: str, error=None) -> None:
        try:
            flush_stdout()
            if error is not None:  # Without run_check's own frame.
                tb = error.__traceback__.tb_next if error.__traceback__ is not None else None
                print_exception(type(error), error, tb, file=stderr)
            write_stderr(f"calm_jax.sandbox: {message}\n")
            flush_stderr()
        except base_exception:  # noqa: BLE001 - the exit below is what counts.
            pass
        exit_(1)

    def run_check(namespace: dict) -> None:
        if candidate_name not in namespace:
            fail(f"the program defines no {candidate_name!r} for the check")
        candidate = namespace[candidate_name]
        scope = {"__builtins__": copy_dict(builtins_copy), "__name__": "__check__"}
        try:
            exec_(code, scope)
            scope[candidate_name] = candidate
            function = scope.get(function_name)
            if not callable_(function):
                fail(f"the check source defines no function {function_name!r}")
            function(candidate)
        except base_exception as e:  # noqa: BLE001 - SystemExit included: the check did not return.
            fail("the check did not pass", e)
        try:
            flush_stdout()
            flush_stderr()
        except base_exception:  # noqa: BLE001
            pass
        written = write(proof_fd, secret)
        exit_(0 if written == len(secret) else 1)

    return run_check


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


def _load_kernel():
    """Loads ``sandbox_kernel.py`` from this file's directory by path (see the module docstring)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_kernel.py")
    spec = importlib.util.spec_from_file_location("calm_jax_sandbox_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _install_audit_hook(workdir: str, *, refuse_introspection: bool = False) -> None:
    """Python-level guard: refuses writes outside ``workdir``, sockets, new processes.

    With ``refuse_introspection`` (set when a check follows the program) it
    also refuses tracing and profiling hooks (which could rewrite the check
    while it runs) and the ``gc`` functions that list or follow arbitrary
    objects (which could find the harness's secret).
    """
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

    if refuse_introspection:
        denied_events |= {
            "sys.settrace", "sys.setprofile", "sys._settraceallthreads", "sys._setprofileallthreads",
            "sys._current_frames", "sys._current_exceptions", "gc.get_objects", "gc.get_referrers",
            "gc.get_referents",
        }

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
