"""Streamed sources: examples -> tokens -> packed rows -> batches, with a JSON-able position.

Plain Python + numpy: text and JSONL files stream from here without TensorFlow, and the TFDS
source of `calm_jax.input_pipeline` (and its seqio source across tokenizers) reuses the
tokenizing, packing and batching (`example_maker`, `config_source`).

* An example is `(tokens, prompt)`: token ids (EOS appended) and how many of them are the
  prompt (0 for plain text; loss on the rest).
* `Packer` lays examples into rows of `length` positions the way `tasks.byte_data` does:
  targets are the tokens, inputs the tokens shifted right inside their segment with 0 (PAD, t5x's
  BOS) first, segment ids 1, 2, ... per example (0 on padding), positions restarting at 0.
  A text longer than a row is cut into row-sized pieces, each its own segment; a prompted
  example longer than a row is dropped (with a warning), since cutting would lose its target.
  With `pack=False` each example (piece) has a row of its own.
* `FileExamples` reads lines of files in blocks of `block_bytes`: each process owns every
  `process_count`-th block of each file, and each epoch visits its blocks in a seeded order and
  the lines of a block in a seeded order. Only one block is held in memory. Its position is
  (epoch, block, examples taken from the block), which is all that a resume needs: the block is
  read again and permuted the same way.
* `BatchSource` stacks `batch_size / process_count` rows per call; its state is the example
  stream's position plus the packer's pending pieces (examples read but not yet placed).

Across tokenizers (`DatasetConfig.augment_vocabularies`: {augment name: vocabulary}), each text
becomes an `AlignedExample`: the features `calm_jax.alignment.text_examples` gives for that text
alone (the anchor's tokens and `decoder_byte_ends`, every augment's own tokens and byte ends,
cut to fit a row by its rule), and `AlignedPacker` lays them into rows as `text_examples` does
(`pack`: greedily, while the anchor row and every augment row have room), so a streamed row
equals `text_examples`' row for the same texts. Its pending examples are stored as their texts.
The two packers share their row-filling loop (`_RowFiller`).
"""

from __future__ import annotations

import glob
import logging
import math
import os
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Protocol

import numpy as np

from calm_jax import alignment
from calm_jax.data import check_state_kind, json_object, processes

log = logging.getLogger(__name__)

Example = tuple[list[int], int]  # (token ids, prompt length)


class DataExhausted(RuntimeError):
    """A stream with `dataset.num_epochs` set has no more batches."""


class Vocabulary(Protocol):
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...


def load_vocabulary(spec: str, field: str = "dataset.vocabulary") -> Vocabulary:
    """"byte" (`ByteTokenizer`) or a tokenizer directory: `Tokenizer.save`'s, a Hugging Face
    model's, or a model export holding one in `tokenizer/` (`field` names it in errors)."""
    from calm_jax import tokenizers

    if spec == "byte":
        return tokenizers.ByteTokenizer()
    if not isinstance(spec, str) or not os.path.isdir(spec):
        raise ValueError(f"{field}: expected 'byte' or a tokenizer directory, got {spec!r}")
    nested = os.path.join(spec, "tokenizer")
    return tokenizers.Tokenizer.load(nested if os.path.isdir(nested) else spec)


class ExampleMaker:
    """Text or {field: text} -> `Example`, tokenized with `vocabulary` (EOS appended)."""

    def __init__(self, vocabulary: Vocabulary, *, text_field: str = "text",
                 inputs_field: str | None = None, add_eos: bool = True):
        if add_eos and vocabulary.eos_id is None:
            raise ValueError("dataset.add_eos: expected False, the vocabulary has no EOS token")
        self.vocabulary, self.text_field, self.inputs_field = vocabulary, text_field, inputs_field
        self.eos = [vocabulary.eos_id] if add_eos else []

    def from_text(self, text: str) -> Example | None:
        tokens = self.vocabulary.encode(text)
        return (tokens + self.eos, 0) if tokens else None

    def from_dict(self, record: Mapping[str, Any], where: str) -> Example | None:
        fields = [self.text_field] + ([self.inputs_field] if self.inputs_field else [])
        for field in fields:
            if field not in record:
                name = "text_field" if field == self.text_field else "inputs_field"
                raise ValueError(f"dataset.{name}: expected key {field!r} in every example, got "
                                 f"keys {sorted(record)} in {where}")
        text = _as_text(record[self.text_field])
        if self.inputs_field is None:
            return self.from_text(text)
        prompt = self.vocabulary.encode(_as_text(record[self.inputs_field]))
        return prompt + self.vocabulary.encode(text) + self.eos, len(prompt)


