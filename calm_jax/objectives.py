"""Trainer objectives: one class per training mode, t5x `BaseModel`-style.

An `Objective` declares what its mode trains, what it reads frozen, its loss and its export;
`register_objective` makes it a mode of `trainer.train(mode=...)`, and `make_objective` looks
it up and checks its settings before anything is loaded or compiled. The built-in modes:
  pretrain  - `PretrainObjective`: a single LM from scratch (the small anchor / augmenting models
              of reproductions), optionally with multi-token heads;
  finetune  - `FinetuneObjective`: full fine-tune of the anchor (the paper's mB+NTL baseline);
  lora      - `LoraObjective`: LoRA on the frozen anchor, rank matched to the CALM
              configuration's parameter count unless given (the paper's LoRA baseline);
  compose   - `ComposeObjective`: CALM, anchor and augmenting models frozen, only the
              composition trained.
A new mode is one subclass and its registration. `Objective.build` returns the mode's `Setup`:
what the generic loop (`calm_jax.trainer`, `steps.build_program`) needs of it. The models a
run reads are `ModelSpec`s (a config, a model export, or both).

The trained tree is differentiated and checkpointed; the frozen trees are jit arguments (never
closed-over constants), placed once, in the compute dtype, and never written back.

`frozen_layout="per_layer"` (mode "compose") places the frozen models in the decoding layout
(`transformer.unstack_layers`: one array per layer, the projections that share an input fused):
their layers run unrolled and read their weights where they lie, where the stacked layout's
layer loop copies every layer's weights out of the stack at every use (bench/RESULTS.md). It
changes how the weights are held, not the function; exports stay in the stacked layout.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, ClassVar, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn

from calm_jax import alignment
from calm_jax import checkpoints as ckpt
from calm_jax import exports as exports_lib
from calm_jax import lora as lora_lib
from calm_jax import multi_token as mtp_lib
from calm_jax import partitioning as part
from calm_jax import steps as steps_lib
from calm_jax.composition import ComposedLM, CompositionConfig
from calm_jax.losses import chunked_cross_entropy, cross_entropy
from calm_jax.models import Decoder, TransformerConfig
from calm_jax.models.config import RUNTIME_FIELDS
from calm_jax.models.transformer import unstack_layers

log = logging.getLogger("calm_jax")

FROZEN_LAYOUTS = ("stacked", "per_layer")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model of the run: a config, a model export directory (`calm_jax.checkpoints`), or both.

    With only a checkpoint, the stored config is used. With both, the architectures must agree;
    the given config's runtime fields (compute dtype, attention implementation, remat policy)
    win. Without a checkpoint the model is randomly initialised: for a frozen augmenting model
    that is the paper's "CALM with random mA" ablation.

    `dtype`, `attention_impl`, `remat_policy` and `scan_unroll`, when set, replace those
    runtime fields of the resolved config (a stored model's included), e.g. in gin:
    `anchor/trainer.ModelSpec.remat_policy = "full"`.
    """

    config: TransformerConfig | None = None
    checkpoint: str | None = None
    dtype: str | None = None
    attention_impl: str | None = None
    remat_policy: str | None = None
    scan_unroll: int | None = None

    def resolve(self, field: str) -> TransformerConfig:
        cfg = self._resolve(field)
        runtime = {k: getattr(self, k) for k in RUNTIME_FIELDS if getattr(self, k) is not None}
        if not runtime:
            return cfg
        try:
            return cfg.replace(**runtime)
        except ValueError as e:
            raise ValueError(f"{field}.{e}") from None

    def _resolve(self, field: str) -> TransformerConfig:
        if self.checkpoint is None:
            if self.config is None:
                raise ValueError(f"{field}: expected a config or a checkpoint, got neither")
            return self.config
        stored = ckpt.load_model_config(self.checkpoint)
        if self.config is None:
            return stored
        diff = [f.name for f in dataclasses.fields(TransformerConfig)
                if f.name not in RUNTIME_FIELDS + ("param_dtype",)
                and getattr(stored, f.name) != getattr(self.config, f.name)]
        if diff:
            name = diff[0]
            raise ValueError(f"{field}.config.{name}: expected the checkpoint's value "
                             f"{getattr(stored, name)!r} ({self.checkpoint}), "
                             f"got {getattr(self.config, name)!r}")
        return stored.replace(**{k: getattr(self.config, k) for k in RUNTIME_FIELDS})


