r"""Command line: `python -m calm_jax.train --gin_file=FILE [--gin_file=...] [--gin.KEY=VALUE ...]`.

Multi-process runs add `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or
take them from the environment, SLURM or the TPU runtime; see `calm_jax.distributed`).
`--help` lists every flag.

As in t5x: gin files configure the keyword-only `calm_jax.trainer.train` (through
`from __gin__ import dynamic_registration`, so the library carries no gin decorators);
`--gin.KEY=VALUE` is short for `--gin_bindings='KEY = VALUE'`, and bindings apply after the
files. String values need gin's quotes inside the shell's: `--gin.MODEL_DIR="'/tmp/run'"`.
Gin files (and their `include`s) are looked up as given, then under `--gin_search_paths`, then
in the gin folder shipped with the package (`gin_dir()`: the repository's `gin/`, or
`calm_jax/gin_configs` in an installed package). An unknown binding or a missing
`%gin.REQUIRED` value fails before anything is compiled; the command then prints one
`error: ...` line and exits with status 2. `MODEL_DIR/config.gin` (every binding) is written
before training starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import logging
import os
import re
import sys
import textwrap
import tokenize
from collections.abc import Callable, Iterator, Sequence
from typing import Any

PROG = "python -m calm_jax.train"
CONFIG_FILE = "config.gin"


def gin_dir() -> str:
    """The folder of the gin files shipped with calm_jax: `calm_jax/gin_configs` of an installed
    package, else the `gin/` folder of the repository this module was imported from."""
    installed = importlib.resources.files("calm_jax").joinpath("gin_configs")
    if installed.is_dir():
        return str(installed)
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


GIN_DIR = gin_dir()

_DISTRIBUTED_HELP = {
    "coordinator_address": "HOST:PORT of process 0 (multi-process runs)",
    "num_processes": "number of processes in the job",
    "process_id": "this process's index, 0..num_processes-1",
    "local_device_ids": "comma-separated ids of the devices this process uses, e.g. 0,1",
    "heartbeat_timeout_seconds": "seconds without a heartbeat after which a process counts as "
                                 "dead and the job stops",
    "initialization_timeout_seconds": "seconds to wait for every process to join",
}
_HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")


@dataclasses.dataclass(frozen=True)
class Args:
    """The parsed command line: gin files and bindings (in order), extra gin search paths, and
    the multi-process flags given (flag -> value parsed by `calm_jax.distributed`)."""

    gin_files: tuple[str, ...]
    gin_bindings: tuple[str, ...]
    gin_search_paths: tuple[str, ...] = ()
    distributed: dict[str, Any] = dataclasses.field(default_factory=dict)


def flag_values():
    """A fresh `absl.flags.FlagValues` holding every flag of the command line."""
    from absl import flags

    from calm_jax import distributed

    fv = flags.FlagValues()
    flags.DEFINE_multi_string(
        "gin_file", None, f"gin file to read, in order; looked up as given, then "
        f"under --gin_search_paths, then under the shipped gin folder ({GIN_DIR})",
        flag_values=fv)
    flags.DEFINE_multi_string(
        "gin_bindings", None, "gin binding 'KEY = VALUE', applied after the files; "
        "--gin.KEY=VALUE is the same. Strings need gin quotes: --gin.MODEL_DIR=\"'/tmp/run'\"",
        flag_values=fv)
    flags.DEFINE_multi_string(
        "gin_search_paths", None, "extra folder to look gin files and their includes up "
        "in", flag_values=fv)
    for name in distributed.FLAGS:
        flags.DEFINE_string(name, None, _DISTRIBUTED_HELP.get(name, "see calm_jax.distributed"),
                            flag_values=fv)
    return fv


def usage() -> str:
    """The text `--help` prints."""
    fv = flag_values()
    lines = [f"usage: {PROG} --gin_file=FILE [--gin_file=...] [--gin.KEY=VALUE ...] "
             f"[multi-process flags]", "",
             "Trains what the gin files configure (calm_jax.trainer.train).", "", "flags:"]
    for name in sorted(fv):
        lines.append(f"  --{name}")
        lines += textwrap.wrap(" ".join(fv[name].help.split()), width=96, initial_indent="      ",
                               subsequent_indent="      ", break_long_words=False,
                               break_on_hyphens=False)  # paths stay whole
    lines.append("  --gin.KEY=VALUE")
    lines.append("      short for --gin_bindings='KEY = VALUE'")
    return "\n".join(lines)


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
    """`--gin.KEY=VALUE` -> `--gin_bindings=KEY = VALUE`; other arguments unchanged."""
    out = []
    for arg in argv:
        if arg.startswith("--gin."):
            key, eq, value = arg[len("--gin."):].partition("=")
            if not eq or not key:
                raise ValueError(f"{arg}: expected --gin.KEY=VALUE")
            arg = f"--gin_bindings={key} = {value}"
        out.append(arg)
    return out


def wants_help(argv: Sequence[str]) -> bool:
    return any(a in _HELP_FLAGS for a in argv)


def parse_args(argv: Sequence[str]) -> Args:
    """Parses the command line (without the program name). Bad flags raise ValueError."""
    from absl import flags

    from calm_jax import distributed

    fv = flag_values()
    try:
        positional = fv(["calm_jax.train", *rewrite_gin_args(argv)], known_only=False)[1:]
    except flags.UnrecognizedFlagError as e:
        raise ValueError(f"--{e.flagname}: unknown flag; expected --gin_file, --gin.KEY=VALUE, "
                         f"--gin_bindings, --gin_search_paths or a multi-process flag "
                         f"(see {PROG} --help)") from None
    except flags.Error as e:
        raise ValueError(f"arguments: {e} (see {PROG} --help)") from None
    if positional:
        raise ValueError(f"arguments: expected only flags (--gin_file=FILE, --gin.KEY=VALUE, "
                         f"...), got {positional}")
    given = [f"--{name}={fv[name].value}" for name in distributed.FLAGS
             if fv[name].value is not None]
    dist_flags, _ = distributed.split_flags(given)
    return Args(gin_files=tuple(fv.gin_file or ()), gin_bindings=tuple(fv.gin_bindings or ()),
                gin_search_paths=tuple(fv.gin_search_paths or ()), distributed=dist_flags)


def split_args(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """argv -> (gin files, gin bindings 'KEY = VALUE', the other arguments), for entry points
    that take only gin arguments; `parse_args` parses the whole command line of this one."""
    files, bindings, rest = [], [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--gin_file" and i + 1 < len(args):
            files.append(args[i + 1])
            i += 1
        elif arg.startswith("--gin_file="):
            files.append(arg.partition("=")[2])
        elif arg.startswith("--gin."):
            bindings.append(rewrite_gin_args([arg])[0].partition("=")[2])
        else:
            rest.append(arg)
        i += 1
    return files, bindings, rest


class _DropGinPathNotFound(logging.Filter):
    """Drops the 'Path not found' error gin's package-resource reader logs for every include
    that is not a Python package resource (each of ours), before the search paths find it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.ERROR and record.msg == "Path not found: %s")


