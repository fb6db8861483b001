"""Test setup (must precede the first jax import): eight fake CPU devices for sharding tests,
and XLA's CPU backend at optimisation level 0.

Nearly every test compiles a few small programs and runs each a handful of times, so compiling
is most of the suite's time; level 0 compiles them about a third faster (whole suite, 2 cores:
1108 s at the default level, 1009 s with everything at level 0). The programs and their results
are the same; only the machine code is less optimised, which matters for the one test that
trains for minutes: the CI-scale reproduction, which runs in its own process at the default
level (`tests/test_kv_experiment.py`, `DEFAULT_LEVEL_ENV`). An XLA_FLAGS already set is kept.
"""

import os

FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"

os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAG}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import jax  # noqa: E402 (after the flags above)
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Frees each test module's compiled programs when it ends: the whole suite in one process
    otherwise accumulates thousands of executables (and XLA crashed late in such runs)."""
    yield
    jax.clear_caches()