def _as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _as_text(value.item())
    return str(value)


class _RowFiller:
    """The loop both packers share: a row takes pending examples in order, pulling more when
    none is pending, one to a row without `pack`, else while `_fits` and until `_full`."""

    pack: bool
    pending: list[Any]

    def _pieces(self, example: Any) -> list[Any]:
        return [example]

    def _fits(self, placed: list[Any], example: Any) -> bool:
        raise NotImplementedError

    def _full(self, placed: list[Any]) -> bool:
        raise NotImplementedError

    def _row(self, placed: list[Any]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def next_row(self, pull: Callable[[], Any]) -> dict[str, np.ndarray]:
        """The next row, pulling examples with `pull()` (None: a record that makes no
        example; StopIteration ends the data, and a partly filled row is still returned)."""
        placed: list[Any] = []
        while True:
            if not self.pending:
                try:
                    example = pull()
                except StopIteration:
                    if placed:
                        break
                    raise
                if example is not None:
                    self.pending = self._pieces(example)
                continue
            if placed and (not self.pack or not self._fits(placed, self.pending[0])):
                break
            placed.append(self.pending.pop(0))
            if not self.pack or self._full(placed):
                break
        return self._row(placed)


class Packer(_RowFiller):
    """Examples -> rows of `length` positions (see the module docstring)."""

    def __init__(self, length: int, *, pack: bool, prompts: bool):
        self.length, self.pack, self.prompts = length, pack, prompts
        self.pending: list[Example] = []  # pieces read but not yet placed, in order
        self.dropped = 0

    def _pieces(self, example: Example) -> list[Example]:
        tokens, prompt = example
        if len(tokens) <= self.length:
            return [(list(tokens), prompt)]
        if prompt:
            self.dropped += 1
            log.warning("dropped an example of %d tokens (a prompt of %d): longer than "
                        "dataset.length=%d (%d dropped so far)", len(tokens), prompt,
                        self.length, self.dropped)
            return []
        return [(list(tokens[i:i + self.length]), 0)
                for i in range(0, len(tokens), self.length)]

    def _fits(self, placed: list[Example], example: Example) -> bool:
        return sum(len(tokens) for tokens, _ in placed + [example]) <= self.length

    def _full(self, placed: list[Example]) -> bool:
        return sum(len(tokens) for tokens, _ in placed) == self.length

    def _row(self, placed: list[Example]) -> dict[str, np.ndarray]:
        n = self.length
        row = {"decoder_input_tokens": np.zeros(n, np.int32),
               "decoder_target_tokens": np.zeros(n, np.int32),
               "decoder_loss_weights": np.zeros(n, np.float32),
               "decoder_segment_ids": np.zeros(n, np.int32),
               "decoder_positions": np.zeros(n, np.int32)}
        if self.prompts:
            row["prompt_mask"] = np.zeros(n, bool)
        start = 0
        for segment, (tokens, prompt) in enumerate(placed, 1):
            end = start + len(tokens)
            row["decoder_target_tokens"][start:end] = tokens
            row["decoder_input_tokens"][start + 1:end] = tokens[:-1]
            row["decoder_loss_weights"][start + prompt:end] = 1.0
            row["decoder_segment_ids"][start:end] = segment
            row["decoder_positions"][start:end] = np.arange(len(tokens))
            if self.prompts:
                row["prompt_mask"][start:start + prompt + 1] = True
            start = end
        return row

    def get_state(self) -> list[list[Any]]:
        return [[list(map(int, tokens)), int(prompt)] for tokens, prompt in self.pending]

    def set_state(self, pending: list[list[Any]]) -> None:
        self.pending = [(list(map(int, tokens)), int(prompt)) for tokens, prompt in pending]


class AlignedExample(NamedTuple):
    """One text of a composition across tokenizers: the text and its unpadded features
    (the anchor's [k] `decoder_*` arrays and every augment's [m] tokens and byte ends)."""

    text: str
    features: dict[str, np.ndarray]


_ANCHOR_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                    "decoder_byte_ends")