@contextlib.contextmanager
def _gin_lookup(folders: Sequence[str]) -> Iterator[None]:
    """While parsing: gin looks files up in `folders` (after the path as given), and its
    file-existence checks answer False instead of raising, quietly.

    gin's package-resource reader treats `include 'runs/base.gin'` as resource `base.gin` of a
    Python package `runs`; when the working directory holds a plain `runs/` folder (a
    namespace package, whose spec has no origin) it raises TypeError instead of moving on to
    the search paths. When there is no such package it logs an error (on the root logger) and
    answers False, and the search paths then find the file: that error is not shown. gin has
    no public way to wrap its readers or to drop a search path, so its reader list is swapped
    for guarded copies and its search paths extended for the duration of the parse; both are
    restored afterwards.
    """
    import gin.config

    def guard(check):
        def guarded(path):
            try:
                return check(path)
            except (TypeError, ValueError, ImportError):
                return False

        return guarded

    readers, prefixes = gin.config._FILE_READERS, gin.config._LOCATION_PREFIXES
    original_readers, original_prefixes = list(readers), list(prefixes)
    quiet = _DropGinPathNotFound()
    readers[:] = [(reader, guard(check)) for reader, check in original_readers]
    for folder in folders:
        gin.config.add_config_file_search_path(folder)
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        readers[:] = original_readers
        prefixes[:] = original_prefixes
        logging.getLogger().removeFilter(quiet)


