"""bench/gpu_aot.py's reading of compiled GPU programs, on hand-written HLO text (no GPU, no
CUDA plugin), and its refusal to run without the plugin."""

import pytest

from bench import gpu_aot

# The loop both modules share: its body's carried values (a counter, a hidden state, a weight
# stack and an activation stack) and its condition (three trips).
_LOOP_HEAD = """%body (carry: (s32[], bf16[8,64], bf16[3,64,64], bf16[3,8,64])) -> (s32[], bf16[8,64], bf16[3,64,64], bf16[3,8,64]) {
  %carry = (s32[], bf16[8,64]{1,0}, bf16[3,64,64]{2,1,0}, bf16[3,8,64]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%carry), index=0
  %h = bf16[8,64]{1,0} get-tuple-element(%carry), index=1
  %w = bf16[3,64,64]{2,1,0} get-tuple-element(%carry), index=2
  %acts = bf16[3,8,64]{2,1,0} get-tuple-element(%carry), index=3
"""
_LOOP_COND = """%cond (c: (s32[], bf16[8,64], bf16[3,64,64], bf16[3,8,64])) -> pred[] {
  %c = (s32[], bf16[8,64]{1,0}, bf16[3,64,64]{2,1,0}, bf16[3,8,64]{2,1,0}) parameter(0)
  %n = s32[] get-tuple-element(%c), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%n, %three), direction=LT
}
"""

# A scheduled module in the GPU compiler's text form: a three-layer loop whose body indexes a
# weight stack (a copy), multiplies (a cuBLAS-free Triton product) and writes a stacked
# activation (an in-place update); around it an independent chain, a cuDNN attention call, an
# asynchronous dynamic-slice fusion and views that launch nothing.
MODULE = """HloModule jit_step, is_scheduled=true

%fused_dynamic_slice (p0: bf16[3,64,64], p1: s32[]) -> bf16[1,64,64] {
  %p0 = bf16[3,64,64]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  ROOT %ds = bf16[1,64,64]{2,1,0} dynamic-slice(%p0, %p1, %p1, %p1), dynamic_slice_sizes={1,64,64}
}

""" + _LOOP_HEAD + """  %loop_dynamic_slice_fusion = bf16[1,64,64]{2,1,0} fusion(%w, %i), kind=kLoop, calls=%fused_dynamic_slice
  %bitcast.1 = bf16[64,64]{1,0} bitcast(%loop_dynamic_slice_fusion)
  %gemm_fusion_dot.1 = bf16[8,64]{1,0} fusion(%h, %bitcast.1), kind=kCustom, calls=%gemm_fusion_dot.1_computation, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %loop_dynamic_update_slice_fusion = bf16[3,8,64]{2,1,0} fusion(%acts, %gemm_fusion_dot.1, %i), kind=kLoop, calls=%fused_dus
  %loop_add_fusion = s32[] fusion(%i), kind=kLoop, calls=%fused_add
  ROOT %t = (s32[], bf16[8,64]{1,0}, bf16[3,64,64]{2,1,0}, bf16[3,8,64]{2,1,0}) tuple(%loop_add_fusion, %gemm_fusion_dot.1, %w, %loop_dynamic_update_slice_fusion)
}

""" + _LOOP_COND + """
ENTRY %main (x: bf16[8,64], w: bf16[3,64,64], q: bf16[8,16,128,64]) -> (bf16[8,64], bf16[8,64]) {
  %x = bf16[8,64]{1,0} parameter(0)
  %w = bf16[3,64,64]{2,1,0} parameter(1)
  %q = bf16[8,16,128,64]{3,2,1,0} parameter(2)
  %zero = s32[] constant(0)
  %acts0 = bf16[3,8,64]{2,1,0} constant({...})
  %init = (s32[], bf16[8,64]{1,0}, bf16[3,64,64]{2,1,0}, bf16[3,8,64]{2,1,0}) tuple(%zero, %x, %w, %acts0)
  %while = (s32[], bf16[8,64]{1,0}, bf16[3,64,64]{2,1,0}, bf16[3,8,64]{2,1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %out = bf16[8,64]{1,0} get-tuple-element(%while), index=1
  %side = bf16[8,64]{1,0} fusion(%x), kind=kLoop, calls=%fused_tanh
  %side.1 = bf16[8,64]{1,0} fusion(%side), kind=kInput, calls=%fused_reduce
  %attn = (bf16[8,16,128,64]{3,2,1,0}, u8[0]{0}) custom-call(%q, %q, %q), custom_call_target="__cudnn$fmhaSoftmax"
  %fusion-start = ((bf16[3,64,64]{2,1,0}, s32[]), bf16[1,64,64]{2,1,0}, u32[]) fusion-start(%w, %zero), kind=kLoop, calls=%fused_dynamic_slice
  %fusion-done = bf16[1,64,64]{2,1,0} fusion-done(%fusion-start)
  %transpose.1 = bf16[64,8]{1,0} transpose(%out), dimensions={1,0}
  ROOT %result = (bf16[8,64]{1,0}, bf16[8,64]{1,0}) tuple(%out, %side.1)
}
"""


