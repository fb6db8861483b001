"""Tokenizers of real pretrained models, usable with and without seqio.

`Tokenizer` is plain Python over one of two backends:

* a Hugging Face `tokenizers.Tokenizer` (a model's `tokenizer.json`, or one built from a GGUF
  file's embedded byte-level BPE vocabulary and merges: GPT-2, SmolLM2, Llama 3, Qwen2);
* a `sentencepiece.SentencePieceProcessor` (a model's `tokenizer.model`, or a SentencePiece
  model rebuilt from a GGUF file's `llama`-type vocabulary of pieces, scores and piece types:
  Llama 1/2, Gemma).

`encode` never adds EOS (seqio's convention: the feature converter appends it) and adds BOS
only when asked or when the model's own tokenizer does so by default (`add_bos`, e.g. Gemma).
`decode` drops special (control) tokens.

`encode_with_offsets(text)` gives the same ids and each token's byte span [start, end) in
`text.encode("utf-8")`, read from the tokens' own bytes (`token_bytes`): the spans tile the
text's bytes, or a `ValueError` says where the tokens' bytes leave the text (a tokenizer that
normalises its input). Tokens with no text (an added BOS) get an empty span at their place.
`calm_jax.alignment` aligns two tokenizers' streams of one text by these spans.

`Tokenizer.save(dir)` writes the backend file (`tokenizer.json` or `tokenizer.model`) plus
`calm_tokenizer.json` (special ids, `add_bos`); `Tokenizer.load(dir)` reads that back or
reads a Hugging Face model directory.

seqio and TensorFlow are optional: `seqio_vocabulary(tokenizer)` returns a
`calm_jax.seqio_utils.SeqioVocabulary`, a `seqio.Vocabulary`; importing this module never
imports TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Iterable, Sequence

META_FILE = "calm_tokenizer.json"

# SentencePiece / GGUF piece types (the same numbering in both).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split patterns of GGUF byte-level BPE vocabularies (`tokenizer.ggml.pre`).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
           r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
          r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# pre name -> (split digits one by one first, main pattern)
_BPE_PRE = {
    "default": (False, _GPT2), "gpt2": (False, _GPT2), "gpt-2": (False, _GPT2),
    "smollm": (True, _GPT2), "starcoder": (True, _GPT2), "refact": (True, _GPT2),
    "llama-bpe": (False, _LLAMA3), "llama3": (False, _LLAMA3), "qwen2": (False, _QWEN2),
}


class _HFBackend:
    kind = "tokenizer.json"

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def piece_to_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def id_to_piece(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def serialized(self) -> bytes:
        return self.tok.to_str().encode("utf-8")

    def save(self, directory: str) -> None:
        self.tok.save(os.path.join(directory, "tokenizer.json"))

    def token_bytes(self, i: int) -> bytes:
        """The bytes token i stands for: a byte-level BPE piece mapped back to bytes, an added
        token's own text."""
        if not hasattr(self, "_added"):
            spec = json.loads(self.tok.to_str())
            decoder = spec.get("decoder") or {}
            kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
            if "ByteLevel" not in kinds:
                raise ValueError(f"token_bytes: expected a byte-level BPE tokenizer.json "
                                 f"(decoder ByteLevel), got decoder {sorted(map(str, kinds))}")
            self._added = {i: t.content for i, t in self.tok.get_added_tokens_decoder().items()}
        if i in self._added:
            return self._added[i].encode("utf-8")
        piece = self.tok.id_to_token(i)
        if piece is None:
            raise ValueError(f"token_bytes: expected an id in [0, {self.vocab_size()}), got {i}")
        table = _byte_level_table()
        try:
            return bytes(table[ch] for ch in piece)
        except KeyError:
            raise ValueError(f"token_bytes: piece {piece!r} of id {i} is not byte-level "
                             f"encoded") from None

    def chunks(self, text: str) -> list[tuple[str, list[int]]]:
        return [(text, self.encode(text))]

    dummy_prefix = False


