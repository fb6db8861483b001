"""Efficiency of the composed training step, read from the compiled program (never timings).

The tiny shape of `bench/train_step.py` (anchor 4 layers, augmenting model 8 layers, connections
augment 4 -> anchor 2 and 8 -> 4) is compiled twice, as a CALM step and as a full fine-tune step
of the anchor, with the layer scans unrolled so that XLA's cost analysis counts every layer.
Also: `calm_jax.losses.chunked_cross_entropy` equals `cross_entropy`.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax.composition import ComposedLM
from calm_jax.losses import chunked_cross_entropy, cross_entropy
from jaxpr_support import equations

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                     "train_step.py")
_spec = importlib.util.spec_from_file_location("bench_train_step", _PATH)
ts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ts)


@pytest.fixture(scope="module")
def evidence():
    return ts.hlo_evidence("tiny")


@pytest.fixture(scope="module")
def tiny():
    anchor, augment = ts.model_configs("tiny")
    return anchor, augment, ComposedLM(anchor, {"augment": augment})


def test_parameter_counts_follow_the_documented_convention():
    assert ts.check_issue_params("small") == {"anchor": 234_120_192, "augment": 49_947_136}
    assert ts.check_issue_params("large") == {"anchor": 1_474_922_496, "augment": 435_471_360}
    # The issue's numbers exceed ours by exactly 9 d per layer (GLU biases 4d + 4d + d).
    for shape, (issue_anchor, issue_augment) in ts.ISSUE_PARAMS.items():
        anchor, augment = ts.model_configs(shape)
        for cfg, issue in ((anchor, issue_anchor), (augment, issue_augment)):
            surplus = issue - cfg.num_params(include_embedding=False)
            assert surplus == 9 * cfg.embed_dim * cfg.num_layers


def test_composed_step_computes_clearly_less_than_full_finetune(evidence):
    assert evidence["compose_over_finetune_flops"] < 0.85


def test_composed_flops_near_the_estimates(evidence):
    compose, finetune = evidence["compose"], evidence["finetune"]
    # The trainer's (2 N_aug + 4 N_anchor + 6 N_comp) x tokens, generously (attention, loss,
    # optimizer and elementwise work are not in it; the augmenting output layer is).
    assert 0.75 < compose["hlo_over_trainer"] < 1.35
    # The tighter count (backward only above the first connection) leaves room for attention
    # and elementwise work, but not for frozen weight gradients (+~25% here) nor a backward
    # through the augmenting model or the lower anchor layers.
    assert 1.0 <= compose["hlo_over_expected"] < 1.3
    assert 1.0 <= finetune["hlo_over_expected"] < 1.3


def test_no_frozen_kernel_shaped_weight_gradient_in_the_compiled_step(evidence, tiny):
    compose = evidence["compose"]["frozen_kernel_grad_dots"]
    finetune = evidence["finetune"]["frozen_kernel_grad_dots"]
    assert compose["uncheckable"] == [] and compose["checked_forms"] > 0
    assert compose["count"] == 0, compose["examples"]
    # Positive control: trained, the anchor's kernels do get weight-gradient products
    # (q, k, v, out, gate, up, down per layer, and the output layer).
    anchor = tiny[0]
    assert finetune["count"] >= 7 * anchor.num_layers + 1


def test_optimizer_state_holds_only_composition_leaves(evidence, tiny):
    compose = evidence["compose"]
    n_comp = tiny[2].num_composition_params()
    assert compose["trained_params"] == n_comp
    assert compose["opt_state_shapes"] == compose["trained_shapes"]
    assert compose["opt_state_elements"] == 2 * n_comp  # adam's two moments, nothing frozen
    assert all(shape[0] == len(tiny[2].connections["augment"])
               for shape in compose["trained_shapes"])


def test_augmenting_forward_and_lower_anchor_layers_keep_no_activations(evidence, tiny):
    anchor, augment, composed = tiny
    n = len(composed.connections["augment"])
    first = min(b for _, b in composed.connections["augment"])
    residuals = evidence["compose"]["residuals"]
    assert residuals
    # Nothing with the augmenting model's inner widths; its width in activations (arrays with
    # a length axis) only in the connections' inputs, the stacked states [n, batch, length,
    # d_aug]. (The composition's own parameters, and what it computes from them alone, such
    # as the projection multiplied into the key and value kernels, have no length axis.)
    _, _, _, batch, length = ts.SHAPES["tiny"]
    for shape, _, _, where in residuals:
        assert augment.mlp_dim not in shape, where
        if augment.embed_dim in shape and length in shape:
            assert shape == (n, batch, length, augment.embed_dim), (shape, where)
    # The anchor's stacked per-layer residuals cover only the layers above the first
    # connection; fine-tuning keeps them for every layer.
    def scan_layers(mode):
        return {shape[0] for shape, _, _, where in evidence[mode]["residuals"]
                if "run_layers" in where and len(shape) >= 3}

    assert scan_layers("compose") == {anchor.num_layers - first}
    assert scan_layers("finetune") == {anchor.num_layers}
    assert evidence["compose"]["residual_bytes"] < evidence["finetune"]["residual_bytes"]


def test_composed_step_keeps_no_copy_of_frozen_weights(evidence, tiny):
    """The anchor runs in pieces between connections; the pieces index the stacked weights
    inside their layer loop, so the backward pass keeps no slice of them as a residual."""
    anchor, augment, _ = tiny
    frozen, _ = ts.kernel_sets(anchor, augment)
    residuals = evidence["compose"]["residuals"]
    copies = [(shape, where) for shape, _, _, where in residuals
              if not where.startswith(("from a constant", "from a literal"))
              and (shape in frozen or shape[1:] in frozen)]
    assert copies == []
    # The frozen weights are still read by the backward pass: as the inputs they are.
    assert any(shape[1:] in frozen for shape, _, _, where in residuals
               if where.startswith("from a constant"))


def _residuals(remat, loss_chunk):
    from calm_jax import partitioning as part
    import flax.linen as nn

    anchor, augment = ts.model_configs("tiny", dtype="float32", remat=remat)
    _, _, _, batch, length = ts.SHAPES["tiny"]
    mesh = part.make_mesh(part.PartitioningConfig(num_devices=1))
    with part.mesh_context(mesh), nn.logical_axis_rules(list(part.DEFAULT_RULES)):
        b = ts.build("compose", anchor, augment, batch=batch, length=length, mesh=mesh,
                     rules=part.DEFAULT_RULES, loss_chunk=loss_chunk)
        out = [(shape, where) for shape, _, _, where in ts.saved_residuals(b)
               if not where.startswith(("from a constant", "from a literal"))]
    return out, anchor


def test_remat_and_chunked_loss_leave_no_scores_or_logits_for_the_backward():
    _, _, vocab, batch, length = ts.SHAPES["tiny"]

    def scores(res):  # [.., length, length]: attention scores or probabilities
        return [s for s, _ in res if s[-2:] == (length, length)]

    def logits(res):  # all positions' logits (or softmax) at once
        return [s for s, _ in res if s[-1] == vocab and batch * length in
                (int(np.prod(s[:-1])), int(np.prod(s[-3:-1])) if len(s) >= 3 else 0)]

    plain, anchor = _residuals("none", None)
    # Positive control: without remat the composition's cross-attention and the anchor's
    # blocks keep their scores, and the loss keeps the logits.
    assert scores(plain) and logits(plain)
    lean, _ = _residuals("full", 8)
    assert scores(lean) == [] and logits(lean) == []
    assert sum(np.prod(s) for s, _ in lean) < sum(np.prod(s) for s, _ in plain) / 4


@pytest.fixture
def cudnn_traceable(monkeypatch):
    """cuDNN's fused attention traced, never run, where there is no cuDNN: jax asks for the
    cuDNN version and checks the GPU when it traces the call; those two checks are stood in
    for, so that the program a GPU would get can be read here."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused, "check_is_flash_attention", lambda *args, **kwargs: None)


