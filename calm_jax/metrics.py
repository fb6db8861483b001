"""Metric writers: clu's (TensorBoard events + logging) when TensorFlow and tensorboard are
present (the `data` extra), else a TF-free writer; both also append every record to
`<model_dir>/metrics.jsonl`. A resumed run (`resume_step`) first drops the records of the steps
after the one it resumes from, which it is about to run again: each step's records appear once,
as in a run that was never interrupted.

clu's `metric_writers` package imports TensorFlow and tensorboard on import, and the GPU machine
has neither, so the import happens here, lazily, with a fallback: the logging writer plus
TensorBoard events through `tensorboardX` when that is installed.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Mapping

log = logging.getLogger("calm_jax")


def _drop_records_after(path: str, step: int) -> None:
    """Rewrites the JSON lines file `path` without the records of steps after `step` (and any
    line that does not parse: the last one of a writer killed mid-line)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            record_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if record_step <= step:
            kept.append(line)
    if len(kept) == len(lines):
        return
    log.info("%s: dropped %d records after step %d, where this run resumes", path,
             len(lines) - len(kept), step)
    with open(path + ".tmp", "w") as f:
        f.write("".join(line + "\n" for line in kept))
    os.replace(path + ".tmp", path)


class _JsonlWriter:
    def __init__(self, path: str, resume_step: int | None = None):
        if resume_step is not None:
            _drop_records_after(path, resume_step)
        self._file = open(path, "a")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        # Strict JSON, which has no NaN or infinity: a non-finite value is written as null.
        record = {k: float(v) if math.isfinite(float(v)) else None for k, v in scalars.items()}
        self._file.write(json.dumps({"step": int(step), **record}, allow_nan=False) + "\n")
        self._file.flush()

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class _FallbackWriter:
    """Logging (+ tensorboardX events if available), for machines without TensorFlow."""

    def __init__(self, model_dir: str, why: str):
        self._tb = None
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(model_dir)
        except ImportError:
            log.info("no TensorBoard writer (clu: %s; no tensorboardX): metrics go to the log "
                     "and metrics.jsonl", why)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, float(v), step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class MetricWriter:
    """Writes scalars to every sink; only process 0 writes files (others log nothing).

    `resume_step`: the step a run resumes from (0: from scratch); the records metrics.jsonl
    holds for later steps are dropped first. None: append to what is there.
    """

    def __init__(self, model_dir: str, *, is_chief: bool = True, resume_step: int | None = None):
        self._sinks: list[Any] = []
        if not is_chief:
            return
        os.makedirs(model_dir, exist_ok=True)
        try:
            from clu import metric_writers
            self._sinks.append(metric_writers.create_default_writer(model_dir))
        except Exception as e:  # noqa: BLE001 (not only ImportError: a broken TensorFlow
            # or protobuf install fails in other ways, and metrics must not end the run)
            if not isinstance(e, ImportError):
                log.warning("clu's metric writer failed (%s: %s); using the fallback writer",
                            type(e).__name__, e)
            self._sinks.append(_FallbackWriter(model_dir, why=f"{type(e).__name__}: {e}"))
        self._sinks.append(_JsonlWriter(os.path.join(model_dir, "metrics.jsonl"), resume_step))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if "step" in scalars:
            raise ValueError(f"metrics: expected scalar names other than 'step' (metrics.jsonl "
                             f"keeps the step under that name), got {sorted(scalars)}")
        for sink in self._sinks:
            sink.write_scalars(step, scalars)

    def flush(self) -> None:
        for sink in self._sinks:
            sink.flush()

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()