def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's printable character for every byte, inverted: {char: byte}. Bytes
    that are printable Latin-1 (33-126, 161-172, 174-255) stand for themselves; the others
    take the characters 256, 257, ... in byte order."""
    global _BYTE_LEVEL
    if _BYTE_LEVEL is None:
        keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
        kept = set(keep)
        chars, extra = {}, 0
        for b in range(256):
            if b in kept:
                chars[chr(b)] = b
            else:
                chars[chr(256 + extra)] = b
                extra += 1
        _BYTE_LEVEL = chars
    return _BYTE_LEVEL


_BYTE_LEVEL: dict[str, int] | None = None


def _trie_pattern(words: Iterable[str]) -> str:
    """A regex matching the longest of `words` at a position (a trie, so scanning is fast)."""
    trie: dict = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict) -> str:
        branches = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return emit(trie)


class _SPBackend:
    """SentencePiece, with control and user-defined pieces matched in the raw text first.

    This is what llama.cpp and Hugging Face do (SentencePiece itself would only match
    user-defined pieces after escaping spaces, and never control pieces): "<start_of_turn>"
    becomes one id, and a GGUF's user-defined whitespace runs ("  ") are found.
    """

    kind = "tokenizer.model"

    def __init__(self, proto: bytes):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        self.proto = proto
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        model = pb.ModelProto.FromString(proto)
        self.special = {p.piece: i for i, p in enumerate(model.pieces)
                        if p.type in (_CONTROL, _USER_DEFINED) and p.piece}
        self.splitter = re.compile(_trie_pattern(self.special)) if self.special else None
        # Whether SentencePiece puts a space before each text it encodes.
        self.dummy_prefix = model.normalizer_spec.add_dummy_prefix

    def encode(self, text: str) -> list[int]:
        return [i for _, ids in self.chunks(text) for i in ids]

    def chunks(self, text: str) -> list[tuple[str, list[int]]]:
        """(piece of text, its ids) in order: the text between special pieces goes through
        SentencePiece on its own (each such piece takes the dummy prefix, if any)."""
        if self.splitter is None:
            return [(text, list(self.sp.encode(text)))]
        out: list[tuple[str, list[int]]] = []
        start = 0
        for match in self.splitter.finditer(text):
            if match.start() > start:
                chunk = text[start:match.start()]
                out.append((chunk, list(self.sp.encode(chunk))))
            out.append((match.group(), [self.special[match.group()]]))
            start = match.end()
        if start < len(text):
            out.append((text[start:], list(self.sp.encode(text[start:]))))
        return out


    def token_bytes(self, i: int) -> bytes:
        """The bytes piece i stands for: "\u2581" is a space, <0xNN> byte pieces one byte,
        control and user-defined pieces their own text."""
        if not 0 <= i < self.vocab_size():
            raise ValueError(f"token_bytes: expected an id in [0, {self.vocab_size()}), got {i}")
        piece = self.sp.id_to_piece(i)
        if self.sp.is_byte(i):
            return bytes([int(piece[3:-1], 16)])
        if self.sp.is_control(i) or piece in self.special:
            return piece.encode("utf-8")
        return piece.replace("\u2581", " ").encode("utf-8")

    def decode(self, ids: Sequence[int], skip_special: bool) -> str:
        del skip_special  # SentencePiece always drops control pieces when decoding
        return self.sp.decode(list(ids))

    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def piece_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    def id_to_piece(self, i: int) -> str | None:
        return self.sp.id_to_piece(i)

    def serialized(self) -> bytes:
        return self.proto

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, "tokenizer.model"), "wb") as fh:
            fh.write(self.proto)


class ByteTokenizer:
    """UTF-8 bytes as token ids, those of seqio's `ByteVocabulary` (PAD 0, EOS 1, UNK 2, byte b
    -> b + 3): the vocabulary of the key-value experiment's models (`tasks.byte_data`), which
    needs neither seqio nor a tokenizer file. `decode` stops at the first EOS and skips PAD and
    UNK, as `ByteVocabulary` does."""

    pad_id, eos_id, unk_id, bos_id = 0, 1, 2, None
    offset = 3
    vocab_size = 256 + offset  # 259; the models' embedding tables are padded to 384

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def token_bytes(self, ids: Iterable[int]) -> list[bytes]:
        """Each id's byte (b"" for PAD, EOS, UNK and ids past the bytes)."""
        return [bytes([i - self.offset]) if self.offset <= i < self.vocab_size else b""
                for i in map(int, ids)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text)` and each token's byte span: byte k is token k, span (k, k + 1)."""
        ids = self.encode(text)
        return ids, [(k, k + 1) for k in range(len(ids))]

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        del skip_special  # PAD, EOS and UNK have no bytes
        out = bytearray()
        for i in map(int, ids):
            if i == self.eos_id:
                break
            if self.offset <= i < self.vocab_size:
                out.append(i - self.offset)
        return out.decode("utf-8", errors="ignore")


class Tokenizer:
    """A model's tokenizer: `encode(text) -> ids`, `decode(ids) -> text`, special ids.

    Attributes:
      bos_id, eos_id, pad_id, unk_id: special token ids (None when the model has none).
      add_bos: whether the model expects BOS at the start of a sequence (`encode`'s default).
      vocab_size: number of token ids the tokenizer can produce (the model's embedding table
        may be larger, e.g. padded).
    """

    def __init__(self, backend: Any, *, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, unk_id: int | None = None, add_bos: bool = False):
        self._backend = backend
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.add_bos = bool(add_bos)
        if self.add_bos and bos_id is None:
            raise ValueError("add_bos: expected False when the tokenizer has no BOS token")
        n = self.vocab_size
        for name in ("bos_id", "eos_id", "pad_id", "unk_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < n:
                raise ValueError(f"{name}: expected an id in [0, {n}), got {value}")

    # Core API ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size()

    @property
    def backend_kind(self) -> str:
        """"tokenizer.json" (Hugging Face tokenizers) or "tokenizer.model" (SentencePiece)."""
        return self._backend.kind

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        ids = self._backend.encode(text)
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos: this tokenizer has no BOS token")
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special)

    def token_bytes(self, ids: Iterable[int]) -> list[bytes]:
        """Each token's bytes as it stands in text; special tokens give their own text (as
        `encode` finds them in text). The concatenation is the text the ids spell (before a
        SentencePiece dummy prefix is removed); byte-level BPE tokens may hold part of a UTF-8
        character."""
        return [self._backend.token_bytes(i) for i in map(int, ids)]

    def encode_with_offsets(self, text: str, *, add_bos: bool | None = None
                            ) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text)` and each token's byte span (start, end) in `text.encode("utf-8")`.

        The spans are contiguous and cover every byte of the text; an added BOS has the empty
        span (0, 0). Raises ValueError naming the tokenizer and the byte where its tokens' bytes
        differ from the text's (a normalising tokenizer: lower-casing, Unicode normalisation,
        dropped characters).
        """
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos: this tokenizer has no BOS token")
            ids.append(self.bos_id)
            spans.append((0, 0))
        pos = 0
        for chunk, chunk_ids in self._backend.chunks(text):
            want = chunk.encode("utf-8")
            pieces = self.token_bytes(chunk_ids)
            got = b"".join(pieces)
            skip = 1 if self._backend.dummy_prefix and got[:1] == b" " else 0
            if got[skip:] != want:
                at = next((k for k, (a, b) in enumerate(zip(got[skip:], want)) if a != b),
                          min(len(got) - skip, len(want)))
                raise ValueError(
                    f"{self!r}: its tokens do not spell the text (the tokenizer changes it): "
                    f"at byte {pos + at} the tokens give {got[skip + at:skip + at + 12]!r}, "
                    f"the text {want[at:at + 12]!r}")
            for i, piece in zip(chunk_ids, pieces):
                n = max(len(piece) - skip, 0)
                skip = max(skip - len(piece), 0)
                ids.append(i)
                spans.append((pos, pos + n))
                pos += n
        return ids, spans

    def piece_to_id(self, piece: str) -> int | None:
        return self._backend.piece_to_id(piece)

    def id_to_piece(self, i: int) -> str | None:
        return self._backend.id_to_piece(int(i))

    def fingerprint(self) -> str:
        """sha256 of the backend model and the special ids (equal tokenizers, equal prints)."""
        h = hashlib.sha256(self._backend.serialized())
        h.update(json.dumps(self._meta(), sort_keys=True).encode())
        return h.hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.fingerprint() == other.fingerprint()

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def __repr__(self) -> str:
        return (f"Tokenizer({self.backend_kind}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id}, "
                f"add_bos={self.add_bos})")

    # Saving and loading -----------------------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        return {"backend": self.backend_kind, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "pad_id": self.pad_id, "unk_id": self.unk_id, "add_bos": self.add_bos}

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self._backend.save(directory)
        with open(os.path.join(directory, META_FILE), "w") as fh:
            json.dump(self._meta(), fh, indent=2)

    @classmethod
    def load(cls, directory: str) -> "Tokenizer":
        """A directory written by `save`, or a Hugging Face model directory."""
        meta_path = os.path.join(directory, META_FILE)
        if os.path.exists(meta_path):
            with open(meta_path) as fh:
                meta = json.load(fh)
            backend = _load_backend(directory, meta.get("backend"))
            return cls(backend, **{k: meta.get(k) for k in
                                   ("bos_id", "eos_id", "pad_id", "unk_id")},
                       add_bos=bool(meta.get("add_bos", False)))
        return cls.from_hf_dir(directory)

    @classmethod
    def from_hf_dir(cls, directory: str) -> "Tokenizer":
        """tokenizer.json (preferred) or tokenizer.model, with ids from the config files."""
        backend = _load_backend(directory, None)
        configs = {}
        for name in ("config.json", "generation_config.json", "tokenizer_config.json",
                     "special_tokens_map.json"):
            path = os.path.join(directory, name)
            if os.path.exists(path):
                with open(path) as fh:
                    configs[name] = json.load(fh)

        def token_id(kind: str) -> int | None:
            for name in ("generation_config.json", "config.json"):
                value = configs.get(name, {}).get(f"{kind}_token_id")
                if isinstance(value, list):
                    value = value[0] if value else None
                if value is not None:
                    return int(value)
            for name in ("tokenizer_config.json", "special_tokens_map.json"):
                value = configs.get(name, {}).get(f"{kind}_token")
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str) and backend.piece_to_id(value) is not None:
                    return backend.piece_to_id(value)
            return None

        ids = {f"{kind}_id": token_id(kind) for kind in ("bos", "eos", "pad", "unk")}
        add_bos = configs.get("tokenizer_config.json", {}).get("add_bos_token")
        if add_bos is None:
            add_bos = _template_adds_bos(backend, ids["bos_id"])
        return cls(backend, add_bos=bool(add_bos) and ids["bos_id"] is not None, **ids)

    @classmethod
    def from_gguf(cls, path_or_file: Any) -> "Tokenizer":
        """The tokenizer embedded in a GGUF file (`tokenizer.ggml.*` metadata)."""
        from calm_jax.convert.gguf_file import GGUFFile

        f = path_or_file if isinstance(path_or_file, GGUFFile) else GGUFFile(path_or_file)
        meta = f.metadata
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError(f"{f.path}: no embedded tokenizer (tokenizer.ggml.tokens missing)")
        types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
        ids = {}
        for kind, key in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"),
                          ("pad_id", "padding_token_id"), ("unk_id", "unknown_token_id")):
            value = meta.get(f"tokenizer.ggml.{key}")
            ids[kind] = None if value is None else int(value)
        if model == "gpt2":
            backend = _bpe_from_gguf(f, tokens, types)
            add_bos = meta.get("tokenizer.ggml.add_bos_token", False)
        elif model == "llama":
            backend = _sentencepiece_from_gguf(f, tokens, types, ids)
            add_bos = meta.get("tokenizer.ggml.add_bos_token", True)
        else:
            raise ValueError(f"{f.path}: tokenizer.ggml.model: expected 'gpt2' or 'llama', "
                             f"got {model!r}")
        return cls(backend, add_bos=bool(add_bos) and ids["bos_id"] is not None, **ids)


def _load_backend(directory: str, kind: str | None):
    json_path = os.path.join(directory, "tokenizer.json")
    model_path = os.path.join(directory, "tokenizer.model")
    if kind in (None, "tokenizer.json") and os.path.exists(json_path):
        from tokenizers import Tokenizer as HFTokenizer

        return _HFBackend(HFTokenizer.from_file(json_path))
    if kind in (None, "tokenizer.model") and os.path.exists(model_path):
        with open(model_path, "rb") as fh:
            return _SPBackend(fh.read())
    raise ValueError(f"{directory}: no tokenizer.json or tokenizer.model found")


def _template_adds_bos(backend: Any, bos_id: int | None) -> bool:
    """Whether a tokenizer.json's post-processor puts BOS first (Llama 3 does)."""
    if bos_id is None or not isinstance(backend, _HFBackend):
        return False
    ids = backend.tok.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos_id


