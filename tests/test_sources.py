"""Streamed text and JSONL sources: rows as the trainer's batches have them, exact resume,
epochs, per-process shards and bad input (no TensorFlow involved)."""

import json

import numpy as np
import pytest

from calm_jax import sources
from calm_jax.data import DatasetConfig, make_source
from tasks import byte_data

LINES = [f"line {i} " + "ab" * (i % 13) for i in range(200)]  # 8 .. 36 bytes


def _text_file(tmp_path, lines=LINES, name="corpus.txt"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def _jsonl_file(tmp_path, records, name="corpus.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _config(path, **kw):
    args = dict(source="text", paths=path, batch_size=4, length=24, block_bytes=256, seed=5)
    args.update(kw)
    return DatasetConfig(**args)


def _texts(batches):
    """The examples' texts, segment by segment (a cut text appears as its pieces)."""
    out = []
    for batch in batches:
        for tokens, segs in zip(batch["decoder_target_tokens"], batch["decoder_segment_ids"]):
            for s in range(1, segs.max() + 1):
                out.append(byte_data.decode_ids([t for t in tokens[segs == s] if t != 1]))
    return out


def _equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_text_rows_are_packed_lines_with_eos_segments_and_positions(tmp_path):
    source = make_source(_config(_text_file(tmp_path), shuffle=False, pack=True))
    batch = source.next_batch()
    assert set(batch) == {"decoder_input_tokens", "decoder_target_tokens",
                          "decoder_loss_weights", "decoder_segment_ids", "decoder_positions"}
    assert all(v.shape == (4, 24) for v in batch.values())
    tokens, inputs = batch["decoder_target_tokens"], batch["decoder_input_tokens"]
    segs, pos = batch["decoder_segment_ids"], batch["decoder_positions"]
    for r in range(4):
        for s in range(1, segs[r].max() + 1):
            where = np.flatnonzero(segs[r] == s)
            seg = tokens[r, where]
            assert seg[-1] == byte_data.EOS_ID and list(pos[r, where]) == list(range(len(seg)))
            assert list(inputs[r, where]) == [0] + list(seg[:-1])  # shifted inside its segment
        np.testing.assert_array_equal(batch["decoder_loss_weights"][r], segs[r] > 0)
    # Unshuffled, the rows hold the file's lines in order, several to a row.
    assert _texts([batch]) == LINES[:len(_texts([batch]))] and segs.max() >= 2


def test_a_line_longer_than_a_row_is_cut_into_row_sized_pieces(tmp_path):
    long = "x" * 30
    source = make_source(_config(_text_file(tmp_path, ["short", long, "tail"]), shuffle=False,
                                 length=12, batch_size=1))
    rows = [source.next_batch() for _ in range(5)]
    assert _texts(rows) == ["short", "x" * 12, "x" * 12, "x" * 6, "tail"]
    # Without packing each piece has a row of its own, padded with segment 0.
    assert [int(r["decoder_segment_ids"].sum()) for r in rows] == [6, 12, 12, 7, 5]


def test_jsonl_prompted_rows_equal_the_byte_tasks_arrays(tmp_path):
    examples = [{"inputs": f"q{i}=", "targets": str(i * 7), "id": i} for i in range(40)]
    path = _jsonl_file(tmp_path, examples)
    config = _config(path, source="jsonl", text_field="targets", inputs_field="inputs",
                     shuffle=False, pack=True, num_epochs=1, length=32, batch_size=2)
    got = list(make_source(config).sequential())
    want = byte_data.to_numpy_arrays(examples, 32, pack=True)
    rows = len(got) * 2
    assert rows >= len(want["decoder_input_tokens"]) - 1
    for k, v in want.items():
        np.testing.assert_array_equal(np.concatenate([b[k] for b in got]), v[:rows], err_msg=k)


@pytest.mark.parametrize("kind, pack, shuffle", [("text", True, True), ("text", False, True),
                                                 ("jsonl", True, False)])
def test_interrupted_and_resumed_equals_uninterrupted_batch_for_batch(tmp_path, kind, pack,
                                                                      shuffle):
    lines = LINES[:80]
    if kind == "text":
        path = _text_file(tmp_path, lines)
        extra = {}
    else:
        path = _jsonl_file(tmp_path, [{"q": line[:5], "a": line[5:]} for line in lines])
        extra = dict(text_field="a", inputs_field="q")
    config = _config(path, source=kind, pack=pack, shuffle=shuffle, length=20, **extra)
    whole = make_source(config)
    want = [whole.next_batch() for _ in range(60)]
    assert whole.get_state()["stream"]["epoch"] >= 1  # past an epoch boundary
    for stop in (0, 1, 7, 23, 41):
        first = make_source(config)
        for _ in range(stop):
            first.next_batch()
        state = json.loads(json.dumps(first.get_state()))
        resumed = make_source(config)
        resumed.set_state(state)
        _equal([resumed.next_batch() for _ in range(60 - stop)], want[stop:])


def test_each_epoch_reads_every_line_once_in_a_new_order(tmp_path):
    config = _config(_text_file(tmp_path), length=48, batch_size=1)
    source = make_source(config)
    epochs = [_texts(source.next_batch() for _ in range(len(LINES))) for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(LINES)
    assert epochs[0] != LINES and epochs[1] != epochs[0]
    again = make_source(config)
    assert _texts(again.next_batch() for _ in range(len(LINES))) == epochs[0]
    other_seed = make_source(_config(_text_file(tmp_path), length=48, batch_size=1, seed=6))
    assert _texts(other_seed.next_batch() for _ in range(len(LINES))) != epochs[0]


def test_processes_read_disjoint_shards_that_cover_the_files(tmp_path):
    paths = [_text_file(tmp_path, LINES[:120], "a.txt"), _text_file(tmp_path, LINES[120:],
                                                                    "b.txt")]
    seen = []
    for p in range(3):
        config = _config(paths, length=48, batch_size=3, num_epochs=1)
        source = make_source(config, process_index=p, process_count=3)
        assert source.local_batch == 1
        seen.append(_texts(source.sequential()))
        shuffled = make_source(config, process_index=p, process_count=3)
        with pytest.raises(sources.DataExhausted, match=r"dataset.num_epochs: the text data "
                                                        r"ran out after \d+ batches"):
            while True:
                shuffled.next_batch()
        assert shuffled.batches == len(seen[-1])
    assert all(seen) and sorted(sum(seen, [])) == sorted(LINES)


def test_sequential_is_unshuffled_from_the_start_and_leaves_the_position(tmp_path):
    source = make_source(_config(_text_file(tmp_path), length=48, batch_size=2))
    source.next_batch()
    state = source.get_state()
    assert _texts(source.sequential(3)) == LINES[:6]
    assert source.get_state() == state


def test_a_tokenizer_directory_is_a_vocabulary(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<pad>", "</s>", "<unk>", "line"] + [str(i) for i in range(200)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    export = tmp_path / "export" / "tokenizer"
    export.mkdir(parents=True)
    tok.save(str(export / "tokenizer.json"))
    (export / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    path = _text_file(tmp_path, [f"line {i}" for i in range(10)])
    config = _config(path, vocabulary=str(tmp_path / "export"), shuffle=False, length=4,
                     batch_size=2)
    batch = make_source(config).next_batch()
    np.testing.assert_array_equal(batch["decoder_target_tokens"], [[3, 4, 1, 0], [3, 5, 1, 0]])


@pytest.mark.parametrize("kind, lines, kw, message", [
    ("jsonl", ['{"text": "a"}', '{"body": "b"}'], {},
     r"dataset.text_field: expected key 'text' in every example, got keys \['body'\] in .*"
     r"corpus.jsonl"),
    ("jsonl", ['{"text": "a"}'], {"inputs_field": "q"},
     r"dataset.inputs_field: expected key 'q' in every example, got keys \['text'\]"),
    ("jsonl", ["not json"], {}, r"dataset.paths: expected one JSON object per line of .*"
                                r"corpus.jsonl, got b'not json'"),
    ("jsonl", ["[1, 2]"], {}, r"dataset.paths: expected one JSON object per line"),
    ("text", ["a"], {"vocabulary": "/no/such/dir"},
     r"dataset.vocabulary: expected 'byte' or a tokenizer directory, got '/no/such/dir'"),
    ("text", ["a"], {"batch_size": 5},
     r"dataset.batch_size: expected a multiple of the 2 processes, got 5"),
    ("text", ["", "  "], {}, r"dataset.paths: process 0 found no examples in its 1 blocks"),
])
def test_bad_input_is_refused_with_the_field_named(tmp_path, kind, lines, kw, message):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    config = _config(str(path), source=kind, **kw)
    with pytest.raises(ValueError, match=message):
        make_source(config, process_index=0, process_count=2 if "batch_size" in kw else 1
                    ).next_batch()


def test_paths_that_match_no_file_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"dataset.paths: expected existing files, got "
                                         r"'.*nothing\*.txt' which matches none"):
        make_source(_config(str(tmp_path / "nothing*.txt")))


def test_text_and_jsonl_sources_need_no_tensorflow(tmp_path):
    import os
    import subprocess
    import sys

    text = _text_file(tmp_path)
    jsonl = _jsonl_file(tmp_path, [{"text": line} for line in LINES])
    child = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "seqio", "tensorflow_datasets", "grain"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from calm_jax.data import DatasetConfig, make_source
for kind, path in (("text", {text!r}), ("jsonl", {jsonl!r})):
    source = make_source(DatasetConfig(source=kind, paths=path, batch_size=2, length=16))
    source.next_batch()
    state = source.get_state()
    source.set_state(state)
print("ok")
"""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", child], cwd=repo, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# Across tokenizers: the augments' own token streams, as alignment.text_examples gives them. ----

WORDS = "the cat sat on a mat and then ran far away from big red dogs".split()


def _word_lines(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(1, 8))) for _ in range(n)]


@pytest.fixture(scope="module")
def bpe_export(tmp_path_factory):
    """A model-export-like directory whose tokenizer/ holds a byte-level BPE trained here."""
    hf = pytest.importorskip("tokenizers", reason="the [convert] extra builds BPE tokenizers")
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    tok.train_from_iterator(_word_lines(200, seed=1), hf.trainers.BpeTrainer(
        vocab_size=300, special_tokens=[], show_progress=False,
        initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet()))
    root = tmp_path_factory.mktemp("bpe_export")
    (root / "tokenizer").mkdir()
    tok.save(str(root / "tokenizer" / "tokenizer.json"))
    return str(root)


def _augmented(path, bpe_export, **kw):
    args = dict(augment_vocabularies={"b": bpe_export, "c": "byte"}, augment_length=20,
                length=32, batch_size=1)
    args.update(kw)
    return _config(path, **args)


@pytest.mark.parametrize("kind, pack", [("text", False), ("text", True), ("jsonl", True)])
def test_augment_streams_equal_text_examples_row_for_row(tmp_path, bpe_export, kind, pack):
    from calm_jax import alignment
    from calm_jax.tokenizers import ByteTokenizer, Tokenizer

    lines = _word_lines()
    path = (_text_file(tmp_path, lines) if kind == "text" else
            _jsonl_file(tmp_path, [{"body": line, "n": i} for i, line in enumerate(lines)]))
    config = _augmented(path, bpe_export, source=kind, pack=pack, shuffle=False, num_epochs=1,
                        **({"text_field": "body"} if kind == "jsonl" else {}))
    batches = list(make_source(config).sequential())
    got = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    want = alignment.text_examples(
        lines, ByteTokenizer(), {"b": Tokenizer.load(bpe_export + "/tokenizer"),
                                 "c": ByteTokenizer()}, length=32, augment_length=20, pack=pack)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # Some texts are cut (the byte augment's 20 positions run out first), and packed rows
    # hold several texts.
    assert (want["augments/c/segment_ids"] > 0).all(axis=1).any()
    rows = len(want["decoder_input_tokens"])
    assert (rows < len(lines) and want["decoder_segment_ids"].max() >= 2 if pack
            else rows == len(lines))


@pytest.mark.parametrize("kind, pack", [("text", True), ("text", False), ("jsonl", True)])
def test_augment_streams_resume_exactly(tmp_path, bpe_export, kind, pack):
    lines = _word_lines(40)
    path = (_text_file(tmp_path, lines) if kind == "text" else
            _jsonl_file(tmp_path, [{"text": line} for line in lines]))
    config = _augmented(path, bpe_export, source=kind, pack=pack, batch_size=2, block_bytes=128)
    whole = make_source(config)
    want = [whole.next_batch() for _ in range(40)]
    assert whole.get_state()["stream"]["epoch"] >= 1  # past an epoch boundary
    pending = 0
    for stop in (0, 3, 11, 26):
        first = make_source(config)
        for _ in range(stop):
            first.next_batch()
        state = json.loads(json.dumps(first.get_state()))
        pending += len(state["pending"])
        resumed = make_source(config)
        resumed.set_state(state)
        _equal([resumed.next_batch() for _ in range(40 - stop)], want[stop:])
    assert pending or not pack  # a packed stream stops with an example read but not placed


@pytest.mark.parametrize("kw, message", [
    (dict(source="numpy", arrays_fn=dict),
     r"dataset.augment_vocabularies: expected None with source='numpy' \(put "
     r"calm_jax.alignment.text_examples' features in arrays_fn\), got \{'b': 'byte'\}"),
    (dict(source="jsonl", inputs_field="q"),
     r"dataset.inputs_field: expected None with augment_vocabularies"),
    (dict(augment_vocabularies={"b": 3}),
     r"dataset.augment_vocabularies: expected \{augmenting model name: 'byte' or a tokenizer "
     r"directory\} or None, got \{'b': 3\}"),
    (dict(augment_length=0), r"dataset.augment_length: expected a positive integer or None, "
                             r"got 0"),
])
def test_augment_vocabularies_bad_config_is_refused(kw, message):
    args = dict(source="text", paths="x.txt", augment_vocabularies={"b": "byte"})
    args.update(kw)
    with pytest.raises(ValueError, match=message):
        DatasetConfig(**args)


def test_a_missing_augment_vocabulary_is_named(tmp_path):
    config = _config(_text_file(tmp_path), augment_vocabularies={"b": "/no/such/dir"})
    with pytest.raises(ValueError, match=r"dataset.augment_vocabularies\['b'\]: expected 'byte' "
                                         r"or a tokenizer directory, got '/no/such/dir'"):
        make_source(config)
