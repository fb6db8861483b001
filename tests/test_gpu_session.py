"""bench/gpu_session.sh: the runs each part would make, read from its status lines.

A budget under 60 s makes the script skip every run (it says so with the arguments it would
have used), so these tests see the commands without running any benchmark.
"""

import os
import shlex
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_ROOT, "bench", "gpu_session.sh")


def _session(tmp_path, part: str, tiny: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(tmp_path), TINY="1" if tiny else "0",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return subprocess.run(["bash", _SCRIPT, part, "50"], env=env, capture_output=True,
                          text=True, timeout=120)


def _skipped(tmp_path) -> list[str]:
    lines = (tmp_path / "session.log").read_text().splitlines()
    runs = [line for line in lines if not line.startswith("xl allocator fraction")]
    assert runs and all(line.startswith("skipped (budget): ") for line in runs), lines
    return [line[len("skipped (budget): "):] for line in runs]


@pytest.mark.parametrize("part, shapes", [("1", {"small", "large", "xl"}),
                                          ("2", {"small", "large", "xl"}),
                                          ("3", {"small", "large"}),
                                          ("4", {"small", "large"})])
def test_tiny_runs_the_same_commands_at_the_tiny_shape(tmp_path, part, shapes):
    real = _session(tmp_path / "real", part, tiny=False)
    tiny = _session(tmp_path / "tiny", part, tiny=True)
    assert real.returncode == 0 and tiny.returncode == 0, real.stderr + tiny.stderr
    real_runs, tiny_runs = _skipped(tmp_path / "real"), _skipped(tmp_path / "tiny")
    assert len(real_runs) == len(tiny_runs) >= 5
    for real_run, tiny_run in zip(real_runs, tiny_runs):
        name, script, *args = real_run.split()
        expected = [name, script]
        for i, arg in enumerate(args):
            expected.append("tiny" if i > 0 and args[i - 1] == "--shape" else arg)
        if script == "bench/decode.py":
            expected.append("--tiny")
        assert tiny_run.split() == expected
    assert {run.split()[run.split().index("--shape") + 1]
            for run in real_runs if "--shape" in run.split()} == shapes


def test_an_unknown_part_is_refused(tmp_path):
    run = _session(tmp_path, "5", tiny=True)
    assert run.returncode == 2
    assert "PART: expected 1, 2, 3 or 4, got 5" in run.stderr


def _fake_python(tmp_path, error: list[str]):
    """A `python3` that fails every benchmark run without --attention_impl xla, writing the
    lines of `error` to stderr, and prints a JSON line otherwise; `-c` goes to the real
    interpreter."""
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    lines = " ".join(shlex.quote(line) for line in error)
    fake.write_text(f"""#!/usr/bin/env bash
[[ $1 == -c ]] && exec {sys.executable} "$@"
if [[ " $* " != *" --attention_impl xla "* ]]; then
  printf '%s\\n' {lines} >&2
  exit 1
fi
echo '{{"bench": "fake"}}'
""")
    fake.chmod(0o755)
    return fake.parent


def _runs_with_fake(tmp_path, error: list[str]) -> list[str]:
    env = dict(os.environ, OUT=str(tmp_path / "out"), TINY="0",
               PATH=str(_fake_python(tmp_path, error)) + os.pathsep + os.environ.get("PATH", ""))
    run = subprocess.run(["bash", _SCRIPT, "1", "540"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return (tmp_path / "out" / "session.log").read_text().splitlines()[1:]


def test_a_cudnn_failure_moves_the_later_runs_to_xla_attention(tmp_path):
    lines = _runs_with_fake(tmp_path, ["Traceback (most recent call last):", "  ...",
                                       "RuntimeError: CUDNN_STATUS_EXECUTION_FAILED"])
    assert lines[0].startswith("rc=1 ") and lines[0].endswith("--shape small --no_hlo_flops")
    assert lines[1] == "cuDNN failed in small: the runs that follow use --attention_impl xla"
    later = lines[2:]
    assert len(later) == 4 and all(line.startswith("rc=0 ") for line in later), later
    assert all(line.endswith("--attention_impl xla") for line in later)
    assert sum("bench/decode.py" in line for line in later) == 1
    # Every run's stderr in one file, beside 4 JSON files: the device tool returns 8 at most.
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "decode.jsonl", "device.txt", "large.jsonl", "session.log", "small.jsonl",
        "stderr.txt", "xl.jsonl"]
    stderr = (out / "stderr.txt").read_text()
    assert "== small\n" in stderr and "CUDNN_STATUS_EXECUTION_FAILED" in stderr


@pytest.mark.parametrize("error", [
    # cuDNN in a log line long before the error
    ["I1204 cuda_dnn.cc:463] Loaded cuDNN version 91000"] + ["  frame"] * 25
    + ["ValueError: batch: expected a positive integer, got 0"],
    # an out-of-memory report that lists a fused-attention buffer
    ["jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate",
     "  3.00GiB custom-call __cudnn$fmhaSoftmax"],
], ids=["cudnn_in_an_early_log_line", "out_of_memory"])
def test_another_failure_keeps_the_attention_choice(tmp_path, error):
    lines = _runs_with_fake(tmp_path, error)
    assert len(lines) == 5 and not any("cuDNN failed" in line for line in lines)
    assert all("--attention_impl" not in line for line in lines)
    assert all(line.startswith("rc=1 ") for line in lines)
