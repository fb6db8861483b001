"""bench/profile_step.py: the trace summary's arithmetic (no profiler run, no timing)."""

import importlib.util
import os
from types import SimpleNamespace as NS

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                     "profile_step.py")
_spec = importlib.util.spec_from_file_location("bench_profile_step", _PATH)
ps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ps)


def test_busy_time_is_the_union_of_overlapping_kernels():
    events = [("a", None, 0, 10), ("b", None, 5, 10), ("c", None, 30, 5), ("d", None, 31, 1)]
    assert ps.busy_ns(events) == 15 + 5
    assert ps.busy_ns([]) == 0


@pytest.mark.parametrize("names, expected", [
    (("sm90_xmma_gemm_bf16bf16_bf16f32",), "gemm"),
    (("nvjet_tst_128x256", "custom-call.12"), "gemm"),
    (("cudnn_generated_fort_native_sdpa_sm90", None), "attention"),
    (("loop_multiply_fusion", "fusion.3"), "elementwise"),
    (("input_reduce_fusion_2",), "reduce"),
    (("Memcpy DtoD",), "copy"),
    (("mystery",), "other"),
])
def test_kernel_categories(names, expected):
    assert ps.category(*names) == expected


def test_summary_is_per_step():
    events = [("gemm_k", "dot.1", 0, 2_000_000), ("loop_add_fusion", "add.2", 2_000_000, 1_000_000),
              ("gemm_k", "dot.1", 10_000_000, 2_000_000),
              ("loop_add_fusion", "add.2", 12_000_000, 1_000_000)]
    out = ps.summarize(events, steps=2, wall_s=0.010, top=1)
    assert out["step_ms"] == 5.0 and out["busy_ms"] == 3.0 and out["idle_ms"] == 2.0
    assert out["kernels_per_step"] == 2.0
    assert out["by_category_ms"] == {"gemm": 2.0, "elementwise": 1.0}
    assert out["top"] == [{"name": "gemm_k", "hlo_op": "dot.1", "calls": 1.0, "ms": 2.0,
                           "category": "gemm"}]
    assert out["top_by_category"] == {
        "gemm": [{"name": "gemm_k", "calls": 1.0, "ms": 2.0}],
        "elementwise": [{"name": "loop_add_fusion", "calls": 1.0, "ms": 1.0}]}


def test_device_plane_streams_are_preferred_over_the_host():
    ev = lambda name, start, dur, op=None: NS(  # noqa: E731
        name=name, start_ns=start, duration_ns=dur, stats=[("hlo_op", op)] if op else [])
    gpu = NS(name="/device:GPU:0", lines=[NS(name="Stream #7(Compute)", events=[ev("k", 0, 4, "dot.1")]),
                                          NS(name="XLA Ops", events=[ev("dot.1", 0, 4)])])
    host = NS(name="/host:CPU", lines=[NS(name="tf_XLA_thread", events=[ev("h", 0, 9)])])
    source, events = ps.device_events([host, gpu])
    assert source == "/device:GPU:0" and events == [("k", "dot.1", 0, 4)]
    source, events = ps.device_events([host])
    assert source.startswith("/host:CPU") and events == [("h", None, 0, 9)]
