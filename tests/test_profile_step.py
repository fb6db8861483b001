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


# A compiled module in the GPU compiler's text form: an elementwise fusion over two f32[262144]
# operands, and a product (bound by its arithmetic, so left out of the bandwidth).
_HLO = """HloModule jit_step, is_scheduled=true

%fused_mul (a0: f32[262144], a1: f32[262144]) -> f32[262144] {
  %a0 = f32[262144]{0} parameter(0)
  %a1 = f32[262144]{0} parameter(1)
  ROOT %m = f32[262144]{0} multiply(%a0, %a1)
}

ENTRY %main (x: f32[262144], w: bf16[16,16]) -> (f32[262144], bf16[16,16]) {
  %x = f32[262144]{0} parameter(0)
  %w = bf16[16,16]{1,0} parameter(1)
  %loop_multiply_fusion = f32[262144]{0} fusion(%x, %x), kind=kLoop, calls=%fused_mul
  %gemm = (bf16[16,16]{1,0}, s8[8]{0}) custom-call(%w, %w), custom_call_target="__cublas$gemm"
  %y = bf16[16,16]{1,0} get-tuple-element(%gemm), index=0
  ROOT %r = (f32[262144]{0}, bf16[16,16]{1,0}) tuple(%loop_multiply_fusion, %y)
}
"""


def test_bandwidth_joins_traced_kernels_with_the_bytes_their_ops_move():
    moved = ps.op_bytes(_HLO)
    assert moved["loop_multiply_fusion"] == (3 * 262144 * 4, True)
    assert moved["gemm"][1] is False
    # Two steps: the fusion runs once a step for 3,072 ns (3 MiB: 1.024 TB/s), the product
    # is not counted, and a kernel whose op the module lacks is not either.
    events = [("loop_multiply_fusion", "loop_multiply_fusion", 0, 3072),
              ("nvjet_gemm", "gemm", 4000, 50000), ("memset", None, 60000, 1000),
              ("loop_multiply_fusion", "loop_multiply_fusion", 100000, 3072)]
    out = ps.bandwidth(events, steps=2, moved=moved)
    assert out["achieved_tb_s"] == 1.024 and out["covered_ms"] == 0.003
    assert out["top"] == [{"hlo_op": "loop_multiply_fusion", "calls": 1.0, "ms": 0.003,
                           "gib": round(3 / 1024, 3), "tb_s": 1.024}]
    # Command buffers on: the trace names command buffers, not ops, and nothing is matched.
    assert ps.bandwidth([("k", "command_buffer_3", 0, 5)], steps=1, moved=moved) is None
