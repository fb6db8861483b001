"""Experiment pipelines: named stages run in order, each skipped when its output exists.

An experiment (the key-value one, translation, ...) is a list of `Stage`s: convert, pretrain,
finetune, compose, baselines, evaluate, report. `Pipeline.run()` runs them in order in
`run_dir` and returns {stage name: `StageResult`}.

* **Skip if done.** A finished stage's result is recorded in `run_dir/pipeline.json` (written
  whole to a temporary file and renamed into place, so a kill leaves the previous record). A
  second run reads a recorded stage's result instead of running it again; a stage killed midway
  is run again (a training stage resumes from its own checkpoints). `force=("name", ...)` runs
  recorded stages again.
* **Own-skill checks with retry.** A stage with a `SkillCheck` is measured right after it runs;
  below `min_score` it runs again in a new directory (`name_attempt2`, ...) with its seed moved
  by `seed_stride`, up to `attempts` runs. The first run that passes is chosen, else the best.
* **Progress.** A line per stage as it starts and ends: its place, kind, time, and the time the
  whole pipeline still needs, estimated from the stages' `cost`s (any unit, e.g. training
  steps) and the seconds per unit of cost measured so far.

A stage's function takes a `StageRun` (its directory and seed offset, and the results of the
stages before it) and returns a JSON-serialisable dict.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from typing import Any, Callable, Iterable, Mapping

log = logging.getLogger("calm_jax")

KINDS = ("convert", "pretrain", "finetune", "compose", "baselines", "evaluate", "report")
RECORD_FILE = "pipeline.json"


@dataclasses.dataclass(frozen=True)
class SkillCheck:
    """`measure(run, result) -> score` (a percentage) taken right after a stage runs; below
    `min_score` the stage runs again with its seed moved by `seed_stride`, `attempts` runs in
    all."""

    measure: Callable[[StageRun, dict], float]
    min_score: float
    attempts: int = 1
    seed_stride: int = 1000

    def __post_init__(self):
        if not isinstance(self.attempts, int) or isinstance(self.attempts, bool) \
                or self.attempts < 1:
            raise ValueError(f"SkillCheck.attempts: expected an integer >= 1, "
                             f"got {self.attempts!r}")
        if isinstance(self.min_score, bool) or not isinstance(self.min_score, (int, float)):
            raise ValueError(f"SkillCheck.min_score: expected a number, got {self.min_score!r}")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of an experiment. `fn(run: StageRun) -> dict` (JSON-serialisable)."""

    name: str
    kind: str
    fn: Callable[[StageRun], dict]
    cost: float = 1.0
    check: SkillCheck | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or os.sep in self.name:
            raise ValueError(f"Stage.name: expected a non-empty name without {os.sep!r}, "
                             f"got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"Stage.kind: expected one of {KINDS}, got {self.kind!r} "
                             f"(stage {self.name!r})")
        if isinstance(self.cost, bool) or not isinstance(self.cost, (int, float)) \
                or self.cost < 0:
            raise ValueError(f"Stage.cost: expected a number >= 0, got {self.cost!r} "
                             f"(stage {self.name!r})")


@dataclasses.dataclass(frozen=True)
class StageRun:
    """What a stage's function gets: where to write, which attempt, what came before."""

    name: str          # the stage's name
    directory: str     # its own directory: run_dir/name, or run_dir/name_attemptK
    attempt: int       # 0 for the first run
    seed_offset: int   # attempt * check.seed_stride
    results: Mapping[str, StageResult]  # the stages before it


@dataclasses.dataclass(frozen=True)
class StageResult:
    """A finished stage: its chosen run's directory name and result, every attempt's
    {'directory', 'seed_offset', 'score', 'seconds'}, the seconds it took in all (as
    recorded when it ran), and whether this run skipped it."""

    chosen: str
    result: dict
    attempts: list[dict]
    seconds: float
    skipped: bool = False

    def to_json(self) -> dict:
        return {"chosen": self.chosen, "result": self.result, "attempts": self.attempts,
                "seconds": self.seconds}


