"""The trainer on a streamed text corpus: resume continues the stream exactly where it stopped,
and a corpus far larger than memory's growth trains (peak RSS, measured in subprocesses)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from calm_jax import checkpoints as ckpt
from calm_jax import trainer
from calm_jax.data import DatasetConfig
from calm_jax.models import TransformerConfig
from calm_jax.optim import OptimizerConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = TransformerConfig.tiny(vocab_size=384, embed_dim=32, num_layers=2, num_heads=2,
                             num_kv_heads=2, mlp_dim=64, max_len=32)
FAST = dict(log_every=1, checkpoint=ckpt.CheckpointConfig(save_every=0, use_async=False),
            optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=0))


def _corpus(directory, lines=300):
    rng = np.random.default_rng(0)
    words = ["calm", "anchor", "augment", "layer", "cross", "attention", "token", "stream"]
    path = os.path.join(directory, "corpus.txt")
    with open(path, "w") as fh:
        for _ in range(lines):
            fh.write(" ".join(rng.choice(words, rng.integers(2, 9))) + "\n")
    return path


def _pretrain(model_dir, dataset, **kw):
    return trainer.train(mode="pretrain", model_dir=str(model_dir), num_steps=6,
                         anchor=trainer.ModelSpec(config=CFG), dataset=dataset, **FAST, **kw)


def test_text_run_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    dataset = DatasetConfig(source="text", paths=_corpus(str(tmp_path)), batch_size=8,
                            length=32, pack=True, block_bytes=1024, seed=2)
    full = _pretrain(tmp_path / "full", dataset)
    first = _pretrain(tmp_path / "split", dataset, stop_after=3)
    assert first["stopped_early"]
    stopped = ckpt.Checkpointer(str(tmp_path / "split" / "checkpoints"), FAST["checkpoint"])
    state = stopped.read_meta(3)["data_state"]
    assert [s["source"] for s in state] == ["text"] and state[0]["batches"] == 3
    stopped.close()
    resumed = _pretrain(tmp_path / "split", dataset)
    assert int(resumed["state"]["step"]) == 6
    for a, b in zip(jax.tree.leaves(full["state"]["params"]),
                    jax.tree.leaves(resumed["state"]["params"])):
        np.testing.assert_array_equal(a, b)
    metas = [ckpt.Checkpointer(str(tmp_path / d / "checkpoints"), FAST["checkpoint"])
             for d in ("full", "split")]
    assert metas[0].read_meta(6)["data_state"] == metas[1].read_meta(6)["data_state"]
    for m in metas:
        m.close()


_RSS_CHILD = """
import json, resource, sys
from calm_jax import checkpoints as ckpt, trainer
from calm_jax.data import DatasetConfig
from calm_jax.models import TransformerConfig
cfg = TransformerConfig.tiny(vocab_size=384, embed_dim=32, num_layers=2, num_heads=2,
                             num_kv_heads=2, mlp_dim=64, max_len=64)
peaks = []
for path, model_dir in zip(sys.argv[1::2], sys.argv[2::2]):
    dataset = DatasetConfig(source="text", paths=path, batch_size=8, length=64, pack=True)
    result = trainer.train(mode="pretrain", model_dir=model_dir, num_steps=4,
                           anchor=trainer.ModelSpec(config=cfg), dataset=dataset, log_every=1,
                           checkpoint=ckpt.CheckpointConfig(save_every=0, use_async=False))
    assert int(result["state"]["step"]) == 4
    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print(json.dumps(peaks))
"""


def test_a_300_mb_corpus_trains_without_growing_memory_like_the_corpus(tmp_path):
    big = tmp_path / "big.txt"
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", np.uint8)
    chunk = letters[rng.integers(0, len(letters), 4 << 20)].copy()
    chunk[rng.integers(0, len(chunk), len(chunk) // 60)] = ord("\n")  # lines of ~60 bytes
    chunk = chunk.tobytes()
    with open(big, "wb") as fh:
        while fh.tell() < 300 << 20:
            fh.write(chunk)
    small = tmp_path / "small.txt"
    small.write_bytes(chunk[:1 << 20])
    size = os.path.getsize(big)
    # One fresh process (so this one's history does not count) trains the same tiny model on
    # a 1 MiB file, then on the 300 MiB file; peak RSS after each.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    try:
        out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(small),
                              str(tmp_path / "run_small"), str(big), str(tmp_path / "run_big")],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        big.unlink()
    assert out.returncode == 0, out.stderr[-3000:]
    base, peak = json.loads(out.stdout.strip().splitlines()[-1])
    # What the big corpus adds to the peak is a small fraction of the corpus (one block of
    # dataset.block_bytes = 1 MiB is read at a time); reading the file whole would add more
    # than the corpus.
    assert size >= 300 << 20
    assert peak - base < size / 10, (peak, base, size)


def test_the_text_gin_file_trains_from_the_command_line(tmp_path):
    from calm_jax import train as train_cli

    corpus = _corpus(str(tmp_path))
    result = train_cli.run(["--gin_file=experiments/pretrain_text.gin",
                            f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--gin.NUM_STEPS=2",
                            f"--gin.TRAIN_FILES=['{corpus}']", "--gin.BATCH_SIZE=8",
                            "--gin.LENGTH=32", "--gin.trainer.train.log_every=1"])
    assert int(result["state"]["step"]) == 2
    assert result["history"][0][1]["loss"] > 0


_PROCESS_CHILD = """
import json, sys
from calm_jax import data as data_lib, distributed
from calm_jax.data import DatasetConfig
port, index, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
distributed.initialize(f"localhost:{port}", 2, index)
dataset = DatasetConfig(source="text", paths=path, batch_size=4, length=16, block_bytes=256)
source = data_lib.make_source(dataset)
for _ in range(3 + 2 * index):  # the processes stand at different places in their shards
    source.next_batch()
meta = data_lib.checkpoint_meta(source)
resumed = data_lib.make_source(dataset)
data_lib.restore_state(resumed, meta)
print(json.dumps({"mine": source.get_state(), "meta": meta, "resumed": resumed.get_state(),
                  "next_equal": all((a == b).all() for a, b in zip(
                      source.next_batch().values(), resumed.next_batch().values()))}))
"""


def test_every_process_stores_and_gets_back_its_own_position(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    corpus = _corpus(str(tmp_path))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    children = [subprocess.Popen([sys.executable, "-c", _PROCESS_CHILD, str(port), str(i),
                                  corpus], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [c.communicate(timeout=300) for c in children]
    assert [c.returncode for c in children] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    mine = [r["mine"] for r in results]
    assert mine[0] != mine[1] and [m["batches"] for m in mine] == [3, 5]
    for r in results:
        assert r["meta"] == {"data_state": mine}
    assert [r["resumed"] for r in results] == mine
    assert all(r["next_equal"] for r in results)
