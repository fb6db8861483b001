"""Faults injected at exact points (hooks, never timing): a run killed inside training, inside a
checkpoint save and inside the export resumes to the same parameters, bit for bit, as a run
never interrupted; damaged checkpoints are reported and skipped, never silently restored;
unfinished exports are written again; a `restore_from` that does not exist is an error.

The kills are real: the run goes on in a child process (`python tests/test_faults.py MODEL_DIR
POINT`), which a patched function ends with `os._exit` at the chosen point.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from calm_jax import checkpoints as ckpt
from calm_jax import trainer
from calm_jax.data import DatasetConfig
from calm_jax.exports import COMPOSITION_FILE, load_composition
from calm_jax.models import TransformerConfig
from calm_jax.optim import OptimizerConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_trainer import LENGTH, _arrays  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLED = 77  # the exit status of a run ended by a hook
NUM_STEPS = 6
CFG = TransformerConfig.tiny(vocab_size=128, embed_dim=16, num_layers=2, num_heads=2,
                             num_kv_heads=2, mlp_dim=32, max_len=32)
DATA = DatasetConfig(arrays_fn=_arrays, batch_size=8, length=LENGTH)
CHECKPOINTS = ckpt.CheckpointConfig(save_every=2, keep=3, use_async=False)


def _pretrain(model_dir, **kw):
    args = dict(mode="pretrain", model_dir=str(model_dir), num_steps=NUM_STEPS,
                anchor=trainer.ModelSpec(config=CFG), dataset=DATA, log_every=1,
                checkpoint=CHECKPOINTS,
                optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=0))
    args.update(kw)
    return trainer.train(**args)


def _steps(model_dir):
    """The steps saved in the run's checkpoints/ (finished step directories)."""
    directory = os.path.join(model_dir, "checkpoints")
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _exported(model_dir):
    return ckpt.load_model(os.path.join(model_dir, "export"))[1]