class AlignedExampleMaker:
    """Text or {field: text} -> `AlignedExample`, with the anchor's vocabulary and each
    augment's own (`alignment.text_examples` of the text alone, cut to fit `length` anchor
    and `augment_length` augment positions)."""

    def __init__(self, vocabulary: Vocabulary, augments: Mapping[str, Vocabulary], *,
                 length: int, augment_length: int, text_field: str = "text",
                 add_eos: bool = True):
        if add_eos and vocabulary.eos_id is None:
            raise ValueError("dataset.add_eos: expected False, the vocabulary has no EOS token")
        self.vocabulary, self.augments = vocabulary, dict(augments)
        self.names = sorted(self.augments)
        self.length, self.augment_length = length, augment_length
        self.text_field, self.add_eos = text_field, add_eos

    def from_text(self, text: str) -> AlignedExample | None:
        if not text:
            return None
        f = alignment.text_examples([text], self.vocabulary, self.augments, length=self.length,
                                    augment_length=self.augment_length, pack=True,
                                    add_eos=self.add_eos)
        k = int((f["decoder_segment_ids"][0] > 0).sum())
        out = {name: f[name][0, :k] for name in _ANCHOR_FEATURES}
        for name in self.names:
            m = int((f[alignment.feature_name(name, "segment_ids")][0] > 0).sum())
            for feature in ("tokens", "byte_ends"):
                key = alignment.feature_name(name, feature)
                out[key] = f[key][0, :m]
        return AlignedExample(text, out)

    def from_dict(self, record: Mapping[str, Any], where: str) -> AlignedExample | None:
        if self.text_field not in record:
            raise ValueError(f"dataset.text_field: expected key {self.text_field!r} in every "
                             f"example, got keys {sorted(record)} in {where}")
        return self.from_text(_as_text(record[self.text_field]))


class AlignedPacker(_RowFiller):
    """`AlignedExample`s -> rows equal to `alignment.text_examples`' rows of the same texts:
    [length] anchor features and [augment_length] `augments/{name}/...` features; with `pack`
    each row takes whole examples while the anchor row and every augment row have room (and
    `decoder_segment_ids` / `decoder_positions`), else one example per row."""

    def __init__(self, maker: AlignedExampleMaker, *, pack: bool):
        self.maker, self.pack = maker, pack
        self.pending: list[AlignedExample] = []  # read but not yet placed (at most one)

    def _fits(self, placed: list[AlignedExample], example: AlignedExample) -> bool:
        def used(key: str) -> int:
            return sum(len(e.features[key]) for e in placed + [example])

        return used("decoder_input_tokens") <= self.maker.length and all(
            used(alignment.feature_name(n, "tokens")) <= self.maker.augment_length
            for n in self.maker.names)

    def _full(self, placed: list[AlignedExample]) -> bool:
        return sum(len(e.features["decoder_input_tokens"]) for e in placed) == self.maker.length

    def _row(self, placed: list[AlignedExample]) -> dict[str, np.ndarray]:
        n, m = self.maker.length, self.maker.augment_length
        row = {"decoder_input_tokens": np.zeros(n, np.int32),
               "decoder_target_tokens": np.zeros(n, np.int32),
               "decoder_loss_weights": np.zeros(n, np.float32),
               "decoder_byte_ends": np.zeros(n, np.int32)}
        if self.pack:
            row["decoder_segment_ids"] = np.zeros(n, np.int32)
            row["decoder_positions"] = np.zeros(n, np.int32)
        for name in self.maker.names:
            for feature in alignment.AUGMENT_FEATURES:
                row[alignment.feature_name(name, feature)] = np.zeros(m, np.int32)
        at = dict.fromkeys(["anchor", *self.maker.names], 0)
        for segment, example in enumerate(placed, 1):
            f = example.features
            k = len(f["decoder_input_tokens"])
            where = slice(at["anchor"], at["anchor"] + k)
            for key in _ANCHOR_FEATURES:
                row[key][where] = f[key]
            if self.pack:
                row["decoder_segment_ids"][where] = segment
                row["decoder_positions"][where] = np.arange(k)
            at["anchor"] += k
            for name in self.maker.names:
                tokens = f[alignment.feature_name(name, "tokens")]
                where = slice(at[name], at[name] + len(tokens))
                row[alignment.feature_name(name, "tokens")][where] = tokens
                row[alignment.feature_name(name, "byte_ends")][where] = f[
                    alignment.feature_name(name, "byte_ends")]
                row[alignment.feature_name(name, "segment_ids")][where] = segment
                row[alignment.feature_name(name, "positions")][where] = np.arange(len(tokens))
                at[name] += len(tokens)
        return row

    def get_state(self) -> list[str]:
        return [example.text for example in self.pending]

    def set_state(self, pending: list[str]) -> None:
        self.pending = [self.maker.from_text(str(text)) for text in pending]


class ExampleStream(Protocol):
    """Examples in a fixed order, with a JSON-able position (`get_state`/`set_state`)."""

    def next(self) -> Example | None: ...  # None: a record that makes no example

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: Mapping[str, Any]) -> None: ...


