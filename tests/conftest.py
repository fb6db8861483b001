"""Test setup (must precede the first jax import): eight fake CPU devices for sharding tests,
XLA's CPU backend at optimisation level 0, and a compilation cache shared by the whole run.

Nearly every test compiles a few small programs and runs each a handful of times, so compiling
is most of the suite's time; level 0 compiles them about a third faster (whole suite, 2 cores:
1108 s at the default level, 1009 s with everything at level 0). The programs and their results
are the same; only the machine code is less optimised, which matters for the one test that
trains for minutes: the CI-scale reproduction, which runs in its own process at the default
level (`tests/test_kv_experiment.py`, `DEFAULT_LEVEL_ENV`). An XLA_FLAGS already set is kept.

Many tests build the same tiny models, so they compile the same programs again under new jitted
functions; jax's persistent compilation cache, in a directory made for this run (and removed at
its end) and with no minimum compile time, compiles each once for the whole run, pytest-xdist
workers and the subprocesses of the command-line and multi-host tests included
(tests/test_composition.py alone, 2 cores: 244 s without it, 154 s with it). A
JAX_COMPILATION_CACHE_DIR already set is used as it is and kept.

The importer tests check our logits against transformers' on the CPU (the `verify` extra). Where
torch comes as its CUDA build (PyPI's default Linux wheel) it brings triton, and
transformers imports torch._dynamo, which imports triton. Loaded into a process that has
already loaded TensorFlow (the seqio tests, in the same pytest-xdist worker), triton's native
library crashes in its LLVM static initialisers (a segmentation fault; TensorFlow 2.21, triton
3.7.1). A CPU reference compiles no kernels, so triton is kept out of the test processes:
torch's `has_triton_package` then answers False. calm_jax itself imports torch only to read
PyTorch .bin checkpoints, and torch alone (import, `torch.load`) does not load triton.
"""

import atexit
import os
import shutil
import sys
import tempfile

sys.modules.setdefault("triton", None)  # see above: `import triton` raises ImportError

FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"

os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAG}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the first process of the run makes it
    _cache_dir = tempfile.mkdtemp(prefix="calm_jax-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import jax  # noqa: E402 (after the flags above)
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Frees each test module's compiled programs when it ends: the whole suite in one process
    otherwise accumulates thousands of executables (and XLA crashed late in such runs)."""
    yield
    jax.clear_caches()
