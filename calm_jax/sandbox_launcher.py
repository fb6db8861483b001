"""The child side of :mod:`calm_jax.sandbox`: the script the sandboxed process runs.

:func:`calm_jax.sandbox.run_program` starts this file as a script,
``python -I -B -X utf8 sandbox_launcher.py --calm-jax-sandbox CONFIG``; it
puts up the containment layers described in :mod:`calm_jax.sandbox`
(resource limits, the kernel layers, the audit hook) and then runs the
program as ``__main__``.

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
import sys

#: argv marker that makes this file run as the launcher (see ``__main__``).
LAUNCH_FLAG = "--calm-jax-sandbox"

#: Exit status of a launcher that could not put its mandatory guards up.
SETUP_FAILED_EXIT = 119

_MAX_OPEN_FILES = 128
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
            guards += _load_kernel().apply_kernel_guards(config)
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


def _load_kernel():
    """Loads ``sandbox_kernel.py`` from this file's directory by path (see the module docstring)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_kernel.py")
    spec = importlib.util.spec_from_file_location("calm_jax_sandbox_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
