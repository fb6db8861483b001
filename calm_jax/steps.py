"""The jitted pieces of a run: the train and eval steps and their shardings.

`build_program` turns a mode's setup (what is trained, the frozen trees, the loss) into a
`Program`: the state's shardings, its initialiser, and the train step jitted with the state
donated. The trainer's loop and the benchmarks run the same program.

A train step's metrics are the loss, accuracy, gradient norm, learning rate and target-token
count; with `optax.apply_if_finite` as the optimizer's outer layer (`OptimizerConfig.
skip_nonfinite`) also `skipped_updates` (updates so far whose gradients were not finite: each
was skipped unless more of them came in a row than the limit) and `nonfinite_streak` (how many
of the latest updates in a row were).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from calm_jax import partitioning as part
from calm_jax.losses import cross_entropy


def next_token_loss(forward, params, frozen, batch):
    logits = forward(params, frozen, batch)
    m = cross_entropy(logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"])
    return m["loss_sum"], m


def make_train_step(forward, optimizer: optax.GradientTransformation, lr_schedule,
                    accum_steps: int, loss_fn: Callable | None = None) -> Callable:
    """(state, frozen, batch) -> (state, metrics); gradients w.r.t. state['params'] only.

    `loss_fn(params, frozen, batch) -> (loss sum, metric sums)` replaces the next-token loss of
    `forward`'s logits (an auxiliary loss, e.g. multi-token prediction).
    """
    if loss_fn is None:
        loss_fn = functools.partial(next_token_loss, forward)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, frozen, batch):
        params = state["params"]
        if accum_steps == 1:
            (_, sums), grads = grad_fn(params, frozen, batch)
        else:
            # Row j*accum + i goes to micro-batch i: each device keeps its own rows.
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps,
                                                     *x.shape[1:]).swapaxes(0, 1), batch)

            def body(carry, mb):
                (_, m), g = grad_fn(params, frozen, mb)
                return jax.tree.map(jnp.add, carry, (g, m)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            # The carry holds whatever metric sums loss_fn returns (their shapes and dtypes).
            _, metric_shapes = jax.eval_shape(loss_fn, params, frozen,
                                              jax.tree.map(lambda x: x[0], micro))
            zero_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
            (grads, sums), _ = jax.lax.scan(body, (zeros, zero_m), micro)
        denom = jnp.maximum(sums["weight_sum"], 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state}
        metrics = {"loss": sums["loss_sum"] / denom, "accuracy": sums["correct_sum"] / denom,
                   "grad_norm": optax.tree.norm(grads),
                   "learning_rate": lr_schedule(state["step"]), "tokens": sums["weight_sum"]}
        if isinstance(opt_state, optax.ApplyIfFiniteState):  # OptimizerConfig.skip_nonfinite
            metrics["skipped_updates"] = opt_state.total_notfinite
            metrics["nonfinite_streak"] = opt_state.notfinite_count
        return new_state, metrics

    return step


def make_eval_step(forward) -> Callable:
    def step(params, frozen, batch):
        return next_token_loss(forward, params, frozen, batch)[1]
    return step


@dataclasses.dataclass
class Program:
    """The jitted, sharded pieces of a run: what `train` and the benchmarks execute."""

    param_shardings: Any
    state_shardings: Any
    batch_sharding: Any
    abstract_state: Any           # ShapeDtypeStructs with shardings (restore target)
    init_state: Callable[[jax.Array], Any]   # rng -> fresh placed state
    train_step: Any               # jit: (state, frozen, batch) -> (state, metrics); donates state
    eval_step: Any                # jit: (params, frozen, batch) -> metric sums


def build_program(s, opt: optax.GradientTransformation, lr_schedule, accum_steps: int,
                  mesh, rules) -> Program:
    """Shardings of the trained params and optimizer state (only param-shaped optimizer leaves
    are sharded like their parameter), the state initialiser, and the jitted steps.

    `s` is a mode's setup (`objectives.Setup`): `forward`, `loss()`, `abstract_params` (boxed, with
    logical axes), `init_params` (rng -> unboxed tree) and the placed `frozen` trees.
    """
    param_shardings = part.shardings_for(s.abstract_params, mesh, rules)
    abstract_params = nn.unbox(s.abstract_params)
    part.check_divisible(abstract_params, param_shardings, "params")
    abstract_opt = jax.eval_shape(opt.init, abstract_params)
    repl = part.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        opt, lambda leaf, p, sh: sh if leaf.shape == p.shape else repl, abstract_opt,
        abstract_params, param_shardings, transform_non_params=lambda _: repl)
    state_shardings = {"step": repl, "params": param_shardings, "opt_state": opt_shardings}
    frozen_shardings = jax.tree.map(lambda x: x.sharding, s.frozen)
    batch_sharding = part.batch_sharding(mesh)

    def new_state(params):
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": opt.init(params)}

    abstract_state = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
        jax.eval_shape(new_state, abstract_params), state_shardings)
    init_params = jax.jit(s.init_params, out_shardings=param_shardings)
    place_state = jax.jit(new_state, out_shardings=state_shardings)
    train_step = jax.jit(make_train_step(s.forward, opt, lr_schedule, accum_steps, s.loss()),
                         in_shardings=(state_shardings, frozen_shardings, batch_sharding),
                         out_shardings=(state_shardings, repl), donate_argnums=(0,))
    eval_step = jax.jit(make_eval_step(s.forward),
                        in_shardings=(param_shardings, frozen_shardings, batch_sharding),
                        out_shardings=repl)
    return Program(param_shardings, state_shardings, batch_sharding, abstract_state,
                   lambda rng: place_state(init_params(rng)), train_step, eval_step)


def _inner_opt_state(opt_state, layers):
    """The optimizer's own state (AdamW's or Adafactor's) inside the wrappers `layers` names."""
    skip, clip = layers
    inner = opt_state.inner_state if skip else opt_state
    return inner[1] if clip else inner  # optax.chain(clip_by_global_norm, opt): a tuple