def write_json(path: str, obj: Any) -> None:
    """Writes `obj` as JSON to `path` atomically (a temporary sibling renamed into place)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Pipeline:
    """Runs `stages` in order in `run_dir`; see the module docstring."""

    def __init__(self, run_dir: str, stages: Iterable[Stage]):
        self.run_dir = os.path.abspath(run_dir)
        self.stages = list(stages)
        names = [s.name for s in self.stages]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"stages: expected unique names, got {repeated} more than once")
        if not self.stages:
            raise ValueError("stages: expected at least one stage, got none")

    @property
    def record_path(self) -> str:
        return os.path.join(self.run_dir, RECORD_FILE)

    def recorded(self) -> dict[str, dict]:
        """The finished stages' records in `run_dir` ({} before the first)."""
        if not os.path.exists(self.record_path):
            return {}
        try:
            with open(self.record_path) as f:
                record = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.record_path}: expected the pipeline's JSON record of "
                             f"finished stages, got an unreadable file ({e}); remove it to "
                             f"run every stage again") from None
        return record.get("stages", {})

    def run(self, force: Iterable[str] = ()) -> dict[str, StageResult]:
        force = set(force)
        unknown = sorted(force - {s.name for s in self.stages})
        if unknown:
            raise ValueError(f"force: expected stage names of {[s.name for s in self.stages]}, "
                             f"got {unknown}")
        os.makedirs(self.run_dir, exist_ok=True)
        record = self.recorded()
        results: dict[str, StageResult] = {}
        todo = [s for s in self.stages if s.name not in record or s.name in force]
        remaining_cost = sum(s.cost for s in todo)
        spent_cost, spent_seconds, t0 = 0.0, 0.0, time.time()
        for index, stage in enumerate(self.stages, 1):
            where = f"[{index}/{len(self.stages)}] {stage.name} ({stage.kind})"
            if stage not in todo:
                r = record[stage.name]
                results[stage.name] = StageResult(r["chosen"], r["result"], r["attempts"],
                                                  r["seconds"], skipped=True)
                log.info("%s: done before, skipped", where)
                continue
            eta = (f", pipeline ETA {_hms(spent_seconds / spent_cost * remaining_cost)}"
                   if spent_cost > 0 else "")
            log.info("%s: starting (elapsed %s%s)", where, _hms(time.time() - t0), eta)
            start = time.time()
            results[stage.name] = self._run_stage(stage, results)
            seconds = time.time() - start
            spent_cost += stage.cost
            spent_seconds += seconds
            remaining_cost -= stage.cost
            left = (f", pipeline ETA {_hms(spent_seconds / spent_cost * remaining_cost)}"
                    if spent_cost > 0 else "")
            log.info("%s: done in %s (elapsed %s%s)", where, _hms(seconds),
                     _hms(time.time() - t0), left)
            record[stage.name] = results[stage.name].to_json()
            write_json(self.record_path, {"stages": record})
        return results

    def _run_stage(self, stage: Stage, before: Mapping[str, StageResult]) -> StageResult:
        check = stage.check
        attempts, outputs = [], {}
        start = time.time()
        for k in range(check.attempts if check else 1):
            directory = stage.name if k == 0 else f"{stage.name}_attempt{k + 1}"
            offset = k * check.seed_stride if check else 0
            run = StageRun(stage.name, os.path.join(self.run_dir, directory), k, offset,
                           dict(before))
            os.makedirs(run.directory, exist_ok=True)
            t = time.time()
            outputs[directory] = stage.fn(run)
            seconds = round(time.time() - t, 1)
            score = None if check is None else float(check.measure(run, outputs[directory]))
            attempts.append({"directory": directory, "seed_offset": offset, "score": score,
                             "seconds": seconds})
            if check is None:
                break
            if score >= check.min_score:
                log.info("%s: check score %.1f, at least %g", directory, score,
                         check.min_score)
                break
            left = check.attempts - k - 1
            log.warning("%s: check score %.1f, below %g; %s", directory, score,
                        check.min_score, f"running it again with seed offset "
                        f"{offset + check.seed_stride}" if left
                        else "no attempts left, going on with the best one")
        last = attempts[-1]
        passed = check is None or last["score"] >= check.min_score
        chosen = last if passed else max(attempts, key=lambda a: a["score"])
        return StageResult(chosen["directory"], outputs[chosen["directory"]], attempts,
                           round(time.time() - start, 1))


def read_losses(metrics_path: str) -> tuple[list[int], list[float]]:
    """(steps, training losses) logged in a run's `metrics.jsonl` (a non-finite loss, written
    as null, is NaN); empty lists when the file is missing."""
    steps, losses = [], []
    if not os.path.exists(metrics_path):
        return steps, losses
    with open(metrics_path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if "loss" in row and "step" in row:
                steps.append(int(row["step"]))
                losses.append(float("nan") if row["loss"] is None else float(row["loss"]))
    return steps, losses


def plot_summary(path: str, *, curves: Mapping[str, str],
                 bars: Mapping[str, Mapping[str, float]], score_label: str = "score",
                 title: str = "") -> None:
    """Writes one PNG: the training curves on the left (loss by step from each
    {label: metrics.jsonl path}), and on the right every score of `bars` ({group: {model:
    value}}) as a horizontal bar named on the axis ("group: model") with its value written at
    its end, so no legend covers a bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{group}: {model}", float(value)) for group, scores in bars.items()
            for model, value in scores.items()]
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(14, max(4.5, 0.32 * len(rows) + 1.5)),
        gridspec_kw={"width_ratios": [1, 1.2]})
    for label, metrics_path in curves.items():
        steps, losses = read_losses(metrics_path)
        if steps:
            left.plot(steps, losses, label=label)
    left.set(xlabel="step", ylabel="training loss", title="Training curves")
    if left.lines:
        left.set_yscale("log")
        left.legend(fontsize=8)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups = list(bars)
    ys = list(range(len(rows)))[::-1]
    right.barh(ys, [v for _, v in rows], color=[colours[groups.index(name.split(": ")[0])
                                                        % len(colours)] for name, _ in rows])
    right.set_yticks(ys, [name for name, _ in rows], fontsize=8)
    top = max([v for _, v in rows] + [1e-9])
    for y, (_, v) in zip(ys, rows):
        right.text(v + 0.01 * top, y, f"{v:.1f}", va="center", fontsize=8)
    right.set(xlabel=score_label, xlim=(0, top * 1.12), title="Scores")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