@dataclasses.dataclass
class Setup:
    """A built objective: what a mode contributes to the generic loop (`steps.build_program`
    compiles its loss; `trainer.train` restores, loops, evaluates and exports with it)."""

    forward: Callable[[Any, Any, Mapping[str, jax.Array]], jax.Array]
    abstract_params: Any          # boxed ShapeDtypeStructs of the trained tree
    init_params: Callable[[jax.Array], Any]  # rng -> unboxed trained tree (not yet placed)
    frozen: Any                   # placed frozen trees
    fingerprints: dict[str, str]  # frozen export -> fingerprint
    flops_per_token: float        # model FLOPs of one training token (matmuls only)
    # (directory, trained params) -> writes the run's export: the model (pretrain, finetune,
    # lora merged into the anchor) or the composition (`calm_jax.exports`).
    export: Callable[[str, Any], None]
    # (params, frozen, batch) -> (differentiated loss sum, metric sums); None: the
    # next-token cross-entropy of `forward`'s logits.
    loss_fn: Callable[[Any, Any, Mapping[str, jax.Array]], tuple[jax.Array, dict]] | None = None
    export_params: Callable[[Any], Any] = lambda params: params  # trainer.train()'s 'params'
    export_marker: str = ckpt.CONFIG_FILE  # the file that marks a finished export
    # (params, frozen, batch) -> (last residual stream [batch, length, embed], head_fn: a
    # chunk of it -> logits): `forward` split before the output layer, for `loss_chunk`.
    final_states: Callable[[Any, Any, Mapping[str, jax.Array]],
                           tuple[jax.Array, Callable]] | None = None

    def loss(self) -> Callable[[Any, Any, Mapping[str, jax.Array]], tuple[jax.Array, dict]]:
        """(params, frozen, batch) -> (loss sum to differentiate, metric sums)."""
        if self.loss_fn is not None:
            return self.loss_fn
        return functools.partial(steps_lib.next_token_loss, self.forward)


def _abstract_decoder(cfg: TransformerConfig) -> Any:
    tokens = jnp.zeros((1, min(8, cfg.max_len)), jnp.int32)
    return jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), tokens))["params"]


def _place_frozen(spec: ModelSpec, cfg: TransformerConfig, mesh, rules, rng, field: str,
                  fingerprints: dict[str, str], layout: str = "stacked") -> Any:
    """Loads (or randomly initialises) a model, sharded and cast to its compute dtype, in
    `layout` ("per_layer": `unstack_layers`, in the same program as the cast, so the stacked
    cast copy is never held beside it; each per-layer array keeps its stack's sharding less
    the layer axis, as XLA propagates it)."""
    boxed = _abstract_decoder(cfg)
    shardings = part.shardings_for(boxed, mesh, rules)
    part.check_divisible(nn.unbox(boxed), shardings, f"{field} ")

    def to_compute(tree):
        return jax.tree.map(lambda x: x.astype(cfg.compute_dtype), tree)

    if layout == "per_layer":
        cast = jax.jit(lambda t: unstack_layers(to_compute(t)))
    else:
        cast = jax.jit(to_compute, out_shardings=shardings)
    if spec.checkpoint is None:
        init = jax.jit(lambda k: nn.unbox(Decoder(cfg).init(
            k, jnp.zeros((1, min(8, cfg.max_len)), jnp.int32))["params"]),
            out_shardings=shardings)
        return cast(init(rng))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
    stored_cfg, params = ckpt.load_model(spec.checkpoint, target=target)
    fingerprints[field] = ckpt.params_fingerprint(stored_cfg, params)
    return cast(params)


