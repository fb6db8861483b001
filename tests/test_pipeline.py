"""The experiment pipeline: stages in order, skip-if-done, own-skill retries, progress, reports."""

import json
import logging
import os

import pytest

from calm_jax.experiments import pipeline as pl


def _counting_stage(name, calls, kind="pretrain", value=None, cost=1.0, check=None):
    def fn(run):
        calls.append((run.name, os.path.basename(run.directory), run.seed_offset))
        assert os.path.isdir(run.directory)
        return {"value": value if value is not None else len(calls),
                "before": sorted(run.results)}
    return pl.Stage(name, kind, fn, cost=cost, check=check)


def test_stages_run_in_order_and_a_second_run_skips_them(tmp_path):
    calls = []
    stages = [_counting_stage("a", calls), _counting_stage("b", calls, kind="compose"),
              _counting_stage("c", calls, kind="report")]
    first = pl.Pipeline(str(tmp_path), stages).run()
    assert [c[0] for c in calls] == ["a", "b", "c"]
    assert first["c"].result["before"] == ["a", "b"]  # each stage sees the ones before it
    assert not any(r.skipped for r in first.values())
    second = pl.Pipeline(str(tmp_path), stages).run()
    assert len(calls) == 3  # nothing ran again
    assert all(r.skipped for r in second.values())
    assert {k: r.result for k, r in second.items()} == {k: r.result for k, r in first.items()}
    pl.Pipeline(str(tmp_path), stages).run(force=["b"])
    assert [c[0] for c in calls] == ["a", "b", "c", "b"]


def test_a_failed_stage_runs_again_and_the_finished_ones_do_not(tmp_path):
    calls, fail = [], {"b": True}

    def flaky(run):
        calls.append(run.name)
        if fail["b"]:
            raise RuntimeError("killed")
        return {"ok": True}

    stages = [_counting_stage("a", calls), pl.Stage("b", "compose", flaky),
              _counting_stage("c", calls, kind="evaluate")]
    with pytest.raises(RuntimeError, match="killed"):
        pl.Pipeline(str(tmp_path), stages).run()
    record = json.loads((tmp_path / pl.RECORD_FILE).read_text())
    assert sorted(record["stages"]) == ["a"]
    fail["b"] = False
    results = pl.Pipeline(str(tmp_path), stages).run()
    assert [c if isinstance(c, str) else c[0] for c in calls] == ["a", "b", "b", "c"]
    assert results["a"].skipped and not results["b"].skipped


def test_a_stage_below_its_skill_runs_again_with_the_next_seed(tmp_path):
    scores = iter([10.0, 95.0])
    calls = []
    check = pl.SkillCheck(lambda run, result: next(scores), min_score=90.0, attempts=3,
                          seed_stride=1000)
    result = pl.Pipeline(str(tmp_path), [_counting_stage("mB", calls, check=check)]).run()["mB"]
    assert calls == [("mB", "mB", 0), ("mB", "mB_attempt2", 1000)]
    assert result.chosen == "mB_attempt2"  # the first that passes
    assert [(a["directory"], a["seed_offset"], a["score"]) for a in result.attempts] == [
        ("mB", 0, 10.0), ("mB_attempt2", 1000, 95.0)]


def test_when_no_attempt_passes_the_best_one_is_chosen(tmp_path):
    scores = iter([30.0, 50.0, 20.0])
    calls = []
    check = pl.SkillCheck(lambda run, result: next(scores), min_score=90.0, attempts=3)
    result = pl.Pipeline(str(tmp_path), [_counting_stage("mA", calls, check=check)]).run()["mA"]
    assert len(calls) == 3
    assert result.chosen == "mA_attempt2" and result.result["value"] == 2


def test_progress_lines_name_the_stage_and_estimate_the_time_left(tmp_path, caplog):
    calls = []
    stages = [_counting_stage("a", calls, cost=10), _counting_stage("b", calls, cost=30)]
    with caplog.at_level(logging.INFO, logger="calm_jax"):
        pl.Pipeline(str(tmp_path), stages).run()
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("[1/2] a (pretrain): starting") for m in lines)
    # After the first stage (cost 10) the ETA covers the second one (cost 30).
    assert any(m.startswith("[2/2] b (pretrain): starting") and "pipeline ETA" in m
               for m in lines)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="calm_jax"):
        pl.Pipeline(str(tmp_path), stages).run()
    assert [r.getMessage() for r in caplog.records] == [
        "[1/2] a (pretrain): done before, skipped", "[2/2] b (pretrain): done before, skipped"]


def test_bad_pipelines_are_refused_before_anything_runs(tmp_path):
    calls = []
    with pytest.raises(ValueError, match=r"stages: expected unique names, got \['a'\]"):
        pl.Pipeline(str(tmp_path), [_counting_stage("a", calls), _counting_stage("a", calls)])
    with pytest.raises(ValueError, match=r"Stage.kind: expected one of .*got 'train'"):
        pl.Stage("a", "train", lambda run: {})
    with pytest.raises(ValueError, match="Stage.cost: expected a number >= 0, got -1"):
        pl.Stage("a", "pretrain", lambda run: {}, cost=-1)
    with pytest.raises(ValueError, match="SkillCheck.attempts: expected an integer >= 1, got 0"):
        pl.SkillCheck(lambda run, result: 0.0, min_score=1.0, attempts=0)
    with pytest.raises(ValueError, match=r"force: expected stage names of \['a'\], got \['z'\]"):
        pl.Pipeline(str(tmp_path), [_counting_stage("a", calls)]).run(force=["z"])
    (tmp_path / pl.RECORD_FILE).write_text("")
    with pytest.raises(ValueError, match="pipeline.json: expected the pipeline's JSON record"):
        pl.Pipeline(str(tmp_path), [_counting_stage("a", calls)]).run()
    assert calls == []


def test_write_json_leaves_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "results.json")
    pl.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        pl.write_json(path, {"a": object()})
    assert json.loads(open(path).read()) == {"a": 1}
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary left behind


def test_summary_figure_is_a_png_with_curves_and_bars(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": null}\n{"step": 3, "lo')
    assert pl.read_losses(str(metrics))[0] == [1, 2]  # a line cut short by a kill is skipped
    out = tmp_path / "results.png"
    pl.plot_summary(str(out), curves={"mA": str(metrics), "missing": str(tmp_path / "x")},
                    bars={"task": {"mA": 10.0, "CALM": 80.0}, "ablations": {"lora": 0.0}})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
