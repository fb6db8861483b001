r"""Command line: `python -m calm_jax.train --gin_file=FILE [--gin_file=...] [--gin.KEY=VALUE ...]`.

Multi-process runs add `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or
take them from the environment, SLURM or the TPU runtime; see `calm_jax.distributed`).

As in t5x: gin files configure the keyword-only `calm_jax.trainer.train` (through
`from __gin__ import dynamic_registration`, so the library carries no gin decorators);
`--gin.KEY=VALUE` adds bindings after the files (string values need quotes:
`--gin.MODEL_DIR=\"'/tmp/run'\"`). Gin files are looked up as given, then relative to the
repository's `gin/` folder. An unknown binding or a missing `%gin.REQUIRED` value fails before
anything is compiled.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, Sequence

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


def split_args(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """argv -> (gin files, gin bindings, other arguments)."""
    files, bindings, rest = [], [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        for prefix, out in (("--gin_file", files), ("--gin.", bindings)):
            if arg.startswith(prefix):
                if prefix == "--gin_file":
                    value = arg.split("=", 1)[1] if "=" in arg else args[i + 1]
                    i += 0 if "=" in arg else 1
                    out.append(value)
                else:
                    key_value = arg[len(prefix):]
                    if "=" not in key_value:
                        raise ValueError(f"--gin.{key_value}: expected --gin.KEY=VALUE")
                    out.append(key_value.replace("=", " = ", 1))
                break
        else:
            rest.append(arg)
        i += 1
    return files, bindings, rest


class _DropGinPathNotFound(logging.Filter):
    """Drops the 'Path not found' error gin's package-resource reader logs for every include
    that is not a Python package resource (each of ours), before the search paths find it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.ERROR and record.msg == "Path not found: %s")


def _guard_gin_readers() -> None:
    """Makes gin's file-existence checks answer False instead of raising, and quietly.

    gin's package-resource reader treats `include 'runs/base.gin'` as resource `base.gin` of a
    Python package `runs`; when the working directory holds a plain `runs/` folder (a
    namespace package, whose spec has no origin) it raises TypeError instead of moving on to
    the search paths. When there is no such package it logs an error (on the root logger) and
    answers False, and the search paths then find the file: that error is not shown.
    """
    import gin.config

    def safe(check):
        if getattr(check, "calm_jax_guarded", False):
            return check

        def guarded(path):
            quiet = _DropGinPathNotFound()
            logging.getLogger().addFilter(quiet)
            try:
                return check(path)
            except (TypeError, ValueError, ImportError):
                return False
            finally:
                logging.getLogger().removeFilter(quiet)

        guarded.calm_jax_guarded = True
        return guarded

    gin.config._FILE_READERS[:] = [(reader, safe(check))
                                   for reader, check in gin.config._FILE_READERS]


def parse_gin(files: Sequence[str], bindings: Sequence[str]) -> None:
    import gin

    _guard_gin_readers()
    gin.clear_config()
    gin.add_config_file_search_path(os.getcwd())
    gin.add_config_file_search_path(GIN_DIR)
    for path in files:
        if not (os.path.exists(path) or os.path.exists(os.path.join(GIN_DIR, path))):
            raise ValueError(f"--gin_file: expected an existing file (or one under {GIN_DIR}), "
                             f"got {path!r}")
    gin.parse_config_files_and_bindings(list(files), list(bindings), finalize_config=True)


def run(argv: Sequence[str]) -> dict:
    """Parses gin files/bindings from argv and runs the configured `train()`."""
    import gin
    import jax
    from calm_jax import distributed
    from calm_jax import trainer

    files, bindings, rest = split_args(argv)
    dist_flags, rest = distributed.split_flags(rest)
    if rest:
        raise ValueError(f"arguments: expected only --gin_file, --gin.KEY=VALUE and the "
                         f"multi-process flags {sorted(distributed.FLAGS)}, got {rest}")
    distributed.initialize(**dist_flags)  # before anything touches a device
    if not files:
        raise ValueError("--gin_file: expected at least one gin file, got none")
    parse_gin(files, bindings)
    configured = gin.get_configurable(trainer.train)
    result = configured()
    model_dir = result.get("model_dir")
    if model_dir and jax.process_index() == 0:  # one writer per job
        with open(os.path.join(model_dir, "config.gin"), "w") as f:
            f.write(gin.config_str())
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
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


def console_main() -> None:
    run_cli(run)


if __name__ == "__main__":
    console_main()
