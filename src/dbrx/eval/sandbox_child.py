"""The sandboxed process of dbrx.eval.sandbox (whose docstring says what each layer does and does not guarantee).

Run as `python -I sandbox_child.py WORK PYTHON_MAIN SECCOMP REPORT MEMORY FILES OPEN_FILES PROCESSES CPU_S ARGV...`
in WORK, from a new session, with a scrubbed environment: it confines itself (namespaces, read-only filesystem,
rlimits, no capabilities, seccomp) and then runs the program: a Python file exec'd here after an audit hook is
installed (PYTHON_MAIN, with ARGV as sys.argv), or ARGV exec'd. With REPORT it prints the layers it got instead.
It imports only what Python imports at start-up, plus resource and (on Linux) ctypes: each test case of each
completion starts one of these.
"""

import os
import resource
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET, CLONE_THREAD = 0x20000, 0x10000000, 0x40000000, 0x10000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, AT_RECURSIVE, AT_FDCWD = 0x1, 0x2, 0x4, 0x8000, -100
SYS_MOUNT_SETATTR = 442  # the same number on every architecture
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 24, 38, 22, 2
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
# seccomp, per machine: (audit arch, syscalls refused with EPERM, clone, clone3, kill, tgkill)
SYSCALLS = {
    "x86_64": (0xC000003E, {"fork": 57, "vfork": 58, "tkill": 200, "unshare": 272, "setns": 308, "mount": 165,
                            "umount2": 166, "pivot_root": 155, "chroot": 161, "ptrace": 101, "process_vm_readv": 310,
                            "process_vm_writev": 311, "kcmp": 312, "pidfd_open": 434, "pidfd_getfd": 438,
                            "pidfd_send_signal": 424, "setsid": 112, "setpgid": 109, "bpf": 321,
                            "perf_event_open": 298, "keyctl": 250, "add_key": 248, "request_key": 249,
                            "userfaultfd": 323, "mount_setattr": 442, "move_mount": 429, "open_tree": 428,
                            "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "io_uring_setup": 425},
               56, 435, 62, 234),
    "aarch64": (0xC00000B7, {"tkill": 130, "unshare": 97, "setns": 268, "mount": 40, "umount2": 39,
                             "pivot_root": 41, "chroot": 51, "ptrace": 117, "process_vm_readv": 270,
                             "process_vm_writev": 271, "kcmp": 272, "pidfd_open": 434, "pidfd_getfd": 438,
                             "pidfd_send_signal": 424, "setsid": 157, "setpgid": 154, "bpf": 280,
                             "perf_event_open": 241, "keyctl": 219, "add_key": 217, "request_key": 218,
                             "userfaultfd": 282, "mount_setattr": 442, "move_mount": 429, "open_tree": 428,
                             "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "io_uring_setup": 425},
                220, 435, 129, 131),
}
DENIED_EVENTS = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen", "os.kill",
    "os.killpg", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
    "socket.getnameinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr"})
PATH_EVENTS = frozenset({
    "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link", "os.symlink",
    "os.truncate", "os.utime", "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags", "shutil.rmtree",
    "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.move", "shutil.chown"})
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def main(args: list[str]) -> None:
    work, python, seccomp, report = args[0], args[1], args[2] == "1", args[3] == "1"
    memory, files, open_files, processes, cpu_s = (int(a) for a in args[4:9])
    argv = args[9:]
    libc = _libc()
    layers = _isolate(libc, work) if libc is not None else []
    _limit(memory, files, open_files, processes if "user namespace" in layers else None, cpu_s)
    layers.append("rlimits")
    if libc is not None and _drop_capabilities(libc):
        layers.append("no capabilities")
    if seccomp and libc is not None and _seccomp(libc):
        layers.append("seccomp")
    if report:
        print(",".join(layers))
    elif python:
        _run_python(python, argv, work)
    else:
        os.execve(argv[0], argv, os.environ)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _isolate(libc, work: str) -> list[str]:
    """New user (where allowed), network and mount namespaces; the filesystem read-only but for `work`."""
    for flags in (CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS, CLONE_NEWNET | CLONE_NEWNS):
        if libc.unshare(flags) == 0:
            break
    else:
        return []
    layers = (["user namespace"] if flags & CLONE_NEWUSER else []) + ["network namespace"]
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:  # nothing below propagates out
        return layers
    devices = [d for d in DEVICES if os.path.exists(d)]
    for path in [work] + devices:  # bind mounts of their own, whose flags can differ from their parents'
        libc.mount(path.encode(), path.encode(), None, MS_BIND, None)
    if not _mount_setattr(libc, "/", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, recursive=True):
        return layers + ["mount namespace"]  # Linux < 5.12
    _mount_setattr(libc, work, 0, MOUNT_ATTR_RDONLY)
    for device in devices:
        _mount_setattr(libc, device, 0, MOUNT_ATTR_NODEV)
    os.chdir(work)  # the working directory still named the directory under the new bind mount
    return layers + ["mount namespace", "read-only filesystem"]