def test_parse_hlo_finds_the_entry_and_every_computation():
    comps, entry = gpu_aot.parse_hlo(MODULE)
    assert entry == "main"
    assert {"fused_dynamic_slice", "body", "cond", "main"} <= comps.keys()
    names = [i.name for i in comps["body"]]
    assert names[:2] == ["carry", "i"] and names[-1] == "t"
    assert comps["main"][6].op == "while"
    with pytest.raises(ValueError, match="ENTRY"):
        gpu_aot.parse_hlo("%f (p: f32[]) -> f32[] {\n  ROOT %p = f32[] parameter(0)\n}\n")


def test_kernel_inventory_counts_a_loop_body_its_trip_count_times():
    inv = gpu_aot.kernel_inventory(MODULE)
    # body: copy, gemm, update, elementwise (x 3); entry: elementwise, reduce, attention,
    # the asynchronous copy (its done launches nothing) and a transpose.
    assert inv["by_category"] == {"copy": 3 + 2, "gemm": 3, "update": 3, "elementwise": 3 + 1,
                                  "reduce": 1, "attention": 1}
    assert inv["total"] == 17
    # Written by copies: 3 x [1, 64, 64] and the async one (not its operands), and [64, 8].
    assert inv["copy_mib"] == round((4 * 64 * 64 + 64 * 8) * 2 / 2**20, 1)


def test_a_loop_without_a_known_trip_count_counts_once():
    text = MODULE.replace(', backend_config={"known_trip_count":{"n":"3"}}', "")
    assert gpu_aot.kernel_inventory(text)["total"] == 17 - 2 * 4


def test_critical_path_follows_data_dependencies_not_program_order():
    # The loop (4 kernels x 3) then the transpose that reads it: 13; the side chain of two
    # kernels, the attention call and the async copy are beside it.
    assert gpu_aot.critical_path(MODULE) == 13
    # Made to read the side chain's result, the transpose waits for it as well: still 13,
    # the longer of the two; a chain through both would be longer.
    chained = MODULE.replace("%side = bf16[8,64]{1,0} fusion(%x)",
                             "%side = bf16[8,64]{1,0} fusion(%out)")
    assert gpu_aot.critical_path(chained) == 12 + 2


def test_categories_follow_the_launching_instruction():
    def cat(line):
        comps, _ = gpu_aot.parse_hlo(f"ENTRY %m () -> f32[] {{\n{line}\n}}\n")
        return gpu_aot.category(comps["m"][0])

    assert cat('  %c = (bf16[8,64]{1,0}, s8[4]{0}) custom-call(%a, %b), '
               'custom_call_target="__cublas$gemm"') == "gemm"
    assert cat('  %c = (bf16[8,64]{1,0}) custom-call(%a), '
               'custom_call_target="__cudnn$fmhaSoftmaxBackward"') == "attention_backward"
    # XLA's dynamic-slice fusion: a cuBLAS product writing into a slice of a stacked buffer.
    assert cat('  %dynamic_slice_fusion.1 = (bf16[24,8,64]{2,1,0}, s8[64]{0}) fusion(%a, %b), '
               'kind=kCustom, calls=%dynamic-slice-fusion.1, backend_config={"fusion_backend_'
               'config":{"kind":"__custom_fusion","custom_fusion_config":{"name":'
               '"dynamic_slice_fusion","kernel_index":0}}}') == "gemm"
    assert cat("  %f = bf16[8,64]{1,0} fusion(%a), kind=kLoop, calls=%fused_transpose") == "copy"
    assert cat("  %wrapped_slice = bf16[1,64]{1,0} fusion(%a), kind=kLoop, "
               "calls=%wrapped_slice_computation") == "copy"
    assert cat("  %loop_select_fusion = bf16[8]{0} fusion(%a), kind=kLoop, "
               "calls=%fused_select") == "elementwise"
    assert cat("  %input_concatenate_fusion = bf16[8]{0} fusion(%a), kind=kInput, "
               "calls=%fused_concatenate") == "reduce"
    assert cat("  %d = bf16[4,8]{1,0} dynamic-update-slice(%a, %b, %i, %i)") == "update"
    assert cat("  %s = f32[8]{0} sort(%a), dimensions={0}") == "reduce"