def _fused_attention_forwards(remat: str) -> tuple[int, int]:
    """(fused attention forwards in the composed loss, the same in its gradient) for the tiny
    shape with cuDNN attention: equations of the traced programs, each scan body once."""
    from calm_jax import partitioning as part
    from calm_jax.models.transformer import FUSED_ATTENTION_FORWARD
    import flax.linen as nn

    anchor, augment = ts.model_configs("tiny", remat=remat, attention_impl="cudnn")
    _, _, _, batch, length = ts.SHAPES["tiny"]
    mesh = part.make_mesh(part.PartitioningConfig(num_devices=1))
    with part.mesh_context(mesh), nn.logical_axis_rules(list(part.DEFAULT_RULES)):
        b = ts.build("compose", anchor, augment, batch=batch, length=length, mesh=mesh,
                     rules=part.DEFAULT_RULES)
        loss = lambda p: b.loss(p, b.frozen, b.batch)[0]  # noqa: E731
        programs = [jax.make_jaxpr(fn)(b.state["params"]) for fn in (loss, jax.grad(loss))]
    return tuple(sum(e.primitive.name in FUSED_ATTENTION_FORWARD for e in equations(j))
                 for j in programs)


def test_dots_attention_policy_does_not_run_the_fused_attention_forward_again(
        cudnn_traceable):
    # The composed loss runs cuDNN's attention in the layer loops of the augmenting model's
    # two segments (up to each connection) and of the anchor's two, and in the two
    # connections' cross-attention. Its gradient runs the backward of the anchor's upper
    # segment and of both cross-attentions: under "dots" (and "full") each of those three
    # first runs its forward again; "dots_attention" keeps the forward's results instead, as
    # keeping everything ("none") does.
    counts = {remat: _fused_attention_forwards(remat)
              for remat in ("none", "dots", "dots_attention", "full")}
    in_loss = counts["none"][0]
    assert in_loss == 6 and all(c[0] == in_loss for c in counts.values()), counts
    assert counts["none"][1] == counts["dots_attention"][1] == in_loss, counts
    assert counts["dots"][1] == counts["full"][1] == in_loss + 3, counts


