"""The training loop, t5x-style: `train(...)` = objective, restore, loop, evaluate, export.

Each mode is an `Objective` class (`calm_jax.objectives`, re-exported here with `ModelSpec`,
`Setup`, `register_objective`, `make_objective` and the built-in objectives); `train(mode=...)`
looks it up and the loop is the same for every mode. `setup(mode, ...)` builds a mode's
`Setup` (what `steps.build_program` compiles, and what `bench/` measures).

The state holds only what is trained: `{'step', 'params', 'opt_state'}`; frozen trees are jit
arguments (never closed-over constants), placed once, in the compute dtype, and never written
back. The loss is differentiated with respect to `state['params']` only, so XLA builds no weight
gradients for frozen parameters and the optimizer keeps no state for them.

Restore order (t5x's, `restore`): the newest intact checkpoint in `<model_dir>/checkpoints`,
else `checkpoint.restore_from`, else scratch. A damaged step (its checksum or files) is reported
and set aside as `<step>.damaged`, and the next older one restored (`Checkpointer.
restore_newest`); with no intact step left the run stops, never silently from scratch. A
compose/lora checkpoint records the fingerprints of the frozen model exports it was trained
against and refuses to resume against different ones. The data source resumes at the restored
step's position. Exports are written whole or not at all (`checkpoints.write_atomically`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from typing import Any, Callable, Mapping

import jax
import flax.linen as nn

from calm_jax import checkpoints as ckpt
from calm_jax import data as data_lib
from calm_jax import distributed
from calm_jax import lora as lora_lib
from calm_jax import metrics as metrics_lib
from calm_jax import multi_token as mtp_lib
from calm_jax import partitioning as part
from calm_jax import steps as steps_lib
from calm_jax import validation
from calm_jax.composition import CompositionConfig
# The objectives' public names stay importable from here (`trainer.Objective`, ...).
from calm_jax.objectives import (  # noqa: F401
    FROZEN_LAYOUTS, MODES, OBJECTIVES, ComposeObjective, FinetuneObjective, LoraObjective,
    ModelSpec, Objective, PretrainObjective, Setup, make_objective, register_objective)
from calm_jax.optim import OptimizerConfig, make_optimizer, schedule, state_layers

log = logging.getLogger("calm_jax")

PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "tpu v4": 275e12,
              "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v6": 918e12}


def setup(mode: str, *, anchor: ModelSpec, augments: Mapping[str, ModelSpec],
          composition: CompositionConfig, lora: lora_lib.LoraConfig, mesh, rules,
          rng: jax.Array,
          multi_token: mtp_lib.MultiTokenConfig = mtp_lib.MultiTokenConfig(),
          loss_chunk: int | None = None, frozen_layout: str = "stacked") -> Setup:
    """The `Setup` of `mode` (`make_objective(...).build(...)`): its forward, trained tree and
    placed frozen trees. With `loss_chunk` the training loss applies the output layer
    `loss_chunk` positions at a time (`losses.chunked_cross_entropy`): no [batch, length,
    vocab] logits are kept for the backward pass. `frozen_layout`: see
    `calm_jax.objectives`."""
    objective = make_objective(mode, anchor=anchor, augments=augments, composition=composition,
                               lora=lora, multi_token=multi_token, loss_chunk=loss_chunk,
                               frozen_layout=frozen_layout)
    return objective.build(mesh=mesh, rules=rules, rng=rng)


def _peak_flops(override: float | None) -> float | None:
    if override:
        return override
    kind = jax.devices()[0].device_kind.lower()
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def train(*, mode: str, model_dir: str, num_steps: int, anchor: ModelSpec,
          dataset: data_lib.DatasetConfig,
          augments: Mapping[str, ModelSpec] | None = None,
          composition: CompositionConfig | None = None,
          lora: lora_lib.LoraConfig | None = None,
          optimizer: OptimizerConfig | None = None,
          partitioning: part.PartitioningConfig | None = None,
          checkpoint: ckpt.CheckpointConfig | None = None,
          eval_dataset: data_lib.DatasetConfig | None = None,
          eval_every: int = 0, eval_batches: int = 4, log_every: int = 10,
          seed: int = 0, peak_flops: float | None = None,
          stop_after: int | None = None,
          multi_token: mtp_lib.MultiTokenConfig | None = None,
          loss_chunk: int | None = None, frozen_layout: str = "stacked",
          decode_eval: Callable[..., Mapping[str, float]] | None = None) -> dict[str, Any]:
    """Trains in `mode` for `num_steps` steps.

    Returns {'state', 'params' (the trained model's tree as exported: the decoder without
    multi-token heads in pretraining; the trained tree otherwise), 'frozen' (the frozen trees as
    used), 'history', 'stopped_early', 'model_dir'}.

    `multi_token` (mode='pretrain' only) adds heads for tokens 2.. depth ahead to the loss
    (`calm_jax.multi_token`); they are trained and checkpointed but not exported.

    `loss_chunk` applies the output layer to that many positions at a time in the training
    loss (`losses.chunked_cross_entropy`): the [batch, length, vocab] fp32 logits are never
    kept for the backward pass; each chunk's gradient is taken while its logits are live, so
    the output layer's products are the same as without chunks. None: all at once.

    `frozen_layout` ("stacked" or, in mode "compose", "per_layer") is how the frozen models
    are held on the devices: see `calm_jax.objectives`. The trained parameters, checkpoints and
    exports are the same either way; 'frozen' is returned in this layout.

    `decode_eval` decodes and scores the trained model every `eval_every` steps and at the end
    (`calm_jax.evaluate.DecodeEval`, or any callable `fn(model, params, step) -> {name: value}`
    given the `Decoder` or `ComposedLM` and its full parameter tree); its metrics are logged as
    "decode_eval/<name>" beside the others. None (the default) costs nothing.

    `history` is a list of (step, metrics) for logged steps and evaluations. `stop_after` ends
    this invocation (with a checkpoint) after that many steps, as a preemption would; the
    learning-rate schedule still spans `num_steps` and the next invocation resumes.
    """
    augments = dict(augments or {})
    composition = composition or CompositionConfig()
    lora = lora or lora_lib.LoraConfig()
    optimizer = optimizer or OptimizerConfig()
    partitioning = partitioning or part.PartitioningConfig()
    checkpoint = checkpoint or ckpt.CheckpointConfig()
    if not isinstance(num_steps, int) or num_steps <= 0:
        raise ValueError(f"num_steps: expected a positive integer, got {num_steps!r}")
    ckpt.check_restore_from(checkpoint, os.path.join(model_dir, "checkpoints"))
    objective = make_objective(mode, anchor=anchor, augments=augments, composition=composition,
                               lora=lora, multi_token=multi_token, loss_chunk=loss_chunk,
                               frozen_layout=frozen_layout)

    mesh = part.make_mesh(partitioning)
    rules = partitioning.logical_axis_rules
    dp = part.data_parallel_size(mesh)
    for field, ds in (("dataset", dataset), ("eval_dataset", eval_dataset)):
        if ds is not None and ds.batch_size % (dp * optimizer.grad_accum_steps):
            raise ValueError(f"{field}.batch_size: expected a multiple of the data-parallel size "
                             f"{dp} x grad_accum_steps {optimizer.grad_accum_steps}, "
                             f"got {ds.batch_size}")
        if ds is not None:  # each process feeds its own rows
            distributed.check_process_batch_layout(part.batch_sharding(mesh), ds.batch_size,
                                                   field)
    rng_setup, rng_init = jax.random.split(jax.random.key(seed))
    source = data_lib.make_source(dataset)
    eval_source = data_lib.make_source(eval_dataset) if eval_dataset is not None else None
    decode_fn = None
    if decode_eval is not None:  # prepared now: bad settings fail before anything compiles
        from calm_jax import evaluate
        decode_fn = evaluate.trainer_hook(decode_eval, mode, anchor=anchor, augments=augments,
                                          composition=composition, lora=lora,
                                          model_dir=model_dir)

    with part.mesh_context(mesh), nn.logical_axis_rules(list(rules)):
        s = objective.build(mesh=mesh, rules=rules, rng=rng_setup)
        readers = {"anchor": anchor, **({f"augments[{n!r}]": a for n, a in augments.items()}
                                        if mode == "compose" else {})}  # read the batches
        limits = validation.model_limits(*(spec.resolve(f) for f, spec in readers.items()))
        opt = make_optimizer(optimizer, num_steps)
        lr_schedule = schedule(optimizer, num_steps)
        prog = steps_lib.build_program(s, opt, lr_schedule, optimizer.grad_accum_steps, mesh,
                                       rules)
        os.makedirs(model_dir, exist_ok=True)
        checkpointer = ckpt.Checkpointer(os.path.join(model_dir, "checkpoints"), checkpoint)
        state, start = restore(checkpointer, checkpoint, prog, s, mode, optimizer, source)
        if state is None:
            state = prog.init_state(rng_init)

        def next_batch():
            return data_lib.to_global(
                validation.check_batch(source.next_batch(), name="dataset", **limits),
                prog.batch_sharding)

        def evaluate_at(step: int, params) -> list[dict[str, float]]:
            """The evaluations due after `step`: loss and accuracy on `eval_dataset`, then
            the decode-and-score evaluation."""
            out = []
            if eval_source is not None and eval_every and (
                    step % eval_every == 0 or step == num_steps):
                ev = _evaluate(prog.eval_step, params, s.frozen, eval_source, limits,
                               eval_batches, prog.batch_sharding)
                log.info("step %d eval loss %.4f acc %.3f", step, ev["eval/loss"],
                         ev["eval/accuracy"])
                out.append(ev)
            if decode_fn is not None and (step == num_steps or (
                    eval_every and step % eval_every == 0)):
                ev = decode_fn(step, params, s.frozen, s.export_params)
                log.info("step %d %s", step, " ".join(f"{k} {v:.4g}" for k, v in ev.items()))
                out.append(ev)
            return out

        first = next_batch()
        compiled = prog.train_step.lower(state, s.frozen, first).compile()
        _log_memory(compiled)
        writer = metrics_lib.MetricWriter(model_dir, is_chief=jax.process_index() == 0,
                                          resume_step=start)
        meta = {"frozen": s.fingerprints, "mode": mode,
                "optimizer": dataclasses.asdict(optimizer)}
        t_start = time.time()
        try:
            state, step, history, stopped_early = _loop(
                compiled, state, s.frozen, first, next_batch, start, num_steps=num_steps,
                checkpointer=checkpointer, writer=writer, evaluate_at=evaluate_at,
                save_meta=lambda step: {**meta, "data_position": step,
                                        **data_lib.checkpoint_meta(source)},
                skip_limit=optimizer.skip_nonfinite, log_every=log_every,
                stop_after=stop_after,
                tokens_per_step=dataset.batch_size * source.length,
                flops_per_token=s.flops_per_token, peak=_peak_flops(peak_flops))
        finally:  # an error (a non-finite loss, an interrupt) still completes a started save
            checkpointer.close()
            writer.close()
        if not stopped_early:
            # Written whole or not at all (`checkpoints.write_atomically`); every process
            # joins orbax's save. An unfinished export is written again.
            export = os.path.join(model_dir, "export")
            if not _agreed(ckpt.export_complete(export, s.export_marker)):
                ckpt.discard_incomplete_export(export, s.export_marker)
                s.export(export, state["params"])
        log.info("done: %d steps in %s", step - start, _hms(time.time() - t_start))
    return {"state": state, "params": s.export_params(state["params"]), "frozen": s.frozen,
            "history": history,
            "stopped_early": stopped_early, "model_dir": model_dir}


def restore(checkpointer: ckpt.Checkpointer, checkpoint: ckpt.CheckpointConfig, prog,
            s: Setup, mode: str, optimizer: OptimizerConfig,
            source: Any) -> tuple[Any | None, int]:
    """(state, data position) of the newest intact step in `checkpointer`'s directory, else in
    `checkpoint.restore_from`, else (None, 0): t5x's order. A damaged step is reported and the
    next older one restored, never scratch; the data source is moved to the restored step's
    position."""
    managers = [checkpointer]
    if checkpointer.latest_step() is None and checkpoint.restore_from:
        managers.append(ckpt.Checkpointer(checkpoint.restore_from, checkpoint, read_only=True))
    for manager in managers:
        restored = manager.restore_newest(functools.partial(
            _restore_step, manager, prog, s.fingerprints, mode, optimizer))
        if restored is None:
            continue
        step, state, meta = restored
        data_lib.restore_state(source, meta)
        log.info("restored step %d from %s", step, manager.directory)
        return state, int(meta["data_position"])
    return None, 0


def _loop(compiled, state, frozen, first, next_batch: Callable[[], Any], start: int, *,
          num_steps: int, checkpointer: ckpt.Checkpointer, writer, evaluate_at,
          save_meta: Callable[[int], dict], skip_limit: int, log_every: int,
          stop_after: int | None, tokens_per_step: int, flops_per_token: float,
          peak: float | None) -> tuple[Any, int, list, bool]:
    """Steps from `start` to `num_steps` (or a preemption, or `stop_after` steps): logs,
    checks every logged or saved state for non-finite values before it is kept, evaluates
    (`evaluate_at(step, params)`) and saves. Returns (state, last step, history, stopped
    early)."""
    history: list[tuple[int, dict[str, float]]] = []
    stopped_early, skipped = False, 0
    t_last, last_step = time.time(), start
    with distributed.Preemption() as preemption:
        step = start
        while step < num_steps:
            batch = first if step == start else next_batch()
            state, metrics = compiled(state, frozen, batch)
            step += 1
            stop = preemption.should_stop(step) or (
                stop_after is not None and step - start >= stop_after)
            save = checkpointer.due(step, force=step == num_steps or stop)
            logged = step % log_every == 0 or step == num_steps
            if logged or save:  # a state is checked before it is saved
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if logged:
                    now = time.time()
                    rate = (step - last_step) / max(now - t_last, 1e-9)
                    metrics.update({"steps_per_sec": rate,
                                    "tokens_per_sec": rate * tokens_per_step})
                    if peak:
                        metrics["mfu"] = (rate * tokens_per_step * flops_per_token
                                          / (peak * jax.device_count()))
                    t_last, last_step = now, step
                    writer.write_scalars(step, metrics)
                    history.append((step, metrics))
                    log.info("step %d/%d loss %.4f acc %.3f lr %.2e gnorm %.3f "
                             "%.1f steps/s ETA %s", step, num_steps, metrics["loss"],
                             metrics["accuracy"], metrics["learning_rate"],
                             metrics["grad_norm"], rate,
                             _hms((num_steps - step) / max(rate, 1e-9)))
                skipped = _check_finite(step, metrics, skip_limit, skipped, checkpointer)
            for ev in evaluate_at(step, state["params"]):
                writer.write_scalars(step, ev)
                history.append((step, ev))
            if save:
                checkpointer.save(step, state, save_meta(step), force=True)
            if stop and step < num_steps:
                stopped_early = True
                break
    return state, step, history, stopped_early


def _agreed(flag: bool) -> bool:
    """Process 0's value of `flag` on every process (a lone process's own value)."""
    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def _check_finite(step: int, metrics: Mapping[str, float], skip_limit: int, skipped: int,
                  checkpointer: ckpt.Checkpointer) -> int:
    """Raises FloatingPointError when the state after `step` must not be kept or saved.

    Without `skip_limit` (optimizer.skip_nonfinite) that is a non-finite loss or gradient norm;
    with it, more non-finite updates in a row than the limit (optax then applies the last one).
    Returns the count of skipped updates so far, logging any new ones.
    """
    if skip_limit:
        streak, total = int(metrics["nonfinite_streak"]), int(metrics["skipped_updates"])
        if total > skipped:
            log.warning("step %d: %d updates skipped so far (non-finite gradients), %d of the "
                        "latest in a row", step, total, streak)
        if streak <= skip_limit:
            return total
        what = (f"{streak} updates in a row had non-finite gradients, more than "
                f"optimizer.skip_nonfinite={skip_limit}, so the last one was applied")
    else:
        bad = [f"{k} is {metrics[k]}" for k in ("loss", "grad_norm")
               if not math.isfinite(metrics[k])]
        if not bad:
            return 0
        what = "the training " + " and ".join(bad)
    checkpointer.wait()
    latest = checkpointer.latest_step()
    kept = ("no checkpoint was saved" if latest is None else
            f"the latest checkpoint kept is step {latest} in {checkpointer.directory}")
    raise FloatingPointError(
        f"step {step}: {what}; stopped without saving this state ({kept}). Lower "
        f"optimizer.learning_rate, set optimizer.clip_norm, check the data's loss weights, or "
        f"set optimizer.skip_nonfinite=N to skip up to N such updates in a row.")


def _restore_step(manager: ckpt.Checkpointer, prog, fingerprints: Mapping[str, str], mode: str,
                  optimizer: OptimizerConfig, step: int) -> tuple[Any, dict[str, Any]]:
    """(this run's state, meta) from checkpoint `step` of `manager`: the frozen models it was
    trained against checked, the optimizer state's layout converted to this run's. Raises
    ValueError when the step does not fit this run, `checkpoints.DamagedCheckpoint` when it
    is damaged."""
    meta = manager.read_meta(step)
    _check_frozen(meta.get("frozen", {}), fingerprints, manager.directory)
    ours = dataclasses.asdict(optimizer)
    saved = meta.get("optimizer", ours)
    target, to_this_run = steps_lib.saved_state_layout(
        prog, state_layers(saved), state_layers(ours))
    try:
        state, meta = manager.restore(step, target)
    except ckpt.StateMismatch as e:  # the stored tree is not this run's state
        raise ValueError(_restore_mismatch(meta, step, manager.directory, mode,
                                           optimizer, e)) from e
    changed = [f"optimizer.{k}={saved.get(k)!r} (this run: {ours[k]!r})"
               for k in ("skip_nonfinite", "clip_norm")
               if bool(saved.get(k)) != bool(ours[k])]
    if changed:
        log.info("step %d was saved with %s; the optimizer's state carries "
                 "over", step, ", ".join(changed))
    return to_this_run(state), meta


def _restore_mismatch(stored: Mapping[str, Any], step: int, where: str, mode: str,
                      optimizer: OptimizerConfig, error: Exception) -> str:
    """Why checkpoint `step` in `where` does not restore into this run's state: the settings
    it was saved with that differ from this run's (the mode, optimizer fields), then how the
    stored tree differs."""
    diffs = [] if stored.get("mode", mode) == mode else [
        f"mode={stored['mode']!r} (this run: {mode!r})"]
    ours = dataclasses.asdict(optimizer)
    diffs += [f"optimizer.{k}={v!r} (this run: {ours[k]!r})"
              for k, v in sorted(stored.get("optimizer", {}).items())
              if k in ours and ours[k] != v]
    saved = f"; it was saved with {', '.join(diffs)}" if diffs else ""
    return (f"checkpoint: step {step} in {where} does not match this run's training state"
            f"{saved}. Resume with the settings it was saved with, or use another model_dir. "
            f"The stored state: {error}")


def _check_frozen(stored: Mapping[str, str], current: Mapping[str, str], where: str) -> None:
    for name in sorted(set(stored) | set(current)):
        if stored.get(name) != current.get(name):
            raise ValueError(
                f"{name}: the checkpoint in {where} was trained against frozen weights with "
                f"fingerprint {stored.get(name)}, but this run loads {current.get(name)}; "
                f"refusing to resume (use another model_dir)")


def _evaluate(eval_step, params, frozen, source, limits, num_batches,
              sharding) -> dict[str, float]:
    sums = {"loss_sum": 0.0, "weight_sum": 0.0, "correct_sum": 0.0}
    for batch in source.sequential(num_batches):
        batch = validation.check_batch(batch, name="eval_dataset", **limits)
        m = jax.device_get(eval_step(params, frozen, data_lib.to_global(batch, sharding)))
        for k in sums:
            sums[k] += float(m[k])
    denom = max(sums["weight_sum"], 1.0)
    return {"eval/loss": sums["loss_sum"] / denom, "eval/accuracy": sums["correct_sum"] / denom}


def _log_memory(compiled) -> None:
    try:
        mem = compiled.memory_analysis()
    except Exception:  # not every backend reports it
        return
    if mem is None:
        return
    gib = lambda n: n / 2**30  # noqa: E731
    log.info("compiled step: arguments %.2f GiB, outputs %.2f GiB, temporaries %.2f GiB",
             gib(mem.argument_size_in_bytes), gib(mem.output_size_in_bytes),
             gib(mem.temp_size_in_bytes))


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

