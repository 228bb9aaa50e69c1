"""Running untrusted programs (a model's code completions) in a sandbox: Python, C++ and JavaScript.

Every run is a fresh `python -I` process (sandbox_child.py) started in a new session, with a scrubbed environment,
in a temporary directory of its own. Before the program runs, that process confines itself, layer by
layer, as far as the OS allows (`describe_sandbox()` says which layers this machine gives):

- namespaces (Linux): a new user namespace, a new network namespace (no interfaces but a loopback that is down:
  every connection fails, localhost included) and a new mount namespace in which the whole filesystem is remounted
  read-only, nosuid and nodev, except the run's own directory (and /dev/null, /dev/zero, /dev/urandom, /dev/random,
  /dev/full, which stay usable). Where user namespaces are disabled but the evaluator is root, the network and mount
  namespaces are made without one. The read-only remount needs Linux 5.12 (mount_setattr).
- resource limits: address space (memory), CPU seconds, the size of any file written (its output included), open
  files, no core files; processes and threads (RLIMIT_NPROC) when it has its own user namespace. RLIMIT_NPROC counts
  per user, and in the evaluator's own namespace it would count the evaluator's threads too, so it is set only
  inside a fresh user namespace, where the count starts from this process; the kernel does not apply it to root.
- no capabilities: the bounding set and the process's capabilities are dropped, so a program that is root in its
  namespace cannot undo the read-only mounts, and no_new_privs is set.
- seccomp (Linux on x86_64 and aarch64): the program cannot create processes (fork, vfork, clone without
  CLONE_THREAD; clone3 answers ENOSYS so that the C library creates threads with clone), cannot signal processes
  other than itself and its own process group, cannot trace or read other processes' memory, and cannot unshare,
  mount, chroot, setsid or setpgid. This is what contains a fork loop when the evaluator runs as root. The C++
  compiler (which runs its own subprocesses) runs without this layer, with all the others.
- Python only, an audit hook installed before the program's first line: opening a file for writing, removing,
  renaming or changing a file outside the run's directory, sockets (connect, bind, name lookups), subprocesses,
  fork, os.kill and ctypes raise PermissionError. Python's audit hooks are not a security boundary (a determined
  program can get around them); here they are a second line, and the only one for files and network where the OS
  gives no namespaces. Nothing is ever exec'd in the evaluator: the program is exec'd in the sandboxed process.

The evaluator waits for the run with a wall-clock timeout; then (whether the run ended or not) the run's whole
process group is killed with SIGKILL before the process is reaped, so nothing it started outlives it, and its
directory is removed. Output is read from files (bounded by the file size limit), never from an unbounded pipe.

Not guaranteed: reading. A program can read any file the evaluator's user can read (it has nowhere to send it but
its own output). Where the OS gives none of the namespaces (macOS, or Linux with user namespaces disabled and a
non-root evaluator), C++ and JavaScript programs can write wherever the evaluator can and reach the network; only
the limits, seccomp and the process-group kill apply to them.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]

LANGUAGES = ("python", "c++", "javascript")
RUNTIMES = {"c++": "g++", "javascript": "node"}  # the program each language needs on PATH (python: this one)
MAIN = {"python": "program.py", "c++": "program.cpp", "javascript": "program.js"}
_OUTPUT_CAP = 64 * 1024  # bytes of stdout / stderr kept in a Result
_CHILD = Path(__file__).with_name("sandbox_child.py")


class SandboxError(RuntimeError):
    """The sandbox cannot run this at all (an unsupported language, a missing compiler or runtime, no POSIX)."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0  # wall clock per run (Foundry's local code-eval client gives each test case 5 s)
    compile_timeout_s: float = 60.0
    memory_bytes: int = 1 << 30  # address space (RLIMIT_AS)
    file_bytes: int = 16 << 20  # largest file a run may write, its stdout and stderr included (RLIMIT_FSIZE)
    open_files: int = 256
    processes: int = 64  # processes and threads, inside the run's own user namespace (RLIMIT_NPROC)


@dataclass
class Result:
    """How one run ended. status: "ok" (exit status 0), "error" (another exit status), "timeout", "killed" (by a
    signal: a limit, a crash, an abort) or "compile_error"."""
    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    reason: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def missing_runtime(language: str) -> str | None:
    """Why `language` cannot run here (None when it can)."""
    if resource is None or os.name != "posix":
        return "code execution needs a POSIX system (Linux or macOS)"
    if language not in LANGUAGES:
        return f"language {language!r} is not supported (supported: {', '.join(LANGUAGES)})"
    tool = RUNTIMES.get(language)
    if tool is not None and shutil.which(tool) is None:
        return f"{language} programs need {tool}, which is not on PATH; install it or leave these tasks out"
    return None