def test_flops_only_counts_the_step_from_shapes(capsys):
    # `--flops_only` lowers each mode's step from shapes with the layer scans unrolled: the
    # same count as the same step built from placed weights and lowered.
    from calm_jax import partitioning as part
    import flax.linen as nn

    records = ts.main(["--shape", "tiny", "--flops_only", "--remat", "dots"])
    assert [r["mode"] for r in records] == ["compose", "finetune"]
    anchor, augment = ts.model_configs("tiny", remat="dots", unroll=True)
    _, _, _, batch, length = ts.SHAPES["tiny"]
    mesh = part.make_mesh(part.PartitioningConfig(num_devices=1))
    for rec in records:
        assert rec["flops_only"] and rec["hlo_flops_from"] == "lowered", rec
        with part.mesh_context(mesh), nn.logical_axis_rules(list(part.DEFAULT_RULES)):
            b = ts.build(rec["mode"], anchor, augment, batch=batch, length=length, mesh=mesh,
                         rules=part.DEFAULT_RULES)
            placed, _ = ts.unrolled_flops(b.step.lower(b.state, b.frozen, b.batch))
        assert rec["hlo_flops"] == pytest.approx(placed, rel=1e-6), (rec, placed)
        assert rec["hlo_flops_per_token"] == round(rec["hlo_flops"] / (batch * length))
    assert records[0]["hlo_flops"] < records[1]["hlo_flops"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        ts.parse_args(["--flops_only", "--trace_only"])
    assert ("expected at most one, got --trace_only, --flops_only"
            in capsys.readouterr().err)


def test_every_remat_policy_name_has_a_policy():
    from calm_jax.models.config import REMAT_POLICY_NAMES
    from calm_jax.models.transformer import REMAT_POLICIES

    assert set(REMAT_POLICIES) == set(REMAT_POLICY_NAMES) - {"none"}


@pytest.mark.parametrize("mode", ["compose", "finetune"])
def test_state_is_donated_and_steps_compile_once(evidence, mode):
    rec = evidence[mode]
    assert rec["state_donated"]
    assert rec["compilations"] == 1
    assert np.isfinite(rec["loss"])


def test_dot_parser_reads_cpu_and_gpu_hlo():
    text = "\n".join([
        "  %dot.4 = f32[64,512]{1,0} dot(%a, %b), lhs_contracting_dims={0}",
        "  ROOT %dot_general.1 = bf16[2,40,64]{2,1,0} dot(%c, %d), lhs_contracting_dims={2}",
        '  %cublas-gemm.1 = (bf16[512,64]{1,0}, s8[4194304]{0}) custom-call(%x, %y), '
        'custom_call_target="__cublas$gemm", backend_config={}',
        '  %cc = f32[8]{0} custom-call(%z), custom_call_target="Sharding"',
        "  %fusion.3 = f32[64,512]{1,0} fusion(%p), kind=kLoop, calls=%fused_dot",
    ])
    assert ts.dot_output_shapes(text) == [(64, 512), (2, 40, 64), (512, 64)]
    found = ts.frozen_kernel_grad_dots(text, {(64, 512)}, set(), (40, 80))
    assert found["count"] == 2  # [64, 512] and its transpose; the activation is skipped


def test_frozen_models_in_the_per_layer_layout_give_the_same_step():
    # The composed step reading the frozen models as per-layer arrays with fused projections
    # (unrolled layers; `train_step.build(frozen_layout="per_layer")`) computes the stacked
    # layout's loss and gradients, and still no frozen-weight gradient.
    anchor, augment = ts.model_configs("tiny", dtype="float32", remat="dots")
    _, _, _, batch, length = ts.SHAPES["tiny"]
    from calm_jax import partitioning as part
    import flax.linen as nn

    mesh = part.make_mesh(part.PartitioningConfig(num_devices=1))
    out = {}
    with part.mesh_context(mesh), nn.logical_axis_rules(list(part.DEFAULT_RULES)):
        for layout in ts.FROZEN_LAYOUTS:
            b = ts.build("compose", anchor, augment, batch=batch, length=length, mesh=mesh,
                         rules=part.DEFAULT_RULES, loss_chunk=8, frozen_layout=layout)
            grad = jax.jit(jax.value_and_grad(lambda p, f, x: b.loss(p, f, x)[0]))
            out[layout] = grad(b.state["params"], b.frozen, b.batch)
            if layout == "per_layer":
                assert "qkv" not in b.frozen["anchor"]["layers"]["attn"]  # 4 heads, 2 KV heads
                assert "kv" in b.frozen["anchor"]["layers"]["attn"]
                assert "gate_up" in b.frozen["augments"]["augment"]["layers"]["mlp"]
                text = b.step.lower(b.state, b.frozen, b.batch).compile().as_text()
                frozen, trained = ts.kernel_sets(anchor, augment)
                found = ts.frozen_kernel_grad_dots(text, frozen, trained,
                                                   ts.token_dims(batch, length, 8))
                assert found["count"] == 0 and found["checked_forms"] > 0, found
    (loss_s, grads_s), (loss_p, grads_p) = out["stacked"], out["per_layer"]
    np.testing.assert_allclose(loss_p, loss_s, rtol=1e-5)
    for g_p, g_s in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_s)):
        np.testing.assert_allclose(g_p, g_s, rtol=1e-3, atol=1e-5 * float(np.abs(g_s).max()))
    assert any(np.any(g) for g in jax.tree.leaves(grads_s))
    with pytest.raises(ValueError, match=r"frozen_layout: expected one of \('stacked', "
                                         r"'per_layer'\), got 'rolled'"):
        ts.build("compose", anchor, augment, batch=batch, length=length, mesh=mesh,
                 rules=part.DEFAULT_RULES, frozen_layout="rolled")