def test_array_bytes_of_arrays_and_tuples():
    assert gpu_aot.array_bytes("bf16[8,64]{1,0}") == 8 * 64 * 2
    assert gpu_aot.array_bytes("(f32[2,3]{1,0}, s8[4]{0}, pred[])") == 24 + 4 + 1


def test_topology_without_the_cuda_plugin_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(gpu_aot, "cuda_plugin_installed", lambda: False)
    with pytest.raises(RuntimeError, match=r"CUDA plugin.*jax\[cuda13\]"):
        gpu_aot.topology("h100")
    with pytest.raises(ValueError, match="--target: expected one of .*'h200'.*got 'a100'"):
        gpu_aot.topology("a100")


def test_the_plugin_check_answers_whether_or_not_jax_plugins_exists():
    assert isinstance(gpu_aot.cuda_plugin_installed(), bool)


@pytest.mark.parametrize("argv, message", [
    (["train", "--target", "v100"], "--target: expected one of ['h100', 'h200'], got 'v100'"),
    (["decode", "--batch", "0"], "--batch: expected a positive integer, got 0"),
    (["train", "--modes", "pretrain"], "--modes: expected a comma-separated subset of"),
    (["decode", "--layouts", "rows"], "--layouts: expected per_layer and/or stacked, got ['rows']"),
])
def test_bad_arguments_name_the_flag_and_the_value(argv, message, capsys):
    with pytest.raises(SystemExit):
        gpu_aot.parse_args(argv)
    assert message in capsys.readouterr().err


def test_defaults():
    args = gpu_aot.parse_args(["train", "--tiny", "--loss_chunk", "0"])
    assert (args.shape, args.loss_chunk, args.gemm) == ("tiny", None, "cublas")


# Traffic: a loop that slices a weight stack (a fusion that reads only the slice) and writes
# an activation stack in place (only the update moves), an elementwise fusion reading two whole
# operands, and a product, which the memory-bound time leaves out.
TRAFFIC_MODULE = """HloModule jit_traffic, is_scheduled=true

%fused_ds (p0: bf16[3,64,64], p1: s32[]) -> bf16[1,64,64] {
  %p0 = bf16[3,64,64]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  ROOT %ds = bf16[1,64,64]{2,1,0} dynamic-slice(%p0, %p1, %p1, %p1), dynamic_slice_sizes={1,64,64}
}

%fused_dus (q0: bf16[3,8,64], q1: bf16[8,64], q2: s32[]) -> bf16[3,8,64] {
  %q0 = bf16[3,8,64]{2,1,0} parameter(0)
  %q1 = bf16[8,64]{1,0} parameter(1)
  %q2 = s32[] parameter(2)
  %t = bf16[8,64]{1,0} tanh(%q1)
  %r = bf16[1,8,64]{2,1,0} bitcast(%t)
  %z = s32[] constant(0)
  ROOT %u = bf16[3,8,64]{2,1,0} dynamic-update-slice(%q0, %r, %q2, %z, %z)
}

%fused_inc (c0: s32[]) -> s32[] {
  %c0 = s32[] parameter(0)
  %one = s32[] constant(1)
  ROOT %sum = s32[] add(%c0, %one)
}

%fused_mul (a0: f32[8,64], a1: f32[8,64]) -> f32[8,64] {
  %a0 = f32[8,64]{1,0} parameter(0)
  %a1 = f32[8,64]{1,0} parameter(1)
  ROOT %m = f32[8,64]{1,0} multiply(%a0, %a1)
}

""" + _LOOP_HEAD + """  %loop_dynamic_slice_fusion = bf16[1,64,64]{2,1,0} fusion(%w, %i), kind=kLoop, calls=%fused_ds, metadata={op_name="jit(step)/while/body/Block/mlp/dynamic_slice"}
  %loop_dynamic_update_slice_fusion = bf16[3,8,64]{2,1,0} fusion(%acts, %h, %i), kind=kLoop, calls=%fused_dus
  %loop_add_fusion = s32[] fusion(%i), kind=kLoop, calls=%fused_inc
  ROOT %t = (s32[], bf16[8,64]{1,0}, bf16[3,64,64]{2,1,0}, bf16[3,8,64]{2,1,0}) tuple(%loop_add_fusion, %h, %w, %loop_dynamic_update_slice_fusion)
}

""" + _LOOP_COND + """
ENTRY %main (x: bf16[8,64], w: bf16[3,64,64], f: f32[8,64], acts: bf16[3,8,64]) -> (bf16[3,8,64], f32[8,64], bf16[8,64]) {
  %x = bf16[8,64]{1,0} parameter(0)
  %w = bf16[3,64,64]{2,1,0} parameter(1)
  %f = f32[8,64]{1,0} parameter(2)
  %acts = bf16[3,8,64]{2,1,0} parameter(3)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[8,64]{1,0}, bf16[3,64,64]{2,1,0}, bf16[3,8,64]{2,1,0}) tuple(%zero, %x, %w, %acts)
  %while = (s32[], bf16[8,64]{1,0}, bf16[3,64,64]{2,1,0}, bf16[3,8,64]{2,1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %out = bf16[3,8,64]{2,1,0} get-tuple-element(%while), index=3
  %loop_multiply_fusion = f32[8,64]{1,0} fusion(%f, %f), kind=kLoop, calls=%fused_mul, metadata={op_name="jit(step)/mul"}
  %w0 = bf16[64,64]{1,0} bitcast(%w)
  %gemm = (bf16[8,64]{1,0}, s8[4]{0}) custom-call(%x, %w0), custom_call_target="__cublas$gemm"
  %y = bf16[8,64]{1,0} get-tuple-element(%gemm), index=0
  ROOT %result = (bf16[3,8,64]{2,1,0}, f32[8,64]{1,0}, bf16[8,64]{1,0}) tuple(%out, %loop_multiply_fusion, %y)
}
"""