def _batch_kwargs(batch: Mapping[str, jax.Array]) -> dict[str, Any]:
    return {"segment_ids": batch.get("decoder_segment_ids"),
            "positions": batch.get("decoder_positions")}


def _decoder_final_states(model: Decoder, params, batch):
    """(last residual stream, head_fn) of a plain decoder with `params`."""
    variables, last = {"params": params}, model.config.num_layers
    h = model.apply(variables, batch["decoder_input_tokens"], (last,),
                    method=Decoder.hidden_states, **_batch_kwargs(batch))[last]
    return h, lambda x: model.apply(variables, x, method=Decoder.head)


def _check_frozen_layout(frozen_layout, mode: str) -> None:
    if frozen_layout not in FROZEN_LAYOUTS:
        raise ValueError(f"frozen_layout: expected one of {FROZEN_LAYOUTS}, "
                         f"got {frozen_layout!r}")
    if frozen_layout != "stacked" and mode != "compose":
        raise ValueError(f"frozen_layout: expected 'stacked' in mode={mode!r} (only the "
                         f"compose mode's frozen models can be held per layer), "
                         f"got {frozen_layout!r}")


def _check_loss_chunk(loss_chunk) -> None:
    if loss_chunk is not None and (not isinstance(loss_chunk, int)
                                   or isinstance(loss_chunk, bool) or loss_chunk <= 0):
        raise ValueError(f"loss_chunk: expected None or a positive integer (positions per "
                         f"output-layer chunk), got {loss_chunk!r}")


def _next_token_loss(h, head_fn, batch, loss_chunk: int | None) -> dict[str, jax.Array]:
    """The next-token cross-entropy sums of logits `head_fn(h)`, a chunk of `loss_chunk`
    positions at a time when set (`chunked_cross_entropy`)."""
    targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    if loss_chunk is None:
        return cross_entropy(head_fn(h), targets, weights)
    return chunked_cross_entropy(h, head_fn, targets, weights, chunk=loss_chunk)


class Objective:
    """One training mode: what it trains, what it reads frozen, its loss and its export.

    A subclass sets `mode` (the name `trainer.train(mode=...)` takes), `trains` and
    `reads_frozen` (what a user reads in `describe()`), checks its settings in `__init__`
    (before anything is loaded or compiled) and builds a `Setup` in `build`.
    `register_objective` makes it a mode of `trainer.train`. The trained tree is differentiated
    and checkpointed; the frozen trees are jit arguments, placed once in the compute dtype,
    never differentiated nor saved.
    """

    mode: ClassVar[str] = ""
    trains: ClassVar[str] = ""
    reads_frozen: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, anchor: ModelSpec, augments: Mapping[str, ModelSpec] | None = None,
                 composition: CompositionConfig | None = None,
                 lora: lora_lib.LoraConfig | None = None,
                 multi_token: mtp_lib.MultiTokenConfig | None = None,
                 loss_chunk: int | None = None, frozen_layout: str = "stacked"):
        _check_loss_chunk(loss_chunk)
        _check_frozen_layout(frozen_layout, self.mode)
        self.anchor = anchor
        self.augments = dict(augments or {})
        self.composition = composition or CompositionConfig()
        self.lora = lora or lora_lib.LoraConfig()
        self.multi_token = multi_token or mtp_lib.MultiTokenConfig()
        self.loss_chunk = loss_chunk
        self.frozen_layout = frozen_layout
        if self.multi_token.depth > 1 and self.mode != "pretrain":
            raise ValueError(f"multi_token.depth: expected 1 in mode={self.mode!r} (extra heads "
                             f"are a pretraining loss), got {self.multi_token.depth}")
        if "augments" not in self.reads_frozen and self.mode != "lora" and self.augments:
            raise ValueError(f"augments: expected none in mode={self.mode!r}, "
                             f"got {sorted(self.augments)}")

    @classmethod
    def describe(cls) -> str:
        frozen = ", ".join(cls.reads_frozen) or "nothing"
        return f"{cls.mode}: trains {cls.trains}; reads frozen: {frozen}"

    def build(self, *, mesh, rules, rng: jax.Array) -> Setup:
        """Loads and places the frozen models and returns the mode's `Setup`."""
        s = self._build(mesh, rules, rng)
        if self.loss_chunk is not None and s.loss_fn is None:
            loss_chunk = self.loss_chunk

            def loss_fn(params, frozen, batch):
                h, head_fn = s.final_states(params, frozen, batch)
                m = _next_token_loss(h, head_fn, batch, loss_chunk)
                return m["loss_sum"], m

            s.loss_fn = loss_fn
        return s

    def _build(self, mesh, rules, rng: jax.Array) -> Setup:
        raise NotImplementedError


OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Makes `cls` the objective of `trainer.train(mode=cls.mode)` (a class decorator)."""
    if not cls.mode:
        raise ValueError(f"{cls.__name__}.mode: expected a mode name, got {cls.mode!r}")
    OBJECTIVES[cls.mode] = cls
    return cls


def _plain_decoder_setup(cfg: TransformerConfig, init, flops_per_token: float) -> Setup:
    """A Setup that trains a whole decoder (`init`: rng -> its unboxed parameters)."""
    model = Decoder(cfg)

    def forward(params, frozen, batch):
        return model.apply({"params": params}, batch["decoder_input_tokens"],
                           **_batch_kwargs(batch))[0]

    def final_states(params, frozen, batch):
        return _decoder_final_states(model, params, batch)

    return Setup(forward, _abstract_decoder(cfg), init, {}, {}, flops_per_token,
                 lambda directory, params: ckpt.save_model(directory, cfg, params),
                 final_states=final_states)


def _multi_token_setup(model: Decoder, boxed, init_decoder, mt: mtp_lib.MultiTokenConfig,
                       flops_per_token: float, loss_chunk: int | None) -> Setup:
    """Pretraining with extra heads for tokens further ahead (`calm_jax.multi_token`).

    The trained tree is {'decoder': ..., 'multi_token': ...}; only 'decoder' is exported.
    """
    cfg = model.config
    heads = mtp_lib.MultiTokenHeads(cfg, mt.depth)
    hidden = jax.ShapeDtypeStruct((1, 1, cfg.embed_dim), jnp.float32)
    boxed_heads = jax.eval_shape(heads.init, jax.random.key(0), hidden)["params"]

    def init(k):
        k_dec, k_heads = jax.random.split(k)
        return {"decoder": init_decoder(k_dec),
                "multi_token": nn.unbox(heads.init(k_heads, jnp.zeros((1, 1, cfg.embed_dim)))[
                    "params"])}

    def forward(params, frozen, batch):
        return model.apply({"params": params["decoder"]}, batch["decoder_input_tokens"],
                           **_batch_kwargs(batch))[0]

    def loss_fn(params, frozen, batch):
        h, head_fn = _decoder_final_states(model, params["decoder"], batch)
        targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
        m = _next_token_loss(h, head_fn, batch, loss_chunk)
        ahead = heads.apply({"params": params["multi_token"]}, h)
        extra, _ = mtp_lib.ahead_loss(ahead, targets, weights, batch.get("decoder_segment_ids"))
        return m["loss_sum"] + mt.weight * extra, m

    extra_flops = 6.0 * (mt.depth - 1) * cfg.embed_dim * cfg.vocab_size
    return Setup(forward, {"decoder": boxed, "multi_token": boxed_heads}, init, {}, {},
                  flops_per_token + extra_flops,
                  lambda directory, params: ckpt.save_model(directory, cfg, params["decoder"]),
                  loss_fn=loss_fn, export_params=lambda params: params["decoder"])


@register_objective
class PretrainObjective(Objective):
    """A single LM from scratch (the small anchor / augmenting models of reproductions), with
    optional multi-token heads (`multi_token`, trained and checkpointed, not exported)."""

    mode = "pretrain"
    trains = "every parameter of a new model (and its multi-token heads)"

    def __init__(self, **kw):
        super().__init__(**kw)
        if self.anchor.checkpoint is not None:
            raise ValueError("anchor.checkpoint: expected None in mode='pretrain' (it starts "
                             f"from scratch; use mode='finetune'), got {self.anchor.checkpoint!r}")

    def _build(self, mesh, rules, rng):
        cfg = self.anchor.resolve("anchor")
        tokens = jnp.zeros((1, min(8, cfg.max_len)), jnp.int32)
        init = lambda k: nn.unbox(Decoder(cfg).init(k, tokens)["params"])  # noqa: E731
        flops = 6.0 * cfg.num_params(include_embedding=False)
        if self.multi_token.depth > 1:
            return _multi_token_setup(Decoder(cfg), _abstract_decoder(cfg), init,
                                      self.multi_token, flops, self.loss_chunk)
        return _plain_decoder_setup(cfg, init, flops)


@register_objective
class FinetuneObjective(Objective):
    """Full fine-tune of the anchor from its export (the paper's mB+NTL baseline)."""

    mode = "finetune"
    trains = "every parameter of the anchor, from its export"

    def __init__(self, **kw):
        super().__init__(**kw)
        if self.anchor.checkpoint is None:
            raise ValueError("anchor.checkpoint: expected a model export to fine-tune in "
                             "mode='finetune', got None")

    def _build(self, mesh, rules, rng):
        cfg = self.anchor.resolve("anchor")
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                              nn.unbox(_abstract_decoder(cfg)))
        _, loaded = ckpt.load_model(self.anchor.checkpoint, target=target)
        return _plain_decoder_setup(cfg, lambda k: loaded,
                                    6.0 * cfg.num_params(include_embedding=False))