def test_unrolled_flops_falls_back_to_the_compiled_module():
    # The GPU backend's lowered module reports no cost analysis (None); the H200 run's
    # `hlo_flops` then failed with a TypeError. The compiled module's count is used instead.
    class Compiled:
        def __init__(self, cost):
            self.cost = cost

        def cost_analysis(self):
            return self.cost

    class Lowered(Compiled):
        def __init__(self, cost, compiled_cost):
            super().__init__(cost)
            self.compiled_cost = compiled_cost

        def compile(self):
            return Compiled(self.compiled_cost)

    assert ts.unrolled_flops(Lowered({"flops": 7.0}, None)) == (7.0, "lowered")
    assert ts.unrolled_flops(Lowered(None, {"flops": 9.0})) == (9.0, "compiled")
    assert ts.unrolled_flops(Lowered(None, [{"flops": 3.0}])) == (3.0, "compiled")
    assert ts.unrolled_flops(Lowered(None, None)) == (None, None)


def test_chunked_loss_logits_shaped_like_the_output_layer_are_activations():
    # The xl shape's anchor has d = 4096 = batch 8 x loss_chunk 512: each chunk's logits are
    # [4096, 32000], the output layer's own shape (an H200 run counted these two products as
    # frozen weight gradients). Compiled from shapes only: no xl weight is created.
    import flax.linen as nn
    from calm_jax import partitioning as part
    import bench.step_analysis as sa

    anchor, augment = ts.model_configs("xl", remat="dots")
    mesh = part.make_mesh(part.PartitioningConfig(num_devices=1))
    rules = part.DEFAULT_RULES
    with part.mesh_context(mesh), nn.logical_axis_rules(list(rules)):
        text = sa.lowered_step("compose", anchor, augment, batch=8, length=1024, mesh=mesh,
                               rules=rules, loss_chunk=512).compile().as_text()
    frozen, trained = ts.kernel_sets(anchor, augment)
    assert ts.token_dims(8, 1024, 512) == (512, 1024, 4096, 8192)
    assert ts.token_dims(8, 1024, None) == (1024, 8192)
    unaware = ts.frozen_kernel_grad_dots(text, frozen, trained, ts.token_dims(8, 1024, None))
    assert unaware["count"] >= 1 and set(unaware["examples"]) == {(4096, 32000)}
    aware = ts.frozen_kernel_grad_dots(text, frozen, trained, ts.token_dims(8, 1024, 512))
    assert aware["count"] == 0, aware["examples"]
    assert aware["checked_forms"] > 0