def _assert_bit_identical(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def _metric_steps(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: checkpoints 2, 4, 6 and its export."""
    model_dir = tmp_path_factory.mktemp("faults") / "reference"
    _pretrain(model_dir)
    assert _steps(model_dir) == [2, 4, 6]
    return model_dir


# Kills at chosen points ---------------------------------------------------------------------------

def _install_kill(point: str) -> None:
    """Patches the run in this (child) process to end with `os._exit(KILLED)` at `point`:
    'training' when step 3's metrics are written (step 2's checkpoint is saved, step 4's not);
    'save' when orbax is about to commit step 4 (written in full, not yet renamed into place);
    'export' once the export's parameters are written (before the export is moved into place)."""
    if point == "training":
        from calm_jax import metrics

        write = metrics.MetricWriter.write_scalars

        def write_scalars(self, step, scalars):
            if step == 3:
                os._exit(KILLED)
            write(self, step, scalars)

        metrics.MetricWriter.write_scalars = write_scalars
    elif point == "save":
        from orbax.checkpoint._src.path import atomicity

        finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize_or_die(self, *args, **kw):
            final = str(self.get_final())
            if os.path.basename(os.path.dirname(final)) == "checkpoints" and \
                    os.path.basename(final) == "4":
                os._exit(KILLED)
            return await finalize(self, *args, **kw)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_die
    elif point == "export":
        save_params = ckpt.save_params

        def save_params_then_die(path, params):
            save_params(path, params)
            os._exit(KILLED)

        ckpt.save_params = save_params_then_die
    else:
        raise ValueError(f"point: expected 'training', 'save' or 'export', got {point!r}")


def _killed_run(model_dir, point):
    """Runs `_pretrain(model_dir)` in a child process killed at `point`; returns its output."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(model_dir), point],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == KILLED, out[-3000:]
    return out


def test_killed_in_training_in_a_save_and_in_the_export_ends_as_if_never_killed(
        tmp_path, reference):
    model_dir = tmp_path / "killed"
    _killed_run(model_dir, "training")
    assert _steps(model_dir) == [2]
    out = _killed_run(model_dir, "save")  # resumes from 2, dies committing step 4
    assert "restored step 2" in out
    assert _steps(model_dir) == [2]
    out = _killed_run(model_dir, "export")  # resumes from 2 again, dies in the export
    assert "restored step 2" in out
    assert _steps(model_dir) == [2, 4, 6]
    assert not os.path.exists(model_dir / "export")
    assert os.path.isdir(model_dir / "export.partial")
    with pytest.raises(ValueError, match=r"holds an unfinished export: the run that wrote it "
                                         r"stopped while exporting"):
        ckpt.load_model(str(model_dir / "export"))

    result = _pretrain(model_dir)  # restores step 6 and writes the export
    assert int(result["state"]["step"]) == NUM_STEPS and not result["history"]
    assert not os.path.exists(model_dir / "export.partial")
    # The step-4 save killed before its commit left a temporary directory: cleaned up.
    assert sorted(os.listdir(model_dir / "checkpoints")) == ["2", "4", "6"]
    _assert_bit_identical(_exported(model_dir), _exported(reference))
    # Each step's metrics once, as in the uninterrupted run, whatever was run again.
    assert _metric_steps(model_dir) == _metric_steps(reference) == list(range(1, 7))


# Unfinished exports (the repros, without a kill) ----------------------------------------

def test_a_pretrain_export_without_params_is_written_again(tmp_path, reference):
    model_dir = tmp_path / "run"
    shutil.copytree(reference, model_dir)
    shutil.rmtree(model_dir / "export" / "params")
    with pytest.raises(ValueError, match=r"incomplete export: no params/"):
        ckpt.load_model(str(model_dir / "export"))
    _pretrain(model_dir)
    _assert_bit_identical(_exported(model_dir), _exported(reference))


def test_a_compose_export_without_composition_json_is_written_again(tmp_path, reference):
    model_dir = tmp_path / "calm"
    export = str(reference / "export")
    args = dict(mode="compose", augments={"kv": trainer.ModelSpec(checkpoint=export)},
                anchor=trainer.ModelSpec(checkpoint=export), num_steps=2)
    _pretrain(model_dir, **args)
    model, first = load_composition(str(model_dir / "export"))
    os.remove(model_dir / "export" / COMPOSITION_FILE)
    with pytest.raises(ValueError, match=r"it holds an unfinished export"):
        load_composition(str(model_dir / "export"))
    _pretrain(model_dir, **args)
    _, again = load_composition(str(model_dir / "export"))
    _assert_bit_identical(again, first)


# Damaged checkpoints ------------------------------------------------------------------------------

def _flip_bits(step_dir):
    """Flips 16 bits in the middle of each data file of a step's state (whichever the reader
    reads: they are laid out differently by orbax versions); returns the state's directory."""
    for path in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
        data = bytearray(open(path, "rb").read())
        for i in range(16):
            data[len(data) // 2 + 3 * i] ^= 1 << (i % 8)
        open(path, "wb").write(bytes(data))
    return os.path.join(step_dir, "state")


def _delete_data(step_dir):
    """Deletes the data files of a step's state; returns the state's directory."""
    for path in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
        os.remove(path)
    return os.path.join(step_dir, "state")


def _swap_states(step_dir, other_dir):
    """Swaps two steps' states: each is intact, only its checksum tells it is not its step's."""
    a, b = os.path.join(step_dir, "state"), os.path.join(other_dir, "state")
    os.replace(a, a + ".x")
    os.replace(b, a)
    os.replace(a + ".x", b)
    return a


def _remove(name):
    def damage(step_dir):
        os.remove(os.path.join(step_dir, *name.split("/")))
        return os.path.join(step_dir, *name.split("/"))
    return damage


def _empty_meta(step_dir):
    path = os.path.join(step_dir, "meta", "metadata")
    open(path, "w").close()
    return path


@pytest.mark.parametrize("damage", [
    _flip_bits, _delete_data, lambda d: _swap_states(d, os.path.join(os.path.dirname(d), "2")),
    _remove("state/_METADATA"), _remove("state/manifest.ocdbt"), _empty_meta,
], ids=["flipped_bits", "deleted_data", "swapped_states", "no_METADATA", "no_manifest",
        "empty_meta"])
def test_a_damaged_latest_step_is_reported_kept_and_the_run_resumes_before_it(
        tmp_path, reference, damage, caplog):
    model_dir = tmp_path / "run"
    shutil.copytree(reference, model_dir)
    shutil.rmtree(model_dir / "export")
    at_fault = damage(str(model_dir / "checkpoints" / "6"))
    with caplog.at_level(logging.WARNING, logger="calm_jax"):
        result = _pretrain(model_dir)
    (report,) = [r.getMessage() for r in caplog.records
                 if "is damaged" in r.getMessage()]
    assert report.startswith(f"checkpoint step 6 in {model_dir / 'checkpoints'} is damaged: "
                             f"{at_fault}")  # the file, or one in the directory
    assert report.endswith("; trying step 4")
    assert "\n" not in report
    assert [s for s, _ in result["history"]] == [5, 6]  # resumed from step 4
    # The damaged step is kept aside for inspection; step 6 was saved again.
    assert os.path.isdir(model_dir / "checkpoints" / "6.damaged")
    assert _steps(model_dir) == [2, 4, 6]
    _assert_bit_identical(_exported(model_dir), _exported(reference))


def test_every_step_damaged_is_an_error_not_a_fresh_start(tmp_path, reference):
    model_dir = tmp_path / "run"
    shutil.copytree(reference, model_dir)
    for step in (2, 4, 6):
        _empty_meta(str(model_dir / "checkpoints" / str(step)))
    with pytest.raises(ValueError, match=(  # checkpoints.DamagedCheckpoint
            r"^checkpoint: no intact step in .*checkpoints \(step 6: .*6/meta/metadata; step 4: "
            r".*; step 2: .*\); refusing to start from scratch")):
        _pretrain(model_dir)
    assert _steps(model_dir) == [2, 4, 6]  # nothing set aside, nothing saved


def test_a_checkpoint_of_other_settings_is_a_mismatch_not_damage(tmp_path, reference):
    model_dir = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", model_dir / "checkpoints")
    with pytest.raises(ValueError, match=(
            r"^checkpoint: step 6 in .* does not match this run's training state; it was saved "
            r"with optimizer.name='adamw' \(this run: 'adafactor'\)\. Resume with the settings "
            r"it was saved with, or use another model_dir\. The stored state: ")):
        _pretrain(model_dir, optimizer=OptimizerConfig(name="adafactor", learning_rate=3e-3,
                                                       warmup_steps=0))
    assert sorted(os.listdir(model_dir / "checkpoints")) == ["2", "4", "6"]  # none set aside


def test_restore_from_that_does_not_exist_is_an_error_before_any_work(tmp_path):
    missing = tmp_path / "missing" / "dir"
    checkpoint = ckpt.CheckpointConfig(restore_from=str(missing), use_async=False)
    with pytest.raises(ValueError, match=(
            rf"^checkpoint.restore_from: expected a directory of training checkpoints \(the "
            rf"checkpoints/ directory of an earlier run\), got '{missing}', which does not "
            rf"exist$")):
        _pretrain(tmp_path / "run", checkpoint=checkpoint)
    assert not os.path.exists(missing) and not os.path.exists(tmp_path / "run")


def test_restore_from_a_run_directory_points_to_its_checkpoints(tmp_path, reference):
    checkpoint = ckpt.CheckpointConfig(restore_from=str(reference), use_async=False)
    with pytest.raises(ValueError, match=r"which holds none \(did you mean '.*reference/"
                                         r"checkpoints'\?\)"):
        _pretrain(tmp_path / "run", checkpoint=checkpoint)
    checkpoint = ckpt.CheckpointConfig(restore_from=str(reference / "checkpoints"),
                                       save_every=2, use_async=False)
    result = _pretrain(tmp_path / "run", checkpoint=checkpoint, num_steps=7)
    assert [s for s, _ in result["history"]] == [7]  # from the reference's step 6


if __name__ == "__main__":  # a child of test_killed_in_training_in_a_save_and_in_the_export...
    logging.basicConfig(level=logging.WARNING, format="%(message)s", force=True)
    logging.getLogger("calm_jax").setLevel(logging.INFO)
    _install_kill(sys.argv[2])
    _pretrain(sys.argv[1])
    sys.exit(0)