def _bpe_from_gguf(f: Any, tokens: list[str], types: list[int]) -> _HFBackend:
    """Byte-level BPE (GPT-2 style) from GGUF tokens, merges and pre-tokenizer name."""
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    pre = f.metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _BPE_PRE:
        raise ValueError(f"{f.path}: tokenizer.ggml.pre: expected one of {sorted(_BPE_PRE)}, "
                         f"got {pre!r}")
    merges = f.metadata.get("tokenizer.ggml.merges")
    if merges is None:
        raise ValueError(f"{f.path}: byte-level BPE tokenizer without tokenizer.ggml.merges")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    digits, pattern = _BPE_PRE[pre]
    steps = []
    if digits:
        steps.append(pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"))
    steps.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    return _HFBackend(tok)


def _sentencepiece_from_gguf(f: Any, tokens: list[str], types: list[int],
                             ids: dict[str, int | None]) -> _SPBackend:
    """A SentencePiece BPE model proto from GGUF pieces, scores and types."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    scores = f.metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    m = pb.ModelProto()
    unk = ids.get("unk_id")
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        if not piece:
            raise ValueError(f"{f.path}: tokenizer.ggml.tokens[{i}] is empty")
        p = m.pieces.add()
        p.piece, p.score = piece, float(score)
        # SentencePiece needs exactly one UNKNOWN piece; GGUF files often mark it CONTROL.
        if i == unk:
            kind = _UNKNOWN
        elif kind == _UNKNOWN:
            kind = _CONTROL
        p.type = kind
    if unk is None:
        raise ValueError(f"{f.path}: SentencePiece tokenizer without "
                         f"tokenizer.ggml.unknown_token_id")
    spec = m.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = any(t == _BYTE for t in types)
    for kind in ("unk", "bos", "eos", "pad"):
        value = ids.get(f"{kind}_id")
        setattr(spec, f"{kind}_id", -1 if value is None else value)
        if value is not None:
            setattr(spec, f"{kind}_piece", tokens[value])
    norm = m.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(f.metadata.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return _SPBackend(m.SerializeToString())


# seqio ------------------------------------------------------------------------------------------


def seqio_vocabulary(tokenizer: Tokenizer, extra_ids: int = 0):
    """A `seqio.Vocabulary` for `tokenizer` (`calm_jax.seqio_utils`; imports TensorFlow)."""
    from calm_jax.seqio_utils import SeqioVocabulary

    return SeqioVocabulary(tokenizer, extra_ids=extra_ids)