@register_objective
class LoraObjective(Objective):
    """LoRA on the frozen anchor, rank matched to the CALM configuration's parameter count
    unless `lora.rank` is given (the paper's LoRA baseline); exported merged into the anchor."""

    mode = "lora"
    trains = "low-rank adapters of the anchor's projections"
    reads_frozen = ("anchor",)

    def _build(self, mesh, rules, rng):
        cfg, lora = self.anchor.resolve("anchor"), self.lora
        fingerprints: dict[str, str] = {}
        key = jax.random.split(rng, 1 + len(self.augments))[0]  # as compose's anchor key
        frozen = {"anchor": _place_frozen(self.anchor, cfg, mesh, rules, key, "anchor",
                                          fingerprints, self.frozen_layout)}
        if lora.rank is None:
            if not self.augments:
                raise ValueError("lora.rank: expected a rank, or augments to match CALM's "
                                 "parameter count, got neither")
            augment_cfgs = {name: spec.resolve(f"augments[{name!r}]")
                            for name, spec in self.augments.items()}
            budget = ComposedLM(cfg, augment_cfgs, self.composition).num_composition_params()
            rank = lora_lib.rank_for_budget(frozen["anchor"], lora, budget)
            log.info("LoRA rank %d matches the composition's %d parameters", rank, budget)
        else:
            rank = lora.rank
        model = Decoder(cfg)
        init = lambda k: lora_lib.init_lora(k, frozen["anchor"], lora, rank)  # noqa: E731

        def forward(params, frozen, batch):
            merged = lora_lib.merge(frozen["anchor"], params, lora)
            return model.apply({"params": merged}, batch["decoder_input_tokens"],
                               **_batch_kwargs(batch))[0]

        def final_states(params, frozen, batch):
            return _decoder_final_states(model, lora_lib.merge(frozen["anchor"], params, lora),
                                         batch)

        def export(directory, params):  # the merged anchor, a plain model export
            anchor_params = jax.tree.map(lambda x: x.astype(cfg.params_dtype), frozen["anchor"])
            ckpt.save_model(directory, cfg, lora_lib.merge(anchor_params, params, lora))

        n_anchor = cfg.num_params(include_embedding=False)
        n_lora = rank * lora_lib.params_per_rank(frozen["anchor"], lora)
        return Setup(forward, jax.eval_shape(init, jax.random.key(0)), init, frozen,
                     fingerprints, 4.0 * n_anchor + 6.0 * n_lora, export,
                     final_states=final_states)