class Program:
    """A program in a temporary directory of its own: `build()` once (a C++ program is compiled there), then
    `run(args)` as often as needed, each run in a fresh copy of that directory. Use as a context manager."""

    def __init__(self, language: str, files: dict[str, str], main: str | None = None, limits: Limits | None = None):
        problem = missing_runtime(language)
        if problem:
            raise SandboxError(problem)
        self.language = language
        self.main = main or MAIN[language]
        self.limits = limits or Limits()
        self.root = Path(tempfile.mkdtemp(prefix="dbrx-sandbox-"))
        self.source = self.root / "program"
        self.source.mkdir()
        for name, text in files.items():
            (self.source / name).write_text(text, encoding="utf-8")
        self.built: Result | None = None

    def __enter__(self) -> Program:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        _remove_tree(self.root)

    def build(self) -> Result:
        """Compile (C++: `g++ -std=c++11 MAIN -o program`, as Foundry does); other languages have nothing to build."""
        if self.built is None:
            if self.language == "c++":
                argv = [shutil.which("g++") or "g++", "-std=c++11", self.main, "-o", "program"]
                result = _run(argv, self.source, self.root, self.limits, self.limits.compile_timeout_s, seccomp=False)
                if not result.ok:
                    errors = [line for line in result.stderr.splitlines() if "error" in line]
                    result.status = "compile_error"
                    result.reason = f"compile error: {(errors or [result.reason])[0]}"
                self.built = result
            else:
                self.built = Result("ok", 0, "", "", 0.0, "nothing to build")
        return self.built

    def run(self, args: tuple[str, ...] | list[str] = (), main: str | None = None) -> Result:
        """Run the (built) program with `args`; `main` picks another file of the program to run (Python, JS)."""
        built = self.build()
        if not built.ok:
            return built
        work = Path(tempfile.mkdtemp(prefix="run-", dir=self.root))
        try:
            shutil.copytree(self.source, work, dirs_exist_ok=True)
            main = main or self.main
            if self.language == "python":
                argv, python = list(args), main
            elif self.language == "c++":
                argv, python = ["./program", *args], None
            else:
                argv, python = [shutil.which("node") or "node", main, *args], None
            return _run(argv, work, self.root, self.limits, self.limits.timeout_s, seccomp=True, python=python)
        finally:
            _remove_tree(work)


def run_program(language: str, source: str, args: tuple[str, ...] | list[str] = (),
                limits: Limits | None = None) -> Result:
    """Build and run one program (`source` is its only file) in the sandbox."""
    with Program(language, {MAIN[language]: source}, limits=limits) as program:
        return program.run(args)


@lru_cache(maxsize=1)
def describe_sandbox() -> list[str]:
    """The layers a sandboxed run gets on this machine, found by starting one (e.g. ['user namespace', 'network
    namespace', 'read-only filesystem', 'rlimits', 'no capabilities', 'seccomp', 'audit hook'])."""
    if missing_runtime("python"):
        return []
    root = Path(tempfile.mkdtemp(prefix="dbrx-sandbox-"))
    try:
        result = _run([], root, root, Limits(), 30.0, seccomp=True, report=True)
        if not result.ok:
            raise SandboxError(f"the sandbox could not start: {result.reason}")
        return result.stdout.strip().split(",") + ["audit hook (Python)"]
    finally:
        _remove_tree(root)


# ---- the evaluator's side ----------------------------------------------------------------------------------------
def _run(argv: list[str], work: Path, root: Path, limits: Limits, timeout: float, seccomp: bool,
         python: str | None = None, report: bool = False) -> Result:
    """Start sandbox_child.py in `work`, wait at most `timeout` seconds, then kill its process group."""
    spec = [str(work), python or "", str(int(seccomp)), str(int(report)), str(limits.memory_bytes),
            str(limits.file_bytes), str(limits.open_files), str(limits.processes), str(int(timeout) + 2)]
    tools = [os.path.dirname(p) for p in (shutil.which(t) for t in RUNTIMES.values()) if p]
    env = {"PATH": os.pathsep.join(dict.fromkeys(tools + ["/usr/local/bin", "/usr/bin", "/bin"])),
           "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work)}
    io_dir = Path(tempfile.mkdtemp(prefix="io-", dir=root))  # outside `work`: read-only to the program
    try:
        with open(io_dir / "stdout", "w+b") as out, open(io_dir / "stderr", "w+b") as err:
            start = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-I", str(_CHILD), *spec, *argv], cwd=work, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                                    close_fds=True)
            finished = _wait_unreaped(proc.pid, timeout)
            try:  # the group's leader is not reaped yet, so its id cannot have been reused
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            seconds = time.monotonic() - start
            stdout, stderr = _head(out), _tail(err)
    finally:
        _remove_tree(io_dir)
    code = proc.returncode
    if not finished:
        return Result("timeout", code, stdout, stderr, seconds, f"timed out after {timeout:g} s (wall clock)")
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        why = {"SIGXCPU": " (CPU time limit)", "SIGXFSZ": " (file size limit)",
               "SIGKILL": " (CPU time hard limit, or out of memory)", "SIGSEGV": " (a crash, or the memory limit)",
               "SIGABRT": " (aborted)"}.get(name, "")
        return Result("killed", code, stdout, stderr, seconds, f"killed by {name}{why}")
    if code > 0:  # the last line that names an error (Python's and node's), else the last line
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        last = ([line for line in lines if "Error" in line] or lines)[-1:]
        return Result("error", code, stdout, stderr, seconds,
                      f"exit status {code}" + (f": {last[0][:300]}" if last else ""))
    return Result("ok", 0, stdout, stderr, seconds, "exit status 0")


def _wait_unreaped(pid: int, timeout: float) -> bool:
    """Wait until child `pid` exits (True) or `timeout` passes (False), leaving it unreaped."""
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            fd = None
        if fd is not None:
            try:
                return bool(select.select([fd], [], [], timeout)[0])
            finally:
                os.close(fd)
    deadline = time.monotonic() + timeout
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _head(f) -> str:
    f.seek(0)
    return f.read(_OUTPUT_CAP).decode("utf-8", errors="replace")


def _tail(f) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - _OUTPUT_CAP))
    return f.read().decode("utf-8", errors="replace")


def _remove_tree(path: Path) -> None:
    def writable(func, p, _exc):  # a program may have left a directory without write permission
        os.chmod(os.path.dirname(p), 0o700)
        func(p)

    if path.exists():
        shutil.rmtree(path, onerror=writable)
