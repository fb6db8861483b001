"""Metric writers: metrics.jsonl records, the clu and TF-free sinks, non-chief processes."""

import json
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax.metrics import MetricWriter


class _Recorder:
    def __init__(self, *args):
        self.args, self.calls = args, []

    @classmethod
    def factory(cls, made):
        def make(*args):
            made.append(cls(*args))
            return made[-1]
        return make

    def write_scalars(self, step, scalars):
        self.calls.append(("write_scalars", step, dict(scalars)))

    def add_scalar(self, name, value, step):
        self.calls.append(("add_scalar", name, value, step))

    def flush(self):
        self.calls.append(("flush",))

    def close(self):
        self.calls.append(("close",))


@pytest.fixture
def no_clu(monkeypatch):
    """Neither clu nor tensorboardX can be imported."""
    for name in ("clu", "clu.metric_writers", "tensorboardX"):
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture
def fake_clu(monkeypatch):
    """A clu whose `create_default_writer` returns a recorder (kept in the returned list)."""
    made = []
    module = types.ModuleType("clu.metric_writers")
    module.create_default_writer = _Recorder.factory(made)
    package = types.ModuleType("clu")
    package.metric_writers = module
    monkeypatch.setitem(sys.modules, "clu", package)
    monkeypatch.setitem(sys.modules, "clu.metric_writers", module)
    return made


def _records(model_dir):
    with open(model_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_one_json_object_per_write_with_int_step_and_float_values(tmp_path, no_clu):
    writer = MetricWriter(str(tmp_path))
    writer.write_scalars(np.int64(3), {"loss": jnp.float32(1.5), "accuracy": np.float64(0.25),
                                       "tokens": 96})
    writer.write_scalars(jnp.int32(4), {"loss": jnp.asarray(0.75)})
    writer.close()
    records = _records(tmp_path)
    assert records == [{"step": 3, "loss": 1.5, "accuracy": 0.25, "tokens": 96.0},
                       {"step": 4, "loss": 0.75}]
    assert all(type(r["step"]) is int for r in records)
    assert all(type(v) is float for r in records for k, v in r.items() if k != "step")


def test_non_finite_values_are_written_as_null_so_every_line_is_strict_json(tmp_path, no_clu):
    writer = MetricWriter(str(tmp_path))
    writer.write_scalars(2, {"loss": jnp.float32(jnp.nan), "grad_norm": np.inf,
                             "lr": -np.inf, "accuracy": 0.5})
    writer.close()
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    strict = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {line}"))
    assert strict == {"step": 2, "loss": None, "grad_norm": None, "lr": None, "accuracy": 0.5}


def test_a_clu_that_fails_otherwise_than_on_import_falls_back_and_says_why(tmp_path, fake_clu,
                                                                          monkeypatch, caplog):
    def broken(*args):
        raise TypeError("Descriptors cannot be created directly")

    monkeypatch.setattr(sys.modules["clu.metric_writers"], "create_default_writer", broken)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with caplog.at_level("INFO", logger="calm_jax"):
        writer = MetricWriter(str(tmp_path))
    writer.write_scalars(1, {"loss": 2.0})
    writer.close()
    assert _records(tmp_path) == [{"step": 1, "loss": 2.0}]
    assert ("clu's metric writer failed (TypeError: Descriptors cannot be created directly); "
            "using the fallback writer") in caplog.text
    assert "(clu: TypeError: Descriptors cannot be created directly; no tensorboardX)" in (
        caplog.text)


def test_records_are_on_disk_before_close(tmp_path, no_clu):
    writer = MetricWriter(str(tmp_path))
    writer.write_scalars(1, {"loss": 2.0})
    assert _records(tmp_path) == [{"step": 1, "loss": 2.0}]
    writer.close()


def test_non_chief_creates_no_directory_and_no_file(tmp_path, fake_clu):
    model_dir = tmp_path / "run"
    writer = MetricWriter(str(model_dir), is_chief=False)
    writer.write_scalars(1, {"loss": 1.0})
    writer.flush()
    writer.close()
    assert not model_dir.exists() and fake_clu == []


def test_without_clu_or_tensorboardx_the_fallback_still_writes_jsonl(tmp_path, no_clu):
    model_dir = tmp_path / "a" / "b"
    writer = MetricWriter(str(model_dir))
    writer.write_scalars(5, {"loss": 1.25})
    writer.flush()
    writer.close()
    assert [p.name for p in model_dir.iterdir()] == ["metrics.jsonl"]
    assert _records(model_dir) == [{"step": 5, "loss": 1.25}]


def test_clu_writer_gets_every_record_flush_and_close(tmp_path, fake_clu):
    writer = MetricWriter(str(tmp_path))
    writer.write_scalars(2, {"loss": 0.5})
    writer.flush()
    writer.close()
    [clu_writer] = fake_clu
    assert clu_writer.args == (str(tmp_path),)
    assert clu_writer.calls == [("write_scalars", 2, {"loss": 0.5}), ("flush",), ("close",)]
    assert _records(tmp_path) == [{"step": 2, "loss": 0.5}]


def test_fallback_writes_tensorboardx_events_when_it_is_installed(tmp_path, monkeypatch, no_clu):
    made = []
    module = types.ModuleType("tensorboardX")
    module.SummaryWriter = _Recorder.factory(made)
    monkeypatch.setitem(sys.modules, "tensorboardX", module)
    writer = MetricWriter(str(tmp_path))
    writer.write_scalars(7, {"loss": jnp.float32(0.5), "lr": 1})
    writer.flush()
    writer.close()
    [tb] = made
    assert tb.args == (str(tmp_path),)
    assert tb.calls == [("add_scalar", "loss", 0.5, 7), ("add_scalar", "lr", 1.0, 7), ("flush",),
                        ("close",)]
    assert all(type(c[2]) is float for c in tb.calls[:2])
    assert _records(tmp_path) == [{"step": 7, "loss": 0.5, "lr": 1.0}]


def test_a_second_writer_appends_to_the_first_runs_records(tmp_path, no_clu):
    for step in (1, 2):
        writer = MetricWriter(str(tmp_path))
        writer.write_scalars(step, {"loss": float(step)})
        writer.close()
    assert _records(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]


def test_a_resumed_writer_drops_the_records_after_its_step(tmp_path, no_clu):
    """A run killed after step 5 that resumes from its step-3 checkpoint runs steps 4 and 5
    again: their first records go (and a line cut short by the kill), so each step appears
    once; records up to step 3 (an evaluation at 3 included) stay as they were."""
    writer = MetricWriter(str(tmp_path))
    for step in range(1, 6):
        writer.write_scalars(step, {"loss": float(step)})
        if step == 3:
            writer.write_scalars(step, {"eval/loss": 9.0})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')
    writer = MetricWriter(str(tmp_path), resume_step=3)
    for step in (4, 5):
        writer.write_scalars(step, {"loss": 10.0 * step})
    writer.close()
    assert _records(tmp_path) == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 3.0},
        {"step": 3, "eval/loss": 9.0}, {"step": 4, "loss": 40.0}, {"step": 5, "loss": 50.0}]
    MetricWriter(str(tmp_path), resume_step=0).close()  # from scratch: nothing kept
    assert _records(tmp_path) == []