@register_objective
class ComposeObjective(Objective):
    """CALM: anchor and augmenting models frozen, only the composition trained; exported as a
    composition export (`calm_jax.exports`)."""

    mode = "compose"
    trains = "the composition (projections and cross-attention) alone"
    reads_frozen = ("anchor", "augments")

    def __init__(self, **kw):
        super().__init__(**kw)
        if not self.augments:
            raise ValueError("augments: expected at least one augmenting model in "
                             "mode='compose', got none")

    def _build(self, mesh, rules, rng):
        anchor_cfg = self.anchor.resolve("anchor")
        augment_cfgs = {name: spec.resolve(f"augments[{name!r}]")
                        for name, spec in self.augments.items()}
        keys = dict(zip(["anchor", *augment_cfgs], jax.random.split(rng, 1 + len(augment_cfgs))))
        fingerprints: dict[str, str] = {}
        frozen = {"anchor": _place_frozen(self.anchor, anchor_cfg, mesh, rules, keys["anchor"],
                                          "anchor", fingerprints, self.frozen_layout)}
        composed = ComposedLM(anchor_cfg, augment_cfgs, self.composition)
        frozen["augments"] = {
            name: _place_frozen(spec, augment_cfgs[name], mesh, rules, keys[name],
                                f"augments[{name!r}]", fingerprints, self.frozen_layout)
            for name, spec in self.augments.items()}

        names = sorted(augment_cfgs)  # a batch with the augments' own tokens: across tokenizers

        def forward(params, frozen, batch):
            return composed.apply({**frozen, "composition": params},
                                  batch["decoder_input_tokens"],
                                  prompt_mask=batch.get("prompt_mask"), **_batch_kwargs(batch),
                                  **alignment.cross_kwargs(batch, names))

        def final_states(params, frozen, batch):
            everything = {**frozen, "composition": params}
            h = composed.final_states(everything, batch["decoder_input_tokens"],
                                      prompt_mask=batch.get("prompt_mask"),
                                      **_batch_kwargs(batch),
                                      **alignment.cross_kwargs(batch, names))
            return h, lambda x: composed.head(everything, x)

        init = lambda k: nn.unbox(composed.init_composition(k))  # noqa: E731
        n_anchor = anchor_cfg.num_params(include_embedding=False)
        n_aug = sum(c.num_params(include_embedding=False) for c in augment_cfgs.values())
        flops = 2.0 * n_aug + 4.0 * n_anchor + 6.0 * composed.num_composition_params()
        sources = {"anchor": self.anchor.checkpoint,
                   "augments": {name: spec.checkpoint for name, spec in self.augments.items()}}
        export = functools.partial(exports_lib.save_composition, model=composed, frozen=frozen,
                                   sources=sources, fingerprints=fingerprints)
        return Setup(forward, jax.eval_shape(composed.init_composition, jax.random.key(0)),
                     init, frozen, fingerprints, flops, export, final_states=final_states,
                     export_marker=exports_lib.COMPOSITION_FILE)


MODES = tuple(OBJECTIVES)


def make_objective(mode: str, **kw) -> Objective:
    """The registered objective of `mode`, its settings checked (`Objective.__init__`)."""
    if mode not in OBJECTIVES:
        raise ValueError(f"mode: expected one of {tuple(OBJECTIVES)}, got {mode!r}")
    return OBJECTIVES[mode](**kw)