def parse_gin(files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
    """Clears gin, then parses `files` and `bindings` ('KEY = VALUE') and finalizes the config.

    Files and includes are looked up as given (relative to the working directory), then under
    each of `search_paths`, then under `GIN_DIR`. gin's own exceptions propagate (see
    `parse_gin_args` for one-line errors).
    """
    import gin

    gin.clear_config()
    folders = [os.getcwd(), *search_paths, GIN_DIR]
    for path in files:
        if not any(os.path.isfile(os.path.join(f, path)) for f in folders):
            raise ValueError(f"--gin_file: expected an existing file (here, or under "
                             f"{', '.join(folders[1:])}), got {path!r}")
    with _gin_lookup(folders):
        gin.parse_config_files_and_bindings(list(files), list(bindings), finalize_config=True)


# A value gin cannot parse that the user most likely meant as a string: a word or a path.
_BARE_STRING = re.compile(r"[\w./~:+-]+")


def _binding_flag(binding: str) -> str:
    key, eq, value = (x.strip() for x in binding.partition("="))
    if eq and re.fullmatch(r"[\w./]+", key):
        return f"--gin.{key}={value}"
    return f"--gin_bindings={binding!r}"


def gin_error_line(error: BaseException, bindings: Sequence[str]) -> str:
    """One line saying what gin rejected and where (file and line, or the --gin. flag);
    for an unquoted string value, how to quote it."""
    if isinstance(error, tokenize.TokenError):  # raised before gin knows the line
        return f"gin: {error.args[0]} (an unclosed bracket in a gin file or binding?)"
    text = str(error.msg if isinstance(error, SyntaxError) else error).strip()
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    message = (lines[0] if lines else type(error).__name__).split(" in config string:")[0]
    message = message.split(". Searched config paths:")[0]
    required = re.match(r"(\S+?)(?:/macro\.value)? set to `%gin\.REQUIRED`", message)
    if required:
        message = f"{message} Pass --gin.{required.group(1)}=VALUE."
    filename, lineno = None, None
    if isinstance(error, SyntaxError):
        filename, lineno = error.filename, error.lineno
        if lineno is None:  # the message carries it: "... (line 2)"
            found = re.search(r"\(line (\d+)\)\s*$", message)
            lineno = int(found.group(1)) if found else None
        message = re.sub(r"\s*\(line \d+\)\s*$", "", message)
        if len(lines) > 1 and lines[-1].startswith("Failed to parse token"):
            message = lines[-1]
    for line in lines[1:]:
        found = re.match(r'In (?:file "(.*)",|bindings string) line (\d+)', line)
        if found:
            filename, lineno = found.group(1), int(found.group(2))
    if filename is None and lineno is not None and 0 < lineno <= len(bindings):
        binding = bindings[lineno - 1]
        key, _, value = (x.strip() for x in binding.partition("="))
        if isinstance(error, SyntaxError) and _BARE_STRING.fullmatch(value):
            return (f"{_binding_flag(binding)}: gin cannot parse {value!r} ({message}); a "
                    f"string needs gin's quotes inside the shell's: "
                    f"--gin.{key}=\"'{value}'\"")
        return f"{_binding_flag(binding)}: {message}"
    if filename:
        return f"gin file {filename}, line {lineno}: {message}"
    return f"gin: {message}"


def parse_gin_args(args: Args) -> None:
    """`parse_gin` for a command line: gin's errors become a ValueError of one line."""
    if not args.gin_files:
        raise ValueError("--gin_file: expected at least one gin file, got none")
    try:
        parse_gin(args.gin_files, args.gin_bindings, args.gin_search_paths)
    except (SyntaxError, ValueError, OSError, ImportError, TypeError, AttributeError,
            tokenize.TokenError) as e:
        if isinstance(e, ValueError) and str(e).startswith("--gin_file:"):
            raise
        raise ValueError(gin_error_line(e, args.gin_bindings)) from None


def configured_model_dir() -> str | None:
    """The `model_dir` gin passes to `trainer.train` (following macros), or None if it is not a
    plain value."""
    import gin

    try:
        value = gin.query_parameter("calm_jax.trainer.train.model_dir")
        for _ in range(16):
            if not (isinstance(value, gin.config.ConfigurableReference)
                    and value.selector == "gin.macro"):
                break
            value = value.scoped_configurable_fn()
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def check_model_dir(model_dir: str | None) -> None:
    if model_dir is not None and os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise ValueError(f"MODEL_DIR (trainer.train.model_dir): expected a directory, new or "
                         f"existing, got {model_dir!r}, which is a file")


def write_config(model_dir: str) -> str:
    """Writes every gin binding to MODEL_DIR/config.gin; returns its path."""
    import gin

    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, CONFIG_FILE)
    with open(path, "w") as f:
        f.write(gin.config_str())
    return path


def run(argv: Sequence[str]) -> dict:
    """Parses the command line and runs the configured `train()`; `--help` prints the flags."""
    if wants_help(argv):
        print(usage())
        return {}
    args = parse_args(argv)
    if not args.gin_files:
        raise ValueError("--gin_file: expected at least one gin file, got none")
    import gin
    import jax

    from calm_jax import distributed, trainer

    distributed.initialize(**args.distributed)  # before anything touches a device
    parse_gin_args(args)
    model_dir = configured_model_dir()
    check_model_dir(model_dir)
    chief = jax.process_index() == 0  # one writer per job
    if model_dir and chief:  # written first, so that a run that fails still has its config
        write_config(model_dir)
    result = gin.get_configurable(trainer.train)()
    if not model_dir and result.get("model_dir") and chief:
        write_config(result["model_dir"])
    return result


def run_cli(entry: Callable[[Sequence[str]], Any]) -> None:
    """Runs `entry(sys.argv[1:])` as a command: calm_jax progress logging on; bad settings
    (ValueError) end it with `error: ...` and exit status 2, a run stopped by a non-finite loss
    (FloatingPointError) with `error: ...` and exit status 3, instead of a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", force=True)
    logging.getLogger("calm_jax").setLevel(logging.INFO)
    try:
        entry(sys.argv[1:])
    except ValueError as e:
        print(f"error: {_without_gin_call_note(e)}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {_without_gin_call_note(e)}", file=sys.stderr)
        sys.exit(3)


def _without_gin_call_note(error: BaseException) -> str:
    """The message without the "In call to configurable ..." lines gin adds to an exception
    raised inside a configured function."""
    return str(error).split("\n  In call to configurable")[0]


def console_main() -> None:
    run_cli(run)


if __name__ == "__main__":
    console_main()