def test_close_closes_the_file(tmp_path, no_clu):
    writer = MetricWriter(str(tmp_path))
    writer.write_scalars(1, {"loss": 1.0})
    writer.close()
    with pytest.raises(ValueError, match="closed file"):
        writer.write_scalars(2, {"loss": 2.0})
    assert _records(tmp_path) == [{"step": 1, "loss": 1.0}]


def test_a_scalar_named_step_is_refused(tmp_path, no_clu):
    writer = MetricWriter(str(tmp_path))
    with pytest.raises(ValueError, match=r"metrics: expected scalar names other than 'step' "
                                         r"\(metrics.jsonl keeps the step under that name\), "
                                         r"got \['loss', 'step'\]"):
        writer.write_scalars(3, {"loss": 1.0, "step": 9})
    writer.close()
    assert _records(tmp_path) == []


def test_with_the_data_extra_clu_writes_tensorboard_events(tmp_path):
    """clu's own writer (TensorFlow and tensorboard, the `data` extra) writes event files."""
    pytest.importorskip("clu.metric_writers",
                        reason="clu's TensorBoard writer needs the [data] extra's TensorFlow")
    writer = MetricWriter(str(tmp_path))
    writer.write_scalars(1, {"loss": 0.5})
    writer.close()
    assert [p.name for p in tmp_path.glob("events.out.tfevents.*")]
    assert _records(tmp_path) == [{"step": 1, "loss": 0.5}]
