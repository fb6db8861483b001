"""Optimizers and learning-rate schedules (optax)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW or Adafactor with warmup and cosine / linear / constant decay.

    Attributes:
      name: "adamw" or "adafactor".
      learning_rate: peak learning rate, reached after `warmup_steps`.
      warmup_steps: linear warmup from 0.
      decay: "cosine", "linear" or "constant" after warmup, over the rest of the run.
      final_lr_fraction: learning rate at the last step, as a fraction of the peak.
      weight_decay: decoupled weight decay (AdamW) / Adafactor's weight decay rate.
      b1, b2, eps: Adam moments.
      clip_norm: global-norm gradient clipping (None or 0 disables; a run resumes with it
        turned on or off).
      grad_accum_steps: micro-batches per step (a `lax.scan` inside the step).
      skip_nonfinite: skip an update whose gradients hold a NaN or infinity, up to this many in
        a row (`optax.apply_if_finite`; the skipped step changes neither the parameters nor the
        optimizer's moments). 0: off, and the trainer stops at the first non-finite loss it
        sees. A run resumes with it turned on or off: the optimizer's moments carry over, and
        its skip counters start at 0 or are dropped.
    """

    name: Literal["adamw", "adafactor"] = "adamw"
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    grad_accum_steps: int = 1
    skip_nonfinite: int = 0

    def __post_init__(self):
        if self.name not in ("adamw", "adafactor"):
            raise ValueError(f"optimizer.name: expected 'adamw' or 'adafactor', got {self.name!r}")
        if self.decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"optimizer.decay: expected 'cosine', 'linear' or 'constant', "
                             f"got {self.decay!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"optimizer.learning_rate: expected > 0, got {self.learning_rate!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps: expected >= 0, got {self.warmup_steps!r}")
        if not isinstance(self.grad_accum_steps, int) or self.grad_accum_steps < 1:
            raise ValueError(f"optimizer.grad_accum_steps: expected a positive integer, "
                             f"got {self.grad_accum_steps!r}")
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ValueError(f"optimizer.final_lr_fraction: expected a fraction in [0, 1], "
                             f"got {self.final_lr_fraction!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"optimizer.weight_decay: expected >= 0, got {self.weight_decay!r}")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optimizer.{name}: expected a value in [0, 1), "
                                 f"got {getattr(self, name)!r}")
        if not self.eps > 0:
            raise ValueError(f"optimizer.eps: expected > 0, got {self.eps!r}")
        if not isinstance(self.skip_nonfinite, int) or self.skip_nonfinite < 0:
            raise ValueError(f"optimizer.skip_nonfinite: expected updates >= 0 (0: off), "
                             f"got {self.skip_nonfinite!r}")
        if self.clip_norm is not None and not self.clip_norm >= 0:
            raise ValueError(f"optimizer.clip_norm: expected None, 0 (off) or a positive norm, "
                             f"got {self.clip_norm!r}")


def schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    peak, warm = config.learning_rate, config.warmup_steps
    rest = max(total_steps - warm, 1)
    end = peak * config.final_lr_fraction
    if config.decay == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=config.final_lr_fraction)
    elif config.decay == "linear":
        after = optax.linear_schedule(peak, end, rest)
    else:
        after = optax.constant_schedule(peak)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def state_layers(config: Mapping[str, Any]) -> tuple[bool, bool]:
    """Which wrappers `make_optimizer` puts around the optimizer for these settings (a dict of
    `OptimizerConfig`'s fields, as a checkpoint records them): (`optax.apply_if_finite`,
    gradient clipping). They decide the layout of the optimizer state."""
    return bool(config.get("skip_nonfinite")), bool(config.get("clip_norm"))


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    lr = schedule(config, total_steps)
    if config.name == "adamw":
        opt = optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps,
                          weight_decay=config.weight_decay)
    else:
        opt = optax.adafactor(lr, weight_decay_rate=config.weight_decay or None)
    if config.clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(config.clip_norm), opt)
    if config.skip_nonfinite:  # outermost: a skipped update touches no inner state
        opt = optax.apply_if_finite(opt, config.skip_nonfinite)
    return opt