def test_kernel_bytes_counts_slices_read_and_in_place_updates_written():
    comps, _ = gpu_aot.parse_hlo(TRAFFIC_MODULE)
    body = {i.name: i for i in comps["body"]}
    main = {i.name: i for i in comps["main"]}

    def moved(name, scope):
        return gpu_aot.kernel_bytes(scope[name], scope, comps)

    # The slice of the [3, 64, 64] stack is read (and the index), not the stack.
    assert moved("loop_dynamic_slice_fusion", body) == (64 * 64 * 2 + 4, 64 * 64 * 2)
    # The stack written in place is neither read nor written whole: the [8, 64] update is
    # read (with the index) and written.
    assert moved("loop_dynamic_update_slice_fusion", body) == (8 * 64 * 2 + 4, 8 * 64 * 2)
    assert moved("loop_multiply_fusion", main) == (2 * 8 * 64 * 4, 8 * 64 * 4)
    # An unfused in-place update likewise: the [2, 64] update and two indices.
    comps2, _ = gpu_aot.parse_hlo(
        "ENTRY %m (a: bf16[4,64], b: bf16[2,64], i: s32[]) -> bf16[4,64] {\n"
        "  %a = bf16[4,64]{1,0} parameter(0)\n  %b = bf16[2,64]{1,0} parameter(1)\n"
        "  %i = s32[] parameter(2)\n"
        "  ROOT %d = bf16[4,64]{1,0} dynamic-update-slice(%a, %b, %i, %i)\n}\n")
    scope = {i.name: i for i in comps2["m"]}
    assert moved("d", scope) == (2 * 64 * 2 + 2 * 4, 2 * 64 * 2)
    # A library call: its operands (as shaped where it reads them: a bitcast's shape) and its
    # output, not the byte workspace that ends its output tuple.
    assert moved("gemm", main) == (8 * 64 * 2 + 64 * 64 * 2, 8 * 64 * 2)


def test_traffic_multiplies_loops_and_leaves_products_out_of_the_time():
    slice_, update, inc = 2 * 64 * 64 * 2 + 4, 8 * 64 * 2 * 2 + 4, 8
    mul = 3 * 8 * 64 * 4
    out = gpu_aot.traffic(TRAFFIC_MODULE, bandwidth=1e6, top=2)
    bound = 3 * (slice_ + update + inc) + mul
    assert out["memory_bound_ms"] == round(bound / 1e6 * 1e3, 3)
    assert out["mib_by_category"]["copy"] == round(3 * slice_ / 2**20, 1)
    assert set(out["mib_by_category"]) == {"copy", "update", "elementwise", "gemm"}
    # The heaviest two, with their launches per execution and the jax op that made them.
    assert [(k["kernel"], k["launches"]) for k in out["top"]] == [
        ("loop_dynamic_slice_fusion", 3), ("loop_dynamic_update_slice_fusion", 3)]
    assert out["top"][0]["op_name"] == "jit(step)/while/body/Block/mlp/dynamic_slice"
    assert [k["category"] for k in out["top"]] == ["copy", "update"]