# chunked_cross_entropy -----------------------------------------------------------------------


def _head_problem(length=11, vocab=37, embed=8, batch=3):
    keys = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(keys[0], (batch, length, embed))
    w = jax.random.normal(keys[1], (embed, vocab)) / np.sqrt(embed)
    targets = jax.random.randint(keys[2], (batch, length), 0, vocab)
    weights = (jax.random.uniform(keys[3], (batch, length)) > 0.3).astype(jnp.float32)
    return h, w, targets, weights


@pytest.mark.parametrize("chunk", [4, 11, 64])  # padded (11 = 3 x 4 - 1), exact, longer
def test_chunked_cross_entropy_equals_cross_entropy(chunk):
    h, w, targets, weights = _head_problem()

    def full(h, w):
        return cross_entropy(jnp.tanh(h) @ w, targets, weights)

    def chunked(h, w):
        return chunked_cross_entropy(h, lambda x: jnp.tanh(x) @ w, targets, weights,
                                     chunk=chunk)

    @jax.jit
    def values_and_grads(h, w):
        grads = [jax.grad(lambda h, w: fn(h, w)["loss"], argnums=(0, 1))(h, w)
                 for fn in (full, chunked)]
        return full(h, w), chunked(h, w), grads

    want, got, (grad_want, grad_got) = values_and_grads(h, w)
    for key in ("loss", "loss_sum", "weight_sum", "correct_sum"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
    for g, e in zip(grad_got, grad_want):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def _reference_loss_sum(logits, targets, weights):
    """sum(weights x nll) written plainly, differentiated by jax alone."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.sum(log_probs * jax.nn.one_hot(targets, logits.shape[-1]), -1)
                    * weights)


def test_cross_entropy_gradient_is_softmax_minus_one_hot_without_a_scatter():
    h, w, targets, weights = _head_problem()
    logits = jnp.tanh(h) @ w

    def loss(logits, weights):  # a cotangent of 3 on the sum, and one through the mean
        m = cross_entropy(logits, targets, weights)
        return 3.0 * m["loss_sum"] + m["loss"]

    def reference(logits, weights):
        loss_sum = _reference_loss_sum(logits, targets, weights)
        return 3.0 * loss_sum + loss_sum / jnp.maximum(jnp.sum(weights), 1.0)

    got = jax.grad(loss, argnums=(0, 1))(logits, weights)
    want = jax.grad(reference, argnums=(0, 1))(logits, weights)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss(logits, weights), reference(logits, weights), rtol=1e-6)
    # bf16 logits: the gradient comes back in bf16, and is the float32 one rounded.
    g16 = jax.grad(lambda x: cross_entropy(x, targets, weights)["loss_sum"])(
        logits.astype(jnp.bfloat16))
    assert g16.dtype == jnp.bfloat16
    g32 = jax.grad(lambda x: _reference_loss_sum(x, targets, weights))(
        logits.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(g16.astype(jnp.float32), g32, rtol=1e-2, atol=1e-2)
    # No scatter: the target logit's gather, differentiated automatically, would be one.
    jaxpr = jax.make_jaxpr(jax.grad(lambda x: cross_entropy(x, targets, weights)["loss_sum"]))(
        logits.astype(jnp.bfloat16))
    names = {eqn.primitive.name for eqn in equations(jaxpr)}
    assert not any("scatter" in n for n in names), names


def test_chunked_cross_entropy_never_holds_all_logits():
    h, w, targets, _ = _head_problem(length=64, vocab=97)

    def loss(h, w):
        return chunked_cross_entropy(h, lambda x: x @ w, targets, chunk=8)["loss"]

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(h, w)
    shapes = {tuple(v.aval.shape) for eqn in equations(jaxpr) for v in eqn.outvars
              if hasattr(v.aval, "shape")}
    vocab_shapes = {s for s in shapes if 97 in s}
    assert vocab_shapes and all(np.prod(s) <= 3 * 8 * 97 for s in vocab_shapes), vocab_shapes


def _vocab_products(fn, *args, vocab: int) -> int:
    """Matrix products in fn's jaxpr (nested ones included, each once) that read or write an
    axis of size `vocab`: the output layer's forward, input-gradient and weight-gradient."""
    return sum(eqn.primitive.name == "dot_general" and any(
        vocab in getattr(v.aval, "shape", ()) for v in (*eqn.invars, *eqn.outvars))
        for eqn in equations(jax.make_jaxpr(fn)(*args)))


def test_chunked_loss_runs_the_output_layer_once_each_way():
    # Differentiated, each chunk's logits are computed once (no rematerialised second
    # forward): one forward product, one input-gradient product, and a weight-gradient
    # product only where the output layer is trained. The full loss has the same count.
    h, w, targets, weights = _head_problem(length=16, vocab=97)

    def loss(chunk, frozen):
        def fn(h, w):
            w = jax.lax.stop_gradient(w) if frozen else w
            if chunk is None:
                return cross_entropy(h @ w, targets, weights)["loss"]
            return chunked_cross_entropy(h, lambda x: x @ w, targets, weights,
                                         chunk=chunk)["loss"]
        return jax.grad(fn, argnums=(0, 1))

    for frozen, products in ((True, 2), (False, 3)):
        assert _vocab_products(loss(None, frozen), h, w, vocab=97) == products
        assert _vocab_products(loss(4, frozen), h, w, vocab=97) == products
    # Not differentiated: the forward product alone.
    assert _vocab_products(lambda h, w: chunked_cross_entropy(
        h, lambda x: x @ w, targets, weights, chunk=4)["loss"], h, w, vocab=97) == 1


def test_chunked_loss_gradients_for_closed_over_parameters_and_scaled_cotangents():
    h, w, targets, weights = _head_problem(length=10, vocab=23)
    scale = jnp.linspace(0.5, 1.5, h.shape[-1])

    def loss(h, w, scale, chunk):
        head = lambda x: (x * scale) @ w  # noqa: E731
        if chunk is None:
            m = cross_entropy(head(h), targets, weights)
        else:
            m = chunked_cross_entropy(h, head, targets, weights, chunk=chunk)
        return 3.0 * m["loss_sum"] + m["weight_sum"]  # a cotangent of 3 reaches the VJP

    want = jax.grad(loss, argnums=(0, 1, 2))(h, w, scale, None)
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(h, w, scale, 4)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
    # bf16 hidden states keep their dtype in the gradient.
    g16 = jax.grad(lambda h: loss(h, w, scale, 4))(h.astype(jnp.bfloat16))
    assert g16.dtype == jnp.bfloat16


def test_chunked_cross_entropy_rejects_bad_input():
    h, w, targets, _ = _head_problem()
    with pytest.raises(ValueError, match="chunk: expected a positive integer"):
        chunked_cross_entropy(h, lambda x: x @ w, targets, chunk=0)
    with pytest.raises(ValueError, match="h: expected"):
        chunked_cross_entropy(h[:, :5], lambda x: x @ w, targets, chunk=4)