def _mount_setattr(libc, path: str, set_: int, clear: int, recursive: bool = False) -> bool:
    import ctypes

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                    ("userns_fd", ctypes.c_uint64)]

    attr = MountAttr(set_, clear, 0, 0)
    return libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), AT_RECURSIVE if recursive else 0,
                        ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))) == 0


def _limit(memory: int, files: int, open_files: int, processes: int | None, cpu_s: int) -> None:
    """Lower each limit (never above what this process already has). RLIMIT_NPROC only in a fresh user namespace,
    where it counts this sandbox's processes and threads alone; elsewhere it would count all of the user's."""
    def lower(which: int, soft: int, hard: int | None = None) -> None:
        _, current = resource.getrlimit(which)
        hard = soft if hard is None else hard
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        resource.setrlimit(which, (soft, hard))

    lower(resource.RLIMIT_CORE, 0)
    lower(resource.RLIMIT_CPU, cpu_s, cpu_s + 1)  # SIGXCPU, then SIGKILL a second later
    lower(resource.RLIMIT_AS, memory)
    lower(resource.RLIMIT_FSIZE, files)
    lower(resource.RLIMIT_NOFILE, open_files)
    if processes is not None and hasattr(resource, "RLIMIT_NPROC"):
        lower(resource.RLIMIT_NPROC, processes)


def _drop_capabilities(libc) -> bool:
    import ctypes

    for cap in range(64):  # the bounding set first (needs CAP_SETPCAP), so that no exec gives any back
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    data = (ctypes.c_uint32 * 6)()  # two __user_cap_data_struct of zeros: effective, permitted, inheritable
    return libc.capset(ctypes.byref(Header(0x20080522, 0)), data) == 0


def _seccomp(libc) -> bool:
    """A BPF filter: no new processes (threads only), no signals to others, no tracing, no namespaces or mounts."""
    import ctypes

    machine = os.uname().machine
    if machine not in SYSCALLS:
        return False
    arch, denied, clone, clone3, kill, tgkill = SYSCALLS[machine]
    eperm, enosys = 0x00050000 | 1, 0x00050000 | 38  # SECCOMP_RET_ERRNO | errno
    allow, kill_process = 0x7FFF0000, 0x80000000
    ld, jeq, jset, jge, ret = 0x20, 0x15, 0x45, 0x35, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JSET|K, JMP|JGE|K, RET|K
    me = os.getpid()
    # (code, jump if true, jump if false, k); jumps count the instructions skipped
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill_process), (ld, 0, 0, 0)]  # A = syscall number
    if machine == "x86_64":
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, eperm)]  # the x32 ABI
    for nr in denied.values():
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, eperm)]
    prog += [(jeq, 0, 1, clone3), (ret, 0, 0, enosys)]  # the C library then creates threads with clone
    # clone: threads only (args[0], the flags, starts at offset 16; its low 32 bits hold CLONE_THREAD)
    prog += [(jeq, 0, 4, clone), (ld, 0, 0, 16), (jset, 0, 1, CLONE_THREAD), (ret, 0, 0, allow), (ret, 0, 0, eperm)]
    # kill(pid, sig): itself, or its own process group (pid 0); tgkill(tgid, tid, sig): itself
    prog += [(jeq, 0, 5, kill), (ld, 0, 0, 16), (jeq, 2, 0, 0), (jeq, 1, 0, me), (ret, 0, 0, eperm),
             (ret, 0, 0, allow)]
    prog += [(jeq, 0, 4, tgkill), (ld, 0, 0, 16), (jeq, 1, 0, me), (ret, 0, 0, eperm), (ret, 0, 0, allow)]
    prog += [(ret, 0, 0, allow)]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(prog))(*[Filter(*f) for f in prog])
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    return libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(Program(len(prog), filters)), 0, 0) == 0


def _run_python(main: str, argv: list[str], work: str) -> None:
    import builtins

    sys.dont_write_bytecode = True
    sys.argv = [main, *argv]
    path = os.path.join(work, main)
    with open(path, encoding="utf-8") as f:
        source = f.read()
    code = compile(source, path, "exec")
    _audit_hook(work)
    exec(code, {"__name__": "__main__", "__file__": path, "__builtins__": builtins})


def _audit_hook(work: str) -> None:
    """Refuse writes and file changes outside `work`, sockets, subprocesses, signals and ctypes from here on."""
    root = os.path.realpath(work)

    def inside(path) -> bool:
        full = os.path.realpath(os.path.join(os.getcwd(), os.fsdecode(path)))
        return full == root or full.startswith(root + os.sep)

    def paths(args):
        return [a for a in args if isinstance(a, (str, bytes, os.PathLike))]

    def hook(event: str, args: tuple) -> None:
        if event in DENIED_EVENTS or event.startswith("ctypes."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, _mode, flags = args
            if isinstance(flags, int) and flags & WRITE_FLAGS and paths([path]) and not inside(path):
                raise PermissionError(f"sandbox: writing {os.fsdecode(path)} (outside the run's directory)")
        elif event in PATH_EVENTS:
            for path in paths(args):
                if not inside(path):
                    raise PermissionError(f"sandbox: {event} on {os.fsdecode(path)} (outside the run's directory)")

    sys.addaudithook(hook)


if __name__ == "__main__":
    main(sys.argv[1:])
