"""Kernel-level containment layers of :mod:`calm_jax.sandbox` (best effort).

Run only inside the sandboxed process, by :mod:`calm_jax.sandbox_launcher`,
which loads this file by path: it must import only the standard library,
never ``calm_jax``. :func:`apply_kernel_guards` puts up, where the machine
allows, a private size-capped ``tmpfs`` over the working directory, a network
namespace and an empty capability set (all three only as root), then
Landlock and a seccomp-BPF filter (through ``ctypes``; syscall numbers for
x86-64 and arm64). See :mod:`calm_jax.sandbox` for what each layer refuses.
"""

from __future__ import annotations

import os

__all__ = ["apply_kernel_guards"]


def apply_kernel_guards(config: dict) -> list[str]:
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
