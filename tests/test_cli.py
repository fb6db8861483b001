"""`python -m calm_jax.train`'s command line: flags, --help, and one `error:` line (exit status 2)
for each kind of bad input, before anything is trained."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from calm_jax import distributed
from calm_jax import train as train_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = "--gin_file=experiments/pretrain_kv.gin"


def _command(*args, cwd=REPO):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "calm_jax.train", *args], capture_output=True,
                          text=True, env=env, cwd=cwd)


def _error_line(monkeypatch, capsys, *argv) -> str:
    """Runs the command in this process; asserts exit status 2 and exactly one line on stderr."""
    monkeypatch.setattr("sys.argv", ["calm_jax.train", *argv])
    with pytest.raises(SystemExit) as exit_:
        train_cli.console_main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.rstrip("\n")


def test_help_lists_every_flag():
    result = _command("--help")
    assert result.returncode == 0, result.stderr
    for name in ("gin_file", "gin_bindings", "gin_search_paths", *distributed.FLAGS):
        assert f"\n  --{name}\n" in result.stdout, name
    assert "--gin.KEY=VALUE" in result.stdout
    assert result.stdout.startswith("usage: python -m calm_jax.train --gin_file=FILE")


def test_flags_parse_into_gin_files_bindings_and_multi_process_values():
    args = train_cli.parse_args([
        "--gin_file=a.gin", "--gin.NUM_STEPS=3", "--gin_bindings=BATCH_SIZE = 8",
        "--gin_file", "b.gin", "--gin.MODEL_DIR='/tmp/a=b'", "--gin_search_paths=/x",
        "--num_processes=2", "--process_id", "1", "--local_device_ids=0,1",
        "--coordinator_address=localhost:1234"])
    assert args.gin_files == ("a.gin", "b.gin")
    assert args.gin_bindings == ("NUM_STEPS = 3", "BATCH_SIZE = 8", "MODEL_DIR = '/tmp/a=b'")
    assert args.gin_search_paths == ("/x",)
    assert args.distributed == {"num_processes": 2, "process_id": 1, "local_device_ids": (0, 1),
                                "coordinator_address": "localhost:1234"}


@pytest.mark.parametrize("argv, expected", [
    (["--bogus=1"], "error: --bogus: unknown flag; expected --gin_file, --gin.KEY=VALUE"),
    (["--gin_file"], "error: arguments: Missing value for flag --gin_file"),
    ([PRETRAIN, "stray.gin"], "error: arguments: expected only flags (--gin_file=FILE, "
                              "--gin.KEY=VALUE, ...), got ['stray.gin']"),
    ([PRETRAIN, "--gin.MODEL_DIR"], "error: --gin.MODEL_DIR: expected --gin.KEY=VALUE"),
    (["--gin.MODEL_DIR='x'"], "error: --gin_file: expected at least one gin file, got none"),
    (["--gin_file=no_such.gin"], "error: --gin_file: expected an existing file (here, or under "),
    ([PRETRAIN, "--num_processes=two"], "error: --num_processes: expected an integer, got 'two'"),
    # The most common mistake: a string without gin's quotes.
    ([PRETRAIN, "--gin.MODEL_DIR=runs/x"],
     "error: --gin.MODEL_DIR=runs/x: gin cannot parse 'runs/x' (Failed to parse token 'runs'); "
     "a string needs gin's quotes inside the shell's: --gin.MODEL_DIR=\"'runs/x'\""),
    ([PRETRAIN, "--gin.MODEL_DIR=/tmp/run"],
     "error: --gin.MODEL_DIR=/tmp/run: gin cannot parse '/tmp/run' (Unable to parse value.); "
     "a string needs gin's quotes inside the shell's: --gin.MODEL_DIR=\"'/tmp/run'\""),
    ([PRETRAIN, "--gin.MODEL_DIR='/tmp/x'", "--gin.NUM_STEPS=abc("],
     "error: --gin.NUM_STEPS=abc(: Failed to parse token 'abc'"),
    ([PRETRAIN, "--gin.MODEL_DIR='/tmp/x'", "--gin.trainer.train.bogus=1"],
     "error: --gin.trainer.train.bogus=1: Configurable 'trainer.train' doesn't have a parameter "
     "named 'bogus'."),
    ([PRETRAIN, "--gin.MODEL_DIR='/tmp/x'", "--gin.NUM_STEPS=@nothing()"],
     "error: --gin.NUM_STEPS=@nothing(): No configurable matching reference '@nothing()'."),
    ([PRETRAIN, "--gin.MODEL_DIR='/tmp/x'", "--gin_bindings=include 'no_such.gin'"],
     "error: --gin_bindings=\"include 'no_such.gin'\": Unable to open file: no_such.gin"),
    (["--gin_file=experiments/compose_kv.gin", "--gin.MODEL_DIR='/tmp/x'"],
     "error: gin: ANCHOR_CHECKPOINT/macro.value set to `%gin.REQUIRED` but not subsequently "
     "overridden. Pass --gin.ANCHOR_CHECKPOINT=VALUE."),
])
def test_bad_input_is_one_error_line(monkeypatch, capsys, argv, expected):
    assert _error_line(monkeypatch, capsys, *argv).startswith(expected)


def test_a_gin_file_error_names_the_file_and_line(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'experiments/pretrain_kv.gin'\nNUM_STEPS = 3\nBATCH_SIZE = a/b\n")
    assert _error_line(monkeypatch, capsys, f"--gin_file={bad}") == (
        f"error: gin file {bad}, line 3: Failed to parse token 'a'")
    bad.write_text("include 'experiments/pretrain_kv.gin'\n\ntrainer.train.bogus = 1\n")
    assert _error_line(monkeypatch, capsys, f"--gin_file={bad}") == (
        f"error: gin file {bad}, line 3: Configurable 'trainer.train' doesn't have a parameter "
        f"named 'bogus'.")
    bad.write_text("include 'experiments/pretrain_kv.gin'\nNUM_STEPS = (3,\n")
    # Python's tokenizer words it "EOF ..." up to 3.11 and "unexpected EOF ..." from 3.12.
    assert re.match(r"error: gin: (unexpected )?EOF in multi-line statement",
                    _error_line(monkeypatch, capsys, f"--gin_file={bad}"))


def test_a_model_dir_that_is_a_file(tmp_path, monkeypatch, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    assert _error_line(monkeypatch, capsys, PRETRAIN, f"--gin.MODEL_DIR='{path}'") == (
        f"error: MODEL_DIR (trainer.train.model_dir): expected a directory, new or existing, "
        f"got '{path}', which is a file")
    assert path.read_text() == "mine"


def test_config_gin_is_written_before_training_starts(tmp_path, monkeypatch, capsys):
    """A run that fails inside train() (here: on its first check) still leaves its config."""
    model_dir = tmp_path / "run"
    line = _error_line(monkeypatch, capsys, PRETRAIN, f"--gin.MODEL_DIR='{model_dir}'",
                       "--gin.NUM_STEPS=0")
    assert line == "error: num_steps: expected a positive integer, got 0"
    # gin continues a long line with a backslash: read the file as gin does.
    config = " ".join((model_dir / "config.gin").read_text().replace("\\\n", " ").split())
    assert "NUM_STEPS = 0" in config and f"MODEL_DIR = '{model_dir}'" in config


def test_gin_files_relative_to_the_working_directory_and_search_paths(tmp_path, monkeypatch):
    import gin

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "short.gin").write_text("include 'experiments/pretrain_kv.gin'\nNUM_STEPS = 7\n")
    (tmp_path / "runs").mkdir()  # must not shadow the shipped include 'runs/base.gin'
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    readers, prefixes = list(gin.config._FILE_READERS), list(gin.config._LOCATION_PREFIXES)
    for argv in (["--gin_file=mine/short.gin"],
                 ["--gin_file=short.gin", f"--gin_search_paths={mine}"]):
        train_cli.parse_gin_args(train_cli.parse_args([*argv, "--gin.MODEL_DIR='/tmp/x'"]))
        assert gin.query_parameter("%NUM_STEPS") == 7
        assert gin.query_parameter("%MODE") == "pretrain"  # from the shipped experiment
        assert train_cli.configured_model_dir() == "/tmp/x"
    # gin's readers and search paths are left as they were.
    assert gin.config._FILE_READERS == readers and gin.config._LOCATION_PREFIXES == prefixes


def test_the_command_ends_with_one_error_line_not_a_traceback(tmp_path):
    result = _command(PRETRAIN, "--gin.MODEL_DIR=runs/x", cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert errors == ["error: --gin.MODEL_DIR=runs/x: gin cannot parse 'runs/x' (Failed to parse "
                      "token 'runs'); a string needs gin's quotes inside the shell's: "
                      "--gin.MODEL_DIR=\"'runs/x'\""]
