"""dbrx.eval.sandbox: programs run contained. An infinite loop, a fork loop, a huge allocation, a write outside the
run's directory and a network call each end as a failed run, and the evaluator carries on (and can still start
processes). Where a layer depends on the OS (namespaces, seccomp), the test says which layer it relies on."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dbrx.eval.sandbox import Limits, Program, describe_sandbox, missing_runtime, run_program

pytestmark = pytest.mark.skipif(missing_runtime("python") is not None, reason="code execution needs POSIX")
QUICK = Limits(timeout_s=2.0)
HAS_GXX = missing_runtime("c++") is None
HAS_NODE = missing_runtime("javascript") is None


def layers() -> list[str]:
    return describe_sandbox()


def leftovers(marker: str) -> list[str]:
    """Processes whose command line names `marker` (a program's temporary directory)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(pid)
    return found


def test_programs_run_in_each_language_with_their_output():
    print("sandbox layers on this machine:", ", ".join(layers()))
    assert "rlimits" in layers()
    r = run_program("python", "import sys\nprint('hello', sys.argv[1:])", args=["a"])
    assert r.status == "ok" and r.stdout == "hello ['a']\n", r.reason
    bad = run_program("python", "raise ValueError('no')")
    assert bad.status == "error" and bad.reason == "exit status 1: ValueError: no"
    if HAS_GXX:
        r = run_program("c++", "#include <iostream>\nint main(int argc, char** argv) { std::cout << argv[1]; }",
                        args=["7"])
        assert r.status == "ok" and r.stdout == "7", r.reason
        broken = run_program("c++", "int main() { return undefined_name; }")
        assert broken.status == "compile_error" and "undefined_name" in broken.reason
    if HAS_NODE:
        r = run_program("javascript", "console.log(JSON.stringify([1, 'a']))")
        assert r.status == "ok" and r.stdout == '[1,"a"]\n', r.reason


def test_an_infinite_loop_times_out_and_is_killed():
    t0 = time.monotonic()
    with Program("python", {"program.py": "while True:\n    pass\n"}, limits=Limits(timeout_s=1.0)) as program:
        r = program.run()
        assert leftovers(str(program.root)) == []
    assert r.status == "timeout" and "timed out after 1 s" in r.reason
    assert time.monotonic() - t0 < 3


def test_a_fork_loop_is_contained_and_the_evaluator_can_still_start_processes():
    r = run_program("python", "import os\nwhile True:\n    os.fork()\n", limits=QUICK)
    assert r.status == "error" and "os.fork is not allowed" in r.reason  # the audit hook, first
    if HAS_GXX:  # below the audit hook: seccomp refuses fork (a loop of children that never exit otherwise)
        source = ("#include <unistd.h>\n#include <cstdio>\nint main() {\n  for (;;) {\n    pid_t p = fork();\n"
                  "    if (p < 0) { perror(\"fork\"); return 3; }\n    if (p == 0) for (;;) pause();\n  }\n}\n")
        t0 = time.monotonic()
        with Program("c++", {"program.cpp": source}, limits=QUICK) as program:
            r = program.run()
            assert leftovers(str(program.root)) == []
        assert r.status != "ok" and time.monotonic() - t0 < 10
        if "seccomp" in layers():
            assert r.status == "error" and "fork: Operation not permitted" in r.stderr
    assert subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True).stdout == b"1\n"


def test_a_huge_allocation_fails_inside_the_memory_limit():
    r = run_program("python", "x = bytearray(1 << 40)\n", limits=QUICK)
    assert r.status == "error" and r.reason.endswith("MemoryError")
    growing = "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 24))\n"  # 16 MiB at a time
    r = run_program("python", growing, limits=Limits(timeout_s=5.0, memory_bytes=256 << 20))
    assert r.status == "error" and r.reason.endswith("MemoryError") and r.seconds < 5
    if HAS_GXX:
        r = run_program("c++", "int main() { char* p = new char[1ull << 40]; p[0] = 1; return p[0] - 1; }",
                        limits=QUICK)
        assert r.status == "killed" and "SIGABRT" in r.reason and "bad_alloc" in r.stderr


def test_a_write_outside_the_run_directory_fails(tmp_path):
    target = tmp_path / "outside.txt"
    r = run_program("python", f"open({str(target)!r}, 'w').write('escaped')\n", limits=QUICK)
    assert r.status == "error" and "PermissionError: sandbox: writing" in r.reason and not target.exists()
    inside = run_program("python", "open('mine.txt', 'w').write('ok')\nprint(open('mine.txt').read())\n")
    assert inside.status == "ok" and inside.stdout == "ok\n"  # its own directory stays writable
    big = run_program("python", "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
                      limits=Limits(timeout_s=5.0, file_bytes=1 << 20))
    assert big.status == "error" and "File too large" in big.reason  # output is bounded too (RLIMIT_FSIZE)
    if "read-only filesystem" not in layers():
        pytest.skip("no mount namespace here: C++ and JavaScript writes are not contained (docs/eval.md)")
    if HAS_GXX:
        source = (f'#include <cstdio>\nint main() {{ FILE* f = fopen("{target}", "w");\n'
                  '  if (!f) { perror("fopen"); return 3; }\n  fputs("escaped", f); return 0; }\n')
        r = run_program("c++", source, limits=QUICK)
        assert r.status == "error" and "Read-only file system" in r.stderr and not target.exists()
    if HAS_NODE:
        r = run_program("javascript", f"require('fs').writeFileSync({str(target)!r}, 'escaped')", limits=QUICK)
        assert r.status == "error" and "EROFS" in r.stderr and not target.exists()


def test_a_network_call_fails():
    with socket.socket() as listener:  # a server on this machine's loopback, which the program tries to reach
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.2)
        port = listener.getsockname()[1]
        r = run_program("python", f"import socket\nsocket.create_connection(('127.0.0.1', {port})).send(b'x')\n",
                        limits=QUICK)
        assert r.status == "error" and "is not allowed" in r.reason
        if "network namespace" in layers() and HAS_GXX:  # below the audit hook: no network at all
            source = ("#include <arpa/inet.h>\n#include <sys/socket.h>\n#include <cstdio>\nint main() {\n"
                      "  int s = socket(AF_INET, SOCK_STREAM, 0);\n  sockaddr_in a{};\n  a.sin_family = AF_INET;\n"
                      f"  a.sin_port = htons({port});\n  inet_pton(AF_INET, \"127.0.0.1\", &a.sin_addr);\n"
                      "  if (connect(s, (sockaddr*)&a, sizeof a) != 0) { perror(\"connect\"); return 3; }\n"
                      "  return 0;\n}\n")
            r = run_program("c++", source, limits=QUICK)
            assert r.status == "error" and "connect: Network is unreachable" in r.stderr
        with pytest.raises(socket.timeout):
            listener.accept()  # nothing ever arrived


def test_a_missing_runtime_is_named(monkeypatch):
    assert "not supported" in missing_runtime("cobol")
    monkeypatch.setattr("dbrx.eval.sandbox.shutil.which", lambda name: None)
    assert missing_runtime("c++") == "c++ programs need g++, which is not on PATH; install it or leave these tasks out"