class BatchSource:
    """`next_batch` / `get_state` / `set_state` / `sequential` over an example stream.

    `open_stream(shuffle, num_epochs)` builds this process's stream; `sequential` opens an
    unshuffled one-epoch stream from the start. With `packed_rows` the stream gives finished
    rows ({feature: [length] array}) instead of examples, and nothing is packed here;
    `make_packer` builds another packer than `Packer` (e.g. `AlignedPacker`).
    """

    def __init__(self, kind: str, open_stream: Callable[[bool, int | None], ExampleStream], *,
                 length: int, batch_size: int, pack: bool, prompts: bool, shuffle: bool,
                 num_epochs: int | None, process_count: int, packed_rows: bool = False,
                 make_packer: Callable[[], Any] | None = None):
        if batch_size % process_count:
            raise ValueError(f"dataset.batch_size: expected a multiple of the "
                             f"{process_count} processes, got {batch_size}")
        self.kind, self.length = kind, length
        self.local_batch = batch_size // process_count
        self._open, self._pack, self._prompts = open_stream, pack, prompts
        self._packed_rows, self._make_packer = packed_rows, make_packer
        self.stream = open_stream(shuffle, num_epochs)
        self.packer = self._new_packer()
        self.batches = 0  # batches given since the start

    def _new_packer(self) -> Any:
        if self._packed_rows:
            return None
        if self._make_packer is not None:
            return self._make_packer()
        return Packer(self.length, pack=self._pack, prompts=self._prompts)

    def _batch(self, stream: ExampleStream, packer: Any) -> dict[str, np.ndarray]:
        if packer is None:
            rows = [stream.next() for _ in range(self.local_batch)]
        else:
            rows = [packer.next_row(stream.next) for _ in range(self.local_batch)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def next_batch(self) -> dict[str, np.ndarray]:
        try:
            batch = self._batch(self.stream, self.packer)
        except StopIteration:
            raise DataExhausted(f"dataset.num_epochs: the {self.kind} data ran out after "
                                f"{self.batches} batches; train fewer steps or allow more "
                                f"epochs") from None
        self.batches += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"source": self.kind, "batches": self.batches, "stream": self.stream.get_state(),
                "pending": [] if self.packer is None else self.packer.get_state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        check_state_kind(state, self.kind)
        self.stream.set_state(state["stream"])
        if self.packer is not None:
            self.packer.set_state(state["pending"])
        self.batches = int(state["batches"])

    def sequential(self, num_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Full batches of one unshuffled pass from the start (evaluation)."""
        stream, packer = self._open(False, 1), self._new_packer()
        given = 0
        while num_batches is None or given < num_batches:
            try:
                batch = self._batch(stream, packer)
            except StopIteration:
                return
            given += 1
            yield batch


class FileExamples:
    """Lines of files as examples, by blocks (see the module docstring)."""

    def __init__(self, paths: list[str], parse: Callable[[bytes, str], Example | None], *,
                 block_bytes: int, seed: int, shuffle: bool, num_epochs: int | None,
                 process_index: int, process_count: int):
        self.parse, self.seed, self.shuffle = parse, seed, shuffle
        self.num_epochs, self.process_index = num_epochs, process_index
        self.blocks: list[tuple[str, int, int]] = []  # (path, first byte, end byte)
        for path in paths:
            size = os.path.getsize(path)
            count = max(math.ceil(size / block_bytes), process_count)
            bounds = [size * i // count for i in range(count + 1)]
            self.blocks += [(path, bounds[i], bounds[i + 1])
                            for i in range(process_index, count, process_count)]
        self.epoch = self.block = self.taken = 0
        self._lines: list[bytes] | None = None
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            self._order = (np.random.default_rng([self.seed, self.process_index, self.epoch])
                           .permutation(len(self.blocks)) if self.shuffle
                           else np.arange(len(self.blocks)))
        return self._order

    def _read_block(self) -> list[bytes]:
        index = int(self._epoch_order()[self.block])
        path, lo, hi = self.blocks[index]
        with open(path, "rb") as fh:
            start = lo
            if lo > 0:  # the block's lines are those that start in [lo, hi)
                fh.seek(lo - 1)
                start = lo - 1 + len(fh.readline())
            data = fh.read(max(hi - start, 0)) if start < hi else b""
            if data and not data.endswith(b"\n"):
                data += fh.readline()
        lines = data.split(b"\n")
        if lines and not lines[-1]:
            lines.pop()
        if self.shuffle:
            order = np.random.default_rng(
                [self.seed, self.process_index, self.epoch, index]).permutation(len(lines))
            lines = [lines[i] for i in order]
        return lines

    def next(self) -> Example:
        passed = 0  # block ends passed without an example
        while True:
            if self.num_epochs is not None and self.epoch >= self.num_epochs:
                raise StopIteration
            if self._lines is None:
                self._lines = self._read_block()
            if self.taken < len(self._lines):
                line = self._lines[self.taken]
                self.taken += 1
                example = self.parse(line, self.blocks[int(self._epoch_order()[self.block])][0])
                if example is not None:
                    return example
                continue
            passed += 1
            if passed > len(self.blocks):
                raise ValueError(f"dataset.paths: process {self.process_index} found no "
                                 f"examples in its {len(self.blocks)} blocks of "
                                 f"{self.blocks[0][0]!r}...; use smaller dataset.block_bytes "
                                 f"or more data")
            self.block, self.taken, self._lines = self.block + 1, 0, None
            if self.block == len(self.blocks):
                self.epoch, self.block, self._order = self.epoch + 1, 0, None

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "block": self.block, "taken": self.taken}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.block, self.taken = (int(state[k]) for k in ("epoch", "block", "taken"))
        self._lines = self._order = None


def expand_paths(patterns: tuple[str, ...]) -> list[str]:
    """Files matching `patterns` (sorted per pattern, in pattern order)."""
    paths: list[str] = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern))
        if not found:
            raise ValueError(f"dataset.paths: expected existing files, got {pattern!r} which "
                             f"matches none")
        paths += [p for p in found if p not in paths]
    return paths


def example_maker(config) -> tuple[ExampleMaker | AlignedExampleMaker,
                                   Callable[[], AlignedPacker] | None]:
    """(maker, make_packer) for a `DatasetConfig`: an `ExampleMaker` with `vocabulary` and
    `make_packer=None` (`BatchSource` packs with `Packer`); or, with `augment_vocabularies`,
    an `AlignedExampleMaker` with `vocabulary` as the anchor's and each augment's own, and a
    `make_packer` that builds its `AlignedPacker`. The "text", "jsonl" and "tfds" sources (and
    "seqio" across tokenizers) make their examples and rows with these."""
    vocabulary = load_vocabulary(config.vocabulary)
    if not config.augment_vocabularies:
        return ExampleMaker(vocabulary, text_field=config.text_field,
                            inputs_field=config.inputs_field, add_eos=config.add_eos), None
    augments = {name: load_vocabulary(spec, f"dataset.augment_vocabularies[{name!r}]")
                for name, spec in config.augment_vocabularies.items()}
    maker = AlignedExampleMaker(vocabulary, augments, length=config.length,
                                augment_length=config.augment_length or config.length,
                                text_field=config.text_field, add_eos=config.add_eos)

    def make_packer() -> AlignedPacker:
        return AlignedPacker(maker, pack=config.pack)

    return maker, make_packer


def config_source(config, open_stream: Callable[[bool, int | None], ExampleStream], *,
                  process_count: int, make_packer: Callable[[], Any] | None = None,
                  packed_rows: bool = False) -> BatchSource:
    """The `BatchSource` of a `DatasetConfig` over the streams `open_stream` opens."""
    return BatchSource(config.source, open_stream, length=config.length,
                       batch_size=config.batch_size, pack=config.pack,
                       prompts=config.inputs_field is not None, shuffle=config.shuffle,
                       num_epochs=config.num_epochs, process_count=process_count,
                       packed_rows=packed_rows, make_packer=make_packer)


def file_source(config, *, process_index: int | None = None,
                process_count: int | None = None) -> BatchSource:
    """A `BatchSource` over the "text" or "jsonl" files of a `DatasetConfig`."""
    process_index, process_count = processes(process_index, process_count)
    paths = expand_paths(config.paths)
    maker, make_packer = example_maker(config)
    if config.source == "text":
        def parse(line: bytes, path: str) -> Any:
            text = line.decode("utf-8").rstrip("\r")
            return maker.from_text(text) if text.strip() else None
    else:
        def parse(line: bytes, path: str) -> Any:
            if not line.strip():
                return None
            record = json_object(line, f"dataset.paths: expected one JSON object per line of "
                                       f"{path}")
            return maker.from_dict(record, path)

    def open_stream(shuffle: bool, num_epochs: int | None) -> FileExamples:
        return FileExamples(paths, parse, block_bytes=config.block_bytes, seed=config.seed,
                            shuffle=shuffle, num_epochs=num_epochs,
                            process_index=process_index, process_count=process_count)

    return config_source(config, open_stream, process_count=process_count,
                         make_packer=make_packer)