def _wrap_opt_state(inner, layers, counters):
    skip, clip = layers
    state = (optax.EmptyState(), inner) if clip else inner
    return optax.ApplyIfFiniteState(*counters, state) if skip else state


def saved_state_layout(program: Program, saved: tuple[bool, bool],
                       layers: tuple[bool, bool]) -> tuple[Any, Callable[[Any], Any]]:
    """What a checkpoint holds and how it becomes `program`'s state when the optimizer's
    wrappers differ between the two: `saved` and `layers` say whether `optax.apply_if_finite`
    (`OptimizerConfig.skip_nonfinite`) and gradient clipping (`clip_norm`) were on when it was
    saved and are on in this run (`optim.state_layers`).

    Returns the restore target (ShapeDtypeStructs with shardings) and a function of the restored
    state. The optimizer's own state (moments, step counts) carries over as it is, and no array
    is copied. Turning skipping on starts its counters at 0; turning it off drops them. Clipping
    keeps no state of its own.
    """
    abstract = program.abstract_state
    if saved == layers:
        return abstract, lambda state: state
    repl = abstract["step"].sharding
    ours = abstract["opt_state"]

    def scalar(dtype):
        return jax.ShapeDtypeStruct((), dtype, sharding=repl)
    target = {**abstract, "opt_state": _wrap_opt_state(
        _inner_opt_state(ours, layers), saved,
        (scalar(jnp.int32), scalar(jnp.bool_), scalar(jnp.int32)))}
    fresh = jax.jit(lambda: (jnp.zeros([], jnp.int32), jnp.array(True),
                             jnp.zeros([], jnp.int32)), out_shardings=repl)

    def to_this_run(state):
        opt_state = state["opt_state"]
        counters = opt_state[:3] if saved[0] else fresh() if layers[0] else None
        return {**state, "opt_state": _wrap_opt_state(_inner_opt_state(opt_state, saved),
                                                      layers, counters)}
    return target, to_this_run
